"""The dataset on disk: NIH ChestX-ray14's files and quirks, the extras, and `generate`.

`generate` renders every patient (in worker processes), then writes the NIH tables and split
lists, the extras' fine labels and `phantom_info.json`, all into a staging folder that is renamed
into place only when complete. File names, headers and the folder's layout are documented in
docs/phantom.md ("Files") and docs/architecture.md ("The phantom in NIH layout"). With `layout`
"chexpert" or "mimic", the images and tables are those of that release instead
(release_layouts; docs/phantom.md, "Other layouts").
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cxr_jax.data import labels as label_lib
from cxr_jax import fileutil
from data_prep import common
from data_prep.phantom import streams
from data_prep.phantom.anatomy import ANATOMY_NAMES
from data_prep.phantom.patients import Job, render_patient
from data_prep.phantom.prevalence import DEFAULT_NO_FINDING, abnormal_rates, resolve_prevalence
from data_prep.phantom.render import Instance

GENERATOR_VERSION = "1.0"

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_LIST = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# The 8 classes NIH boxed, with NIH's spelling in BBox_List_2017.csv.
BBOX_NAMES = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
              "Infiltration": "Infiltrate", "Mass": "Mass", "Nodule": "Nodule",
              "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax"}
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
EXTRAS = "phantom_extras"
FINE_LABELS = "fine_labels.csv"
FINE_LABELS_HEADER = "Image Index,Finding Label,Side,Zone,x,y,w,h"
INFO = "phantom_info.json"
FIELD_OF_VIEW_MM = 400.0  # the canonical image width, for OriginalImagePixelSpacing
LAYOUTS = ("nih", "chexpert", "mimic")  # the releases whose files `generate` can write
# The extras of the other layouts: each image's phantom name (its extras' key) and release path.
IMAGE_PATHS = "image_paths.csv"
IMAGE_PATHS_HEADER = "Image Index,Path"
# MIMIC's subject ids have 8 digits, 10000000-19999999 as in the release: one per patient.
MIMIC_MAX_PATIENTS = 10_000_000


def generate(out_dir: str | os.PathLike, num_patients: int, image_size: int = 512, seed: int = 0,
             *, workers: int | None = None, test_fraction: float = 0.2, label_noise: float = 0.0,
             prevalence: Mapping[str, float] | None = None,
             no_finding: float = DEFAULT_NO_FINDING, overwrite: bool = False,
             layout: str = "nih") -> dict[str, Any]:
  """Writes a phantom dataset in the NIH layout (package docstring), or in CheXpert's or
  MIMIC-CXR-JPG's (`layout`), and returns its summary.

  Args:
    out_dir: the dataset folder; written atomically (a temporary sibling renamed at the end).
    num_patients: patients (1 to 5 images each); patient ids are 1..num_patients.
    image_size: side of the square images, in pixels.
    seed: everything is a function of the seed (and the arguments below, except `workers`).
    workers: processes to render with (default: all cores); the output does not depend on it.
    test_fraction: fraction of patients in test_list.txt (the rest in train_val_list.txt).
    label_noise: probability that each of the 14 labels in Data_Entry is flipped; the extras
      (fine labels, boxes) keep the rendered truth.
    prevalence: per-image rates overriding DEFAULT_PREVALENCE, by label name.
    no_finding: fraction of images with no finding.
    overwrite: replace a non-empty `out_dir` (refused otherwise).
    layout: one of LAYOUTS: "nih", or "chexpert" / "mimic" for those releases' files, labels
      mapped to CheXpert's observations (release_layouts), with the same extras but for NIH's
      tables and boxes.
  """
  _check_arguments(num_patients, image_size, seed, test_fraction, label_noise, layout)
  prevalence_all = resolve_prevalence(prevalence)
  rates = abnormal_rates(prevalence_all, no_finding)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
  with fileutil.staged_dir(out_dir, replace=True) as tmp:
    image_dirs = os.path.join(tmp, "images"), os.path.join(tmp, EXTRAS, "anatomy")
    for folder in image_dirs:
      os.makedirs(folder)
    jobs = [Job(pid, seed, image_size, tuple(rates.tolist()), no_finding, label_noise, image_dirs)
            for pid in range(1, num_patients + 1)]
    rows = _render_patients(jobs, workers)
    test = draw_patients(seed, range(1, num_patients + 1), test_fraction, index=0)
    arguments = dict(num_patients=num_patients, image_size=image_size, seed=seed,
                     test_fraction=test_fraction, label_noise=label_noise,
                     prevalence=dict(prevalence or {}), no_finding=no_finding)
    if layout == "nih":
      summary = _write_tables(tmp, rows, test, image_size, arguments, prevalence_all, no_finding)
    else:
      # Only here, so that an NIH dataset's phantom_info.json stays as it always was.
      arguments["layout"] = layout
      summary = _write_release(tmp, layout, rows, test, image_size, arguments, prevalence_all,
                               no_finding)
  return summary


def _check_arguments(num_patients: int, image_size: int, seed: int, test_fraction: float,
                     label_noise: float, layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "mimic" and num_patients > MIMIC_MAX_PATIENTS:
    raise ValueError(f"the mimic layout holds at most {MIMIC_MAX_PATIENTS} patients (8-digit "
                     f"subject ids 1XXXXXXX), got {num_patients}")
  if num_patients < 1 or num_patients > 99_999_999:
    raise ValueError(f"num_patients must be in [1, 99999999], got {num_patients}")
  if image_size < 32:
    raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if not 0.0 <= test_fraction <= 1.0 or not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"test_fraction ({test_fraction}) and label_noise ({label_noise}) must lie "
                     "in [0, 1]")


def _render_patients(jobs: Sequence[Job], workers: int | None) -> list[dict[str, Any]]:
  """Every patient's table rows, in patient order, from `workers` processes (default: the usable
  cores)."""
  if not workers:
    # Imported here: cxr_jax.parallel imports JAX (seconds and ~130 MB per process), which the
    # spawned render workers would then load too, as they import this package.
    from cxr_jax import parallel  # pylint: disable=g-import-not-at-top
    workers = parallel.usable_cpus()
  # No more workers than patients: one patient renders in this process, without a pool.
  with common.parallel_map(render_patient, jobs, min(workers, len(jobs))) as results:
    return [row for rows in results for row in rows]


def draw_patients(seed: int, patients: Iterable[int], fraction: float, index: int) -> set[int]:
  """A seeded draw of round(fraction x patients) of `patients` (ids in ascending order), at least
  one drawn and one left when both are asked for; `index` of the SPLIT stream: 0 the test split,
  1 MIMIC's validate split (drawn from the others)."""
  pool = list(patients)
  count = round(fraction * len(pool))
  if 0.0 < fraction < 1.0 and len(pool) >= 2:
    count = min(max(count, 1), len(pool) - 1)
  order = np.random.default_rng([seed, 0, streams.SPLIT, index]).permutation(len(pool))
  return {pool[i] for i in order[:count]}


def _write_tables(out: str, rows: list[dict[str, Any]], test: set[int], size: int,
                  arguments: dict[str, Any], prevalence: dict[str, float],
                  no_finding: float) -> dict[str, Any]:
  """Writes the CSVs, split lists and phantom_info.json; returns the summary."""
  entries, boxes, fine, splits = _tables(rows, test, size)
  for path, lines in ((DATA_ENTRY, entries), (BBOX_LIST, boxes),
                      (os.path.join(EXTRAS, FINE_LABELS), fine)):
    write_lines(out, path, lines)
  for path, names in splits.items():
    with open(os.path.join(out, path), "w", newline="") as f:
      f.write("\n".join(names))  # NIH's lists end without a newline
  summary = _summary(rows, splits, len(fine) - 1, len(boxes) - 1, arguments, prevalence,
                     no_finding)
  _write_info(out, summary)
  return summary


def _write_release(out: str, layout: str, rows: list[dict[str, Any]], test: set[int], size: int,
                   arguments: dict[str, Any], prevalence: dict[str, float],
                   no_finding: float) -> dict[str, Any]:
  """Writes the images and tables of CheXpert's or MIMIC's release (release_layouts), then the
  extras: fine labels, image_paths.csv and phantom_info.json (no NIH tables, no boxes); returns
  the summary, with the images of each of the release's splits (`layout_splits`)."""
  # Imported here: release_layouts reads the converters' formats from data_prep.chexpert and
  # data_prep.mimic, which load TensorFlow Datasets; the spawned render workers import this
  # package and would load it too.
  from data_prep.phantom import release_layouts  # pylint: disable=g-import-not-at-top
  paths, layout_splits = release_layouts.write(layout, out, rows, test, arguments["seed"], size)
  _, _, fine, splits = _tables(rows, test, size)
  write_lines(out, os.path.join(EXTRAS, FINE_LABELS), fine)
  write_lines(out, os.path.join(EXTRAS, IMAGE_PATHS),
               [IMAGE_PATHS_HEADER] + [f"{row['image']},{paths[row['image']]}" for row in rows])
  summary = _summary(rows, splits, len(fine) - 1, 0, arguments, prevalence, no_finding)
  summary.update(layout=layout, layout_splits=layout_splits)
  _write_info(out, summary)
  return summary


def write_lines(out: str, path: str, lines: Sequence[str]) -> None:
  """Writes `lines` to `path` under `out`, each ended by a newline (no CRLF on any platform)."""
  with open(os.path.join(out, path), "w", newline="") as f:
    f.write("\n".join(lines) + "\n")


def _write_info(out: str, summary: dict[str, Any]) -> None:
  with open(os.path.join(out, EXTRAS, INFO), "w") as f:
    json.dump(summary, f, indent=1)
    f.write("\n")


def _tables(rows: list[dict[str, Any]], test: set[int],
            size: int) -> tuple[list[str], list[str], list[str], dict[str, list[str]]]:
  """The lines of Data_Entry, BBox_List and fine_labels.csv (headers first), and the image names
  of each split list."""
  spacing = f"{FIELD_OF_VIEW_MM / size:.6g}"
  entries, boxes, fine = [DATA_ENTRY_HEADER], [BBOX_HEADER], [FINE_LABELS_HEADER]
  splits = {TRAIN_VAL_LIST: [], TEST_LIST: []}
  for row in rows:
    name = row["image"]
    labels = "|".join(row["labels"]) or label_lib.NO_FINDING
    entries.append(f"{name},{labels},{row['follow_up']},{row['patient']},{row['age']},"
                   f"{row['sex']},{row['view']},{size},{size},{spacing},{spacing}")
    is_test = row["patient"] in test
    splits[TEST_LIST if is_test else TRAIN_VAL_LIST].append(name)
    fine += [f"{name},{inst.finding},{inst.side},{inst.zone},{','.join(map(str, inst.box))}"
             for inst in row["instances"]]
    if is_test:  # NIH boxed test images only
      boxes += _bbox_lines(name, row["instances"])
  return entries, boxes, fine, splits


def _bbox_lines(name: str, instances: Sequence[Instance]) -> list[str]:
  """BBox_List rows of one image: one box per (image, class), the largest instance's."""
  largest = {}
  for inst in instances:
    area = inst.box[2] * inst.box[3]
    if inst.finding in BBOX_NAMES and area > largest.get(inst.finding, (-1,))[0]:
      largest[inst.finding] = (area, inst.box)
  lines = []
  for finding in sorted(largest):
    x, y, w, h = (float(v) for v in largest[finding][1])
    lines.append(f"{name},{BBOX_NAMES[finding]},{x},{y},{w},{h}")
  return lines


def _summary(rows: list[dict[str, Any]], splits: dict[str, list[str]], num_instances: int,
             num_boxes: int, arguments: dict[str, Any], prevalence: dict[str, float],
             no_finding: float) -> dict[str, Any]:
  """The contents of phantom_info.json."""
  counts = {n: sum(n in r["truth"] for r in rows) for n in label_lib.NIH_LABELS}
  reported = {n: sum(n in r["labels"] for r in rows) for n in label_lib.NIH_LABELS}
  return dict(
      generator="data_prep.phantom", generator_version=GENERATOR_VERSION,
      seed=arguments["seed"], arguments=arguments,
      prevalences=dict(prevalence, **{label_lib.NO_FINDING: no_finding}),
      anatomy_names=list(ANATOMY_NAMES), label_names=list(label_lib.NIH_LABELS),
      fine_label_names=list(label_lib.fine_vocabulary()),
      bbox_labels=[BBOX_NAMES[n] for n in label_lib.NIH_LABELS if n in BBOX_NAMES],
      num_patients=arguments["num_patients"], num_images=len(rows),
      num_train_val_images=len(splits[TRAIN_VAL_LIST]), num_test_images=len(splits[TEST_LIST]),
      num_instances=num_instances, num_boxes=num_boxes,
      rendered_positives=counts, reported_positives=reported,
      no_finding_images=sum(not r["labels"] for r in rows))
