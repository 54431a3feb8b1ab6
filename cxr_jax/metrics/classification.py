"""Classification metrics on the host: exact ROC AUC, AUPRC, their report and its table.

Inputs are numpy arrays of shape (N, K): scores (probabilities or logits; only their order
matters), targets (1 positive, 0 negative) and an optional mask (true where the label counts for
that example). Non-finite targets (the schema's NaN "unknown") are always masked out; anything
else that is counted must be 0 or 1, so an uncertain -1 must be mapped or masked by the caller.

Conventions follow sklearn and CXR practice (CheXNet-style per-class AUROC and its mean):
- AUC counts a tied positive/negative pair as 1/2 (`roc_auc_score`, Mann-Whitney U with average
  ranks). A class with only one kind of target has AUC NaN and is left out of the mean, which is
  the unweighted mean over the remaining classes.
- AUPRC is step-wise average precision with tied scores entering together
  (`average_precision_score`).
- Confidence intervals come from `cxr_jax.metrics.bootstrap`, a patient-level percentile
  bootstrap that shares the exact AUC engine used here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cxr_jax.metrics import bootstrap


def _one_class(scores, targets) -> tuple[np.ndarray, np.ndarray]:
  """Checked (n,) float scores and 0/1 targets of one class."""
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
  if scores.ndim != 1 or scores.shape != targets.shape:
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (n,)")
  bootstrap.check_binary(targets)
  return scores, targets


def roc_auc(scores: Sequence[float], targets: Sequence[float]) -> float:
  """Exact ROC AUC of one class, ties as in sklearn's `roc_auc_score`.

  Args:
    scores: (n,) finite scores; higher means more likely positive.
    targets: (n,) 0/1 targets.

  Returns:
    The probability that a random positive outscores a random negative (ties count 1/2), or NaN
    when the targets hold only one class.
  """
  scores, targets = _one_class(scores, targets)
  ranking = bootstrap.rank(scores, targets)
  unit_weights = np.ones((len(scores), 1), np.float32)
  return float(bootstrap.weighted_auc(unit_weights, ranking, bootstrap.Scratch())[0])


def average_precision(scores: Sequence[float], targets: Sequence[float]) -> float:
  """Area under the precision-recall curve as sklearn's `average_precision_score` computes it.

  Sum over score thresholds (high to low) of the recall gained times the precision there; tied
  scores form one threshold.

  Args:
    scores: (n,) finite scores; higher means more likely positive.
    targets: (n,) 0/1 targets.

  Returns:
    Average precision, or NaN when there is no positive (precision-recall is undefined).
  """
  scores, targets = _one_class(scores, targets)
  order, starts = bootstrap.tie_groups(scores)
  n_pos = np.count_nonzero(targets)
  if n_pos == 0:
    return float("nan")
  pos = np.add.reduceat(targets[order].astype(np.int64), starts)
  # Thresholding at a group's score keeps that group and every group above it.
  true_pos = np.cumsum(pos[::-1])[::-1]
  kept = len(scores) - starts
  return float(np.sum(pos * true_pos / kept) / n_pos)


def per_class_auc(scores, targets, mask=None) -> np.ndarray:
  """ROC AUC of every class over the examples where it counts.

  Args:
    scores: (N, K) scores.
    targets: (N, K) 0/1 targets; NaN marks an unknown label, which is not counted.
    mask: optional, broadcastable to (N, K); true (or 1) where the label counts. Masks out
      ignored uncertain labels and padded evaluation examples.

  Returns:
    (K,) float64 AUCs, NaN for a class whose counted targets hold only one class.
  """
  scores, targets, mask = bootstrap.prepare_inputs(scores, targets, mask)
  return np.array([roc_auc(scores[m, k], targets[m, k]) for k, m in enumerate(mask.T)])


def per_class_average_precision(scores, targets, mask=None) -> np.ndarray:
  """AUPRC of every class over the examples where it counts (arguments as `per_class_auc`).

  Returns:
    (K,) float64 average precisions, NaN for a class without a counted positive.
  """
  scores, targets, mask = bootstrap.prepare_inputs(scores, targets, mask)
  return np.array([average_precision(scores[m, k], targets[m, k]) for k, m in enumerate(mask.T)])


def mean_auc(aucs: Sequence[float]) -> tuple[float, np.ndarray]:
  """Unweighted mean over the classes with a defined AUC.

  Args:
    aucs: (K,) per-class AUCs, NaN where a class was single-valued.

  Returns:
    (mean, skipped): the mean of the finite AUCs (NaN if none) and the indices of the classes
    left out.
  """
  aucs = np.asarray(aucs, np.float64)
  defined = np.isfinite(aucs)
  mean = float(aucs[defined].mean()) if defined.any() else float("nan")
  return mean, np.flatnonzero(~defined)


STUDY_POOLS = ("max", "mean")


def pool_by_study(scores, targets, mask, study_ids: Sequence[str],
                  how: str = "max") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One row per study from (N, K) image rows: the images' scores pooled (`how`: "max", as the
  CheXpert paper takes over a study's views, or "mean"), a class's target positive when any of
  its known image targets is, known when any image's is.

  Returns:
    (scores, targets, mask, first) with one row per study in order of first appearance; `first`
    (S,) is each study's first image row (to find its patient).
  """
  if how not in STUDY_POOLS:
    raise ValueError(f"study pooling {how!r}: choose from {STUDY_POOLS}")
  scores, targets, mask = (np.asarray(a, np.float64) for a in (scores, targets, mask))
  _, first, group = np.unique(np.asarray(study_ids), return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")  # studies in order of first appearance
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  group = rank[group.reshape(-1)]
  shape = (len(order), scores.shape[1])
  known = mask > 0
  pooled_mask = np.zeros(shape)
  np.maximum.at(pooled_mask, group, known.astype(np.float64))
  pooled_targets = np.zeros(shape)
  np.maximum.at(pooled_targets, group, np.where(known, targets, 0.0))
  if how == "max":
    pooled = np.full(shape, -np.inf)
    np.maximum.at(pooled, group, scores)
  else:
    pooled = np.zeros(shape)
    np.add.at(pooled, group, scores)
    pooled /= np.bincount(group, minlength=len(order))[:, None]
  return pooled, pooled_targets, pooled_mask, first[order]


def json_float(value) -> float | None:
  """A float for JSON, with NaN (and infinities) as None: strict JSON has neither."""
  value = float(value)
  return value if np.isfinite(value) else None


def _json_ci(ci) -> list[float | None]:
  return [json_float(bound) for bound in ci]


def evaluate_predictions(scores, targets, mask, label_names: Sequence[str], patient_ids=None, *,
                         n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
  """The classification report the trainer and `cxr_jax.evaluate` print and save as JSON.

  Args:
    scores, targets, mask: as in `per_class_auc` (mask may be None).
    label_names: K class names, in column order.
    patient_ids: optional (N,) patient ids for the patient-level bootstrap.
    n_boot: bootstrap resamples; 0 skips the bootstrap (intervals are None).
    level: interval coverage.
    seed: bootstrap seed.

  Returns:
    A JSON-ready dict (undefined values are None):
      classes: {name: {auc, auc_ci: [lo, hi], auprc, n_pos, n_neg, n_boot_used}} in column
        order, n_boot_used being the resamples in which the class had both targets;
      mean_auc, mean_auc_ci, mean_auc_n_boot_used, skipped (names left out of the mean),
      n_examples (examples counted for at least one class), n_patients (None without ids),
      bootstrap: {n_boot, level, seed, unit ("patient" or "image")}.
  """
  label_names = list(label_names)
  scores, targets, mask = bootstrap.prepare_inputs(scores, targets, mask)
  if len(label_names) != scores.shape[1] or len(set(label_names)) != len(label_names):
    raise ValueError(f"need {scores.shape[1]} distinct label names, got {label_names}")
  aucs = per_class_auc(scores, targets, mask)
  auprcs = per_class_average_precision(scores, targets, mask)
  mean, skipped = mean_auc(aucs)
  n_pos = (targets * mask).sum(axis=0)
  n_neg = mask.sum(axis=0) - n_pos
  n_classes = len(label_names)
  class_ci, mean_ci = [None] * n_classes, None
  class_n_used, mean_n_used = [0] * n_classes, 0
  if n_boot:
    boot = bootstrap.bootstrap_auc(scores, targets, mask, patient_ids, n_boot=n_boot,
                                   level=level, seed=seed)
    class_ci, mean_ci = [_json_ci(ci) for ci in boot.class_ci], _json_ci(boot.mean_ci)
    class_n_used, mean_n_used = boot.class_n_used.tolist(), boot.mean_n_used
  counted = mask.any(axis=1)
  n_patients = None
  if patient_ids is not None:
    n_patients = int(np.unique(np.asarray(patient_ids)[counted]).size)
  classes = {}
  for k, name in enumerate(label_names):
    classes[name] = {
        "auc": json_float(aucs[k]),
        "auc_ci": class_ci[k],
        "auprc": json_float(auprcs[k]),
        "n_pos": int(n_pos[k]),
        "n_neg": int(n_neg[k]),
        "n_boot_used": class_n_used[k],
    }
  return {
      "classes": classes,
      "mean_auc": json_float(mean),
      "mean_auc_ci": mean_ci,
      "mean_auc_n_boot_used": mean_n_used,
      "skipped": [label_names[k] for k in skipped],
      "n_examples": int(counted.sum()),
      "n_patients": n_patients,
      "bootstrap": {"n_boot": n_boot, "level": level, "seed": seed,
                    "unit": "image" if patient_ids is None else "patient"},
  }


def format_value(value: float | None) -> str:
  """A report value for a text table: 3 decimals, "n/a" for None."""
  return "n/a" if value is None else f"{value:.3f}"


def _fmt_ci(ci: list[float | None] | None) -> str:
  return "n/a" if ci is None or None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def text_table(table: Sequence[Sequence[str]]) -> str:
  """Rows of cells as aligned text: the first row a header, the last a summary, ruled apart.

  Names (first column) read best left-aligned, numbers right-aligned.
  """
  widths = [max(len(cell) for cell in column) for column in zip(*table)]

  def line(row):
    cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
    return "  ".join(cells).rstrip()

  header, *body, summary = [line(row) for row in table]
  rule = "-" * len(header)
  return "\n".join([header, rule, *body, rule, summary])


def format_table(report: dict[str, Any]) -> str:
  """A per-class table of an `evaluate_predictions` report, columns aligned, the mean last.

  The interval column is left out when the report has no bootstrap.
  """
  header = ["label", "AUC", f"{100 * report['bootstrap']['level']:g}% CI", "AUPRC", "n_pos",
            "n_neg"]
  rows = [[name, format_value(c["auc"]), _fmt_ci(c["auc_ci"]), format_value(c["auprc"]),
           str(c["n_pos"]), str(c["n_neg"])] for name, c in report["classes"].items()]
  n_classes = len(report["classes"])
  rows.append([f"mean ({n_classes - len(report['skipped'])}/{n_classes})",
               format_value(report["mean_auc"]), _fmt_ci(report["mean_auc_ci"]), "", "", ""])
  table = [header] + rows
  if not report["bootstrap"]["n_boot"]:
    table = [row[:2] + row[3:] for row in table]
  return text_table(table)
