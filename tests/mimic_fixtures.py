"""Builders of small MIMIC-CXR-JPG 2.x source folders in the release's exact formats.

`write_mimic` writes mimic-cxr-2.0.0-{chexpert,negbio,split,metadata}.csv, gzipped (as PhysioNet
distributes them) or plain, and files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg as small grayscale JPEGs.
The fixture has the three official splits, subject-disjoint; a study with a PA, an AP (of smaller
dicom_id) and a lateral image; a study with two APs; LL and blank views; blank, 0.0, 1.0 and -1.0
label values; a study without a label row; a label row and a metadata row of images that are in
no split row. `write_fine_labels` writes a user's location-aware labels for --fine-labels. Tests
then break one thing with `edit` or `append_line`, which read and write .gz files too.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib

import numpy as np
from PIL import Image

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
LABEL_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv", "negbio": "mimic-cxr-2.0.0-negbio.csv"}
# The release's headers, verbatim.
LABEL_HEADER = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged "
                "Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,"
                "Pleural Other,Pneumonia,Pneumothorax,Support Devices")
SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
METADATA_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,"
                   "Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
                   "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning")
LABEL_COLUMNS = tuple(LABEL_HEADER.split(",")[2:])
VIEW_MEANINGS = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                 "LL": "left lateral", "": ""}


@dataclasses.dataclass(frozen=True)
class Jpg:
  """One image of the fixture: its split.csv and metadata.csv rows and its pixels."""

  number: int  # makes the dicom_id
  subject: str
  study: str
  split: str  # train, validate or test
  view: str  # ViewPosition, "" for blank
  value: int  # the gray level of a flat image
  size: tuple[int, int] = (24, 24)  # width, height

  @property
  def dicom_id(self) -> str:
    """Five dash-separated groups of 8 hex digits, as in the release."""
    n = self.number
    return f"{n:08x}-{n:04x}aaaa-{n:04x}bbbb-{n:04x}cccc-{n:04x}dddd"

  @property
  def image_id(self) -> str:
    return f"p{self.subject[:2]}/p{self.subject}/s{self.study}/{self.dicom_id}.jpg"


IMAGES = (
    # Study 50000001: PA, an AP of smaller dicom_id, and a lateral.
    Jpg(0x20, "10000032", "50000001", "train", "PA", 60),
    Jpg(0x10, "10000032", "50000001", "train", "AP", 40),
    Jpg(0x30, "10000032", "50000001", "train", "LATERAL", 80),
    # Study 50000002: two APs.
    Jpg(0x41, "10000032", "50000002", "train", "AP", 100),
    Jpg(0x40, "10000032", "50000002", "train", "AP", 120),
    Jpg(0x50, "10000764", "50000003", "train", "PA", 140, size=(32, 20)),
    Jpg(0x51, "10000764", "50000003", "train", "LL", 160),
    Jpg(0x60, "11000011", "50000004", "validate", "", 180),
    Jpg(0x61, "11000011", "50000004", "validate", "AP", 200),
    Jpg(0x70, "12000022", "50000005", "test", "PA", 220),
    Jpg(0x71, "12000022", "50000006", "test", "PA", 30),  # its study has no label row
    Jpg(0x80, "19000033", "50000007", "train", "AP", 50),
)
# A metadata row of an image that no split row names (and that has no file).
METADATA_ONLY = Jpg(0x90, "10000032", "50000099", "train", "PA", 0)
UNLABELLED_STUDY = "50000006"

# Label rows by (subject, study): the file's column name -> cell; absent columns are blank.
CHEXPERT = {
    ("10000032", "50000001"): {"Atelectasis": "1.0", "Pleural Effusion": "-1.0",
                               "Support Devices": "0.0", "Cardiomegaly": "0.0"},
    ("10000032", "50000002"): {"No Finding": "1.0"},
    ("10000032", "50000099"): {"Edema": "1.0"},  # a study no split row names
    ("10000764", "50000003"): {"Edema": "1.0", "Consolidation": "-1.0", "Lung Opacity": "1.0",
                               "Pneumonia": "0.0"},
    ("11000011", "50000004"): {"Pneumothorax": "1.0", "Fracture": "-1.0"},
    ("12000022", "50000005"): {"Enlarged Cardiomediastinum": "1.0", "Lung Lesion": "0.0",
                               "Pleural Other": "-1.0"},
    ("19000033", "50000007"): {"No Finding": "1.0", "Support Devices": "1.0"},
}
NEGBIO = {**CHEXPERT,
          ("10000032", "50000001"): {"Pleural Effusion": "1.0", "Support Devices": "-1.0"},
          ("11000011", "50000004"): {"Pneumothorax": "0.0"}}

# (image number, Fine Labels) of a user's location-aware labels for --fine-labels, against the
# chexpert labels above: a finding uncertain (-1) in its study listed under an alias (`Pleural
# Effusion` of 0x20), an empty cell leaving a positive finding unlocated (Atelectasis of 0x10),
# a positive finding unlocated beside located ones (Lung Opacity of 0x50), a blank finding listed
# (Lung Lesion of 0x61), a lateral that is not written by default (0x30) and an image of the
# study without labels (0x71); the other images are absent.
USER_FINE_LABELS = (
    (0x20, "Atelectasis|left|lower;Pleural Effusion|right|lower"),
    (0x10, ""),
    (0x30, "Atelectasis|right|lower"),
    (0x50, "Edema|right|lower;Edema|left|lower;Consolidation|right|lower"),
    (0x61, "Pneumothorax|left|upper;Lung Lesion|left|upper"),
    (0x71, "Edema|left|middle"),
)


def write_mimic(root: str | os.PathLike, *, gz: bool = True, images=IMAGES, chexpert=CHEXPERT,
                negbio=NEGBIO) -> pathlib.Path:
  """Writes a MIMIC-CXR-JPG source folder, its CSV files gzipped (`gz`) or plain."""
  root = pathlib.Path(root)
  for jpg in images:
    path = root / "files" / jpg.image_id
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = jpg.size
    Image.fromarray(np.full((height, width), jpg.value, np.uint8), "L").save(
        path, format="JPEG", quality=95)
  suffix = ".gz" if gz else ""
  for labeler, rows in (("chexpert", chexpert), ("negbio", negbio)):
    write_text(root / (LABEL_FILES[labeler] + suffix), _label_lines(rows))
  write_text(root / (SPLIT_FILE + suffix), "".join(
      [SPLIT_HEADER + "\n"] + [f"{j.dicom_id},{j.study},{j.subject},{j.split}\n" for j in images]))
  write_text(root / (METADATA_FILE + suffix), "".join(
      [METADATA_HEADER + "\n"] + [_metadata_line(j) for j in images + (METADATA_ONLY,)]))
  return root


def write_fine_labels(path: str | os.PathLike, rows=USER_FINE_LABELS) -> pathlib.Path:
  """Writes a --fine-labels CSV whose columns are in another order than the converter names them,
  with a `Source` column it is to ignore."""
  by_number = {jpg.number: jpg for jpg in IMAGES}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_text(path, "".join(["Fine Labels,Source,dicom_id\n"] + [
      f"{cell},imagenome,{by_number[number].dicom_id}\n" for number, cell in rows]))
  return path


def _label_lines(rows) -> str:
  lines = [LABEL_HEADER + "\n"]
  for (subject, study), cells in sorted(rows.items()):
    assert set(cells) <= set(LABEL_COLUMNS), cells
    lines.append(",".join([subject, study] + [cells.get(c, "") for c in LABEL_COLUMNS]) + "\n")
  return "".join(lines)


def _metadata_line(jpg: Jpg) -> str:
  width, height = jpg.size
  procedure = "CHEST (PA AND LAT)" if jpg.view != "AP" else "CHEST (PORTABLE AP)"
  orientation = "Erect" if jpg.view else ""
  return (f"{jpg.dicom_id},{jpg.subject},{jpg.study},{procedure},{jpg.view},{height},{width},"
          f"21800506,2130{jpg.number % 60:02d}.531,{procedure},{VIEW_MEANINGS[jpg.view]},"
          f"{orientation}\n")


def csv_path(root: str | os.PathLike, name: str) -> pathlib.Path:
  """The file of CSV `name` in a fixture: `name`.gz, else `name`."""
  root = pathlib.Path(root)
  return root / (name + ".gz") if (root / (name + ".gz")).exists() else root / name


def read_text(path: str | os.PathLike) -> str:
  """The text of a plain or gzipped (.gz) file."""
  path = pathlib.Path(path)
  if path.suffix == ".gz":
    with gzip.open(path, "rt", encoding="utf-8") as f:
      return f.read()
  return path.read_text()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a plain or, for a .gz name, gzipped text file (with a fixed mtime, so that the
  bytes depend on the text only)."""
  path = pathlib.Path(path)
  if path.suffix == ".gz":
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      f.write(text.encode())
  else:
    path.write_text(text)


def edit(path: str | os.PathLike, old: str, new: str) -> None:
  """Replaces the first occurrence of `old` (which must be there) by `new`."""
  text = read_text(path)
  assert old in text, f"{old!r} not in {path}"
  write_text(path, text.replace(old, new, 1))


def append_line(path: str | os.PathLike, line: str) -> None:
  """Appends a line, after a newline when the file lacks a final one."""
  text = read_text(path)
  write_text(path, text + ("" if text.endswith("\n") else "\n") + line + "\n")


def line_of(path: str | os.PathLike, text: str, occurrence: int = 1) -> int:
  """The 1-based number of the `occurrence`-th line of a file that contains `text`."""
  found = [n for n, line in enumerate(read_text(path).splitlines(), 1) if text in line]
  assert len(found) >= occurrence, f"{text!r} not {occurrence} times in {path}"
  return found[occurrence - 1]
