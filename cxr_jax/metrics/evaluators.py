"""Pluggable streaming evaluators, chosen by `config.eval.evaluators` (comma-separated names).

Every evaluator takes the valid examples of one evaluation batch at a time (`update`), as numpy
arrays from the eval step: `scores` (B, K), optional `cams` (B, h, w, K), the label fields
(`labels`, `label_mask`, `fine_labels`, `fine_label_mask`), `boxes` (B, M, 4), `box_labels`
(B, M) and `index` (B,). It keeps only what its metric needs (per-example scores, or per
(image, class) numbers for localization), never a split's maps. Then `result()` is its JSON
report and `scalars()` its flat numbers for logs and best-checkpoint ranking.

  classification     per-class AUC, AUPRC, patient-level bootstrap CIs, over the task's targets
  ham_localization   HAM's protocol: thresholded normalised CAM vs box masks, T(IoU), T(IoR)
  wang_localization  Wang et al.'s: CAM boxes at levels 60/180 of 255, T(IoU), T(IoBB), AFP
  location_accuracy  location-aware tasks: side and zone accuracy among positives per finding
  segmentation       anatomy tasks (a segmenter): Dice and IoU per region of the argmax maps
Localization evaluators run where the method returns `cams` and the split has boxes. An anatomy
task's `scores` are per pixel (B, H, W, K) and its batches carry the true `anatomy` maps.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cxr_jax.data import labels
from cxr_jax.metrics import classification, localization, location_aware, segmentation

LOCALIZATION = ("ham_localization", "wang_localization")
EVALUATORS = ("classification", *LOCALIZATION, "location_accuracy", "segmentation")


def parse(names: str) -> tuple[str, ...]:
  """The evaluator names of `config.eval.evaluators`, checked."""
  parsed = tuple(n.strip() for n in names.split(",") if n.strip())
  unknown = [n for n in parsed if n not in EVALUATORS]
  if unknown or not parsed:
    raise ValueError(f"{names!r}: name one or more of {list(EVALUATORS)}")
  return parsed


class Classification:
  """Per-class AUC/AUPRC of the task's targets, streamed as (N, K) scores, targets and masks.

  The report (and its mean AUC) covers the classes at `columns` (None: all), such as CheXpert's 5
  competition labels of a model that learns 14; `predictions()` keeps every class. With
  `study_ids` (one per record of the split) and `study_pool` ("max" or "mean"), the report scores
  studies, each image's scores pooled over its study (`classification.pool_by_study`).
  """

  def __init__(self, target: str, mask_key: str, class_names: Sequence[str], *,
               patient_ids: Sequence[str] | None = None, n_boot: int = 0, seed: int = 0,
               columns: Sequence[int] | None = None, study_ids: Sequence[str] | None = None,
               study_pool: str = ""):
    self.target, self.mask_key, self.class_names = target, mask_key, list(class_names)
    self.patient_ids, self.n_boot, self.seed = patient_ids, n_boot, seed
    self.columns = list(range(len(self.class_names))) if columns is None else list(columns)
    if study_pool and study_ids is None:
      raise ValueError(f"study-level evaluation ({study_pool}) needs the records' study ids")
    self.study_ids, self.study_pool = study_ids, study_pool
    self._parts: dict[str, list[np.ndarray]] = {"scores": [], "targets": [], "mask": [],
                                                "index": []}

  def update(self, batch: Mapping[str, np.ndarray]) -> None:
    """Keeps the batch's scores, targets, masks and record indices."""
    for key, source in (("scores", "scores"), ("targets", self.target),
                        ("mask", self.mask_key), ("index", "index")):
      self._parts[key].append(np.asarray(batch[source]))

  def predictions(self) -> dict[str, np.ndarray]:
    """Everything seen, in record-index order: scores, targets, mask (N, K) and index (N,)."""
    if not self._parts["index"]:
      empty = np.zeros((0, len(self.class_names)), np.float32)
      return dict(scores=empty, targets=empty, mask=empty, index=np.zeros((0,), np.int32))
    merged = {k: np.concatenate(v) for k, v in self._parts.items()}
    order = np.argsort(merged["index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}

  def result(self) -> dict[str, Any]:
    p = self.predictions()
    c = self.columns
    scores, targets, mask = p["scores"][:, c], p["targets"][:, c], p["mask"][:, c]
    rows = p["index"].astype(np.int64)
    if self.study_pool:
      scores, targets, mask, first = classification.pool_by_study(
          scores, targets, mask, np.asarray(self.study_ids)[rows], self.study_pool)
      rows = rows[first]
    patients = None if self.patient_ids is None else np.asarray(self.patient_ids)[rows]
    report = classification.evaluate_predictions(
        scores, targets, mask, [self.class_names[k] for k in c], patient_ids=patients,
        n_boot=self.n_boot, seed=self.seed)
    return dict(report, unit=f"study ({self.study_pool})" if self.study_pool else "image")

  def scalars(self, report: Mapping[str, Any] | None = None) -> dict[str, float]:
    report = report or self.result()
    values = {"mean_auc": report["mean_auc"]}
    values.update({f"auc/{name}": c["auc"] for name, c in report["classes"].items()})
    return {k: float("nan") if v is None else float(v) for k, v in values.items()}


class _Localization:
  """Adapts a `cxr_jax.metrics.localization` accumulator to the evaluator interface; boxes of
  classes outside `classes` (indices; None: all) are left out, as padding is."""

  def __init__(self, accumulator, classes: Sequence[int] | None = None):
    self.accumulator = accumulator
    self.classes = None if classes is None else np.asarray(classes)

  def update(self, batch: Mapping[str, np.ndarray]) -> None:
    box_labels = batch["box_labels"]
    if self.classes is not None:
      box_labels = np.where(np.isin(box_labels, self.classes), box_labels, -1)
    self.accumulator.update(batch["cams"], batch["boxes"], box_labels,
                            np.ones(len(batch["cams"]), np.float32))

  def result(self) -> dict[str, Any]:
    return self.accumulator.result()

  def scalars(self, report: Mapping[str, Any] | None = None) -> dict[str, float]:
    del report
    return self.accumulator.scalars()


class _Segmentation(_Localization):
  """Dice and IoU of an anatomy task's per-pixel scores against the true maps."""

  def update(self, batch: Mapping[str, np.ndarray]) -> None:
    self.accumulator.update(batch["scores"], batch["anatomy"])


# The summary number of each primary evaluator's report.
HEADLINE = {"classification": "mean_auc", "segmentation": "mean_dice"}


def primary(task: Any) -> str:
  """The evaluator every evaluation of the task runs: segmentation for a segmenter, else
  classification."""
  return "segmentation" if task.target == "anatomy" else "classification"


class _LocationAccuracy(_Localization):
  """Side and zone accuracy of a location-aware (fine-label) task."""

  def update(self, batch: Mapping[str, np.ndarray]) -> None:
    self.accumulator.update(batch["scores"], batch["fine_labels"], batch["fine_label_mask"],
                            np.ones(len(batch["scores"]), np.float32))


def build(names: Sequence[str], task: Any, eval_config: Mapping[str, Any], *, image_size: int,
          has_cams: bool, has_boxes: bool, patient_ids: Sequence[str] | None = None,
          study_ids: Sequence[str] | None = None, n_boot: int = 0,
          seed: int = 0) -> dict[str, Any]:
  """The evaluators `names` for one split; localization ones only where they can run.

  Args:
    names: evaluator names (see `parse`).
    task: the run's `cxr_jax.methods.Task`.
    eval_config: `config.eval` (thresholds, levels; `classes` and `localization_classes`: the
      class names classification and localization are reported on, comma-separated; empty: every
      class, or every class with boxes; `study_level`: "", "max" or "mean").
    image_size: side of the evaluated images (maps are compared with boxes at this size).
    has_cams: whether the method returns `cams`.
    has_boxes: whether the split has boxes.
    patient_ids: patient of each record of the split, for the bootstrap.
    study_ids: study of each record of the split, for study-level evaluation.
    n_boot: bootstrap resamples (0: none); seed: their seed.

  Raises:
    ValueError: an evaluator that does not fit the task (localization needs the finding labels
      that boxes name; location accuracy needs fine labels).
  """
  evaluators = {}
  located = class_indices(eval_config, "localization_classes", task.class_names)
  classified = class_indices(eval_config, "classes", task.class_names)
  for name in names:
    if (name == "segmentation") != (task.target == "anatomy"):
      raise ValueError(f"evaluator {name!r} does not fit a task learning {task.target}: a "
                       "segmenter (data.target=anatomy) is evaluated by 'segmentation' only")
    if name in LOCALIZATION and task.target != "labels":
      raise ValueError(f"{name} compares maps of the finding labels with their boxes; the task "
                       f"learns {task.target}")
    if name == "location_accuracy" and task.target != "fine_labels":
      raise ValueError("location_accuracy needs a location-aware task (config.data.target="
                       "fine_labels)")
    if name in LOCALIZATION and not (has_cams and has_boxes):
      continue
    if name == "classification":
      evaluators[name] = Classification(task.target, task.mask_key, task.class_names,
                                        patient_ids=patient_ids, n_boot=n_boot, seed=seed,
                                        columns=classified, study_ids=study_ids,
                                        study_pool=eval_config.get("study_level", ""))
    elif name == "ham_localization":
      evaluators[name] = _Localization(localization.HamLocalization(
          task.class_names, image_size, threshold=eval_config["ham_threshold"]), located)
    elif name == "wang_localization":
      evaluators[name] = _Localization(localization.WangLocalization(
          task.class_names, image_size, levels=tuple(eval_config["wang_levels"])), located)
    elif name == "segmentation":
      evaluators[name] = _Segmentation(segmentation.SegmentationAccumulator(task.class_names))
    else:
      evaluators[name] = _LocationAccuracy(location_aware.LocationAccuracy(task.class_names))
  return evaluators


def class_indices(eval_config: Mapping[str, Any], field: str,
                  class_names: Sequence[str]) -> list[int] | None:
  """Indices of the comma-separated class names of `config.eval.<field>`, in the task's spelling
  (`labels.canonical`: "Pleural Effusion" is Effusion); None (every class) when empty."""
  chosen = [labels.canonical(n) for n in eval_config.get(field, "").split(",") if n.strip()]
  unknown = [n for n in chosen if n not in class_names]
  if unknown:
    raise ValueError(f"config.eval.{field} names {unknown}, not classes of the task "
                     f"{list(class_names)}")
  return [list(class_names).index(n) for n in chosen] or None


def needs_cams(evaluators: Mapping[str, Any]) -> bool:
  """Whether any of the evaluators reads class activation maps."""
  return any(name in LOCALIZATION for name in evaluators)
