"""Builders of small NIH ChestX-ray14 source folders in the release's formats, quirks included.

`write_nih` writes Data_Entry (the v2020 file, or the 2017 one with a trailing comma on every line
and ages like `058Y`), BBox_List_2017.csv (9-field header, 6-field rows, `Infiltrate`), the split
lists without a newline after the last line, the images (flat `images/` or `images_00N/images/`),
and optionally phantom_extras/ as docs/architecture.md describes it; `write_fine_labels` writes a
user's location-aware labels for --fine-labels. Tests then break one thing with `edit`,
`append_line` or `link_outside`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
from PIL import Image

from cxr_jax.data import labels

ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum",
                 "abdomen")


@dataclasses.dataclass(frozen=True)
class Xray:
  """One image of the fixture and its Data_Entry row."""

  patient: int
  follow_up: int
  findings: str  # the Finding Labels cell
  side: str  # "train_val" or "test"
  value: int  # the gray level of a flat image
  size: tuple[int, int] = (32, 32)  # width, height
  mode: str = "L"  # "L", "RGBA" or "I;16"
  view: str = "PA"
  textured: bool = False  # X-ray-like structure and noise instead of a flat `value`

  @property
  def image_id(self) -> str:
    return f"{self.patient:08d}_{self.follow_up:03d}.png"


IMAGES = (
    Xray(1, 0, "No Finding", "train_val", 20),
    Xray(1, 1, "Effusion|Infiltration", "train_val", 40, view="AP"),
    Xray(1, 2, "Nodule|Effusion", "train_val", 60),  # not alphabetical, as in 51 real rows
    Xray(2, 0, "Cardiomegaly", "train_val", 80, size=(40, 24)),
    Xray(2, 1, "No Finding", "train_val", 100, mode="RGBA"),
    Xray(3, 0, "Mass|Nodule|Pleural_Thickening", "train_val", 120, mode="I;16"),
    Xray(4, 0, "Hernia", "train_val", 140),
    Xray(4, 1, "No Finding", "train_val", 160),
    Xray(5, 0, "Infiltration|Mass", "test", 180, size=(40, 24)),
    Xray(5, 1, "Atelectasis", "test", 200),
    Xray(6, 0, "Effusion|Pneumothorax", "test", 220),
)

# (Image Index, Finding Label, x, y, w, h) in pixels of the source image; the second box runs past
# the image's corner.
BOXES = (
    ("00000005_000.png", "Infiltrate", 4.0, 6.0, 8.0, 12.0),
    ("00000005_000.png", "Mass", 30.0, 12.0, 20.0, 20.0),
    ("00000006_000.png", "Effusion", 0.0, 0.0, 16.0, 8.0),
)

# (Image Index, Finding Label, Side, Zone, x, y, w, h), one row per finding instance.
FINE_LABELS = (
    ("00000001_001.png", "Effusion", "right", "lower", 2, 20, 10, 8),
    ("00000001_001.png", "Infiltration", "left", "upper", 18, 4, 8, 8),
    ("00000001_001.png", "Effusion", "left", "lower", 20, 20, 10, 8),
    ("00000005_000.png", "Mass", "left", "middle", 24, 8, 8, 8),
)

# (Image Index, Fine Labels) of a user's location-aware labels for --fine-labels: an alias
# (`Infiltrate`), an empty cell (no finding located) and a finding left unlocated
# (Pleural_Thickening of 00000003_000); the other images are absent.
USER_FINE_LABELS = (
    ("00000001_000.png", ""),
    ("00000001_001.png", "Effusion|right|lower;Infiltration|left|upper"),
    ("00000003_000.png", "Nodule|left|lower;Mass|right|upper;Nodule|right|middle"),
    ("00000005_000.png", "Infiltrate|right|middle;Mass|left|middle"),
)

_DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{gender},"
                      "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write_nih(root: str | os.PathLike, *, images=IMAGES, boxes=BOXES, variant: str = "v2020",
              gender_column: str = "Patient Gender", layout: str = "flat",
              extras: bool = False) -> pathlib.Path:
  """Writes an NIH source folder; variant "v2020" or "2017", layout "flat" or "sharded"."""
  root = pathlib.Path(root)
  for index, xray in enumerate(images):
    shard = "images" if layout == "flat" else f"images_{index % 2 + 1:03d}/images"
    folder = root / shard
    folder.mkdir(parents=True, exist_ok=True)
    _image(xray).save(folder / xray.image_id)
  _write_data_entry(root, images, variant, gender_column)
  bbox_rows = [",".join(str(field) for field in box) for box in boxes]
  _write_lines(root / "BBox_List_2017.csv", ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
               + bbox_rows, final_newline=True)
  for side in ("train_val", "test"):
    _write_lines(root / f"{side}_list.txt", [x.image_id for x in images if x.side == side],
                 final_newline=False)
  if extras:
    write_extras(root, images)
  return root


def write_extras(root: pathlib.Path, images=IMAGES, fine_labels=FINE_LABELS) -> None:
  """Writes phantom_extras/: anatomy label maps, fine_labels.csv and phantom_info.json."""
  extras = root / "phantom_extras"
  (extras / "anatomy").mkdir(parents=True)
  for xray in images:
    Image.fromarray(anatomy_map(xray.size), "L").save(extras / "anatomy" / xray.image_id)
  rows = [",".join(str(field) for field in row) for row in fine_labels]
  _write_lines(extras / "fine_labels.csv", ["Image Index,Finding Label,Side,Zone,x,y,w,h"] + rows,
               final_newline=True)
  info = dict(generator_version="fixture", seed=0, anatomy_names=list(ANATOMY_NAMES),
              label_names=list(labels.NIH_LABELS))
  (extras / "phantom_info.json").write_text(json.dumps(info))


def write_fine_labels(path: str | os.PathLike, rows=USER_FINE_LABELS) -> pathlib.Path:
  """Writes a --fine-labels CSV whose first column (`Source`) the converter is to ignore."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_lines(path, ["Source,Image Index,Fine Labels"]
               + [f"imagenome,{image_id},{cell}" for image_id, cell in rows], final_newline=True)
  return path


def anatomy_map(size: tuple[int, int]) -> np.ndarray:
  """A label map of the given (width, height): background on top, then the patient's right lung
  (viewer's left), left lung, and abdomen at the bottom."""
  width, height = size
  ids = np.full((height, width), 1, np.uint8)
  ids[: height // 4] = 0
  ids[height // 4: 3 * height // 4, : width // 2] = 2
  ids[height // 4: 3 * height // 4, width // 2:] = 3
  ids[3 * height // 4:] = 6
  return ids


def edit(path: str | os.PathLike, old: str, new: str) -> None:
  """Replaces the first occurrence of `old` (which must be there) by `new` in a text file."""
  path = pathlib.Path(path)
  text = path.read_text()
  assert old in text, f"{old!r} not in {path}"
  path.write_text(text.replace(old, new, 1))


def append_line(path: str | os.PathLike, line: str) -> None:
  """Appends a line, after a newline when the file lacks a final one."""
  path = pathlib.Path(path)
  text = path.read_text()
  path.write_text(text + ("" if text.endswith("\n") else "\n") + line)


def line_of(path: str | os.PathLike, text: str) -> int:
  """The 1-based number of the first line of a file that contains `text`."""
  for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    if text in line:
      return number
  raise AssertionError(f"{text!r} not in {path}")


# The folder, next to a source folder, that `link_outside` moves files to.
OUTSIDE = "outside"


def link_outside(src: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """Moves a file or folder of `src` to OUTSIDE next to `src`, leaves a symlink to it in its
  place, and returns the link's path."""
  target = src.parent / OUTSIDE / path.name
  target.parent.mkdir(exist_ok=True)
  path.rename(target)
  path.symlink_to(target)
  return path


def _image(xray: Xray) -> Image.Image:
  width, height = xray.size
  if xray.textured:
    pixels = _texture(width, height, xray.value)
  else:
    pixels = np.full((height, width), xray.value, np.uint8)
  if xray.mode == "I;16":
    return Image.fromarray(pixels.astype(np.uint16) * 257)  # full 16-bit range
  if xray.mode == "RGBA":
    return Image.fromarray(np.stack([pixels] * 3 + [np.full_like(pixels, 255)], -1), "RGBA")
  return Image.fromarray(pixels, "L")


def _texture(width: int, height: int, seed: int) -> np.ndarray:
  """Smooth body-like shading with ribs and noise, so that PNG coding costs what real films do."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  body = 160 * np.exp(-((x - 0.5) ** 2 / 0.08 + (y - 0.55) ** 2 / 0.15))
  ribs = 20 * np.sin(60 * y + 5 * np.abs(x - 0.5)) * (body > 60)
  return np.clip(body + ribs + rng.normal(0, 6, (height, width)), 0, 255).astype(np.uint8)


def _write_data_entry(root: pathlib.Path, images, variant: str, gender_column: str) -> None:
  trailing = "," if variant == "2017" else ""  # the original file ends every line with a comma
  lines = [_DATA_ENTRY_HEADER.format(gender=gender_column) + trailing]
  for xray in images:
    age = 40 + xray.patient
    age_text = f"{age:03d}Y" if variant == "2017" else str(age)
    width, height = xray.size
    lines.append(f"{xray.image_id},{xray.findings},{xray.follow_up},{xray.patient},{age_text},"
                 f"{'FM'[xray.patient % 2]},{xray.view},{width},{height},0.143,0.143{trailing}")
  name = "Data_Entry_2017_v2020.csv" if variant == "v2020" else "Data_Entry_2017.csv"
  _write_lines(root / name, lines, final_newline=True)


def _write_lines(path: pathlib.Path, lines, *, final_newline: bool) -> None:
  path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
