"""Builders of small CheXpert v1.0 source folders in the release's exact formats.

`write_chexpert` writes `CheXpert-v1.0-small/` (layout "small") or `CheXpert-v1.0/` (layout
"full") under a root: train.csv and valid.csv with the 19-column header and `1.0`/`0.0`/`-1.0`/
blank values (valid.csv has `0.0`/`1.0` only), and the JPEGs; the small layout's images are half
the full ones' size, as the release's are downscaled. `write_test_csv` adds a test CSV in the same
format (the CheXpert test set as a user has it) and its images; `write_boxes` HAM's box JSON with
its class-name noise. Tests then break one thing with nih_fixtures' `edit` or `append_line`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
from PIL import Image

HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
          "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
          "Pleural Effusion,Pleural Other,Fracture,Support Devices")
LAYOUTS = {"small": "CheXpert-v1.0-small", "full": "CheXpert-v1.0"}
SMALL_FACTOR = 2  # the small layout's images are this much smaller


@dataclasses.dataclass(frozen=True)
class Xray:
  """One image of the fixture and its CSV row (labels: the 14 cells, in the CSV's order)."""

  image_id: str  # the Path without the layout folder
  frontal_lateral: str
  ap_pa: str
  labels: tuple[str, ...]
  value: int  # the gray level of the flat JPEG
  size: tuple[int, int] = (40, 32)  # full-resolution width, height
  sex: str = "Female"
  age: int = 60

  @property
  def patient(self) -> str:
    return self.image_id.split("/")[1]

  @property
  def study(self) -> str:
    return "/".join(self.image_id.split("/")[1:3])


def _cells(text: str) -> tuple[str, ...]:
  """The 14 label cells of a compact spec: space-separated, `.` for a blank."""
  cells = tuple("" if cell == "." else cell for cell in text.split())
  assert len(cells) == 14, text
  return cells


TRAIN = (
    # A study with two images: a PA frontal and its lateral.
    Xray("train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA",
         _cells(". . 1.0 . . -1.0 . . . 0.0 1.0 . . ."), 40, sex="Male", age=54),
    Xray("train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
         _cells(". . 1.0 . . -1.0 . . . 0.0 1.0 . . ."), 50, sex="Male", age=54),
    Xray("train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP",
         _cells(". . -1.0 1.0 . 1.0 . . -1.0 . 1.0 . . 1.0"), 60, size=(48, 40), age=77),
    Xray("train/patient00002/study2/view1_frontal.jpg", "Frontal", "LL",
         _cells("1.0 . . . . . . . . 0.0 . . . ."), 70, age=77),
    Xray("train/patient00003/study1/view1_frontal.jpg", "Frontal", "",
         _cells(". . . . . . 1.0 -1.0 . . . . . ."), 80, sex="Unknown", age=0),
    Xray("train/patient00004/study1/view1_frontal.jpg", "Frontal", "RL",
         _cells(". . . . 1.0 . . . . . . . 1.0 ."), 90),
    Xray("train/patient00005/study1/view1_frontal.jpg", "Frontal", "PA",
         _cells("1.0 0.0 0.0 . . 0.0 . . 0.0 0.0 0.0 . . ."), 100),
    Xray("train/patient00005/study1/view2_lateral.jpg", "Lateral", "",
         _cells("1.0 0.0 0.0 . . 0.0 . . 0.0 0.0 0.0 . . ."), 110),
    Xray("train/patient00006/study1/view1_frontal.jpg", "Frontal", "AP",
         _cells(". . . . . . . . 1.0 . -1.0 . . 1.0"), 120),
)

VALID = (
    Xray("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
         _cells("0.0 0.0 1.0 1.0 0.0 0.0 0.0 0.0 1.0 0.0 1.0 0.0 0.0 1.0"), 130),
    Xray("valid/patient64541/study1/view2_lateral.jpg", "Lateral", "",
         _cells("0.0 0.0 1.0 1.0 0.0 0.0 0.0 0.0 1.0 0.0 1.0 0.0 0.0 1.0"), 140),
    Xray("valid/patient64542/study1/view1_frontal.jpg", "Frontal", "PA",
         _cells("1.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"), 150),
)

TEST = (
    Xray("test/patient64741/study1/view1_frontal.jpg", "Frontal", "AP",
         _cells("0.0 1.0 1.0 0.0 0.0 1.0 0.0 0.0 0.0 0.0 1.0 0.0 0.0 1.0"), 160),
    Xray("test/patient64742/study1/view1_frontal.jpg", "Frontal", "PA",
         _cells("1.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"), 170),
)

# HAM's CheXpert box JSON: [xmin, ymin, xmax, ymax] in full-resolution pixels, with the class
# spellings of the real file (`edema`, `Enlarg_Cardiomediastinum`, underscores for spaces).
BOXES = {
    "train/patient00001/study1/view1_frontal.jpg": {
        "Pleural_Effusion": [[4, 8, 20, 24]],
        "edema": [[0, 0, 40, 32], [10, 16, 30, 28]],
    },
    "train/patient00002/study1/view1_frontal.jpg": {
        "Enlarg_Cardiomediastinum": [[12, 10, 36, 30]],
        "Lung_Opacity": [[24, 20, 48, 40]],
    },
    "train/patient00002/study2/view1_frontal.jpg": {"Enlarged_Cardiomediastinum": [[8, 4, 32, 28]]},
    # A lateral image: not converted with --views frontal, so ignored then.
    "train/patient00001/study1/view2_lateral.jpg": {"Atelectasis": [[2, 2, 10, 10]]},
}


def write_chexpert(root: str | os.PathLike, *, layout: str = "small", train=TRAIN,
                   valid=VALID) -> pathlib.Path:
  """Writes a CheXpert source folder under `root` (the --src); returns `root`."""
  root = pathlib.Path(root)
  folder = root / LAYOUTS[layout]
  write_csv(folder / "train.csv", train, layout)
  write_csv(folder / "valid.csv", valid, layout)
  write_images(root, train + valid, layout)
  return root


def write_test_csv(root: str | os.PathLike, path: str | os.PathLike, *, layout: str = "small",
                   rows=TEST) -> pathlib.Path:
  """Writes a test CSV at `path` and its images under `root`'s layout folder; returns `path`."""
  write_csv(pathlib.Path(path), rows, layout)
  write_images(pathlib.Path(root), rows, layout)
  return pathlib.Path(path)


def write_boxes(path: str | os.PathLike, boxes=None) -> pathlib.Path:
  """Writes a HAM-style box JSON (BOXES by default)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(BOXES if boxes is None else boxes, indent=1))
  return path


def write_csv(path: pathlib.Path, rows, layout: str) -> None:
  """Writes a CSV with the 19-column header, one row per image, `\\n` line ends."""
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [HEADER] + [row_text(x, layout) for x in rows]
  path.write_text("\n".join(lines) + "\n")


def row_text(xray: Xray, layout: str = "small") -> str:
  """The CSV line of an image."""
  return ",".join([f"{LAYOUTS[layout]}/{xray.image_id}", xray.sex, str(xray.age),
                   xray.frontal_lateral, xray.ap_pa, *xray.labels])


def stored_size(xray: Xray, layout: str) -> tuple[int, int]:
  """The (width, height) of the image file of a layout."""
  width, height = xray.size
  factor = SMALL_FACTOR if layout == "small" else 1
  return width // factor, height // factor


def write_images(root: pathlib.Path, rows, layout: str) -> None:
  """Writes each row's image as a flat gray JPEG under the layout folder."""
  for xray in rows:
    path = root / LAYOUTS[layout] / xray.image_id
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = stored_size(xray, layout)
    pixels = np.full((height, width), xray.value, np.uint8)
    Image.fromarray(pixels, "L").save(path, format="JPEG", quality=95)


def label_vector(xray: Xray) -> np.ndarray:
  """The 1/0/-1/NaN vector its cells should become."""
  return np.array([float(cell) if cell else np.nan for cell in xray.labels], np.float32)
