"""Converts MIMIC-CXR-JPG 2.x, as released, into a prepared cxr_jax dataset (splits train/val/test).

    python -m data_prep.mimic --src DIR --out DIR --image-size S [--labeler chexpert|negbio]
        [--views frontal|all] [--one-per-study] [--keep-unlabelled] [--fine-labels FILE]
        [--workers N] [--skip-bad] [--overwrite]

Reads from --src (each CSV as `NAME.csv.gz`, as PhysioNet distributes it, or `NAME.csv`; when
both are there the .csv.gz is read, being the file the release's checksums cover; the manifest
names the file read). Headers must be exactly the release's; rows are named by their 1-based line
in the (decompressed) CSV:
  mimic-cxr-2.0.0-chexpert.csv or, with --labeler negbio, mimic-cxr-2.0.0-negbio.csv
      study-level labels: subject_id, study_id and the 14 observations in alphabetical order,
      values 1.0, 0.0, -1.0 or blank, written as 1, 0, -1 and NaN (no uncertainty policy is applied
      here) in labels.CHEXPERT_LABELS order ("Pleural Effusion" is "Effusion"). Each image gets
      the labels of its study.
  mimic-cxr-2.0.0-split.csv   dicom_id, study_id, subject_id, split: the official, subject-disjoint
      split; train, validate and test are written as the splits "train", "val" and "test".
  mimic-cxr-2.0.0-metadata.csv   the view of each image (ViewPosition: PA, AP, LATERAL, LL, ...;
      kept as given, blank written as "UNKNOWN"). Rows of images in no split row are ignored
      (counted as `metadata_only`).
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg   the images (XX: the subject's first two digits), written
      as 8-bit grayscale S x S PNGs (area interpolation) by a pool of --workers processes. Their
      ids are checked (subject and study ids digits, dicom ids letters, digits and dashes), so that
      no path leaves --src; symlinked folders under it are followed.
  --fine-labels (optional, any path)   your own location-aware labels, per image (e.g. derived
      from Chest ImaGenome's scene graphs): a CSV with columns `dicom_id` and `Fine Labels` (found
      by header name; others are ignored), one row per image of split.csv; the cell holds
      `Finding|side|zone` names separated by `;` (`Atelectasis|left|lower;Effusion|right|lower`),
      empty for none, over labels.fine_vocabulary(FINE_FINDINGS): the CHEXPERT_LABELS that have a
      location, i.e. all but "No Finding" and "Support Devices". Records gain fine labels over that
      vocabulary: 1 for a listed location, 0 for the others, and NaN (unknown, masked in training)
      for every location of an image absent from the CSV, and of a finding positive (1) in its
      study's labels that its row does not locate. A listed finding may be uncertain (-1) or blank
      in the study's labels (the row then settles it), not negative (0). See data_prep.fine_labels.
      cxr_manifest.json records the file (`fine_labels_from`) and the written images whose fine
      labels are all unknown (`fine_labels_unlabelled`: absent from it, or with a row skipped by
      --skip-bad).

Records: image_id is the image's path under files/ (`p10/p10000032/s50414267/02aa804e-....jpg`),
patient_id the subject_id, study_id the study_id, view the ViewPosition.

Which images are written, in this order (cxr_manifest.json counts the images each step leaves
out):
  1. every image of split.csv without bad input;
  2. those of a study with a label row; the label files leave out studies without a labelled
     report: their images are dropped (`unlabelled`), or with --keep-unlabelled written with
     unknown (NaN) labels;
  3. --views frontal (the default) keeps PA and AP images, --views all every view (`not_frontal`);
  4. --one-per-study keeps one image per study: PA before AP before any other view, then the
     smallest dicom_id (`not_first_of_study`).

Every bad input (a missing or unreadable image, or one linked from outside --src; a malformed row;
a bad subject, study or dicom id; an unknown split; a subject in two splits; a dicom_id twice in
split.csv or metadata.csv; an image without a metadata row, or whose metadata row names another
subject or study; a bad label value; a second label row for a study; of --fine-labels a malformed
row, a dicom_id not in split.csv, a second row for an image, an unknown fine label, a fine label
whose finding is negative in the study's labels) stops the conversion with an error naming the file
and row, and leaves --out as it was; with --skip-bad it is logged, left out and listed in
cxr_manifest.json instead (a bad label row and a subject in two splits are listed once for each
image they make unusable; an image with a bad --fine-labels row is written with unknown fine
labels, as no row of it can be trusted). A missing file, an unreadable (e.g. truncated .gz) file or
a wrong header always stops the conversion (of --fine-labels, a header without `dicom_id` and `Fine
Labels`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import tfrecord, writer
from data_prep import common
from data_prep import fine_labels as fine_lib
from data_prep.common import BadInputError

VERSION = "1.0"
DATASET_NAME = "mimic"
LABEL_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv", "negbio": "mimic-cxr-2.0.0-negbio.csv"}
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
IMAGES_DIR = "files"
# The label files' observation columns: alphabetical, not labels.CHEXPERT_LABELS's order.
LABEL_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
)
LABEL_HEADER = ("subject_id", "study_id") + LABEL_COLUMNS
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
METADATA_HEADER = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
)
SPLITS = {"train": "train", "validate": "val", "test": "test"}  # official name -> output split
FRONTAL_VIEWS = ("PA", "AP")  # in order of preference for --one-per-study
UNKNOWN_VIEW = "UNKNOWN"
VIEW_CHOICES = ("frontal", "all")
# The findings of --fine-labels: the CHEXPERT_LABELS that can be located; "No Finding" and
# "Support Devices" (lines, tubes and pacemakers wherever they run) have no side and zone.
FINE_FINDINGS = tuple(name for name in labels_lib.CHEXPERT_LABELS
                      if name not in (labels_lib.NO_FINDING, "Support Devices"))
FINE_LABEL_ID = "dicom_id"  # the image column of --fine-labels: the user's labels are per image
# Subject ids have at least the two digits of their pXX folder; a dicom id is letters, digits and
# dashes (in the release, five groups of 8 hex digits), so no id can take a path out of --src.
SUBJECT_ID = re.compile(r"[0-9]{2,}")
STUDY_ID = re.compile(r"[0-9]+")
DICOM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")

Study = tuple[str, str]  # (subject_id, study_id): the key of a label row
# The labels of an image whose study has no label row (kept with --keep-unlabelled).
NO_LABELS = np.full(len(labels_lib.CHEXPERT_LABELS), np.nan, np.float32)
NO_LABELS.flags.writeable = False  # shared by every such image


@dataclasses.dataclass(frozen=True)
class Dicom:
  """One row of split.csv: an image, its study, subject and official split, and its line."""

  dicom_id: str
  study_id: str
  subject_id: str
  split: str  # a key of SPLITS
  line: int

  @property
  def image_id(self) -> str:
    """The image's path under files/, its id in the records."""
    return (f"p{self.subject_id[:2]}/p{self.subject_id}/s{self.study_id}/"
            f"{self.dicom_id}.jpg")

  @property
  def study(self) -> Study:
    return (self.subject_id, self.study_id)


@dataclasses.dataclass(frozen=True)
class Item:
  """An image to write: its split.csv row, output split, view, labels and file."""

  dicom: Dicom
  split: str
  view: str
  labels: np.ndarray
  path: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the metadata says to write, the split file (which names the images' rows), the fine
  labels by dicom_id (None without --fine-labels) and the manifest facts."""

  split_file: str
  items: list[Item]
  fine: fine_lib.FineLabels | None
  facts: dict


def label_positions() -> list[int]:
  """For each column of LABEL_COLUMNS, its index in labels.CHEXPERT_LABELS."""
  positions = [labels_lib.CHEXPERT_LABELS.index(labels_lib.canonical(name))
               for name in LABEL_COLUMNS]
  assert sorted(positions) == list(range(len(labels_lib.CHEXPERT_LABELS))), positions
  return positions


def find_csv(src: str, name: str) -> str:
  """The path of `name`.gz, else of `name`, in `src`."""
  for candidate in (name + ".gz", name):
    path = os.path.join(src, candidate)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"neither {name}.gz nor {name} in {src}")


def check_id(text: str, what: str, pattern: re.Pattern) -> str:
  """`text` if it is a well-formed id; ValueError naming `what` otherwise."""
  if not pattern.fullmatch(text):
    raise ValueError(f"bad {what} {text!r}: expected {pattern.pattern}")
  return text


def read_split(path: str, bad: common.BadInputs) -> dict[str, Dicom]:
  """The rows of split.csv by dicom_id; a dicom_id in two rows is bad (and its image dropped)."""
  dicoms: dict[str, Dicom] = {}
  for line, fields in common.read_exact_table(path, SPLIT_HEADER):
    try:
      dicom = _parse_split_row(common.fit_fields(fields, len(SPLIT_HEADER)), line)
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e)))
      continue
    if dicom.dicom_id in dicoms:
      bad.report(BadInputError(path, line, f"dicom_id {dicom.dicom_id} is also at row "
                               f"{dicoms[dicom.dicom_id].line}", image=dicom.image_id))
      continue
    dicoms[dicom.dicom_id] = dicom
  return dicoms


def _parse_split_row(fields: list[str], line: int) -> Dicom:
  dicom_id, study_id, subject_id, split = fields
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
  return Dicom(dicom_id=check_id(dicom_id, "dicom_id", DICOM_ID),
               study_id=check_id(study_id, "study_id", STUDY_ID),
               subject_id=check_id(subject_id, "subject_id", SUBJECT_ID), split=split, line=line)


def live(dicoms: dict[str, Dicom], bad: common.BadInputs) -> list[Dicom]:
  """The rows whose image no bad input has dropped, by dicom_id."""
  return [dicoms[d] for d in sorted(dicoms) if dicoms[d].image_id not in bad.dropped]


def check_subjects(path: str, dicoms: dict[str, Dicom], bad: common.BadInputs) -> None:
  """The official split is subject-disjoint: a subject in two splits is bad, and each of its
  images is reported (so that --skip-bad drops the subject whole)."""
  rows_of = collections.defaultdict(list)
  for dicom in sorted(live(dicoms, bad), key=lambda d: d.line):
    rows_of[dicom.subject_id].append(dicom)
  for subject, rows in sorted(rows_of.items()):
    first: dict[str, Dicom] = {}  # the first row of each split
    for dicom in rows:
      first.setdefault(dicom.split, dicom)
    if len(first) < 2:
      continue
    where = " and ".join(f"{split} (row {dicom.line})" for split, dicom in first.items())
    for dicom in rows:
      bad.report(BadInputError(path, dicom.line, f"subject {subject} is in both {where}; the "
                               "official split is subject-disjoint", image=dicom.image_id))


def read_metadata(path: str, dicoms: dict[str, Dicom], split_path: str,
                  bad: common.BadInputs) -> tuple[dict[str, str], int]:
  """The view of each image of split.csv, and the number of metadata rows of images in none."""
  views: dict[str, str] = {}
  row_of: dict[str, int] = {}
  metadata_only = 0
  for line, fields in common.read_exact_table(path, METADATA_HEADER):
    dicom = dicoms.get(fields[0])
    image = dicom.image_id if dicom else None
    if image in bad.dropped:
      continue
    try:
      fields = common.fit_fields(fields, len(METADATA_HEADER))
      dicom_id, subject_id, study_id = fields[:3]
      check_id(dicom_id, "dicom_id", DICOM_ID)
      if dicom and (subject_id, study_id) != dicom.study:
        raise ValueError(f"dicom_id {dicom_id} has subject_id {subject_id} and study_id "
                         f"{study_id} here, but {dicom.subject_id} and {dicom.study_id} in "
                         f"{split_path} row {dicom.line}")
      if dicom_id in row_of:
        raise ValueError(f"dicom_id {dicom_id} is also at row {row_of[dicom_id]}")
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e), image=image))
      continue
    row_of[dicom_id] = line
    if dicom is None:
      metadata_only += 1
    else:
      views[dicom_id] = fields[METADATA_HEADER.index("ViewPosition")] or UNKNOWN_VIEW
  return views, metadata_only


def check_metadata_present(split_path: str, metadata_path: str, dicoms: dict[str, Dicom],
                           views: dict[str, str], bad: common.BadInputs) -> None:
  """Every image of split.csv needs a metadata row (its view)."""
  for dicom in live(dicoms, bad):
    if dicom.dicom_id not in views:
      bad.report(BadInputError(split_path, dicom.line, f"dicom_id {dicom.dicom_id} has no row "
                               f"in {metadata_path}", image=dicom.image_id))


def parse_labels(fields: Sequence[str], positions: Sequence[int]) -> np.ndarray:
  """The label vector (CHEXPERT_LABELS order) of a label row's observation fields."""
  vector = np.full(len(labels_lib.CHEXPERT_LABELS), np.nan, np.float32)
  for name, position, text in zip(LABEL_COLUMNS, positions, fields):
    vector[position] = common.chexpert_value(text, name)
  return vector


def report_study(bad: common.BadInputs, path: str, line: int, reason: str,
                 images: Sequence[str]) -> None:
  """Reports a bad label row once for each image of its study, or once if it has none."""
  for image in images or [None]:
    bad.report(BadInputError(path, line, reason, image=image))


def read_labels(path: str, dicoms: dict[str, Dicom], bad: common.BadInputs,
                ) -> tuple[dict[Study, np.ndarray], dict[Study, int]]:
  """The label vector of each study and the row of each study's (first) label row; a bad row
  makes every image of its study bad (a second row for a study too: neither row is more
  trustworthy)."""
  images_of = collections.defaultdict(list)
  for dicom in live(dicoms, bad):
    images_of[dicom.study].append(dicom.image_id)
  positions = label_positions()
  vectors: dict[Study, np.ndarray] = {}
  row_of: dict[Study, int] = {}
  for line, fields in common.read_exact_table(path, LABEL_HEADER):
    study = tuple(fields[:2])
    try:
      fields = common.fit_fields(fields, len(LABEL_HEADER))
      check_id(fields[0], "subject_id", SUBJECT_ID)
      check_id(fields[1], "study_id", STUDY_ID)
      if study in row_of:
        vectors.pop(study, None)
        raise ValueError(f"study {study[1]} of subject {study[0]} is also at row {row_of[study]}")
      row_of[study] = line
      vectors[study] = parse_labels(fields[2:], positions)
    except ValueError as e:
      report_study(bad, path, line, str(e), images_of.get(study, []))
  return vectors, row_of


def read_fine_labels(path: str, dicoms: dict[str, Dicom], vectors: dict[Study, np.ndarray],
                     label_rows: dict[Study, int], split_path: str, label_path: str,
                     bad: common.BadInputs) -> fine_lib.FineLabels:
  """The location-aware labels of the --fine-labels CSV (module docstring) by dicom_id, checked
  against the labels of each image's study (`vectors`, whose rows are `label_rows`)."""
  def describe(dicom_id, finding):
    dicom = dicoms[dicom_id]
    return (f"the labels of its study {dicom.study_id} of subject {dicom.subject_id} "
            f"({label_path} row {label_rows[dicom.study]}), where {finding} is 0.0 (negative)")

  images = fine_lib.Images(
      findings=FINE_FINDINGS, label_names=labels_lib.CHEXPERT_LABELS, id_column=FINE_LABEL_ID,
      labels={d.dicom_id: vectors.get(d.study, NO_LABELS) for d in dicoms.values()},
      listed_in=split_path, describe=describe,
      skip={d.dicom_id for d in dicoms.values() if d.image_id in bad.dropped})
  return fine_lib.read_fine_labels(path, images, bad)


def select_views(dicoms: Iterable[Dicom], views: dict[str, str], which: str) -> list[Dicom]:
  """The images of the chosen views: "frontal" (PA, AP) or "all"."""
  if which == "all":
    return list(dicoms)
  return [d for d in dicoms if views[d.dicom_id] in FRONTAL_VIEWS]


def one_per_study(dicoms: Iterable[Dicom], views: dict[str, str]) -> list[Dicom]:
  """The preferred image of each study: PA, then AP, then any other view; then by dicom_id."""
  def rank(dicom):
    view = views[dicom.dicom_id]
    order = FRONTAL_VIEWS.index(view) if view in FRONTAL_VIEWS else len(FRONTAL_VIEWS)
    return (order, dicom.dicom_id)

  best: dict[Study, Dicom] = {}
  for dicom in dicoms:
    if dicom.study not in best or rank(dicom) < rank(best[dicom.study]):
      best[dicom.study] = dicom
  return sorted(best.values(), key=lambda d: d.dicom_id)


def image_path(src: str, dicom: Dicom) -> str:
  """The file of an image; its checked ids keep the path inside `src` (a link may still lead out:
  check_images_found)."""
  return os.path.join(src, IMAGES_DIR, *dicom.image_id.split("/"))


def check_images_found(src: str, split_path: str, dicoms: Sequence[Dicom],
                       bad: common.BadInputs) -> list[Dicom]:
  """The images whose file exists inside `src`; a missing one, or a link leading out of `src`,
  is bad input."""
  found = []
  for dicom in dicoms:
    path = image_path(src, dicom)
    try:
      if not os.path.isfile(path):
        raise ValueError(f"image {path} not found")
      common.check_inside(path, src)
    except ValueError as e:
      bad.report(BadInputError(split_path, dicom.line, str(e), image=dicom.image_id))
      continue
    found.append(dicom)
  return found


@dataclasses.dataclass(frozen=True)
class Options:
  """What to write: the label file's labeler and which images (module docstring)."""

  labeler: str = "chexpert"
  views: str = "frontal"
  one_per_study: bool = False
  keep_unlabelled: bool = False

  def check(self) -> None:
    """ValueError for an unknown labeler or view choice."""
    if self.labeler not in LABEL_FILES:
      raise ValueError(f"unknown labeler {self.labeler!r}; choose from {list(LABEL_FILES)}")
    if self.views not in VIEW_CHOICES:
      raise ValueError(f"unknown views {self.views!r}; choose from {list(VIEW_CHOICES)}")


def plan(src: str, bad: common.BadInputs, options: Options,
         fine_labels: str | None = None) -> Plan:
  """Reads and checks the CSV files (`fine_labels`: the --fine-labels CSV), joins labels and
  views to the images and selects them."""
  split_path = find_csv(src, SPLIT_FILE)
  metadata_path = find_csv(src, METADATA_FILE)
  label_path = find_csv(src, LABEL_FILES[options.labeler])
  dicoms = read_split(split_path, bad)
  check_subjects(split_path, dicoms, bad)
  views, metadata_only = read_metadata(metadata_path, dicoms, split_path, bad)
  check_metadata_present(split_path, metadata_path, dicoms, views, bad)
  vectors, label_rows = read_labels(label_path, dicoms, bad)
  fine = (read_fine_labels(fine_labels, dicoms, vectors, label_rows, split_path, label_path, bad)
          if fine_labels else None)

  good = live(dicoms, bad)
  labelled = [d for d in good if d.study in vectors]
  unlabelled = len(good) - len(labelled)
  if unlabelled:
    logging.info("%d images are of studies without a row in %s: %s", unlabelled,
                 os.path.basename(label_path),
                 "written with unknown labels" if options.keep_unlabelled else "left out")
  chosen = good if options.keep_unlabelled else labelled
  viewed = select_views(chosen, views, options.views)
  found = check_images_found(src, split_path, viewed, bad)
  kept = one_per_study(found, views) if options.one_per_study else found

  items = [Item(d, SPLITS[d.split], views[d.dicom_id], vectors.get(d.study, NO_LABELS),
                image_path(src, d)) for d in sorted(kept, key=lambda d: d.image_id)]
  facts = dict(
      labeler=options.labeler, label_file=os.path.basename(label_path),
      split_file=os.path.basename(split_path), metadata_file=os.path.basename(metadata_path),
      views=options.views, one_per_study=options.one_per_study,
      keep_unlabelled=options.keep_unlabelled, split_rows=len(dicoms),
      unlabelled=unlabelled, not_frontal=len(chosen) - len(viewed),
      not_first_of_study=len(found) - len(kept), metadata_only=metadata_only,
      view_counts=dict(sorted(collections.Counter(views[d.dicom_id] for d in good).items())),
      split_sizes=split_sizes(items),
      **fine_lib.manifest_facts(fine, [item.dicom.dicom_id for item in items]))
  return Plan(split_path, items, fine, facts)


def split_sizes(items: Sequence[Item]) -> dict[str, dict[str, int]]:
  """The number of subjects and studies of each output split."""
  subjects, studies = collections.defaultdict(set), collections.defaultdict(set)
  for item in items:
    subjects[item.split].add(item.dicom.subject_id)
    studies[item.split].add(item.dicom.study)
  return {split: dict(subjects=len(subjects[split]), studies=len(studies[split]))
          for split in sorted(subjects)}


def make_example(item: Item, result: common.ImageResult,
                 fine: fine_lib.FineLabels | None) -> tfrecord.CxrExample:
  """The record of a prepared image."""
  dicom = item.dicom
  return tfrecord.CxrExample(image=result.png, image_id=dicom.image_id,
                             patient_id=dicom.subject_id, study_id=dicom.study_id,
                             view=item.view, labels=item.labels,
                             fine_labels=fine.vector_of(dicom.dicom_id) if fine else None)


def convert(src: str, out: str, *, image_size: int, labeler: str = "chexpert",
            views: str = "frontal", one_per_study: bool = False, keep_unlabelled: bool = False,
            fine_labels: str | None = None, workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False,
            max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Converts the MIMIC-CXR-JPG release in `src` into a prepared dataset in `out`; returns its
  manifest. The options are the module docstring's; `fine_labels` is the --fine-labels CSV.

  Raises:
    BadInputError (a ValueError) naming the file and row of the first bad input, leaving `out`
      untouched, unless skip_bad; and whatever skip_bad, for a wrong header or unreadable file.
    FileNotFoundError: a CSV file is missing from `src`.
    ValueError: an unknown `labeler` or `views`.
  """
  options = Options(labeler, views, one_per_study, keep_unlabelled)
  options.check()
  bad = common.BadInputs(skip_bad)
  todo = plan(src, bad, options, fine_labels)
  with writer.DatasetWriter(
      out, DATASET_NAME, label_names=labels_lib.CHEXPERT_LABELS, image_size=image_size,
      converter="data_prep.mimic", converter_version=VERSION, source=os.path.abspath(src),
      fine_label_names=todo.fine.names if todo.fine else (), max_shard_bytes=max_shard_bytes,
      overwrite=overwrite, extra=todo.facts) as dataset:
    bad.record_to(dataset)
    jobs = [common.ImageJob(item.path, image_size) for item in todo.items]
    common.add_examples(
        dataset, todo.items, jobs, workers, bad,
        lambda item: (todo.split_file, item.dicom.line, item.dicom.image_id),
        lambda item, result: make_example(item, result, todo.fine))
  return writer.load_manifest(out)


def argument_parser() -> argparse.ArgumentParser:
  """Every converter's arguments (bar the validation carve: MIMIC has an official validation
  split), MIMIC's choices of labels and images, and its location-aware labels."""
  parser = common.argument_parser(__doc__)
  # Left at None so that main can tell that they were given, and refuse them.
  parser.set_defaults(val_fraction=None, seed=None)
  parser.add_argument("--labeler", choices=list(LABEL_FILES), default="chexpert",
                      help="whose labels: mimic-cxr-2.0.0-chexpert.csv or -negbio.csv "
                      "(default chexpert)")
  parser.add_argument("--views", choices=VIEW_CHOICES, default="frontal",
                      help="frontal: PA and AP images only (default); all: every view")
  parser.add_argument("--one-per-study", action="store_true",
                      help="keep one image per study: PA, else AP, else another view; then the "
                      "smallest dicom_id")
  parser.add_argument("--keep-unlabelled", action="store_true",
                      help="write the images of studies without a label row, with unknown labels "
                      "(default: leave them out)")
  parser.add_argument("--fine-labels", help="CSV of location-aware labels per image: dicom_id, "
                      "Fine Labels (`Atelectasis|left|lower;Effusion|right|lower`)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argument_parser()
  args = parser.parse_args(argv)
  if args.val_fraction is not None or args.seed is not None:
    parser.error("--val-fraction and --seed do not apply: MIMIC-CXR-JPG has an official "
                 "validation split (split.csv's `validate`)")
  manifest = common.run_converter(parser, lambda: convert(
      args.src, args.out, image_size=args.image_size, labeler=args.labeler, views=args.views,
      one_per_study=args.one_per_study, keep_unlabelled=args.keep_unlabelled,
      fine_labels=args.fine_labels, workers=args.workers, skip_bad=args.skip_bad,
      overwrite=args.overwrite))
  print(summary(args.out, manifest))


def summary(out: str, manifest: dict) -> str:
  """The line main prints: records per split, images left out by each step, bad inputs."""
  steps = ["not_frontal", "not_first_of_study"]
  if not manifest["keep_unlabelled"]:
    steps.insert(0, "unlabelled")
  left_out = ", ".join(f"{manifest[step]} {step}" for step in steps)
  return (f"wrote {out}: {common.split_counts(manifest)}; left out {left_out}; skipped "
          f"{manifest['skipped']['count']} bad inputs")

if __name__ == "__main__":
  main()
