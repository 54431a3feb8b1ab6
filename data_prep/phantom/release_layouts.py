"""The phantom in CheXpert v1.0's and MIMIC-CXR-JPG 2.x's release layouts (`generate`'s `layout`).

`write` turns the rendered patients (their PNGs in `images/`, their table rows) into the files
data_prep.chexpert or data_prep.mimic reads, with the headers those converters check (taken from
them, so the two cannot drift apart): the images become JPEGs at the release's paths and the NIH
findings become CheXpert's 14 observations (CHEXPERT_OBSERVATION). Every phantom image is one
frontal image of its own study (a patient's follow-ups are separate visits), so the study-level
labels of MIMIC are exactly the image's. docs/phantom.md ("Other layouts") lists the files.
"""

from __future__ import annotations

import datetime
import gzip
import os
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from cxr_jax.data import labels as label_lib
from data_prep import chexpert, mimic
from data_prep.phantom import streams
from data_prep.phantom.layout import MIMIC_MAX_PATIENTS, draw_patients, write_lines

# The CheXpert observation, as the CheXpert and MIMIC CSVs spell it, of each NIH finding the
# phantom draws. Emphysema, Fibrosis and Hernia have no CheXpert observation and are left out:
# an image with only those is not "No Finding", and every mapped observation is 0.0 on it.
CHEXPERT_OBSERVATION = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion",
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
    "Edema": "Edema", "Pleural_Thickening": "Pleural Other",
}
JPEG_QUALITY = 95
CHEXPERT_SEX = {"M": "Male", "F": "Female"}
VALIDATE_FRACTION = 0.1  # of MIMIC's non-test patients, drawn from the seed
FIRST_SUBJECT, FIRST_STUDY = 10_000_000, 50_000_000  # 8-digit ids, as in the release
FIRST_DATE = datetime.date(2150, 1, 1)  # MIMIC's dates are shifted into 2100-2200
FIRST_VISIT_DAYS = 3650  # a patient's first study falls within this many days of FIRST_DATE
DAYS_BETWEEN_VISITS = 180
# Metadata of a view: PerformedProcedureStepDescription and ViewCodeSequence_CodeMeaning.
MIMIC_VIEWS = {"PA": ("CHEST (PA AND LAT)", "postero-anterior"),
               "AP": ("CHEST (PORTABLE AP)", "antero-posterior")}


def write(layout: str, out: str, rows: Sequence[dict[str, Any]], test: set[int], seed: int,
          size: int) -> tuple[dict[str, str], dict[str, int]]:
  """Writes `layout`'s ("chexpert" or "mimic") tables under `out` and moves each image of
  `out`/images/ to its JPEG path (the folder is then removed); returns each image's path (by
  phantom name, relative to `out`) and the images of each of the release's splits."""
  if layout == "chexpert":
    paths, splits = _write_chexpert(out, rows, test)
  elif layout == "mimic":
    paths, splits = _write_mimic(out, rows, test, seed, size)
  else:
    raise ValueError(f"unknown release layout {layout!r}: chexpert or mimic")
  _move_images(out, paths)
  return paths, splits


def observation_cells(findings: Iterable[str]) -> dict[str, str]:
  """An image's 14 CheXpert cells by column name: `No Finding` 1.0 when it has no finding, else
  blank; every other observation 1.0 when one of `findings` maps to it, else 0.0 (the phantom
  knows its findings exactly, so nothing is uncertain, -1.0)."""
  findings = set(findings)
  present = {CHEXPERT_OBSERVATION[f] for f in findings if f in CHEXPERT_OBSERVATION}
  cells = {name: "1.0" if name in present else "0.0" for name in chexpert.LABEL_COLUMNS}
  cells[label_lib.NO_FINDING] = "" if findings else "1.0"
  return cells


def _write_chexpert(out: str, rows: Sequence[dict[str, Any]],
                    test: set[int]) -> tuple[dict[str, str], dict[str, int]]:
  """CheXpert-v1.0-small/{train,valid}.csv (test patients in valid.csv); returns the paths and
  the images of each CSV."""
  folder = chexpert.LAYOUTS["small"]
  header = ",".join(chexpert.HEADER)
  lines = {"train": [header], "valid": [header]}
  paths = {}
  for row in rows:
    split = "valid" if row["patient"] in test else "train"
    path = (f"{folder}/{split}/patient{row['patient']:05d}/study{row['follow_up'] + 1}/"
            "view1_frontal.jpg")
    cells = observation_cells(row["labels"])
    lines[split].append(",".join([path, CHEXPERT_SEX[row["sex"]], str(row["age"]), "Frontal",
                                  row["view"]] + [cells[c] for c in chexpert.LABEL_COLUMNS]))
    paths[row["image"]] = path
  os.makedirs(os.path.join(out, folder))
  files = {"train": chexpert.TRAIN_CSV, "valid": chexpert.VALID_CSV}
  for split, name in files.items():
    write_lines(out, os.path.join(folder, name), lines[split])
  return paths, {name: len(lines[split]) - 1 for split, name in files.items()}


def _write_mimic(out: str, rows: Sequence[dict[str, Any]], test: set[int], seed: int,
                 size: int) -> tuple[dict[str, str], dict[str, int]]:
  """MIMIC-CXR-JPG's four gzipped tables (the negbio labels are the chexpert labels: both
  labelers would read the phantom's findings alike); returns the paths and the images of each
  official split."""
  patients = sorted({row["patient"] for row in rows})
  validate = draw_patients(seed, sorted(set(patients) - test), VALIDATE_FRACTION, index=1)
  ids = _mimic_ids(seed, patients, len(rows))
  labels, split, metadata = ([",".join(header)] for header in (
      mimic.LABEL_HEADER, mimic.SPLIT_HEADER, mimic.METADATA_HEADER))
  paths, counts = {}, {name: 0 for name in mimic.SPLITS}
  for n, row in enumerate(rows):
    subject, study, dicom = ids["subjects"][row["patient"]], ids["studies"][n], ids["dicoms"][n]
    official = ("test" if row["patient"] in test else
                "validate" if row["patient"] in validate else "train")
    cells = observation_cells(row["labels"])
    labels.append(",".join([subject, study] + [cells[c] for c in mimic.LABEL_COLUMNS]))
    split.append(f"{dicom},{study},{subject},{official}")
    metadata.append(_metadata_line(row, size, ids, n))
    paths[row["image"]] = f"{mimic.IMAGES_DIR}/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
    counts[official] += 1
  for name, lines in ((mimic.LABEL_FILES["chexpert"], labels),
                      (mimic.LABEL_FILES["negbio"], labels), (mimic.SPLIT_FILE, split),
                      (mimic.METADATA_FILE, metadata)):
    _write_gz(os.path.join(out, name + ".gz"), lines)
  return paths, counts


def _mimic_ids(seed: int, patients: Sequence[int], num_images: int) -> dict[str, Any]:
  """MIMIC's ids, drawn from the seed: distinct 8-digit subject ids (ascending with the patient)
  and study ids (ascending with the image), dicom ids of five dash-separated groups of 8 hex
  digits, each patient's first study date (days after FIRST_DATE) and each study's time of day
  (seconds)."""
  rng = np.random.default_rng([seed, 0, streams.RELEASE_IDS, 0])
  subjects = np.sort(rng.choice(MIMIC_MAX_PATIENTS, len(patients), replace=False))
  # Up to 5 images per patient: the study ids run up to 99999999 (8 digits).
  studies = np.sort(rng.choice(100_000_000 - FIRST_STUDY, num_images, replace=False))
  hexes = rng.bytes(20 * num_images).hex()
  starts = rng.integers(0, FIRST_VISIT_DAYS, len(patients))
  seconds = rng.integers(0, 86400, num_images)
  return dict(
      subjects={p: str(FIRST_SUBJECT + int(s)) for p, s in zip(patients, subjects)},
      studies=[str(FIRST_STUDY + int(s)) for s in studies],
      dicoms=["-".join(hexes[40 * n + 8 * g:40 * n + 8 * g + 8] for g in range(5))
              for n in range(num_images)],
      start={p: int(s) for p, s in zip(patients, starts)},
      seconds=[int(s) for s in seconds])


def _metadata_line(row: dict[str, Any], size: int, ids: dict[str, Any], n: int) -> str:
  """Image `n`'s metadata.csv row: ids, view, size (Rows, Columns), a date DAYS_BETWEEN_VISITS
  per follow-up after its patient's first, a time (the converter reads ids and ViewPosition)."""
  subject, study, dicom = ids["subjects"][row["patient"]], ids["studies"][n], ids["dicoms"][n]
  start, seconds = ids["start"][row["patient"]], ids["seconds"][n]
  time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.000"
  procedure, meaning = MIMIC_VIEWS[row["view"]]
  date = FIRST_DATE + datetime.timedelta(days=start + DAYS_BETWEEN_VISITS * row["follow_up"])
  return ",".join([dicom, subject, study, procedure, row["view"], str(size), str(size),
                   date.strftime("%Y%m%d"), time, procedure, meaning, "Erect"])


def _write_gz(path: str, lines: Sequence[str]) -> None:
  """Writes `lines` gzipped, with a fixed mtime so that the bytes depend on the lines only."""
  with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    f.write(("\n".join(lines) + "\n").encode())


def _move_images(out: str, paths: dict[str, str]) -> None:
  """Re-encodes each rendered PNG of `out`/images/ as a grayscale JPEG at its path, then removes
  the PNGs' folder (the releases ship JPEGs; the anatomy maps in the extras stay PNG)."""
  source = os.path.join(out, "images")
  for name, path in paths.items():
    target = os.path.join(out, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with Image.open(os.path.join(source, name)) as image:
      image.save(target, format="JPEG", quality=JPEG_QUALITY)
    os.remove(os.path.join(source, name))
  os.rmdir(source)
