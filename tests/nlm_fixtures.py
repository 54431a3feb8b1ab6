"""Builders of small NLM Montgomery and Shenzhen source folders in the releases' exact layouts.

`write_montgomery` writes MontgomerySet/CXR_png/MCUCXR_nnnn_t.png and the lung masks
MontgomerySet/ManualMask/{leftMask,rightMask}/<same name>.png; `write_shenzhen` writes
ChinaSet_AllFiles/CXR_png/CHNCXR_nnnn_t.png and, beside ChinaSet_AllFiles, the Kaggle masks
mask/CHNCXR_nnnn_t_mask.png holding both lungs (one image has no mask, as 96 of the real 662
have none). A `Thumbs.db` sits among the images and masks of both.

Images are 64-128 px, of varying sizes (portrait and landscape), with two dark elliptical lungs on
a grey background whose value differs per image; in Montgomery one image is 16-bit, in Shenzhen
one is RGB. Masks are 0/255 with values 255 inside the lung ellipses (and a stray 100, below the
threshold, elsewhere). As on a real PA film, Montgomery's `leftMask` holds the lung on the
image's RIGHT half (the patient's left). One Shenzhen mask also holds a small speck next to the
lung on the image's right, which the converter gives to that lung. Tests break one thing with the
helpers at the end.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import numpy as np
from PIL import Image

LUNG_GRAY = 40  # the lungs' 8-bit value
MONTGOMERY = "MontgomerySet"
SHENZHEN = "ChinaSet_AllFiles"
IMAGE_DIR = "CXR_png"
SIDES = ("leftMask", "rightMask")


@dataclasses.dataclass(frozen=True)
class Xray:
  """One fixture image: name, size (width, height), background gray, PNG mode, mask or not."""

  name: str
  size: tuple[int, int]
  gray: int
  mode: str = "L"  # "L", "I;16" or "RGB"
  has_mask: bool = True
  speck: bool = False  # Shenzhen: a small detached region next to the image-right lung


MONTGOMERY_IMAGES = (
    Xray("MCUCXR_0001_0", (96, 112), 150),
    Xray("MCUCXR_0002_1", (112, 96), 160, mode="I;16"),
    Xray("MCUCXR_0003_0", (64, 64), 170),
    Xray("MCUCXR_0004_1", (128, 120), 180),
    Xray("MCUCXR_0005_0", (80, 100), 190),
)
SHENZHEN_IMAGES = (
    Xray("CHNCXR_0001_0", (100, 100), 150),
    Xray("CHNCXR_0002_1", (120, 104), 160, mode="RGB"),
    Xray("CHNCXR_0003_0", (96, 128), 170, speck=True),
    Xray("CHNCXR_0004_1", (128, 96), 180),
    Xray("CHNCXR_0005_0", (72, 80), 190),
    Xray("CHNCXR_0006_1", (88, 88), 200, has_mask=False),
)


def lung_masks(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(on the image's left, on the image's right): two ellipses, each in its half, as booleans."""
  width, height = size
  y, x = np.mgrid[:height, :width]
  cy, ry = height * 0.5, height * 0.32

  def ellipse(cx, rx):
    return ((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2 <= 1

  # The image-right lung is the larger, so that size order differs from raster order.
  return ellipse(width * 0.27, width * 0.16), ellipse(width * 0.72, width * 0.18)


def speck_mask(size: tuple[int, int]) -> np.ndarray:
  """A 3 x 3 speck right of the image-right lung, not touching it."""
  width, height = size
  mask = np.zeros((height, width), bool)
  x0, y0 = int(width * 0.93), height // 2
  mask[y0:y0 + 3, x0:x0 + 3] = True
  return mask


def pixels_of(xray: Xray) -> np.ndarray:
  """The 8-bit gray pixels of an image: its background and two dark lungs."""
  on_left, on_right = lung_masks(xray.size)
  gray = np.full(on_left.shape, xray.gray, np.uint8)
  gray[on_left | on_right] = LUNG_GRAY
  return gray


def png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def image_png(xray: Xray) -> bytes:
  """The PNG of an image, in its mode (16-bit: the 8-bit value x 257, so it scales back)."""
  gray = pixels_of(xray)
  if xray.mode == "I;16":
    return png_bytes(Image.fromarray(gray.astype(np.uint16) * 257))  # mode I;16
  return png_bytes(Image.fromarray(gray, "L").convert(xray.mode))


def mask_png(mask: np.ndarray) -> bytes:
  """A 0/255 mask PNG, with a stray 100 (below the 127 threshold) outside the mask."""
  values = np.where(mask, 255, 0).astype(np.uint8)
  values[0, 0] = 0 if mask[0, 0] else 100
  return png_bytes(Image.fromarray(values, "L"))


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def montgomery_image(root, name: str) -> pathlib.Path:
  return pathlib.Path(root) / MONTGOMERY / IMAGE_DIR / f"{name}.png"


def montgomery_mask(root, side: str, name: str) -> pathlib.Path:
  return pathlib.Path(root) / MONTGOMERY / "ManualMask" / side / f"{name}.png"


def shenzhen_image(root, name: str) -> pathlib.Path:
  return pathlib.Path(root) / SHENZHEN / IMAGE_DIR / f"{name}.png"


def shenzhen_mask(root, name: str) -> pathlib.Path:
  return pathlib.Path(root) / "mask" / f"{name}_mask.png"


def write_montgomery(root, images=MONTGOMERY_IMAGES) -> pathlib.Path:
  """Writes a Montgomery source folder (module docstring)."""
  root = pathlib.Path(root)
  for xray in images:
    write(montgomery_image(root, xray.name), image_png(xray))
    on_left, on_right = lung_masks(xray.size)
    # A PA film: the patient's left lung (leftMask) is on the image's right.
    write(montgomery_mask(root, "leftMask", xray.name), mask_png(on_right))
    write(montgomery_mask(root, "rightMask", xray.name), mask_png(on_left))
  write(root / MONTGOMERY / IMAGE_DIR / "Thumbs.db", b"\xd0\xcf\x11\xe0 not an image")
  for side in SIDES:
    write(root / MONTGOMERY / "ManualMask" / side / "Thumbs.db", b"\xd0\xcf\x11\xe0")
  return root


def shenzhen_lungs(xray: Xray) -> np.ndarray:
  """The Kaggle-style mask of an image: both lungs (and its speck) in one."""
  on_left, on_right = lung_masks(xray.size)
  return on_left | on_right | (speck_mask(xray.size) if xray.speck else False)


def write_shenzhen(root, images=SHENZHEN_IMAGES) -> pathlib.Path:
  """Writes a Shenzhen source folder with the masks in `mask/` beside ChinaSet_AllFiles."""
  root = pathlib.Path(root)
  for xray in images:
    write(shenzhen_image(root, xray.name), image_png(xray))
    if xray.has_mask:
      write(shenzhen_mask(root, xray.name), mask_png(shenzhen_lungs(xray)))
  write(root / SHENZHEN / IMAGE_DIR / "Thumbs.db", b"\xd0\xcf\x11\xe0 not an image")
  write(root / "mask" / "Thumbs.db", b"\xd0\xcf\x11\xe0")
  return root


def expected_label_map(xray: Xray, size: int, right_id: int, left_id: int) -> np.ndarray:
  """The size x size map the converter should write: the image-left lung right_id, the
  image-right lung (and any speck) left_id, resized with NEAREST."""
  on_left, on_right = lung_masks(xray.size)
  ids = np.zeros(on_left.shape, np.uint8)
  ids[on_left] = right_id
  ids[on_right] = left_id
  if xray.speck:
    ids[speck_mask(xray.size)] = left_id
  return np.asarray(Image.fromarray(ids, "L").resize((size, size), Image.Resampling.NEAREST))


def write_mask_array(path, values: np.ndarray) -> pathlib.Path:
  """Overwrites a mask with a uint8 array."""
  return write(pathlib.Path(path), png_bytes(Image.fromarray(values.astype(np.uint8), "L")))
