"""Builders of small JSRT + SCR source folders in the releases' exact formats.

`write_jsrt` writes All247images/<name>.IMG as raw 2048 x 2048 big-endian uint16 files of 12-bit
optical density (8 MiB each), SCR's scratch/fold{1,2}/masks/<organ>/<name>.gif as 1024 x 1024
grey-palette GIFs of values 0 and 255 in folders named with spaces, and
Clinical_Information/CLNDAT_EN.txt and CNNDAT_EN.TXT with CR line ends and stray tabs. Every image
has the same organs: rectangles on the 1024 grid at multiples of 32 px, so that a 32 px output
samples each organ whole; they overlap (heart under both lungs, each clavicle over its lung's
apex). The lungs are dense (dark once inverted) on a lighter background of a density that differs
per image, and a 64 x 64 block in the top-left corner is above 12 bits (4095), to be clipped.
Tests then break one thing with the helpers at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pathlib

import numpy as np
from PIL import Image

IMAGE_SIDE, MASK_SIDE = 2048, 1024
IMAGE_DIR = "All247images"
ORGAN_DIRS = ("right lung", "left lung", "heart", "right clavicle", "left clavicle")
# (x0, y0, x1, y1), end exclusive, on the 1024 grid; the patient's right lung is on the image's
# left.
ORGAN_BOXES = {
    "right lung": (128, 192, 448, 800),
    "left lung": (576, 192, 896, 800),
    "heart": (384, 544, 672, 864),
    "right clavicle": (96, 128, 480, 256),
    "left clavicle": (544, 128, 928, 256),
}
# The documented priority, lowest first, and the ANATOMY_NAMES id of each organ.
PRIORITY = ("heart", "right lung", "left lung", "right clavicle", "left clavicle")
ORGAN_IDS = {"right lung": 1, "left lung": 2, "heart": 3, "right clavicle": 4,
             "left clavicle": 5}
LUNG_DENSITY = 3500
CLIPPED_DENSITY = 5000  # above 12 bits: clipped to 4095, i.e. black once inverted
CLIPPED_BLOCK = 64  # its side, in the top-left corner of the 2048 grid


@dataclasses.dataclass(frozen=True)
class Jsrt:
  """One image of the fixture: its name, SCR fold and background density."""

  name: str
  fold: str
  density: int


IMAGES = (
    Jsrt("JPCLN001", "fold1", 1000),
    Jsrt("JPCLN002", "fold2", 1200),
    Jsrt("JPCLN003", "fold1", 1400),
    Jsrt("JPCNN001", "fold1", 1600),
    Jsrt("JPCNN002", "fold2", 1800),
    Jsrt("JPCNN003", "fold1", 2000),
)
# CLNDAT_EN.txt's rows: name, subtlety, size (mm), age, sex, x, y, malignancy, location,
# diagnosis; JPCLN002's free text holds stray tabs (12 fields), JPCLN003's age is "?".
CLINICAL_ROWS = (
    "JPCLN001.IMG\t5\t14\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer",
    "JPCLN002.IMG\t4\t28\t62\tfemale\t512\t1024\tbenign\tr.lower lobe\t\thamartoma\t",
    "JPCLN003.IMG\t1\t7\t?\tmale\t20\t2040\tmalignant\tr.middle lobe\tlung cancer",
)
NON_NODULE_ROWS = ("JPCNN001.IMG 38 male non-nodule", "JPCNN002.IMG 71 female non-nodule",
                   "JPCNN003.IMG 56 male non-nodule")


def density_of(jsrt: Jsrt) -> np.ndarray:
  """The 2048 x 2048 optical density of an image: its background, dense lungs, clipped corner."""
  density = np.full((IMAGE_SIDE, IMAGE_SIDE), jsrt.density, np.uint16)
  for organ in ("right lung", "left lung"):
    x0, y0, x1, y1 = (2 * v for v in ORGAN_BOXES[organ])
    density[y0:y1, x0:x1] = LUNG_DENSITY
  density[:CLIPPED_BLOCK, :CLIPPED_BLOCK] = CLIPPED_DENSITY
  return density


def write_raw(path: pathlib.Path, density: np.ndarray) -> pathlib.Path:
  """Writes a raw JSRT file: big-endian uint16, no header."""
  path.parent.mkdir(parents=True, exist_ok=True)
  density.astype(">u2").tofile(path)
  return path


def gif_bytes(values: np.ndarray) -> bytes:
  """A grey-palette GIF of a uint8 array, as SCR's masks are."""
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint8), "L").save(buffer, format="GIF")
  return buffer.getvalue()


@functools.cache
def organ_gif(organ: str) -> bytes:
  """The GIF of one organ's rectangle (every fixture image has the same)."""
  x0, y0, x1, y1 = ORGAN_BOXES[organ]
  values = np.zeros((MASK_SIDE, MASK_SIDE), np.uint8)
  values[y0:y1, x0:x1] = 255
  return gif_bytes(values)


def image_path(root: pathlib.Path, name: str) -> pathlib.Path:
  """The .IMG file of an image in a fixture."""
  return pathlib.Path(root) / IMAGE_DIR / f"{name}.IMG"


def mask_path(root: pathlib.Path, fold: str, organ: str, name: str) -> pathlib.Path:
  """The mask GIF of an image's organ in a fold of a fixture."""
  return pathlib.Path(root) / "scratch" / fold / "masks" / organ / f"{name}.gif"


def write_masks(root: pathlib.Path, fold: str, name: str) -> None:
  """Writes the five organ masks of an image into a fold."""
  for organ in ORGAN_DIRS:
    path = mask_path(root, fold, organ, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(organ_gif(organ))


def write_jsrt(root, images=IMAGES, clinical: bool = True) -> pathlib.Path:
  """Writes a JSRT + SCR source folder (module docstring)."""
  root = pathlib.Path(root)
  for jsrt in images:
    write_raw(image_path(root, jsrt.name), density_of(jsrt))
    write_masks(root, jsrt.fold, jsrt.name)
  if clinical:
    folder = root / "Clinical_Information"
    folder.mkdir(parents=True, exist_ok=True)
    write_cr_lines(folder / "CLNDAT_EN.txt", CLINICAL_ROWS)
    write_cr_lines(folder / "CNNDAT_EN.TXT", NON_NODULE_ROWS)
  return root


def synthetic_images(count: int) -> tuple[Jsrt, ...]:
  """`count` images alternating between the folds, half of them with a nodule (for timing)."""
  return tuple(Jsrt(f"JPC{'LN' if i % 2 else 'NN'}{i:03d}", f"fold{1 + i % 2}", 1000 + 10 * i)
               for i in range(1, count + 1))


def write_cr_lines(path: pathlib.Path, rows) -> None:
  """Writes rows ending in CR only, as JSRT's clinical files do."""
  path.write_bytes("".join(row + "\r" for row in rows).encode("latin-1"))


def expected_label_map(size: int) -> np.ndarray:
  """The size x size label map the converter should write: organs painted in PRIORITY at 1024 px,
  resized with NEAREST (PIL samples the source pixel under each output pixel's centre)."""
  ids = np.zeros((MASK_SIDE, MASK_SIDE), np.uint8)
  for organ in PRIORITY:
    x0, y0, x1, y1 = ORGAN_BOXES[organ]
    ids[y0:y1, x0:x1] = ORGAN_IDS[organ]
  centres = (np.arange(size) * MASK_SIDE // size) + MASK_SIDE // size // 2
  return ids[np.ix_(centres, centres)]


def gray_of(density: int) -> int:
  """The 8-bit value of a flat 12-bit density, inverted."""
  return round((4095 - min(density, 4095)) * 255 / 4095)


def clinical_line(root, name: str) -> int:
  """The 1-based line of an image's row in CLNDAT_EN.txt."""
  rows = clinical_file(root).read_bytes().decode("latin-1").split("\r")
  return next(n for n, row in enumerate(rows, 1) if row.startswith(name))


def clinical_file(root) -> pathlib.Path:
  """The CLNDAT_EN.txt of a fixture."""
  return pathlib.Path(root) / "Clinical_Information" / "CLNDAT_EN.txt"


def edit_clinical(root, old: str, new: str) -> None:
  """Replaces `old` (which must be there) by `new` in CLNDAT_EN.txt."""
  path = clinical_file(root)
  text = path.read_bytes().decode("latin-1")
  assert old in text, f"{old!r} not in {path}"
  path.write_bytes(text.replace(old, new, 1).encode("latin-1"))
