"""Host-side image decoding, resizing and augmentation, with boxes and label maps kept in step.

Geometry works in normalised image coordinates (0..1 across the image, pixel centres at
(i + 0.5) / size). A training transform maps an output point p to the input point
`A @ (p - 0.5) + 0.5 + t`, so one PIL affine warp does resize, crop (zoom and shift), rotation and
an optional horizontal flip at once. Boxes go through the inverse map; anatomy label maps are
warped with nearest-neighbour sampling.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

_CENTRE = np.array([0.5, 0.5])


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Ranges of the random training transform; zero ranges switch a part off."""

  rotate_deg: float = 7.0          # uniform in [-r, r]
  scale: tuple[float, float] = (0.9, 1.1)  # zoom factor; > 1 crops in
  translate: float = 0.05          # fraction of the image, per axis
  brightness: float = 0.1          # additive, fraction of 255
  contrast: float = 0.1            # multiplicative, around the image mean
  hflip: bool = False              # flips also swap patient left/right in labels and anatomy


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
  """PNG bytes of an image; `compress_level` 0..9 trades size for time (6 is zlib's default)."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()


def decode_png(data: bytes, *, what: str = "image") -> np.ndarray:
  """Decodes PNG bytes into a 2-D uint8 array; a corrupt image raises naming `what`."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode != "L":
        raise ValueError(f"mode {img.mode}, expected 8-bit grayscale 'L'")
      return np.asarray(img)
  except Exception as e:  # PIL raises several unrelated types for broken files
    raise ValueError(f"cannot decode {what}: {e}") from e


def resize(image: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
  """Resizes to size x size: area interpolation for images, nearest for label maps."""
  if image.shape == (size, size):
    return image
  method = Image.NEAREST if nearest else Image.BOX
  return np.asarray(Image.fromarray(image).resize((size, size), method))


def sample_transform(rng: np.random.Generator, params: AugmentParams) -> tuple[np.ndarray, np.ndarray, bool]:
  """A random (A, t, flipped) in normalised coordinates."""
  angle = np.deg2rad(rng.uniform(-params.rotate_deg, params.rotate_deg))
  zoom = rng.uniform(*params.scale)
  cos, sin = np.cos(angle), np.sin(angle)
  a = np.array([[cos, -sin], [sin, cos]]) / zoom
  flipped = bool(params.hflip and rng.random() < 0.5)
  if flipped:
    a = a @ np.diag([-1.0, 1.0])
  t = rng.uniform(-params.translate, params.translate, size=2)
  return a, t, flipped


def warp(image: np.ndarray, a: np.ndarray, t: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
  """Samples `image` at `A @ (p - 0.5) + 0.5 + t` for every pixel p of a size x size output."""
  img = Image.fromarray(image)
  if not nearest:
    # Bilinear sampling aliases when shrinking by 2x or more; a box-filter reduce first avoids it.
    factor = int(min(img.width, img.height) * np.sqrt(abs(np.linalg.det(a))) // size)
    if factor >= 2:
      img = img.reduce(factor)
  w, h = img.width, img.height
  linear = np.array([[w * a[0, 0] / size, w * a[0, 1] / size],
                     [h * a[1, 0] / size, h * a[1, 1] / size]])
  offset = np.array([w, h]) * (-a @ _CENTRE + _CENTRE + t)
  coeffs = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
  method = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(img.transform((size, size), Image.AFFINE, coeffs, resample=method))


def warp_boxes(boxes: np.ndarray, a: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps normalised boxes through the inverse of the warp; returns (boxes, keep).

  Each box becomes the bounding box of its transformed corners, clipped to the image; `keep` is
  False for boxes that end up outside the image.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  corners = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], 1)
  mapped = (corners - _CENTRE - t) @ np.linalg.inv(a).T + _CENTRE
  out = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=-1).clip(0.0, 1.0)
  keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
  return out.astype(np.float32), keep


def adjust_intensity(image: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
  """Random contrast around the image mean, then random brightness; stays uint8."""
  contrast = rng.uniform(1 - params.contrast, 1 + params.contrast)
  brightness = rng.uniform(-params.brightness, params.brightness) * 255
  if contrast == 1 and brightness == 0:
    return image
  mean = image.mean()
  out = (image.astype(np.float32) - mean) * contrast + mean + brightness
  return np.clip(out, 0, 255).astype(np.uint8)
