"""From the canonical frame to pixels: the pose, the pixel grid and drawing primitives.

A `Pose` maps canonical coordinates (u, v in [0, 1] of the image width) to an image; `Grid` holds
the canonical coordinates of every pixel centre of one image size, so that one scene renders the
same at any resolution. The primitives (soft edges, line layers, blur, distances) work on
canonical coordinates or on pixel arrays and know nothing of anatomy.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


def soft(d: np.ndarray, eps: float) -> np.ndarray:
  """1 inside (d < 0), 0 outside, a linear ramp of width `eps` across the boundary."""
  return np.clip(0.5 - d * (1.0 / eps), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Pose:
  """Canonical -> image: rotate by `angle` (radians) and scale about the centre, then shift."""

  angle: float = 0.0
  tx: float = 0.0
  ty: float = 0.0
  scale: float = 1.0


class Grid:
  """Canonical coordinates of every pixel centre of an S x S image under a pose."""

  def __init__(self, size: int, pose: Pose):
    self.size, self.pose = size, pose
    c, s, inv = math.cos(pose.angle), math.sin(pose.angle), 1.0 / pose.scale
    x = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5 - pose.tx
    y = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5 - pose.ty
    self.u = (0.5 + inv * c * x)[None, :] + (inv * s * y)[:, None]
    self.v = (0.5 - inv * s * x)[None, :] + (inv * c * y)[:, None]
    self.pixel = inv / size  # one pixel in canonical units

  def to_pixel(self, u, v):
    """Continuous pixel coordinates (x, y) of canonical points (pixel i spans [i, i + 1))."""
    p = self.pose
    c, s = math.cos(p.angle), math.sin(p.angle)
    du, dv = np.asarray(u) - 0.5, np.asarray(v) - 0.5
    x = (0.5 + p.tx + p.scale * (c * du - s * dv)) * self.size
    y = (0.5 + p.ty + p.scale * (s * du + c * dv)) * self.size
    return x, y

  def to_canonical(self, x: float, y: float) -> tuple[float, float]:
    """Canonical (u, v) of continuous pixel coordinates: the inverse of `to_pixel`."""
    p = self.pose
    c, s = math.cos(p.angle), math.sin(p.angle)
    dx, dy = x / self.size - 0.5 - p.tx, y / self.size - 0.5 - p.ty
    return 0.5 + (c * dx + s * dy) / p.scale, 0.5 + (-s * dx + c * dy) / p.scale

  def window(self, u0: float, v0: float, u1: float, v1: float) -> tuple[slice, slice]:
    """Pixel rows and columns covering a canonical rectangle (one pixel of margin)."""
    x, y = self.to_pixel(np.array([u0, u1, u0, u1]), np.array([v0, v0, v1, v1]))
    r0, r1 = max(0, int(y.min()) - 1), min(self.size, int(y.max()) + 2)
    c0, c1 = max(0, int(x.min()) - 1), min(self.size, int(x.max()) + 2)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

  def around(self, u: float, v: float, radius: float) -> tuple[slice, slice]:
    """Pixel rows and columns covering a canonical square of half-side `radius` around (u, v)."""
    return self.window(u - radius, v - radius, u + radius, v + radius)


def draw_lines(grid: Grid, segments: np.ndarray, values: np.ndarray,
               blur: float = 0.0) -> np.ndarray:
  """A layer of line segments (n, 5: u0, v0, u1, v1, width) drawn with `values` in [0, 1].

  Lines thinner than a pixel get fainter, but keep 3/4 of their density so that fine
  patterns (fibrosis, Kerley lines) stay visible in small images; the layer is blurred by `blur`
  (canonical units) and at least half a pixel so that lines never alias.
  """
  size = grid.size
  canvas = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  x0, y0 = grid.to_pixel(segments[:, 0], segments[:, 1])
  x1, y1 = grid.to_pixel(segments[:, 2], segments[:, 3])
  width = segments[:, 4] / grid.pixel
  fill = np.clip(values * np.clip(width, 0.75, 1.0) * 255 + 0.5, 0, 255).astype(int)
  line_width = np.maximum(1, np.rint(width)).astype(int)
  for args in zip((x0 - 0.5).tolist(), (y0 - 0.5).tolist(), (x1 - 0.5).tolist(),
                  (y1 - 0.5).tolist(), fill.tolist(), line_width.tolist()):
    draw.line(args[:4], fill=args[4], width=args[5])
  return gaussian_blur(np.asarray(canvas, np.float32) * (1.0 / 255), max(0.5, blur / grid.pixel))


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur (sigma in pixels, kernel radius at most 3) with edge padding."""
  if sigma < 0.25:
    return x
  radius = min(3, int(math.ceil(2.5 * sigma)))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k = (k / k.sum()).tolist()
  for axis in (0, 1):
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    p = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = k[0] * (p[:n] if axis == 0 else p[:, :n])
    for i in range(1, 2 * radius + 1):
      out += k[i] * (p[i:i + n] if axis == 0 else p[:, i:i + n])
    x = out
  return x


def segment_distance(u, v, u0, v0, u1, v1):
  """Distance from points to the segment (u0, v0)-(u1, v1)."""
  eu, ev = u1 - u0, v1 - v0
  t = np.clip(((u - u0) * eu + (v - v0) * ev) * (1.0 / max(eu * eu + ev * ev, 1e-12)), 0.0, 1.0)
  pu, pv = u - u0 - t * eu, v - v0 - t * ev
  return np.sqrt(pu * pu + pv * pv)
