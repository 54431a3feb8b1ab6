"""Converts CheXpert v1.0, as released, into a prepared cxr_jax dataset (splits train/val/test).

    python -m data_prep.chexpert --src DIR --out DIR --image-size S [--val-fraction F --seed K]
        [--views frontal|all] [--layout small|full] [--test-csv FILE] [--boxes FILE]
        [--workers N] [--skip-bad] [--overwrite]

Reads from --src, the folder that holds the release's folder:
  CheXpert-v1.0-small/ (the downscaled JPEGs) or CheXpert-v1.0/ (full resolution), whichever is
      there; with both, --layout says which to convert.
  <layout>/train.csv, <layout>/valid.csv   the exact 19-column header `Path,Sex,Age,
      Frontal/Lateral,AP/PA,No Finding,...,Support Devices`, checked. `Path` starts with the
      layout folder and is resolved relative to --src; an absolute path, or one with `..`, is bad
      input. Labels `1.0`, `0.0`, `-1.0` and blank (nothing else) are stored as 1, 0, -1 and
      NaN: no uncertainty policy is applied here (the reader applies it). Label names are
      labels.CHEXPERT_LABELS ("Pleural Effusion" is "Effusion"). Sex and Age are not read.
  Ids: image id = Path without the layout folder (`train/patient00011/study1/view1_frontal.jpg`),
      patient id = `patient00011`, study id = `patient00011/study1`.
  Views: `Frontal/Lateral` with `AP/PA` gives the record's view: AP, PA, LL or RL for a frontal
      image (FRONTAL when AP/PA is blank), LATERAL for a lateral one. --views frontal (default)
      leaves the lateral images out (counted in cxr_manifest.json as `views_filtered_out`; their
      files are not checked); --views all keeps them.

Splits. valid.csv (234 images, labelled by radiologists) is what papers report on, so it becomes
"test"; validation is carved from train.csv by patient (--val-fraction, --seed) over every
patient of train.csv, laterals included, so that --views frontal and --views all hold the same
validation patients. With --test-csv FILE (a CSV with the same header, e.g. the labels of the
CheXpert test set released with CheXlocalize, its images placed under the layout folder) that
file becomes "test" and valid.csv becomes "val"; nothing is carved then (val_fraction is null in
the manifest). Patients in both train.csv and an evaluation CSV are counted
(`patients_in_train_and_eval`) and warned about.

Boxes (--boxes FILE, optional): HAM's CheXpert box JSON, `{"train/patientNNNNN/studyN/
view1_frontal.jpg": {"Class": [[xmin, ymin, xmax, ymax], ...]}}` in full-resolution pixels (a key
may also start with the layout folder). Class names are normalised: underscores become spaces
(`Pleural_Effusion`), case is ignored (`edema`), `Enlarg_Cardiomediastinum` is Enlarged
Cardiomediastinum, then labels.canonical. Boxes are normalised by the size of the image read
from disk, so they need the full-resolution layout: CheXpert-v1.0-small's images are downscaled
by a per-image factor the release does not record, and guessing it would misplace boxes; --boxes
with the small layout is refused. A box may overshoot the image by up to 1 pixel (whole-pixel
rounding of annotation tools) and is then clipped. A key of an image the --views filter left out
is ignored (counted as `boxes_on_filtered_views`).

Every bad input (bad header: always fatal; malformed row, bad label or view value, bad or escaping
Path, second row of an image, missing or unreadable image or one linked from outside --src; in
--boxes a key naming no image of the CSVs, an unknown class, a malformed box, xmax <= xmin or ymax
<= ymin, a box outside the image) stops the conversion with an error naming the file and row (the
JSON file and key for boxes), and leaves --out as it was; with --skip-bad it is logged, left out
and listed in cxr_manifest.json instead (a bad box is left out, its image written).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np
from absl import logging

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import tfrecord, writer
from data_prep import common
from data_prep.common import BadInputError

VERSION = "1.0"
DATASET_NAME = "chexpert"
LAYOUTS = {"small": "CheXpert-v1.0-small", "full": "CheXpert-v1.0"}
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
HEADER = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
LABEL_COLUMNS = HEADER[5:]  # in the order of labels.CHEXPERT_LABELS, as spelt in the CSVs
PATH, FRONTAL_LATERAL, AP_PA = 0, 3, 4  # column positions
FRONTAL_VIEWS = ("AP", "PA", "LL", "RL")
FRONTAL, LATERAL = "FRONTAL", "LATERAL"  # views of a frontal image without AP/PA, of a lateral
VIEW_CHOICES = ("frontal", "all")
SPLITS = ("train", "val", "test")
# An image id: <folder>/patientNNNNN/studyN/<file>.
IMAGE_ID = re.compile(r"[^/\\]+/(?P<patient>patient\d+)/(?P<study>study\d+)/[^/\\]+")
# Misspellings of HAM's box JSON, after underscores became spaces, lower case.
BOX_CLASS_TYPOS = {"enlarg cardiomediastinum": "Enlarged Cardiomediastinum"}
BOX_TOLERANCE = 1.0  # pixels a box may overshoot the image


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of a CheXpert CSV: an image, its patient, study, view and labels, and its place."""

  image_id: str
  patient_id: str
  study_id: str
  view: str
  labels: np.ndarray
  file: str
  line: int


@dataclasses.dataclass(frozen=True)
class Box:
  """A box in full-resolution pixels (xmin, ymin, xmax, ymax), its label index and JSON key."""

  label: int
  xyxy: tuple[float, float, float, float]
  key: str


@dataclasses.dataclass(frozen=True)
class Item:
  """An image to write: its row, output split, file and boxes."""

  entry: Entry
  split: str
  path: str
  boxes: tuple[Box, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the CSVs say to write, the box file (if any) and the manifest facts."""

  items: list[Item]
  boxes_file: str | None
  facts: dict


def find_layout(src: str, layout: str | None = None) -> str:
  """The layout folder to convert: `layout` ("small" or "full"), else the only one in `src`."""
  if layout is not None:
    folder = LAYOUTS[layout]
    if not os.path.isdir(os.path.join(src, folder)):
      raise FileNotFoundError(f"{os.path.join(src, folder)} not found (--layout {layout})")
    return folder
  found = [f for f in LAYOUTS.values() if os.path.isdir(os.path.join(src, f))]
  if not found:
    raise FileNotFoundError(f"neither {' nor '.join(LAYOUTS.values())} is in {src}: --src is "
                            "the folder that holds the release's folder")
  if len(found) > 1:
    raise common.OptionsError(f"both {' and '.join(found)} are in {src}: choose one with "
                       "--layout small or --layout full")
  return found[0]


def check_boxes_option(folder: str, boxes: str | None) -> None:
  """--boxes needs the full-resolution layout (module docstring)."""
  if boxes is not None and folder != LAYOUTS["full"]:
    raise BadInputError(boxes, None, f"boxes are in full-resolution pixels, but {folder} holds "
                        "images downscaled by a factor the release does not record, so the boxes "
                        f"cannot be placed on them; convert {LAYOUTS['full']} instead")


def csv_files(src: str, folder: str, test_csv: str | None) -> dict[str, str]:
  """The CSV of each split: "train" (validation carved from it unless there is a "val"),
  then valid.csv as "test", or as "val" when `test_csv` is the "test"."""
  root = os.path.join(src, folder)
  files = {"train": os.path.join(root, TRAIN_CSV)}
  if test_csv is None:
    files["test"] = os.path.join(root, VALID_CSV)
  else:
    files.update(val=os.path.join(root, VALID_CSV), test=test_csv)
  for path in files.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found")
  return files


def parse_path(text: str, folder: str) -> tuple[str, str, str]:
  """(image id, patient id, study id) of a `Path` cell; ValueError for a path that is absolute,
  escapes --src, lies outside `folder` or is not <folder>/<split>/patientN/studyN/<file>."""
  if os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", text):
    raise ValueError(f"Path {text!r} is absolute; it must be relative to --src")
  parts = re.split(r"[/\\]", text)
  if ".." in parts:
    raise ValueError(f"Path {text!r} escapes --src (`..`)")
  if parts[0] != folder:
    raise ValueError(f"Path {text!r} does not start with {folder}/")
  image_id = "/".join(parts[1:])
  match = IMAGE_ID.fullmatch(image_id)
  if not match:
    raise ValueError(f"Path {text!r} is not {folder}/<folder>/patientNNNNN/studyN/<image>")
  return image_id, match["patient"], f"{match['patient']}/{match['study']}"


def parse_view(frontal_lateral: str, ap_pa: str) -> str:
  """The record's view of the `Frontal/Lateral` and `AP/PA` cells; ValueError if unknown."""
  if ap_pa and ap_pa not in FRONTAL_VIEWS:
    raise ValueError(f"column 'AP/PA': {ap_pa!r} is none of {', '.join(FRONTAL_VIEWS)} or blank")
  if frontal_lateral == "Frontal":
    return ap_pa or FRONTAL
  if frontal_lateral == "Lateral":
    return LATERAL  # AP/PA says nothing more of a lateral image
  raise ValueError(f"column 'Frontal/Lateral': {frontal_lateral!r} is neither Frontal nor Lateral")


def parse_labels(cells: Sequence[str]) -> np.ndarray:
  """The 1/0/-1/NaN vector of the 14 label cells; ValueError naming the column of a bad one."""
  return np.array([common.chexpert_value(cell, column)
                   for column, cell in zip(LABEL_COLUMNS, cells)], np.float32)


def parse_row(fields: list[str], folder: str, path: str, line: int) -> Entry:
  """The entry of a CSV row; ValueError if any of its cells is bad."""
  fields = common.fit_fields(fields, len(HEADER))
  image_id, patient_id, study_id = parse_path(fields[PATH], folder)
  return Entry(image_id=image_id, patient_id=patient_id, study_id=study_id,
               view=parse_view(fields[FRONTAL_LATERAL], fields[AP_PA]),
               labels=parse_labels(fields[len(HEADER) - len(LABEL_COLUMNS):]), file=path,
               line=line)


def read_csv_file(path: str, folder: str, bad: common.BadInputs,
                  entries: dict[str, Entry]) -> list[Entry]:
  """The entries of one CSV, also added to `entries` (by image id, over every CSV read); a row of
  an image already there is bad input."""
  found = []
  for line, fields in common.read_exact_table(path, HEADER):
    try:
      entry = parse_row(fields, folder, path, line)
    except ValueError as e:
      # Name the image when its path can be read, so that --skip-bad records what was left out.
      try:
        image = parse_path(fields[PATH], folder)[0]
      except ValueError:
        image = fields[PATH] or None
      bad.report(BadInputError(path, line, str(e), image=image))
      continue
    if entry.image_id in entries:
      first = entries[entry.image_id]
      bad.report(BadInputError(path, line, f"{entry.image_id} is also at {first.file} row "
                               f"{first.line}", image=entry.image_id))
      continue
    entries[entry.image_id] = entry
    found.append(entry)
  return found


def filter_views(entries: Sequence[Entry], views: str) -> tuple[list[Entry], int]:
  """The entries the --views choice keeps, and how many it leaves out."""
  if views == "all":
    return list(entries), 0
  kept = [e for e in entries if e.view != LATERAL]
  return kept, len(entries) - len(kept)


def check_images_found(src: str, folder: str, kept: Sequence[Entry],
                       bad: common.BadInputs) -> None:
  """Every kept image must have a file inside `src`: not found, or a link leading out of `src`,
  it is bad input."""
  for entry in kept:
    path = image_path(src, folder, entry)
    try:
      if not os.path.isfile(path):
        raise ValueError(f"image {path} not found")
      common.check_inside(path, src)
    except ValueError as e:
      bad.report(BadInputError(entry.file, entry.line, str(e), image=entry.image_id))


def image_path(src: str, folder: str, entry: Entry) -> str:
  """The file of an entry's image."""
  return os.path.join(src, folder, *entry.image_id.split("/"))


def box_label_index(name: str) -> int:
  """Index into CHEXPERT_LABELS of a box class name of HAM's JSON; ValueError if unknown."""
  spaced = " ".join(name.replace("_", " ").split())
  spaced = BOX_CLASS_TYPOS.get(spaced.lower(), spaced)
  by_lower = {n.lower(): n for n in (*labels_lib.CHEXPERT_LABELS, *labels_lib.ALIASES)}
  label = labels_lib.canonical(by_lower.get(spaced.lower(), spaced))
  # No Finding is an observation without a place: a box of it is a mistake.
  if label not in labels_lib.CHEXPERT_LABELS or label == labels_lib.NO_FINDING:
    known = [n for n in labels_lib.CHEXPERT_LABELS if n != labels_lib.NO_FINDING]
    raise ValueError(f"unknown box class {name!r}; known: {', '.join(known)}")
  return labels_lib.CHEXPERT_LABELS.index(label)


def parse_xyxy(value) -> tuple[float, float, float, float]:
  """A [xmin, ymin, xmax, ymax] box of the JSON; ValueError unless 4 numbers with max > min."""
  if (not isinstance(value, list) or len(value) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    raise ValueError(f"box {value!r} is not [xmin, ymin, xmax, ymax]")
  xmin, ymin, xmax, ymax = (float(v) for v in value)
  if not np.all(np.isfinite([xmin, ymin, xmax, ymax])) or xmax <= xmin or ymax <= ymin:
    raise ValueError(f"box {value!r} needs xmax > xmin and ymax > ymin")
  return xmin, ymin, xmax, ymax


def parse_image_boxes(path: str, key: str, classes, bad: common.BadInputs) -> list[Box]:
  """The boxes of one image's `{class: [box, ...]}`; each bad class or box is bad input."""
  if not isinstance(classes, dict):
    bad.report(BadInputError(path, None, f"{key}: expected {{class: [[xmin, ymin, xmax, ymax], "
                             f"...]}}, got {type(classes).__name__}"))
    return []
  boxes = []
  for name, values in classes.items():
    try:
      label = box_label_index(name)
      if not isinstance(values, list):
        raise ValueError(f"class {name!r}: expected a list of boxes")
    except ValueError as e:
      bad.report(BadInputError(path, None, f"{key}: {e}"))
      continue
    for value in values:
      try:
        boxes.append(Box(label, parse_xyxy(value), key))
      except ValueError as e:
        bad.report(BadInputError(path, None, f"{key}: class {name!r}: {e}"))
  return boxes


def load_json(path: str):
  """The content of a JSON file; a file that is not JSON is bad input, always fatal."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise BadInputError(path, e.lineno, f"not JSON: {e.msg}") from e


def read_boxes(path: str, folder: str, entries: dict[str, Entry], kept: set[str],
               bad: common.BadInputs) -> tuple[dict[str, list[Box]], int]:
  """The boxes of HAM's box JSON by image id, and how many of its images --views left out."""
  data = load_json(path)
  if not isinstance(data, dict):
    raise BadInputError(path, None, "expected {image path: {class: [[xmin, ymin, xmax, ymax], "
                        "...]}}")
  boxes, filtered = {}, 0
  for key, classes in data.items():
    image_id = key.removeprefix(folder + "/")
    if image_id in bad.dropped:
      continue
    if image_id not in entries:
      bad.report(BadInputError(path, None, f"{key}: no such image in the CSVs"))
    elif image_id not in kept:
      filtered += 1
    else:
      boxes[image_id] = parse_image_boxes(path, key, classes, bad)
  return boxes, filtered


def check_box_bounds(boxes: Sequence[Box], width: int, height: int, path: str,
                     bad: common.BadInputs) -> list[Box]:
  """The boxes inside a width x height image (BOX_TOLERANCE allowed); any other is bad input."""
  good = []
  for box in boxes:
    xmin, ymin, xmax, ymax = box.xyxy
    if min(xmin, ymin) < -BOX_TOLERANCE or xmax > width + BOX_TOLERANCE or (
        ymax > height + BOX_TOLERANCE):
      bad.report(BadInputError(path, None, f"{box.key}: box {list(box.xyxy)} "
                               f"({labels_lib.CHEXPERT_LABELS[box.label]}) is outside the "
                               f"{width} x {height} image"))
    else:
      good.append(box)
  return good


def assign_splits(by_split: dict[str, list[Entry]], kept: Sequence[Entry], val_fraction: float,
                  seed: int) -> dict[str, str]:
  """The output split of each kept image: its CSV's, with validation carved from train.csv's
  patients (all of them, whatever --views) unless a CSV gives "val"."""
  carve = "val" not in by_split
  val_patients = (common.carve_by_patient((e.patient_id for e in by_split["train"]),
                                          val_fraction, seed) if carve else frozenset())
  split_of_file = {}
  for split, entries in by_split.items():
    for entry in entries:
      split_of_file[entry.image_id] = split

  def split_of(entry):
    split = split_of_file[entry.image_id]
    return "val" if split == "train" and entry.patient_id in val_patients else split

  return {e.image_id: split_of(e) for e in kept}


def shared_patients(by_split: dict[str, list[Entry]]) -> set[str]:
  """Patients of train.csv that also have images in an evaluation CSV."""
  train = {e.patient_id for e in by_split["train"]}
  others = {e.patient_id for s, entries in by_split.items() if s != "train" for e in entries}
  return train & others


def plan(src: str, folder: str, bad: common.BadInputs, *, val_fraction: float, seed: int,
         views: str, test_csv: str | None, boxes_file: str | None) -> Plan:
  """Reads and checks the CSVs (and box JSON), finds the images and assigns the splits."""
  files = csv_files(src, folder, test_csv)
  entries: dict[str, Entry] = {}
  by_split = {split: read_csv_file(path, folder, bad, entries) for split, path in files.items()}
  kept, filtered = filter_views([e for es in by_split.values() for e in es], views)
  if filtered:
    logging.info("left out %d lateral images (--views %s)", filtered, views)
  check_images_found(src, folder, kept, bad)
  kept = sorted((e for e in kept if e.image_id not in bad.dropped), key=lambda e: e.image_id)
  boxes, boxes_filtered = {}, 0
  if boxes_file is not None:
    boxes, boxes_filtered = read_boxes(boxes_file, folder, entries, {e.image_id for e in kept},
                                       bad)
  splits = assign_splits(by_split, kept, val_fraction, seed)
  items = [Item(e, splits[e.image_id], image_path(src, folder, e),
                tuple(boxes.get(e.image_id, ()))) for e in kept]
  # Split by split, so that the manifest lists them in SPLITS order whatever the folder names.
  items.sort(key=lambda item: SPLITS.index(item.split))
  shared = shared_patients(by_split)
  if shared:
    logging.warning("%d patients of %s also have images in an evaluation CSV", len(shared),
                    TRAIN_CSV)
  facts = dict(
      layout=folder, csv_files={split: os.path.basename(path) for split, path in files.items()},
      views=views, views_filtered_out=filtered,
      view_counts=dict(sorted(collections.Counter(e.view for e in kept).items())),
      val_fraction=None if "val" in files else val_fraction, seed=seed,
      val_patients=len({i.entry.patient_id for i in items if i.split == "val"}),
      patients_in_train_and_eval=len(shared),
      boxes_from=os.path.basename(boxes_file) if boxes_file else None,
      boxes_on_filtered_views=boxes_filtered)
  return Plan(items, boxes_file, facts)


def make_example(item: Item, result: common.ImageResult,
                 boxes: Sequence[Box]) -> tfrecord.CxrExample:
  """The record of a prepared image and its (checked) boxes."""
  entry = item.entry
  xyxy = np.array([b.xyxy for b in boxes], np.float64).reshape(-1, 4)
  xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
  return tfrecord.CxrExample(
      image=result.png, image_id=entry.image_id, patient_id=entry.patient_id,
      study_id=entry.study_id, view=entry.view, labels=entry.labels,
      boxes=common.normalise_boxes(xywh, result.width, result.height),
      box_labels=np.array([b.label for b in boxes], np.int64))


def convert(src: str, out: str, *, image_size: int, val_fraction: float = 0.1, seed: int = 0,
            views: str = "frontal", layout: str | None = None, test_csv: str | None = None,
            boxes: str | None = None, workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False,
            max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Converts the CheXpert release in `src` into a prepared dataset in `out`; returns its
  manifest (module docstring for `views`, `layout`, `test_csv` and `boxes`).

  Raises:
    BadInputError (a ValueError) naming the file and row of the first bad input, leaving `out`
      untouched, unless skip_bad; and whatever skip_bad, a bad CSV header, a box file that is not
      JSON, or `boxes` with the small layout.
    common.OptionsError: both layouts in `src` and no `layout`, or an unknown `views`.
    FileNotFoundError: no layout folder, or a missing CSV.
  """
  if views not in VIEW_CHOICES:
    raise common.OptionsError(f"--views must be one of {VIEW_CHOICES}, got {views!r}")
  folder = find_layout(src, layout)
  check_boxes_option(folder, boxes)
  bad = common.BadInputs(skip_bad)
  todo = plan(src, folder, bad, val_fraction=val_fraction, seed=seed, views=views,
              test_csv=test_csv, boxes_file=boxes)
  with writer.DatasetWriter(
      out, DATASET_NAME, label_names=labels_lib.CHEXPERT_LABELS, image_size=image_size,
      converter="data_prep.chexpert", converter_version=VERSION, source=os.path.abspath(src),
      max_shard_bytes=max_shard_bytes, overwrite=overwrite, extra=todo.facts) as dataset:
    bad.record_to(dataset)
    jobs = [common.ImageJob(i.path, image_size) for i in todo.items]
    common.add_examples(
        dataset, todo.items, jobs, workers, bad,
        lambda item: (item.entry.file, item.entry.line, item.entry.image_id),
        lambda item, result: make_example(item, result, check_box_bounds(
            item.boxes, result.width, result.height, todo.boxes_file, bad)))
  return writer.load_manifest(out)


def argument_parser() -> argparse.ArgumentParser:
  """Every converter's arguments, and CheXpert's views, layout, test CSV and boxes."""
  parser = common.argument_parser(__doc__)
  parser.add_argument("--views", choices=VIEW_CHOICES, default="frontal",
                      help="keep frontal images only (default) or all")
  parser.add_argument("--layout", choices=tuple(LAYOUTS),
                      help="which release folder to convert when --src holds both")
  parser.add_argument("--test-csv", help="a CSV in train.csv's format to use as the test split; "
                      "valid.csv then becomes the validation split")
  parser.add_argument("--boxes", help="HAM's CheXpert box JSON (full-resolution layout only)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argument_parser()
  args = parser.parse_args(argv)
  manifest = common.run_converter(parser, lambda: convert(
      args.src, args.out, image_size=args.image_size, val_fraction=args.val_fraction,
      seed=args.seed, views=args.views, layout=args.layout, test_csv=args.test_csv,
      boxes=args.boxes, workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite))
  print(f"wrote {args.out}: {common.split_counts(manifest)}; {manifest['views_filtered_out']} "
        f"lateral images left out; skipped {manifest['skipped']['count']} bad inputs")


if __name__ == "__main__":
  main()
