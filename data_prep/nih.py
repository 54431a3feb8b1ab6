"""Converts NIH ChestX-ray14, as released, into a prepared cxr_jax dataset (splits train/val/test).

    python -m data_prep.nih --src DIR --out DIR --image-size S [--val-fraction F --seed K]
        [--train-list FILE --test-list FILE [--val-list FILE]] [--box-list FILE]
        [--fine-labels FILE] [--workers N] [--skip-bad] [--overwrite]

Reads from --src:
  Data_Entry_2017_v2020.csv, else Data_Entry_2017.csv (trailing comma on every line, ages like
      `058Y`); the columns read (Image Index, Finding Labels, Patient ID, View Position) are found
      by header name, so age and `Patient Gender`/`Patient Sex` spellings do not matter.
  train_val_list.txt, test_list.txt   the official patient-disjoint split; validation is carved
      from train_val by patient (--val-fraction, --seed).
  or --train-list, --test-list and optionally --val-list (any paths)   custom split lists in the
      same format, one Image Index a line, such as HAM's folds. They define the splits: an image
      in none is left out (counted as `unlisted` in cxr_manifest.json); they are image-level, so a
      patient may have images in train and test (counted as `patients_in_train_and_test`, and
      warned). Without --val-list, validation is carved from the train list by patient.
  --box-list (optional, any path)   the images whose boxes may train a box term (HAM's "helper"
      images), in the same format: written with box_supervised = 1. Each must be in the training
      split and have a box; validation is never carved from their patients.
  BBox_List_2017.csv (optional)  9-field header, 6-field rows, `Infiltrate`; x, y, w, h in pixels
      of the source image, normalised here by its actual size.
  images/ or images_001/images/ ... images_012/images/   the PNGs, written as 8-bit grayscale
      S x S PNGs (area interpolation) by a pool of --workers processes.
  phantom_extras/ (optional, written by data_prep.phantom; see docs/architecture.md)  then the
      boxes are every finding instance of fine_labels.csv (BBox_List_2017.csv is still checked),
      and records gain fine labels and anatomy maps (resized with NEAREST).
  --fine-labels (optional, any path; not with phantom_extras/)   your own location-aware labels
      (e.g. derived from Chest ImaGenome): a CSV with columns `Image Index` and `Fine Labels`
      (found by header name; others are ignored), one row per image; the cell holds
      `Finding|side|zone` names of labels.fine_vocabulary() separated by `;`
      (`Nodule|left|lower;Effusion|right|lower`), empty for none. Records gain fine labels over
      that vocabulary: 1 for a listed location, 0 for the others, and NaN (unknown, masked in
      training) for every location of an image absent from the CSV, and of a finding in the
      image's Finding Labels that its row does not locate. cxr_manifest.json records the file
      (`fine_labels_from`) and the images whose fine labels are all unknown
      (`fine_labels_unlabelled`: absent from it, or with a row skipped by --skip-bad).

Every bad input (missing or unreadable image or one linked from outside --src, malformed row,
unknown label, image in no official split list, image in two split lists, list entry not in
Data_Entry, patient in both train_val and test of the official split, box for an unknown image,
box-list image outside the training split or without a box; of --fine-labels an unknown fine label,
an image not in Data_Entry, a second row for an image, a fine label whose finding is not in the
image's Finding Labels) stops the conversion with an error naming the file and row, and leaves
--out as it was; with --skip-bad it is logged, left out and listed in cxr_manifest.json instead (a
box-list image outside the training split or without a box is written, unmarked; an image with a
bad --fine-labels row is written with unknown fine labels, as no row of it can be trusted).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import tfrecord, writer
from data_prep import common
from data_prep import fine_labels as fine_lib
from data_prep.common import BadInputError

VERSION = "1.0"
DATASET_NAME = "nih"
DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preferred first
BBOX_FILE = "BBox_List_2017.csv"
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
# The list sides whose images are training images, bar those carved into validation.
TRAIN_SIDES = ("train_val", "train")
EXTRAS_DIR = "phantom_extras"
DATA_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
FINE_LABEL_COLUMNS = ("Image Index", "Finding Label", "Side", "Zone", "x", "y", "w", "h")
USER_FINE_LABEL_ID = "Image Index"  # the image column of --fine-labels
BBOX_WIDTH = 6  # Image Index, Finding Label, x, y, w, h


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of Data_Entry: an image, its patient, view and label vector, and its line."""

  image_id: str
  patient_id: str
  view: str
  labels: np.ndarray
  line: int


@dataclasses.dataclass(frozen=True)
class Listing:
  """Where a split list (or the box list) names an image."""

  side: str  # a key of SPLIT_FILES; of custom lists "train", "val", "test"; "box" (--box-list)
  path: str
  line: int


@dataclasses.dataclass(frozen=True)
class Box:
  """A box in pixels of the source image (x, y = top-left), with its label index."""

  label: int
  xywh: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class SplitLists:
  """The list files that assign the splits, and the optional box-supervision list.

  `files` maps each side to its path, in reading order; `official` says they are the release's
  own (which must list every image, patient-disjointly).
  """

  files: dict[str, str]
  official: bool
  box_list: str | None = None


class ListOptionsError(common.OptionsError):
  """Split-list options that do not go together, such as --train-list without --test-list."""


@dataclasses.dataclass
class Extras:
  """What phantom_extras/ adds: fine labels, instance boxes and anatomy maps."""

  fine: fine_lib.FineLabels
  anatomy_names: tuple[str, ...]
  boxes: dict[str, list[Box]]
  anatomy_dir: str


@dataclasses.dataclass(frozen=True)
class Item:
  """An image to write: its row, output split, file, boxes and anatomy label map file."""

  entry: Entry
  split: str
  path: str
  boxes: tuple[Box, ...]
  label_map_path: str | None
  box_supervised: bool


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the metadata says to write: the images (by Image Index), their fine labels (if any),
  the anatomy names (empty without anatomy maps) and the manifest facts."""

  data_entry: str
  items: list[Item]
  fine: fine_lib.FineLabels | None
  anatomy_names: tuple[str, ...]
  facts: dict


def parse_finding_labels(text: str) -> np.ndarray:
  """The 0/1 label vector (over NIH_LABELS) of a `Finding Labels` cell; ValueError if bad."""
  names = [name.strip() for name in text.split("|")]
  vector = np.zeros(len(labels_lib.NIH_LABELS), np.float32)
  if names == [labels_lib.NO_FINDING]:
    return vector
  for name in names:
    if name == labels_lib.NO_FINDING:
      raise ValueError(f"'{labels_lib.NO_FINDING}' together with findings in {text!r}")
    vector[label_index(name)] = 1.0
  return vector


def label_index(name: str) -> int:
  """Index into NIH_LABELS of a label name or alias (`Infiltrate`); ValueError if unknown."""
  label = labels_lib.canonical(name)
  if label not in labels_lib.NIH_LABELS:
    raise ValueError(f"unknown label {name!r}; known: {', '.join(labels_lib.NIH_LABELS)}")
  return labels_lib.NIH_LABELS.index(label)


def read_data_entry(path: str, bad: common.BadInputs) -> dict[str, Entry]:
  """The rows of Data_Entry_2017[_v2020].csv by Image Index."""
  rows, width, column = common.read_columns(path, DATA_ENTRY_COLUMNS)
  entries: dict[str, Entry] = {}
  for line, fields in rows:
    image_id = fields[column["Image Index"]] if column["Image Index"] < len(fields) else ""
    try:
      entry = _parse_entry(common.fit_fields(fields, width), column, line)
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e), image=image_id or None))
      continue
    if image_id in entries:
      bad.report(BadInputError(path, line, f"{image_id} is also at row {entries[image_id].line}",
                               image=image_id))
      continue
    entries[image_id] = entry
  return entries


def _parse_entry(fields: list[str], column: dict[str, int], line: int) -> Entry:
  image_id, patient_id = fields[column["Image Index"]], fields[column["Patient ID"]]
  if not image_id or not patient_id:
    raise ValueError("empty Image Index or Patient ID")
  return Entry(image_id=image_id, patient_id=patient_id, view=fields[column["View Position"]],
               labels=parse_finding_labels(fields[column["Finding Labels"]]), line=line)


def split_lists(src: str, *, train_list: str | None = None, test_list: str | None = None,
                val_list: str | None = None, box_list: str | None = None) -> SplitLists:
  """The custom lists when given (train and test together, val optional), else the official ones."""
  if (train_list is None) != (test_list is None):
    raise ListOptionsError("--train-list and --test-list go together: give both or neither")
  if train_list is None:
    if val_list is not None:
      raise ListOptionsError("--val-list needs --train-list and --test-list")
    return SplitLists({side: os.path.join(src, name) for side, name in SPLIT_FILES.items()},
                      official=True, box_list=box_list)
  files = dict(train=train_list, test=test_list)
  if val_list is not None:
    files["val"] = val_list
  return SplitLists(files, official=False, box_list=box_list)


def read_list(path: str, side: str, data_entry: str, entries: dict[str, Entry],
              bad: common.BadInputs, listed: dict[str, Listing]) -> None:
  """Adds where the list file `path` names each image to `listed`; an id not in Data_Entry, or one
  already in `listed`, is bad input."""
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      image_id = text.strip()
      if not image_id or image_id in bad.dropped:
        continue
      if image_id not in entries:
        bad.report(BadInputError(path, line, f"{image_id} is not in {data_entry}"))
      elif image_id in listed:
        first = listed[image_id]
        bad.report(BadInputError(path, line, f"{image_id} is also listed in {first.path} "
                                 f"row {first.line}", image=image_id))
      else:
        listed[image_id] = Listing(side, path, line)


def read_split_lists(files: dict[str, str], data_entry: str, entries: dict[str, Entry],
                     bad: common.BadInputs) -> dict[str, Listing]:
  """Where each image is listed (`files`: side -> path); an image in two lists is bad input."""
  listed: dict[str, Listing] = {}
  for side, path in files.items():
    read_list(path, side, data_entry, entries, bad, listed)
  return listed


def check_all_listed(entries: dict[str, Entry], listed: dict[str, Listing], data_entry: str,
                     bad: common.BadInputs) -> None:
  """The official lists must name every row of Data_Entry."""
  for image_id, entry in entries.items():
    if image_id not in listed and image_id not in bad.dropped:
      bad.report(BadInputError(data_entry, entry.line, f"{image_id} is in none of "
                               f"{', '.join(SPLIT_FILES.values())}", image=image_id))


def check_patients(entries: dict[str, Entry], listed: dict[str, Listing],
                   bad: common.BadInputs) -> None:
  """A patient with images in both train_val and test is bad; each of its images is reported."""
  images_of = collections.defaultdict(list)
  for image_id in sorted(listed):
    if image_id not in bad.dropped:
      images_of[entries[image_id].patient_id].append(image_id)
  for patient, image_ids in sorted(images_of.items()):
    first = {}  # the first image on each side
    for image_id in image_ids:
      first.setdefault(listed[image_id].side, image_id)
    if len(first) < 2:
      continue
    sides = " and ".join(f"{listed[i].path} ({i}, row {listed[i].line})"
                         for i in (first[side] for side in SPLIT_FILES))
    for image_id in image_ids:
      bad.report(BadInputError(listed[image_id].path, listed[image_id].line,
                               f"patient {patient} has images in both {sides}", image=image_id))


def _parse_xywh(texts: Sequence[str]) -> tuple[float, float, float, float]:
  try:
    x, y, w, h = (float(t) for t in texts)
  except ValueError:
    raise ValueError(f"box x, y, w, h must be numbers, got {list(texts)}") from None
  if not np.all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
    raise ValueError(f"bad box x, y, w, h = {x}, {y}, {w}, {h}")
  return x, y, w, h


def _usable(image_id: str, what: str, entries: dict[str, Entry], bad: common.BadInputs,
            path: str, line: int, data_entry: str) -> bool:
  """Whether a row about `image_id` applies: not for a dropped image; an unknown one is bad
  input."""
  if image_id in bad.dropped:
    return False
  if image_id not in entries:
    bad.report(BadInputError(path, line, f"{what} for {image_id}, which is not in {data_entry}"))
    return False
  return True


def read_bbox_list(path: str, data_entry: str, entries: dict[str, Entry],
                   bad: common.BadInputs) -> dict[str, list[Box]]:
  """The boxes of BBox_List_2017.csv by image; its fields are read by position."""
  boxes = collections.defaultdict(list)
  for line, fields in common.read_csv(path):
    if fields[0] == "Image Index":  # the header, which has more fields than the rows
      continue
    try:
      image_id, name, *xywh = common.fit_fields(fields, BBOX_WIDTH)
      box = Box(label_index(name), _parse_xywh(xywh))
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e)))
      continue
    if _usable(image_id, "box", entries, bad, path, line, data_entry):
      boxes[image_id].append(box)
  return boxes


def read_extras(src: str, data_entry: str, entries: dict[str, Entry],
                bad: common.BadInputs) -> Extras | None:
  """The phantom's extras when <src>/phantom_extras exists, else None."""
  root = os.path.join(src, EXTRAS_DIR)
  if not os.path.isdir(root):
    return None
  info_path = os.path.join(root, "phantom_info.json")
  with open(info_path, encoding="utf-8") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise BadInputError(info_path, e.lineno, f"not JSON: {e.msg}") from e
  if "anatomy_names" not in info:
    raise BadInputError(info_path, None, "has no anatomy_names")
  fine = fine_lib.FineLabels(
      tuple(info.get("fine_label_names") or labels_lib.fine_vocabulary()),
      source=f"{EXTRAS_DIR}/fine_labels.csv", absent=0.0)
  extras = Extras(fine=fine, anatomy_names=tuple(info["anatomy_names"]),
                  boxes=collections.defaultdict(list), anatomy_dir=os.path.join(root, "anatomy"))
  path = os.path.join(root, "fine_labels.csv")
  rows, width, column = common.read_columns(path, FINE_LABEL_COLUMNS)
  for line, fields in rows:
    try:
      fields = common.fit_fields(fields, width)
      image_id, finding, side, zone, *xywh = (fields[column[c]] for c in FINE_LABEL_COLUMNS)
      box = Box(label_index(finding), _parse_xywh(xywh))
      position = fine.position(labels_lib.fine_label(finding, side, zone))
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e)))
      continue
    if not _usable(image_id, "finding", entries, bad, path, line, data_entry):
      continue
    extras.boxes[image_id].append(box)
    fine.vectors.setdefault(image_id, np.zeros(len(fine.names), np.float32))[position] = 1.0
  return extras


def check_fine_labels_option(src: str, fine_labels: str | None) -> None:
  """--fine-labels cannot join phantom_extras/, which brings its own fine labels."""
  extras_dir = os.path.join(src, EXTRAS_DIR)
  if fine_labels is not None and os.path.isdir(extras_dir):
    raise BadInputError(fine_labels, None, f"--fine-labels cannot be combined with {extras_dir}, "
                        "which brings its own fine labels; remove one of them")


def finding_names(entry: Entry) -> str:
  """An image's Finding Labels, spelt as in Data_Entry."""
  names = [labels_lib.NIH_LABELS[i] for i in np.flatnonzero(entry.labels)]
  return "|".join(names) or labels_lib.NO_FINDING


def read_fine_labels(path: str, data_entry: str, entries: dict[str, Entry],
                     bad: common.BadInputs) -> fine_lib.FineLabels:
  """The location-aware labels of the --fine-labels CSV (module docstring; data_prep.fine_labels
  reads it) by Image Index; an image it lacks, or whose row is bad, gets unknown (NaN) fine
  labels."""
  def describe(image_id, _):
    entry = entries[image_id]
    return (f"the Finding Labels {finding_names(entry)!r} of {image_id} ({data_entry} row "
            f"{entry.line})")

  images = fine_lib.Images(
      findings=labels_lib.NIH_LABELS, label_names=labels_lib.NIH_LABELS,
      id_column=USER_FINE_LABEL_ID, labels={i: e.labels for i, e in entries.items()},
      listed_in=data_entry, describe=describe, skip=bad.dropped)
  return fine_lib.read_fine_labels(path, images, bad)


def find_images(src: str) -> dict[str, str]:
  """Path of every image file by name, from images/ and images_NNN/images/."""
  shards = sorted(glob.glob(os.path.join(src, "images_*", "images")))
  folders = [os.path.join(src, "images")] + shards
  paths: dict[str, str] = {}
  for folder in folders:
    if not os.path.isdir(folder):
      continue
    for dir_entry in os.scandir(folder):
      if dir_entry.is_file():
        if dir_entry.name in paths:
          raise BadInputError(dir_entry.path, None, f"another image of this name is at "
                              f"{paths[dir_entry.name]}; keep one of them")
        paths[dir_entry.name] = dir_entry.path
  return paths


def find_data_entry(src: str) -> str:
  """The Data_Entry file to read: the v2020 one when both exist."""
  for name in DATA_ENTRY_FILES:
    path = os.path.join(src, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"none of {', '.join(DATA_ENTRY_FILES)} in {src}")


def read_boxes(src: str, data_entry: str, entries: dict[str, Entry], bad: common.BadInputs,
               ) -> tuple[dict[str, list[Box]], Extras | None, str | None]:
  """The boxes by image, the phantom's extras (or None) and the file the boxes come from."""
  bbox_path = os.path.join(src, BBOX_FILE)
  has_bbox = os.path.exists(bbox_path)
  # Read even when the extras replace its boxes, so that the file is always checked.
  boxes = read_bbox_list(bbox_path, data_entry, entries, bad) if has_bbox else {}
  extras = read_extras(src, data_entry, entries, bad)
  if extras is not None:
    return extras.boxes, extras, f"{EXTRAS_DIR}/fine_labels.csv"
  return boxes, None, BBOX_FILE if has_bbox else None


def check_images_found(src: str, data_entry: str, entries: dict[str, Entry],
                       listed: dict[str, Listing], image_paths: dict[str, str],
                       bad: common.BadInputs) -> None:
  """Every listed image must have a file inside `src`: not found, or a link leading out of
  `src`, it is bad input."""
  for image_id in sorted(listed):
    if image_id in bad.dropped:
      continue
    try:
      if image_id not in image_paths:
        raise ValueError(f"image {image_id} not found in {src}/images or {src}/images_*/images")
      common.check_inside(image_paths[image_id], src)
    except ValueError as e:
      bad.report(BadInputError(data_entry, entries[image_id].line, str(e), image=image_id))


def read_box_list(path: str, data_entry: str, entries: dict[str, Entry],
                  listed: dict[str, Listing], boxes: dict[str, list[Box]],
                  boxes_from: str | None, bad: common.BadInputs) -> frozenset[str]:
  """The images to mark for box supervision: those of the list at `path` that are in the
  training side of the split lists and have a box; any other is bad input."""
  marked: dict[str, Listing] = {}
  read_list(path, "box", data_entry, entries, bad, marked)
  good = set()
  for image_id, listing in marked.items():
    if image_id in bad.dropped:
      continue
    # A bad mark names no image: with --skip-bad the image is still written, unmarked.
    if image_id not in listed or listed[image_id].side not in TRAIN_SIDES:
      where = (f"listed in {listed[image_id].path} row {listed[image_id].line}"
               if image_id in listed else "in no split list")
      bad.report(BadInputError(path, listing.line, f"{image_id} is marked for box supervision "
                               f"but is {where}, not in the training split"))
    elif not boxes.get(image_id):
      bad.report(BadInputError(path, listing.line, f"{image_id} is marked for box supervision "
                               f"but has no box in {boxes_from or BBOX_FILE + ' (not found)'}"))
    else:
      good.add(image_id)
  return frozenset(good)


def assign_splits(kept: Sequence[Entry], listed: dict[str, Listing], marked: frozenset[str],
                  val_fraction: float, seed: int) -> dict[str, str]:
  """The output split of each kept image: its list's, with validation carved by patient from the
  training side (`val_fraction` of its patients, bar those with a marked image, which stay in
  training so that no box-supervised image is lost to validation)."""
  keep_in_train = {e.patient_id for e in kept if e.image_id in marked}
  candidates = (e.patient_id for e in kept
                if listed[e.image_id].side in TRAIN_SIDES and e.patient_id not in keep_in_train)
  val_patients = common.carve_by_patient(candidates, val_fraction, seed)

  def split_of(entry):
    side = listed[entry.image_id].side
    if side in TRAIN_SIDES:
      return "val" if entry.patient_id in val_patients else "train"
    return side

  return {e.image_id: split_of(e) for e in kept}


def patients_in_both(items: Sequence[Item], first: str, second: str) -> set[str]:
  """The patients with images in both splits `first` and `second`."""
  patients = collections.defaultdict(set)
  for item in items:
    patients[item.split].add(item.entry.patient_id)
  return patients[first] & patients[second]


def split_facts(lists: SplitLists, entries: dict[str, Entry], listed: dict[str, Listing],
                items: Sequence[Item], bad: common.BadInputs) -> dict:
  """What the manifest records of the split lists: their file names, the images they leave out
  and the patients shared by train and test (none with the official lists, where either is bad
  input)."""
  unlisted = sum(1 for i in entries if i not in listed and i not in bad.dropped)
  shared = patients_in_both(items, "train", "test")
  if unlisted:
    logging.info("left out %d images of Data_Entry that no split list names", unlisted)
  if shared:
    logging.warning("%d patients have images in both train and test: the split lists are "
                    "image-level, not patient-disjoint", len(shared))
  return dict(split_lists={side: os.path.basename(path) for side, path in lists.files.items()},
              box_list=os.path.basename(lists.box_list) if lists.box_list else None,
              unlisted=unlisted, patients_in_train_and_test=len(shared))


def plan(src: str, bad: common.BadInputs, val_fraction: float, seed: int, lists: SplitLists,
         fine_labels: str | None = None) -> Plan:
  """Reads and checks every metadata file (`fine_labels`: the --fine-labels CSV), finds the
  images and assigns the splits."""
  data_entry = find_data_entry(src)
  entries = read_data_entry(data_entry, bad)
  listed = read_split_lists(lists.files, data_entry, entries, bad)
  if lists.official:
    check_all_listed(entries, listed, data_entry, bad)
    check_patients(entries, listed, bad)
  boxes, extras, boxes_from = read_boxes(src, data_entry, entries, bad)
  fine = extras.fine if extras else None
  if fine_labels:  # never with extras: check_fine_labels_option
    fine = read_fine_labels(fine_labels, data_entry, entries, bad)
  image_paths = find_images(src)
  check_images_found(src, data_entry, entries, listed, image_paths, bad)
  marked = (read_box_list(lists.box_list, data_entry, entries, listed, boxes, boxes_from, bad)
            if lists.box_list else frozenset())
  kept = [entries[i] for i in sorted(listed) if i not in bad.dropped]
  val_from_list = "val" in lists.files
  splits = assign_splits(kept, listed, marked, 0.0 if val_from_list else val_fraction, seed)

  def label_map_of(entry):
    return os.path.join(extras.anatomy_dir, entry.image_id) if extras else None

  items = [Item(e, splits[e.image_id], image_paths[e.image_id], tuple(boxes.get(e.image_id, ())),
                label_map_of(e), box_supervised=e.image_id in marked) for e in kept]
  val_patients = {item.entry.patient_id for item in items if item.split == "val"}
  fine_facts = fine_lib.manifest_facts(fine, [item.entry.image_id for item in items])
  facts = dict(data_entry=os.path.basename(data_entry),
               val_fraction=None if val_from_list else val_fraction, seed=seed,
               val_patients=len(val_patients), boxes_from=boxes_from,
               **split_facts(lists, entries, listed, items, bad), **fine_facts)
  return Plan(data_entry, items, fine, extras.anatomy_names if extras else (), facts)


def make_example(item: Item, result: common.ImageResult,
                 fine: fine_lib.FineLabels | None) -> tfrecord.CxrExample:
  """The record of a prepared image."""
  entry = item.entry
  fine_labels = fine.vector_of(entry.image_id) if fine else None
  return tfrecord.CxrExample(
      image=result.png, image_id=entry.image_id, patient_id=entry.patient_id,
      study_id=os.path.splitext(entry.image_id)[0],  # NIH has no studies: one image, one study
      view=entry.view, labels=entry.labels,
      boxes=common.normalise_boxes([b.xywh for b in item.boxes], result.width, result.height),
      box_labels=np.array([b.label for b in item.boxes], np.int64),
      fine_labels=fine_labels, anatomy=result.label_map_png, box_supervised=item.box_supervised)


def convert(src: str, out: str, *, image_size: int, val_fraction: float = 0.1, seed: int = 0,
            train_list: str | None = None, test_list: str | None = None,
            val_list: str | None = None, box_list: str | None = None,
            fine_labels: str | None = None, workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False,
            max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Converts the NIH release in `src` into a prepared dataset in `out`; returns its manifest.

  The splits come from `train_list` and `test_list` (and `val_list`) when given, else from the
  official lists in `src`; the images of `box_list` are marked box_supervised; `fine_labels` is a
  CSV of location-aware labels (module docstring).

  Raises:
    BadInputError (a ValueError) naming the file and row of the first bad input, leaving `out`
      untouched, unless skip_bad; and whatever skip_bad, `fine_labels` with phantom_extras/.
    ListOptionsError: only one of `train_list` and `test_list`, or `val_list` without them.
  """
  lists = split_lists(src, train_list=train_list, test_list=test_list, val_list=val_list,
                      box_list=box_list)
  check_fine_labels_option(src, fine_labels)
  bad = common.BadInputs(skip_bad)
  todo = plan(src, bad, val_fraction, seed, lists, fine_labels)
  with writer.DatasetWriter(
      out, DATASET_NAME, label_names=labels_lib.NIH_LABELS, image_size=image_size,
      converter="data_prep.nih", converter_version=VERSION, source=os.path.abspath(src),
      fine_label_names=todo.fine.names if todo.fine else (), anatomy_names=todo.anatomy_names,
      max_shard_bytes=max_shard_bytes, overwrite=overwrite, extra=todo.facts) as dataset:
    bad.record_to(dataset)
    jobs = [common.ImageJob(i.path, image_size, i.label_map_path) for i in todo.items]
    common.add_examples(
        dataset, todo.items, jobs, workers, bad,
        lambda item: (todo.data_entry, item.entry.line, item.entry.image_id),
        lambda item, result: make_example(item, result, todo.fine))
  return writer.load_manifest(out)


def argument_parser() -> argparse.ArgumentParser:
  """Every converter's arguments, NIH's split lists and its location-aware labels."""
  parser = common.argument_parser(__doc__)
  parser.add_argument("--train-list", help="custom training list (with --test-list): one "
                      "Image Index a line; replaces the official split")
  parser.add_argument("--test-list", help="custom test list (with --train-list)")
  parser.add_argument("--val-list", help="custom validation list (else carved from --train-list)")
  parser.add_argument("--box-list", help="training images to mark for box supervision")
  parser.add_argument("--fine-labels", help="CSV of location-aware labels: Image Index, Fine "
                      "Labels (`Nodule|left|lower;Effusion|right|lower`)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argument_parser()
  args = parser.parse_args(argv)
  manifest = common.run_converter(parser, lambda: convert(
      args.src, args.out, image_size=args.image_size, val_fraction=args.val_fraction,
      seed=args.seed, train_list=args.train_list, test_list=args.test_list,
      val_list=args.val_list, box_list=args.box_list, fine_labels=args.fine_labels,
      workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite))
  print(f"wrote {args.out}: {common.split_counts(manifest)}; skipped "
        f"{manifest['skipped']['count']} bad inputs")


if __name__ == "__main__":
  main()
