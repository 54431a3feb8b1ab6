"""Procedural synthetic chest radiographs ("the phantom"), written in the NIH ChestX-ray14 layout.

Every image is drawn from a seed: a patient's anatomy (body, lungs, heart, mediastinum,
diaphragm, ribs, clavicles, spine, vascular markings), the view (PA or AP), pose, exposure,
noise and blur, and the findings of the 14 NIH labels, each rendered as an instance at a known
side and zone with a tight pixel box. The output folder (docs/architecture.md, "The phantom in
NIH layout") holds the NIH files (images, `Data_Entry_2017_v2020.csv`, `BBox_List_2017.csv`,
`train_val_list.txt`, `test_list.txt`) plus `phantom_extras/` (anatomy label maps, location-aware
labels, generation info), so the NIH converter and every location-aware method have exact
ground truth.

Coordinates. Geometry lives in a canonical frame: u (viewer's left to right) and v (top to
bottom), both in [0, 1] of the image width; the pose maps it to pixels. The patient's right is on
the viewer's left (low u). Sizes and positions are drawn independently of the image size, so one
seed renders the same scene at any resolution. Densities are in units where mediastinal soft
tissue is about 1; the exposure maps density to grey levels (dense = bright).

Determinism. Each patient and each image draws from its own `numpy.random.Generator` seeded by
(seed, patient, follow-up), so the output is byte-identical for any number of workers.

Usage:
  python -m data_prep.phantom --out DIR --num-patients 500 --image-size 256 --seed 0
  python -m data_prep.phantom --preview docs/phantom_preview.png --image-size 256
  python -m data_prep.phantom --benchmark 200 --image-size 256
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_jax.data import labels as label_lib
from cxr_jax.data import writer

GENERATOR_VERSION = "1.0"

ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum", "abdomen")
BACKGROUND, BODY, RIGHT_LUNG, LEFT_LUNG, HEART, MEDIASTINUM, ABDOMEN = range(len(ANATOMY_NAMES))
RIGHT, LEFT = 0, 1  # index into labels.SIDES: the patient's right is on the viewer's left

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_LIST = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# The 8 classes NIH boxed, with NIH's spelling in BBox_List_2017.csv.
BBOX_NAMES = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
              "Infiltration": "Infiltrate", "Mass": "Mass", "Nodule": "Nodule",
              "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax"}
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
EXTRAS = "phantom_extras"
FINE_LABELS = "fine_labels.csv"
FINE_LABELS_HEADER = "Image Index,Finding Label,Side,Zone,x,y,w,h"
INFO = "phantom_info.json"
FIELD_OF_VIEW_MM = 400.0  # the canonical image width, for OriginalImagePixelSpacing

# Per-image rates close to NIH ChestX-ray14's (Wang et al. 2017, v2020 file); Hernia raised from
# 0.2 % so that small phantom datasets still hold a few positives.
DEFAULT_PREVALENCE = {
    "Atelectasis": 0.10, "Cardiomegaly": 0.025, "Effusion": 0.12, "Infiltration": 0.18,
    "Mass": 0.05, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
    "Consolidation": 0.042, "Edema": 0.02, "Emphysema": 0.022, "Fibrosis": 0.015,
    "Pleural_Thickening": 0.03, "Hernia": 0.01,
}
DEFAULT_NO_FINDING = 0.5
FOLLOW_UP_WEIGHTS = (0.35, 0.25, 0.17, 0.13, 0.10)  # P(1..5 images per patient)

# Per-patient anatomy: (low, high) of a uniform draw, canonical units (fraction of image width).
ANATOMY = dict(
    thorax_rx=(0.33, 0.37),          # half-width of the rib cage
    thorax_top=(0.10, 0.14),         # lung apices
    thorax_cy=(0.62, 0.66),          # centre of the rib-cage outline
    thorax_box=(0.2, 0.45),          # 0 = ellipse, 1 = squarer outline
    body_pad=(0.05, 0.09),           # soft tissue outside the ribs
    dome_y=(0.69, 0.77),             # top of the right hemidiaphragm
    dome_drop=(0.005, 0.03),         # left dome lower than the right
    dome_k=(2.5, 3.5),               # dome curvature
    mediastinum_hw=(0.05, 0.065),    # half-width of the mediastinum
    aortic_knob=(0.01, 0.025),       # bulge of the left upper mediastinum
    ctr=(0.39, 0.47),                # cardiothoracic ratio of a normal heart (PA)
    heart_aspect=(0.62, 0.78),       # heart short axis / long axis
    heart_tilt=(28.0, 42.0),         # long axis, degrees below the horizontal
    heart_sink=(0.25, 0.4),           # fraction of the heart's height hidden below the left dome
    hilum_y=(0.40, 0.45),
    rib_spacing=(0.058, 0.068),      # vertical period of the posterior ribs
    rib_curve=(0.9, 1.5),            # downward bend of a rib towards the chest wall
    clavicle_y=(0.19, 0.23),         # medial end of the clavicles
    vessel_width=(0.008, 0.011),     # trunk width at the hilum
)
FEMALE = 0.45  # share of female patients (breast shadows)
STOMACH_BUBBLE = 0.65  # share of patients with a visible gastric air bubble
# Densities of the normal anatomy (mediastinal soft tissue ~ 1).
DENSITY = dict(body=0.55, body_center=0.18, lung_air=0.44, mediastinum=0.3, heart=0.28,
               abdomen=0.24, spine=0.06, rib=0.09, clavicle=0.16, vessel=0.16, hilum=0.12,
               trachea=0.2, breast=0.08, stomach=0.25, texture=0.025)
# Per-image variation: pose (degrees, canonical shift, scale) and exposure.
POSE = dict(rotation=(-5.0, 5.0), shift=(-0.035, 0.035), scale=(0.92, 1.04))
EXPOSURE = dict(
    PA=dict(black=(-0.06, 0.04), white=(1.25, 1.5), gamma=(0.8, 1.2)),
    AP=dict(black=(-0.12, -0.02), white=(1.35, 1.65), gamma=(0.85, 1.25)),
    noise=(0.008, 0.03), blur=(0.0005, 0.0025), gradient=(0.0, 0.1), gradient_angle=(0.0, 360.0))
DOME_MEDIAL = 0.35  # curvature of a dome's medial half relative to its lateral half
AP_FRACTION = 0.4
TEXTURE_CELLS = 24
AP_HEART_MAGNIFICATION = 1.1
AP_CLAVICLE_RAISE = 0.03

# Every finding's strengths, sizes and places: one row per label, (low, high) of a uniform draw
# in canonical units and densities. `zones` weights the upper/middle/lower thirds where a
# localised finding is placed; `box_level` is the fraction of an instance's peak density that
# counts as inside its box (findings without one are boxed by their region: fluid, air, heart).
FINDINGS: dict[str, dict[str, Any]] = {
    "Nodule": dict(radius=(0.015, 0.025), density=(0.28, 0.45), second=0.2,
                   zones=(1, 1, 1), box_level=0.15),
    "Mass": dict(radius=(0.04, 0.07), density=(0.32, 0.5), lobes=(2, 5), lobe_size=(0.5, 0.8),
                 zones=(1, 1, 1), box_level=0.15),
    "Effusion": dict(height=(-0.03, 0.09), meniscus=(0.025, 0.06), density=(0.15, 0.28),
                     bilateral=0.25),
    "Pleural_Thickening": dict(thickness=(0.014, 0.025), length=(0.12, 0.28), density=(0.35, 0.5),
                               apical=0.4, box_level=0.3),
    "Consolidation": dict(radius=(0.065, 0.11), density=(0.32, 0.45), edge=0.006,
                          bronchograms=(2, 4), bronchogram_width=(0.004, 0.007), fissure=0.5,
                          zones=(1, 1, 1.5), box_level=0.3),
    "Infiltration": dict(radius=(0.06, 0.11), density=(0.22, 0.34), blobs=(6, 12),
                         blob_radius=(0.015, 0.03), zones=(1, 1.2, 1.2), box_level=0.3),
    "Pneumonia": dict(radius=(0.055, 0.09), density=(0.28, 0.42), halo=(0.5, 0.9),
                      bronchograms=0.3, zones=(0.6, 1, 1.6), box_level=0.3),
    "Cardiomegaly": dict(ctr=(0.54, 0.66)),
    "Pneumothorax": dict(gap=(0.025, 0.06), extent=(0.35, 0.9), lucency=(0.08, 0.13),
                         line_width=(0.003, 0.005), line_density=(0.15, 0.25)),
    "Atelectasis": dict(length=(0.08, 0.15), thickness=(0.01, 0.018), density=(0.3, 0.45),
                        tilt=(-15.0, 15.0), raise_dome=(0.02, 0.05), shift=(0.005, 0.02),
                        zones=(0.3, 1, 1.5), box_level=0.3),
    "Edema": dict(haze=(0.08, 0.18), radius=(0.08, 0.14), puffs=(5, 10),
                  puff_radius=(0.02, 0.04), kerley=(4, 8),
                  kerley_length=(0.02, 0.035), kerley_width=(0.004, 0.006),
                  kerley_density=(0.3, 0.45), box_level=0.3),
    "Emphysema": dict(lucency=(0.08, 0.13), lower_dome=(0.03, 0.06), flatten=(0.3, 0.5),
                      vessel_keep=(0.25, 0.5), lower_predominant=0.2, bullae=(0, 2),
                      bulla_radius=(0.025, 0.045)),
    "Fibrosis": dict(lines=(40, 70), line_length=(0.015, 0.03), line_width=(0.003, 0.005),
                     density=(0.2, 0.32), region=(0.08, 0.12), raise_dome=(0.01, 0.03),
                     bilateral=0.6, zones=(0.4, 0.3, 1), box_level=0.3),
    "Hernia": dict(radius=(0.035, 0.065), fluid=(0.05, 0.12), air=(0.2, 0.45), level=(-0.3, 0.2),
                   wall=0.004, offset=(0.02, 0.08), lift=(1.0, 1.8)),
}


Box = tuple[int, int, int, int]  # x, y, w, h in pixels


class Instance(NamedTuple):
  """One rendered finding: label, the patient's side, zone and a tight pixel box (x, y, w, h).

  The box covers columns x..x+w-1 and rows y..y+h-1 (x, y = top-left, as in BBox_List_2017.csv).
  """

  finding: str
  side: str
  zone: str
  box: Box


class Rendered(NamedTuple):
  """One rendered radiograph: image (uint8 HxW), anatomy label map (uint8 HxW), instances."""

  image: np.ndarray
  anatomy: np.ndarray
  instances: list[Instance]


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  # Python floats keep float32 arrays float32 under NumPy 2's promotion rules.
  return float(rng.uniform(*bounds))


def _soft(d: np.ndarray, eps: float) -> np.ndarray:
  """1 inside (d < 0), 0 outside, a linear ramp of width `eps` across the boundary."""
  return np.clip(0.5 - d * (1.0 / eps), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """The geometry of one image in canonical units; per side tuples are (right, left)."""

  mid: float
  rx: float
  cy: float
  ry: float
  box: float
  body_pad: float
  dome_x: tuple[float, float]
  dome_y: tuple[float, float]
  dome_k: tuple[float, float]
  med_shift: float
  med_hw: float
  knob: float
  heart: tuple[float, float, float, float]  # cx, cy, long and short semi-axes
  heart_tilt: float  # radians, long axis below the horizontal towards the patient's left
  hilum: tuple[tuple[float, float], tuple[float, float]]
  rib_spacing: float
  rib_phase: tuple[float, float]
  rib_curve: float
  clavicle_y: float
  female: bool
  stomach: bool
  vessels: np.ndarray  # (n, 5): u0, v0, u1, v1, width
  # Disease geometry, per side: effusion fluid level above the dome apex (None: no fluid) and its
  # lateral rise; pneumothorax gap at the chest wall and the lowest level it reaches.
  fluid: tuple[float | None, float | None] = (None, None)
  meniscus: tuple[float, float] = (0.0, 0.0)
  gap: tuple[float, float] = (0.0, 0.0)
  gap_bottom: tuple[float, float] = (0.0, 0.0)
  lucency: tuple[float, float] = (0.0, 0.0)  # emphysema, per side
  lucency_band: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
  vessel_keep: float = 1.0

  @property
  def top(self) -> float:
    return self.cy - self.ry

  def heart_extent(self) -> tuple[float, float]:
    """Half-width and half-height of the (tilted) heart outline."""
    return _ellipse_extent(self.heart[2], self.heart[3], self.heart_tilt)

  def ctr(self) -> float:
    """Cardiothoracic ratio: heart width over the rib cage's widest inner width."""
    return self.heart_extent()[0] / self.rx

  def dome_at(self, side: int, u):
    """Height of a hemidiaphragm at u: steep towards the chest wall, gentle towards the heart."""
    d = u - self.dome_x[side]
    # k d^2 on the lateral half and DOME_MEDIAL k d^2 on the medial half, without a branch.
    even, odd = (1.0 + DOME_MEDIAL) / 2, (1.0 - DOME_MEDIAL) / 2 * (1.0 if side == LEFT else -1.0)
    return self.dome_y[side] + self.dome_k[side] * (even * d * d + odd * d * np.abs(d))


def _ellipse_extent(rx: float, ry: float, tilt: float) -> tuple[float, float]:
  c, s = math.cos(tilt), math.sin(tilt)
  return math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)


def _side_tuple(pair: tuple, side: int, value) -> tuple:
  return (value, pair[1]) if side == RIGHT else (pair[0], value)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  """A random patient's normal anatomy, including its vascular tree."""
  a = {k: _draw(rng, v) for k, v in ANATOMY.items()}
  rx, cy = a["thorax_rx"], a["thorax_cy"]
  dome_y = (a["dome_y"], a["dome_y"] + a["dome_drop"])
  dome_k = (a["dome_k"], a["dome_k"] * _draw(rng, (0.9, 1.1)))
  hw = a["mediastinum_hw"]
  # The heart: its right border a little beyond the mediastinum, its base sunk into the left dome.
  tilt = math.radians(a["heart_tilt"])
  half_w = a["ctr"] * rx
  long_axis = half_w / math.hypot(math.cos(tilt), a["heart_aspect"] * math.sin(tilt))
  short_axis = long_axis * a["heart_aspect"]
  half_h = _ellipse_extent(long_axis, short_axis, tilt)[1]
  hcx = 0.5 - hw - 0.03 + half_w
  dome_below_heart = dome_y[1] + dome_k[1] * DOME_MEDIAL * (hcx - 0.5 - 0.5 * rx) ** 2
  hcy = dome_below_heart - half_h * (1 - 2 * a["heart_sink"])
  anatomy = Anatomy(
      mid=0.5, rx=rx, cy=cy, ry=cy - a["thorax_top"], box=a["thorax_box"],
      body_pad=a["body_pad"], dome_x=(0.5 - 0.5 * rx, 0.5 + 0.5 * rx), dome_y=dome_y,
      dome_k=dome_k, med_shift=0.0, med_hw=hw, knob=a["aortic_knob"],
      heart=(hcx, hcy, long_axis, short_axis), heart_tilt=tilt,
      hilum=((0.5 - hw - 0.02, a["hilum_y"] + 0.015), (0.5 + hw + 0.02, a["hilum_y"])),
      rib_spacing=a["rib_spacing"], rib_phase=(_draw(rng, (0, 1)), _draw(rng, (0, 1))),
      rib_curve=a["rib_curve"], clavicle_y=a["clavicle_y"], female=bool(rng.random() < FEMALE),
      stomach=bool(rng.random() < STOMACH_BUBBLE), vessels=np.zeros((0, 5), np.float32))
  return dataclasses.replace(anatomy, vessels=_vessel_tree(rng, anatomy, a["vessel_width"]))


def _vessel_tree(rng: np.random.Generator, a: Anatomy, trunk_width: float) -> np.ndarray:
  """Branching vessels from each hilum, grown level by level and kept inside the lungs."""
  segments = []
  for side, sign in ((RIGHT, -1.0), (LEFT, 1.0)):
    hx, hy = a.hilum[side]
    n = 6
    angles = np.radians(np.linspace(-75, 80, n) + rng.uniform(-8, 8, n))
    starts = hy + np.linspace(-0.05, 0.06, n) + rng.uniform(-0.01, 0.01, n)
    tips = np.stack([hx + sign * rng.uniform(-0.01, 0.015, n), starts, angles, np.full(n, 0.06),
                     np.full(n, trunk_width)], 1)
    for depth in range(5):
      length = tips[:, 3] * rng.uniform(0.8, 1.2, len(tips))
      ends_u = tips[:, 0] + sign * length * np.cos(tips[:, 2])
      ends_v = tips[:, 1] + length * np.sin(tips[:, 2])
      # Trunks start in the mediastinal shadow; every later branch must end inside the lung.
      inside = (depth == 0) | (_lung_distance(a, ends_u, ends_v, side) < -0.01)
      tips, ends_u, ends_v = tips[inside], ends_u[inside], ends_v[inside]
      segments.append(np.stack([tips[:, 0], tips[:, 1], ends_u, ends_v, tips[:, 4]], 1))
      spread = np.radians(rng.uniform(18, 32, (len(tips), 2))) * np.array([-1.0, 1.0])
      children = np.repeat(np.stack([ends_u, ends_v], 1), 2, axis=0)
      child_angles = (np.repeat(tips[:, 2], 2) + spread.ravel()
                      + np.radians(rng.uniform(-6, 6, 2 * len(tips))))
      tips = np.concatenate([children, child_angles[:, None],
                             np.repeat(tips[:, 3:5] * [0.78, 0.72], 2, axis=0)], 1)
  return np.concatenate(segments).astype(np.float32)


def _lung_distance(a: Anatomy, u: np.ndarray, v: np.ndarray, side: int) -> np.ndarray:
  """Approximate signed distance to one aerated lung (negative inside)."""
  return _Fields(a, np.asarray(u, np.float32), np.asarray(v, np.float32)).lung[side]


class _Fields:
  """Signed distances (negative inside) of the anatomy, evaluated on canonical coordinates."""

  def __init__(self, a: Anatomy, u: np.ndarray, v: np.ndarray, aerated: bool = True):
    du = u - a.mid
    tx = du * du * (1.0 / (a.rx * a.rx))
    dy = (v - a.cy) * (1.0 / a.ry)
    g = tx * (1.0 - a.box) + tx * tx * a.box + dy * dy - 1.0
    self.rib = g * (0.5 * a.rx)
    self.dome = tuple(v - a.dome_at(s, u) for s in (RIGHT, LEFT))
    self.left_half = (du > 0).astype(np.float32)
    self.diaphragm = self.dome[0] + self.left_half * (self.dome[1] - self.dome[0])
    knob_t = (v - (a.top + 0.17)) * (1.0 / 0.05)
    knob = a.knob * np.clip(1.0 - knob_t * knob_t, 0.0, 1.0)
    hw = a.med_hw * (0.75 + 0.25 * np.clip((v - a.top) * (1.0 / 0.3), 0.0, 1.0))
    self.med_r = a.mid + a.med_shift - hw  # viewer-left edge (patient's right)
    self.med_l = a.mid + a.med_shift + hw + knob
    hcx, hcy, hrx, hry = a.heart
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    x, y = u - hcx, v - hcy
    hx, hy = (x * c + y * s) * (1.0 / hrx), (y * c - x * s) * (1.0 / hry)
    self.heart = (hx * hx + hy * hy - 1.0) * (0.5 * hry)
    lung_r = np.maximum(np.maximum(self.rib, self.dome[0]), np.maximum(u - self.med_r, -self.heart))
    lung_l = np.maximum(np.maximum(self.rib, self.dome[1]), np.maximum(self.med_l - u, -self.heart))
    self.field = (lung_r, lung_l)
    self.fluid = [None, None]
    self.gap = [None, None]
    lungs = [lung_r, lung_l]
    if aerated:
      for s in (RIGHT, LEFT):
        if a.fluid[s] is not None:
          lateral = np.clip(np.abs(du) * (1.0 / a.rx), 0.0, 1.0)
          level = a.dome_y[s] - a.fluid[s] - a.meniscus[s] * lateral ** 3
          self.fluid[s] = np.maximum(level - v, self.field[s])
          lungs[s] = np.maximum(lungs[s], -self.fluid[s])
        if a.gap[s] > 0:
          taper = np.clip((a.gap_bottom[s] - v) * (1.0 / 0.06), 0.0, 1.0)
          self.gap[s] = self.rib + a.gap[s] * taper
          lungs[s] = np.maximum(lungs[s], self.gap[s])
    self.lung = tuple(lungs)


class _LungMap:
  """The lungs on a coarse canonical grid: zone limits and random points inside a lung."""

  CELLS = 64

  def __init__(self, a: Anatomy):
    c = (np.arange(self.CELLS, dtype=np.float32) + 0.5) / self.CELLS
    self.u, self.v = np.meshgrid(c, c)
    fields = _Fields(a, self.u, self.v)
    field = _Fields(a, self.u, self.v, aerated=False).lung
    self.lung = fields.lung
    self.limits = []
    for s in (RIGHT, LEFT):
      rows = self.v[field[s] < 0]
      self.limits.append((float(rows.min()), float(rows.max())))

  def zone(self, side: int, v: float) -> int:
    top, bottom = self.limits[side]
    return int(np.clip((v - top) / (bottom - top) * 3, 0, 2))

  def zone_range(self, side: int, zone: int) -> tuple[float, float]:
    top, bottom = self.limits[side]
    third = (bottom - top) / 3
    return top + zone * third, top + (zone + 1) * third

  def point(self, rng: np.random.Generator, side: int, zone: int | None,
            margin: float) -> tuple[float, float]:
    """A random point at least `margin` inside the lung (relaxed when the zone is too small)."""
    ok = np.ones_like(self.u, bool)
    if zone is not None:
      lo, hi = self.zone_range(side, zone)
      ok = (self.v >= lo) & (self.v < hi)
    for m in (margin, margin / 2, 0.0):
      candidates = np.flatnonzero(ok & (self.lung[side] < -m))
      if len(candidates):
        break
    else:
      candidates = np.flatnonzero(self.lung[side] < 0)
    i = candidates[rng.integers(len(candidates))]
    jitter = rng.uniform(-0.5, 0.5, 2) / self.CELLS
    return float(self.u.flat[i] + jitter[0]), float(self.v.flat[i] + jitter[1])


# ---------------------------------------------------------------------------------------------
# Pose and pixel grid


@dataclasses.dataclass(frozen=True)
class Pose:
  """Canonical -> image: rotate by `angle` (radians) and scale about the centre, then shift."""

  angle: float = 0.0
  tx: float = 0.0
  ty: float = 0.0
  scale: float = 1.0


class _Grid:
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
    return self.window(u - radius, v - radius, u + radius, v + radius)


def _box(mask: np.ndarray, window: tuple[slice, slice]) -> Box | None:
  """Tight (x, y, w, h) of a boolean mask that sits at `window` in the image; None if empty."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not len(rows):
    return None
  y, x = window[0].start + rows[0], window[1].start + cols[0]
  return int(x), int(y), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _union(a: Box | None, b: Box | None) -> Box | None:
  if a is None or b is None:
    return a or b
  x0, y0 = min(a[0], b[0]), min(a[1], b[1])
  x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
  return x0, y0, x1 - x0, y1 - y0


def _lines(grid: _Grid, segments: np.ndarray, values: np.ndarray, blur: float = 0.0) -> np.ndarray:
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
  return _blur(np.asarray(canvas, np.float32) * (1.0 / 255), max(0.5, blur / grid.pixel))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Study: one image's view, pose, exposure, anatomy changes and finding instances


@dataclasses.dataclass
class _Lesion:
  """A finding instance to render: label, the patient's side and its drawn parameters."""

  finding: str
  side: int
  params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Study:
  """Everything needed to render one image, drawn up front so that rendering draws nothing."""

  view: str
  pose: Pose
  exposure: dict[str, float]
  anatomy: Anatomy
  lesions: list[_Lesion]
  noise_seed: int
  texture: np.ndarray  # small grid of lung-parenchyma mottling, upsampled to the image
  lungs: _LungMap  # the final lungs on a coarse grid, for zones


def follow_up(rng: np.random.Generator, a: Anatomy) -> Anatomy:
  """The same patient on another day: inspiration, heart size and mediastinum vary a little."""
  lift = float(rng.normal(0, 0.008))
  hcx, hcy, hrx, hry = a.heart
  size = float(rng.uniform(0.97, 1.03))
  return dataclasses.replace(
      a, dome_y=(a.dome_y[0] + lift, a.dome_y[1] + lift), med_shift=float(rng.normal(0, 0.004)),
      heart=(hcx, hcy + lift * 0.5, hrx * size, hry * size))


def sample_study(rng: np.random.Generator, anatomy: Anatomy, findings: Iterable[str],
                 view: str | None = None) -> Study:
  """Draws view, pose, exposure and the instances of `findings` on a patient's anatomy.

  Findings that change the anatomy (heart size, diaphragm, fluid, pneumothorax) act first; then
  every instance is placed in the final lungs, so that nothing lands in fluid or a collapsed lung.
  """
  findings = set(findings)
  unknown = findings - set(FINDINGS)
  if unknown:
    raise ValueError(f"unknown findings {sorted(unknown)}; choose from {list(FINDINGS)}")
  view = view or ("AP" if rng.random() < AP_FRACTION else "PA")
  if view not in EXPOSURE:
    raise ValueError(f"view {view!r}: choose PA or AP")
  pose = Pose(math.radians(_draw(rng, POSE["rotation"])), _draw(rng, POSE["shift"]),
              _draw(rng, POSE["shift"]), _draw(rng, POSE["scale"]))
  exposure = {k: _draw(rng, v) for k, v in EXPOSURE[view].items()}
  exposure.update({k: _draw(rng, EXPOSURE[k])
                   for k in ("noise", "blur", "gradient", "gradient_angle")})
  a = anatomy
  if view == "AP":
    hcx, hcy, hrx, hry = a.heart
    m = AP_HEART_MAGNIFICATION
    a = dataclasses.replace(a, heart=(a.mid + (hcx - a.mid) * m, hcy, hrx * m, hry * m),
                            clavicle_y=a.clavicle_y - AP_CLAVICLE_RAISE)
  lesions: list[_Lesion] = []
  for name in FINDINGS:  # a fixed order keeps the draws reproducible
    if name in findings:
      start = _STARTS.get(name, _start_one_side)
      a, new = start(rng, a, FINDINGS[name], view)
      lesions += [_Lesion(name, side, params) for side, params in new]
  lung_map = _LungMap(a)
  for lesion in lesions:
    place = _PLACES.get(lesion.finding)
    if place:
      place(rng, lesion, a, lung_map, FINDINGS[lesion.finding])
  texture = rng.standard_normal((TEXTURE_CELLS, TEXTURE_CELLS)).astype(np.float32)
  return Study(view, pose, exposure, a, lesions, int(rng.integers(2**31)), texture, lung_map)


# Each finding has a start, run before anything is placed: start(rng, anatomy, table row, view)
# -> (changed anatomy, [(side, params) per instance]); and, if it is localised, a place, run on
# the final lungs: place(rng, lesion, anatomy, lung map, table row) fills lesion.params.


def _start_one_side(rng, a, t, view):
  del t, view
  return a, [(int(rng.integers(2)), {})]


def _start_nodule(rng, a, t, view):
  del view
  count = 2 if rng.random() < t["second"] else 1
  return a, [(int(rng.integers(2)), {}) for _ in range(count)]


def _start_cardiomegaly(rng, a, t, view):
  hcx, hcy, hrx, hry = a.heart
  ctr = _draw(rng, t["ctr"]) * (AP_HEART_MAGNIFICATION if view == "AP" else 1.0)
  half_w, half_h = a.heart_extent()
  new_rx = hrx * ctr / a.ctr()
  new_ry = hry * (ctr / a.ctr()) ** 0.7
  new_w, new_h = _ellipse_extent(new_rx, new_ry, a.heart_tilt)
  # The heart grows mostly to the patient's left and stays on the diaphragm.
  heart = (hcx + 0.7 * (new_w - half_w), hcy - 0.3 * (new_h - half_h), new_rx, new_ry)
  return dataclasses.replace(a, heart=heart), [(LEFT, {})]


def _start_emphysema(rng, a, t, view):
  del view
  drop, flat = _draw(rng, t["lower_dome"]), _draw(rng, t["flatten"])
  lower = bool(rng.random() < t["lower_predominant"])
  a = dataclasses.replace(
      a, dome_y=(a.dome_y[0] + drop, a.dome_y[1] + drop),
      dome_k=(a.dome_k[0] * flat, a.dome_k[1] * flat), vessel_keep=_draw(rng, t["vessel_keep"]))
  bands, new = [], []
  for side in (RIGHT, LEFT):
    cut = a.top + (a.dome_y[side] - a.top) * (0.45 if lower else 0.55)
    bands.append((cut, 2.0) if lower else (-1.0, cut))
    n = int(rng.integers(t["bullae"][0], t["bullae"][1] + 1))
    new.append((side, dict(lower=lower, bullae=n)))
  luc = _draw(rng, t["lucency"])
  return dataclasses.replace(a, lucency=(luc, luc), lucency_band=tuple(bands)), new


def _start_atelectasis(rng, a, t, view):
  del view
  side = int(rng.integers(2))
  shift = _draw(rng, t["shift"]) * (-1 if side == RIGHT else 1)  # towards the collapsed side
  hcx, hcy, hrx, hry = a.heart
  a = dataclasses.replace(
      a, dome_y=_side_tuple(a.dome_y, side, a.dome_y[side] - _draw(rng, t["raise_dome"])),
      med_shift=a.med_shift + shift, heart=(hcx + shift, hcy, hrx, hry))
  return a, [(side, {})]


def _start_fibrosis(rng, a, t, view):
  del view
  sides = (RIGHT, LEFT) if rng.random() < t["bilateral"] else (int(rng.integers(2)),)
  zone = _pick_zone(rng, t["zones"])
  dome_y = a.dome_y
  for side in sides:
    dome_y = _side_tuple(dome_y, side, dome_y[side] - _draw(rng, t["raise_dome"]))
  return dataclasses.replace(a, dome_y=dome_y), [(side, dict(zone=zone)) for side in sides]


def _start_effusion(rng, a, t, view):
  del view
  sides = (RIGHT, LEFT) if rng.random() < t["bilateral"] else (int(rng.integers(2)),)
  fluid, meniscus = a.fluid, a.meniscus
  new = []
  for side in sides:
    fluid = _side_tuple(fluid, side, _draw(rng, t["height"]))
    meniscus = _side_tuple(meniscus, side, _draw(rng, t["meniscus"]))
    new.append((side, dict(density=_draw(rng, t["density"]))))
  return dataclasses.replace(a, fluid=fluid, meniscus=meniscus), new


def _start_pneumothorax(rng, a, t, view):
  del view
  side = int(rng.integers(2))
  bottom = a.top + _draw(rng, t["extent"]) * (a.dome_y[side] - a.top)
  a = dataclasses.replace(a, gap=_side_tuple(a.gap, side, _draw(rng, t["gap"])),
                          gap_bottom=_side_tuple(a.gap_bottom, side, bottom))
  return a, [(side, dict(lucency=_draw(rng, t["lucency"]), width=_draw(rng, t["line_width"]),
                         line=_draw(rng, t["line_density"])))]


def _start_hernia(rng, a, t, view):
  del rng, t, view
  return a, [(LEFT, {})]


def _start_edema(rng, a, t, view):
  del rng, t, view
  return a, [(RIGHT, {}), (LEFT, {})]


def _pick_zone(rng, weights) -> int:
  w = np.asarray(weights, float)
  return int(rng.choice(3, p=w / w.sum()))


def _place_nodule(rng, lesion, a, lungs, t):
  del a
  r = _draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), r)
  lesion.params.update(center=(u, v), radius=r, density=_draw(rng, t["density"]))


def _place_mass(rng, lesion, a, lungs, t):
  del a
  r = _draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.7 * r)
  lobes = [(u, v, r)]
  for _ in range(int(rng.integers(t["lobes"][0], t["lobes"][1] + 1))):
    angle = rng.uniform(0, 2 * np.pi)
    lobes.append((u + 0.55 * r * math.cos(angle), v + 0.55 * r * math.sin(angle),
                  r * _draw(rng, t["lobe_size"])))
  lesion.params.update(lobes=lobes, radius=1.6 * r, center=(u, v),
                       density=_draw(rng, t["density"]))


def _bronchograms(rng, u, v, r, side, count, width):
  """Short branching air-filled bronchi crossing a patch, pointing away from the hilum."""
  segments = []
  sign = -1.0 if side == RIGHT else 1.0
  for _ in range(count):
    su, sv = u + rng.uniform(-0.5, 0.5) * r, v + rng.uniform(-0.5, 0.5) * r
    angle = rng.uniform(-0.9, 0.9)
    length = r * rng.uniform(0.5, 0.8)
    eu, ev = su + sign * length * math.cos(angle), sv + length * math.sin(angle)
    segments.append((su, sv, eu, ev, width))
    branch = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 0.7)
    mu, mv = (su + eu) / 2, (sv + ev) / 2
    segments.append((mu, mv, mu + sign * 0.5 * length * math.cos(branch),
                     mv + 0.5 * length * math.sin(branch), 0.8 * width))
  return np.array(segments, np.float32).reshape(-1, 5)


def _place_patch(rng, lesion, a, lungs, t):
  """Consolidation and pneumonia: a few overlapping ellipses around a point in one zone."""
  del a
  r = _draw(rng, t["radius"])
  zone = _pick_zone(rng, t["zones"])
  u, v = lungs.point(rng, lesion.side, zone, 0.5 * r)
  blobs = [(u + 0.5 * r * rng.uniform(-1, 1), v + 0.5 * r * rng.uniform(-1, 1),
            r * rng.uniform(0.5, 0.8), r * rng.uniform(0.4, 0.7)) for _ in range(4)]
  p = dict(center=(u, v), radius=r, blobs=blobs, density=_draw(rng, t["density"]))
  if lesion.finding == "Consolidation":
    p["bronchi"] = _bronchograms(rng, u, v, r, lesion.side,
                                 int(rng.integers(t["bronchograms"][0], t["bronchograms"][1] + 1)),
                                 _draw(rng, t["bronchogram_width"]))
    if rng.random() < t["fissure"]:  # a lobar patch stops at a straight fissure
      p["fissure"] = (v + 0.4 * r, 1.0) if zone == 0 else (v - 0.4 * r, -1.0)
  else:
    p["halo"] = _draw(rng, t["halo"])
    if rng.random() < t["bronchograms"]:
      p["bronchi"] = _bronchograms(rng, u, v, r, lesion.side, 2, 0.005)
  lesion.params.update(p)


def _place_infiltration(rng, lesion, a, lungs, t):
  del a
  r = _draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.3 * r)
  n = int(rng.integers(t["blobs"][0], t["blobs"][1] + 1))
  rho, phi = r * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
  blobs = np.stack([u + rho * np.cos(phi), v + rho * np.sin(phi),
                    rng.uniform(*t["blob_radius"], n), rng.uniform(0.5, 1.0, n)], 1)
  lesion.params.update(center=(u, v), radius=r + t["blob_radius"][1] * 2, blobs=blobs.tolist(),
                       density=_draw(rng, t["density"]))


def _place_atelectasis(rng, lesion, a, lungs, t):
  del a
  length = _draw(rng, t["length"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.45 * length)
  tilt = math.radians(_draw(rng, t["tilt"]))
  du, dv = 0.5 * length * math.cos(tilt), 0.5 * length * math.sin(tilt)
  lesion.params.update(ends=(u - du, v - dv, u + du, v + dv), center=(u, v), radius=length,
                       thickness=_draw(rng, t["thickness"]), density=_draw(rng, t["density"]))


def _place_pleural_thickening(rng, lesion, a, lungs, t):
  del a
  top, bottom = lungs.limits[lesion.side]
  length = _draw(rng, t["length"])
  if rng.random() < t["apical"]:
    v0 = top - 0.02
  else:
    v0 = rng.uniform(top + 0.1, bottom - 0.05 - length)
  lesion.params.update(rows=(v0, v0 + length), thickness=_draw(rng, t["thickness"]),
                       density=_draw(rng, t["density"]), phase=float(rng.uniform(0, 2 * np.pi)))


def _place_edema(rng, lesion, a, lungs, t):
  hu, hv = a.hilum[lesion.side]
  sign = -1.0 if lesion.side == RIGHT else 1.0
  r = _draw(rng, t["radius"])
  top, bottom = lungs.limits[lesion.side]
  lines = []
  width = _draw(rng, t["kerley_width"])
  for _ in range(int(rng.integers(t["kerley"][0], t["kerley"][1] + 1))):
    v = rng.uniform(bottom - 0.3 * (bottom - top), bottom - 0.08)
    edge = _lateral_edge(lungs, lesion.side, v)
    length = _draw(rng, t["kerley_length"])
    u0 = edge - sign * 0.006
    lines.append((u0, v, u0 - sign * length, v, width))
  centre = (hu + sign * 0.35 * r, hv + 0.02)
  n = int(rng.integers(t["puffs"][0], t["puffs"][1] + 1))  # alveolar fluid is fluffy, not smooth
  rho, phi = r * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
  puffs = np.stack([centre[0] + rho * np.cos(phi), centre[1] + 1.3 * rho * np.sin(phi),
                    rng.uniform(*t["puff_radius"], n)], 1)
  lesion.params.update(center=centre, radius=r, puffs=puffs.tolist(),
                       density=_draw(rng, t["haze"]), kerley=np.array(lines, np.float32),
                       kerley_density=_draw(rng, t["kerley_density"]))


def _lateral_edge(lungs: _LungMap, side: int, v: float) -> float:
  """The canonical u of a lung's outer border at height v (from the coarse map)."""
  row = min(_LungMap.CELLS - 1, int(v * _LungMap.CELLS))
  inside = np.flatnonzero(lungs.lung[side][row] < 0)
  if not len(inside):
    return 0.5
  col = inside[0] if side == RIGHT else inside[-1]
  return float(lungs.u[row, col] + (-0.5 if side == RIGHT else 0.5) / _LungMap.CELLS)


def _place_emphysema(rng, lesion, a, lungs, t):
  del a
  zone = 2 if lesion.params["lower"] else 0
  lesion.params["bullae"] = [
      (*lungs.point(rng, lesion.side, zone, 0.05), _draw(rng, t["bulla_radius"]))
      for _ in range(lesion.params["bullae"])]


def _place_fibrosis(rng, lesion, a, lungs, t):
  del a
  r = _draw(rng, t["region"])
  u, v = lungs.point(rng, lesion.side, lesion.params["zone"], 0.5 * r)
  # Fibrosis favours the lung periphery: move the region part way to the lateral border.
  u = u + 0.5 * (_lateral_edge(lungs, lesion.side, v) - u)
  n = int(rng.integers(t["lines"][0], t["lines"][1] + 1))
  rho, phi = r * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
  cu, cv = u + rho * np.cos(phi), v + rho * np.sin(phi)
  half = 0.5 * rng.uniform(*t["line_length"], n)
  angle = rng.uniform(0, np.pi, n)
  segments = np.stack([cu - half * np.cos(angle), cv - half * np.sin(angle),
                       cu + half * np.cos(angle), cv + half * np.sin(angle),
                       rng.uniform(*t["line_width"], n)], 1).astype(np.float32)
  lesion.params.update(center=(u, v), radius=r, lines=segments, density=_draw(rng, t["density"]))


def _place_hernia(rng, lesion, a, lungs, t):
  del lungs
  r = _draw(rng, t["radius"])
  # Behind the heart, just left of the midline and just above the diaphragm.
  u = a.mid + a.med_shift + _draw(rng, t["offset"])
  v = float(a.dome_at(LEFT, u)) - _draw(rng, t["lift"]) * r
  lesion.params.update(center=(u, v), radius=r, fluid=_draw(rng, t["fluid"]),
                       air=_draw(rng, t["air"]), level=_draw(rng, t["level"]), wall=t["wall"])


_STARTS = {"Nodule": _start_nodule, "Cardiomegaly": _start_cardiomegaly,
           "Emphysema": _start_emphysema, "Atelectasis": _start_atelectasis,
           "Fibrosis": _start_fibrosis, "Effusion": _start_effusion,
           "Pneumothorax": _start_pneumothorax, "Hernia": _start_hernia, "Edema": _start_edema}
_PLACES = {"Nodule": _place_nodule, "Mass": _place_mass, "Consolidation": _place_patch,
           "Pneumonia": _place_patch, "Infiltration": _place_infiltration,
           "Atelectasis": _place_atelectasis, "Pleural_Thickening": _place_pleural_thickening,
           "Edema": _place_edema, "Emphysema": _place_emphysema, "Fibrosis": _place_fibrosis,
           "Hernia": _place_hernia}


# ---------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
  """The density image being built, with the anatomy's fields and masks on the pixel grid."""

  def __init__(self, study: Study, size: int):
    a = self.a = study.anatomy
    self.grid = grid = _Grid(size, study.pose)
    self.edge = max(grid.pixel, 0.003)  # anatomical edges: sharp, yet never aliased
    self.f = f = _Fields(a, grid.u, grid.v)
    self.body = _body_distance(a, grid.u, grid.v)
    air = []
    for s in (RIGHT, LEFT):
      space = f.field[s] if f.fluid[s] is None else np.maximum(f.field[s], -f.fluid[s])
      air.append(_soft(space, self.edge))
    self.air = air  # the air space of each hemithorax, including a pneumothorax
    self.aerated = [_soft(f.lung[s], self.edge) for s in (RIGHT, LEFT)]
    self.vessel_mask = np.ones((size, size), np.float32)
    self.density = _anatomy_density(self)
    mottle = Image.fromarray(study.texture).resize((size, size), Image.Resampling.BICUBIC)
    self.density += DENSITY["texture"] * np.asarray(mottle) * (air[0] + air[1])


def _body_distance(a: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Signed distance to the body outline: torso, shoulders and neck."""
  bx = a.rx + a.body_pad
  neck = _smoothstep((v - (a.top - 0.14)) * (1.0 / 0.12))  # neck widening into the shoulders
  shoulder = 1.0 - _smoothstep((v - a.top) * (1.0 / 0.3))  # shoulders narrowing to the chest
  half_width = 0.075 + (bx - 0.075) * neck + 0.1 * shoulder * neck
  return np.abs(u - a.mid) - half_width


def _smoothstep(t: np.ndarray) -> np.ndarray:
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _segment_distance(u, v, u0, v0, u1, v1):
  """Distance from points to the segment (u0, v0)-(u1, v1)."""
  eu, ev = u1 - u0, v1 - v0
  t = np.clip(((u - u0) * eu + (v - v0) * ev) * (1.0 / max(eu * eu + ev * ev, 1e-12)), 0.0, 1.0)
  pu, pv = u - u0 - t * eu, v - v0 - t * ev
  return np.sqrt(pu * pu + pv * pv)


def _anatomy_density(c: _Canvas) -> np.ndarray:
  """Soft tissue, lungs, heart, mediastinum, abdomen and bones, before any finding."""
  a, f, g, e = c.a, c.f, c.grid, c.edge
  u, v = g.u, g.v
  d = DENSITY
  du = u - a.mid
  body = _soft(c.body, 2 * e)
  bx = a.rx + a.body_pad
  edge_thinning = np.sqrt(np.clip(c.body * (-1.0 / 0.05), 0.0, 1.0))  # a round body's rim is thin
  out = (d["body"] * (0.5 + 0.5 * edge_thinning) * body
         + d["body_center"] * np.clip(1.0 - du * du * (1.0 / (bx * bx)), 0, 1) * body)
  abdomen = _soft(-f.diaphragm, e) * body
  out += d["abdomen"] * abdomen * np.clip(0.75 + f.diaphragm * (0.25 / 0.1), 0.0, 1.0)
  heart = _soft(f.heart, e)
  thickness = np.sqrt(np.clip(f.heart * (-2.0 / a.heart[3]), 0.0, 1.0))
  out += d["heart"] * heart * (0.7 + 0.3 * thickness) * (1.0 - abdomen)
  mediastinum = _soft(np.maximum(np.maximum(f.med_r - u, u - f.med_l), f.diaphragm), e)
  mediastinum *= 1.0 - heart
  # The superior mediastinum holds less tissue than the heart level.
  out += d["mediastinum"] * mediastinum * np.clip(0.6 + (v - a.top) * (0.4 / 0.3), 0.6, 1.0)
  cover = np.minimum(abdomen + heart + mediastinum, 1.0)  # dense tissue that hides the ribs
  depth = np.clip(np.minimum(f.field[0], f.field[1]) * (-1.0 / 0.05), 0.0, 1.0)
  out -= d["lung_air"] * (c.air[0] + c.air[1]) * (0.5 + 0.5 * depth)
  _add_airways(c, out)
  _add_ribs(c, out, du, cover)
  _add_clavicles(c, out)
  _add_spine(c, out)
  _add_soft_tissue_extras(c, out)
  return out


def _add_airways(c: _Canvas, out: np.ndarray) -> None:
  """Trachea and main bronchi: dark air columns in the upper mediastinum."""
  a, g = c.a, c.grid
  carina = (a.mid + a.med_shift, (a.hilum[0][1] + a.hilum[1][1]) / 2 - 0.05)
  pieces = [((a.mid + a.med_shift, a.top - 0.12), carina, 0.012),
            (carina, (a.hilum[0][0] + 0.02, a.hilum[0][1]), 0.008),
            (carina, (a.hilum[1][0] - 0.02, a.hilum[1][1]), 0.008)]
  for (u0, v0), (u1, v1), half in pieces:
    win = g.window(min(u0, u1) - 0.02, min(v0, v1) - 0.02, max(u0, u1) + 0.02, max(v0, v1) + 0.02)
    dist = _segment_distance(g.u[win], g.v[win], u0, v0, u1, v1)
    out[win] -= DENSITY["trachea"] * _soft(dist - half, c.edge)
  for hu, hv in a.hilum:  # hilar vessels
    win = g.around(hu, hv, 0.06)
    du, dv = (g.u[win] - hu) * (1.0 / 0.025), (g.v[win] - hv) * (1.0 / 0.035)
    out[win] += DENSITY["hilum"] * np.exp(-(du * du + dv * dv))


def _add_ribs(c: _Canvas, out: np.ndarray, du: np.ndarray, cover: np.ndarray) -> None:
  """Posterior ribs (bending down towards the chest wall) and fainter anterior ribs."""
  a, f, e = c.a, c.f, c.edge
  adu = np.abs(du)
  spacing = a.rib_spacing
  phase = a.rib_phase[0] + (a.rib_phase[1] - a.rib_phase[0]) * c.f.left_half
  region = (_soft(f.rib - 0.025, 0.02) * np.clip((adu - 0.03) * (1.0 / 0.03), 0.0, 1.0)
            * (1.0 - 0.7 * cover))
  width = 0.42
  psi = (c.grid.v - a.rib_curve * adu * adu + 0.2 * adu - a.top) * (1.0 / spacing) + phase
  q = psi - np.floor(psi)
  dist = (np.abs(q - width / 2) - width / 2) * spacing  # < 0 inside a rib
  rib = _soft(dist, e) * (0.75 + 0.25 * (1.0 - np.clip(dist * (-1.0 / 0.006), 0.0, 1.0)))
  out += DENSITY["rib"] * region * rib
  psi = (c.grid.v + 0.45 * adu - a.top) * (1.0 / (1.1 * spacing)) + phase
  q = psi - np.floor(psi)
  dist = (np.abs(q - 0.2) - 0.2) * spacing
  anterior = region * np.clip((adu - 0.1) * (1.0 / 0.05), 0.0, 1.0)
  out += 0.45 * DENSITY["rib"] * anterior * _soft(dist, 2 * e)


def _add_clavicles(c: _Canvas, out: np.ndarray) -> None:
  a, g = c.a, c.grid
  y = a.clavicle_y
  win = g.window(0.0, y - 0.12, 1.0, y + 0.05)
  u, v = g.u[win], g.v[win]
  adu = np.abs(u - a.mid - a.med_shift)
  t = adu - 0.04
  centre = y - 0.25 * t + 1.0 * t * (t - 0.26)
  half = 0.015 - 0.012 * t
  ends = np.clip(t * (1.0 / 0.01), 0.0, 1.0) * np.clip((0.3 - t) * (1.0 / 0.02), 0.0, 1.0)
  band = _soft(np.abs(v - centre) - half, c.edge) * ends
  out[win] += DENSITY["clavicle"] * band


def _add_spine(c: _Canvas, out: np.ndarray) -> None:
  """The vertebral column, faint behind the mediastinum, with a vertebral-body rhythm."""
  a, g = c.a, c.grid
  centre = a.mid + a.med_shift * 0.5
  win = g.window(centre - 0.05, 0.0, centre + 0.05, 1.0)
  u, v = g.u[win], g.v[win]
  column = _soft(np.abs(u - centre) - 0.028, c.edge)
  rhythm = np.cos((v - a.top) * (2 * np.pi / 0.045))
  out[win] += DENSITY["spine"] * column * (0.85 + 0.15 * rhythm)


def _add_soft_tissue_extras(c: _Canvas, out: np.ndarray) -> None:
  """Breast shadows (female patients) and the gastric air bubble under the left dome."""
  a, g = c.a, c.grid
  if a.female:  # over the lower lungs, densest at their sharp lower edge
    for sign in (-1.0, 1.0):
      cu, cv = a.mid + sign * 0.6 * a.rx, a.dome_y[0] - 0.1
      win = g.window(cu - 0.2, cv - 0.2, cu + 0.2, cv + 0.15)
      du, dv = (g.u[win] - cu) * (1.0 / 0.2), (g.v[win] - cv) * (1.0 / 0.12)
      shape = _soft((du * du + dv * dv - 1.0) * 0.06, c.edge)
      out[win] += DENSITY["breast"] * shape * np.clip(0.5 + dv * 0.5, 0.0, 1.0)
  if a.stomach:
    cu, cv = a.dome_x[1] + 0.03, a.dome_y[1] + 0.05
    win = g.around(cu, cv, 0.06)
    du, dv = (g.u[win] - cu) * (1.0 / 0.045), (g.v[win] - cv) * (1.0 / 0.028)
    bubble = _soft((du * du + dv * dv - 1.0) * 0.014, c.edge) * _soft(-c.f.diaphragm[win], c.edge)
    out[win] -= DENSITY["stomach"] * bubble


def _add_vessels(c: _Canvas) -> None:
  a = c.a
  if not len(a.vessels):
    return
  strength = np.sqrt(a.vessels[:, 4] / a.vessels[:, 4].max())
  layer = _lines(c.grid, a.vessels, strength, blur=0.002)
  visible = (c.aerated[0] + c.aerated[1]) * c.vessel_mask
  c.density += (DENSITY["vessel"] * a.vessel_keep) * layer * visible


# Finding renderers: each adds its signature to the density and returns the instance's tight
# pixel box (None when it fell outside the image).


def _level_box(shape: np.ndarray, win: tuple[slice, slice], level: float) -> Box | None:
  """The box of where `shape` (a window of the image) exceeds `level` times its peak."""
  peak = float(shape.max()) if shape.size else 0.0
  return _box(shape > level * peak, win) if peak > 0 else None


def _render_lump(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  """Nodule (one sphere) and mass (a sphere with lobes): the union of sphere profiles."""
  p = lesion.params
  (u0, v0), r = p["center"], p["radius"]
  lobes = p.get("lobes", [(u0, v0, r)])
  win = c.grid.around(u0, v0, p.get("radius", r) * 1.05)
  u, v = c.grid.u[win], c.grid.v[win]
  shape = np.zeros(u.shape, np.float32)
  for lu, lv, lr in lobes:
    rho2 = ((u - lu) ** 2 + (v - lv) ** 2) * (1.0 / (lr * lr))
    shape = np.maximum(shape, np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0)))
  c.density[win] += p["density"] * shape
  return _level_box(shape, win, t["box_level"])


def _render_patch(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  """Consolidation (sharp, dense, air bronchograms) and pneumonia (fuzzy, mottled)."""
  p = lesion.params
  (u0, v0), r = p["center"], p["radius"]
  halo = p.get("halo", 0.0)
  win = c.grid.around(u0, v0, r * (1.6 + halo))
  u, v = c.grid.u[win], c.grid.v[win]
  shape = np.zeros(u.shape, np.float32)
  for bu, bv, bru, brv in p["blobs"]:
    rho = np.sqrt(((u - bu) * (1.0 / bru)) ** 2 + ((v - bv) * (1.0 / brv)) ** 2)
    if halo:
      m = np.clip((1.0 + halo - rho) * (0.5 / halo), 0.0, 1.0)
      shape = np.maximum(shape, m * m * (3.0 - 2.0 * m))
    else:
      shape = np.maximum(shape, _soft((rho - 1.0) * min(bru, brv), t["edge"]))
  if "fissure" in p:
    level, sign = p["fissure"]
    shape *= _soft(sign * (v - level), c.edge)
  shape *= c.aerated[lesion.side][win]
  if halo:
    shape *= 0.85 + 0.15 * np.cos(u * 180.0 + 1.3 * lesion.side) * np.cos(v * 150.0 + u0 * 50)
  c.density[win] += p["density"] * shape
  if "bronchi" in p:
    bronchi = _lines(c.grid, p["bronchi"], np.ones(len(p["bronchi"])))[win]
    c.density[win] -= 0.6 * p["density"] * bronchi * np.clip(shape * 1.5 - 0.5, 0.0, 1.0)
  return _level_box(shape, win, t["box_level"])


def _render_infiltration(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  p = lesion.params
  (u0, v0), r = p["center"], p["radius"]
  win = c.grid.around(u0, v0, r)
  u, v = c.grid.u[win], c.grid.v[win]
  total = np.zeros(u.shape, np.float32)
  for bu, bv, br, amp in p["blobs"]:
    total += amp * np.exp(((u - bu) ** 2 + (v - bv) ** 2) * (-0.5 / (br * br)))
  shape = (1.0 - np.exp(-1.5 * total)) * c.aerated[lesion.side][win]
  c.density[win] += p["density"] * shape
  return _level_box(shape, win, t["box_level"])


def _render_atelectasis(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  p = lesion.params
  (u0, v0), r = p["center"], p["radius"]
  win = c.grid.around(u0, v0, 0.6 * r + p["thickness"])
  u, v = c.grid.u[win], c.grid.v[win]
  dist = _segment_distance(u, v, *p["ends"])
  shape = _soft(dist - 0.5 * p["thickness"], max(c.edge, 0.004)) * c.aerated[lesion.side][win]
  c.density[win] += p["density"] * shape
  return _level_box(shape, win, t["box_level"])


def _hemithorax_window(c: _Canvas, side: int, v0: float, v1: float):
  a = c.a
  if side == RIGHT:
    return c.grid.window(a.mid - a.rx - 0.03, v0, a.mid + a.med_shift, v1)
  return c.grid.window(a.mid + a.med_shift, v0, a.mid + a.rx + 0.03, v1)


def _render_pleural_thickening(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  p = lesion.params
  v0, v1 = p["rows"]
  win = _hemithorax_window(c, lesion.side, v0 - 0.03, v1 + 0.03)
  v = c.grid.v[win]
  thickness = p["thickness"] * (0.75 + 0.25 * np.sin(v * (2 * np.pi / 0.08) + p["phase"]))
  band = (_soft(-(c.f.rib[win] + thickness), c.edge) * _soft(c.f.field[lesion.side][win], c.edge)
          * _soft(v0 - v, 0.015) * _soft(v - v1, 0.015))
  c.density[win] += p["density"] * band
  return _level_box(band, win, t["box_level"])


def _full(c: _Canvas):
  return slice(0, c.grid.size), slice(0, c.grid.size)


def _render_effusion(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  del t  # the fluid's shape is part of the anatomy
  fluid = c.f.fluid[lesion.side]
  c.density += lesion.params["density"] * _soft(fluid, max(c.edge, 0.015))
  return _box(fluid < 0, _full(c))


def _render_pneumothorax(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  del t  # the air space is part of the anatomy
  p, s, f = lesion.params, lesion.side, c.f
  space = _soft(-f.gap[s], c.edge) * c.air[s]
  c.density -= p["lucency"] * space
  line = _soft(np.abs(f.gap[s]) - 0.5 * p["width"], c.edge) * c.air[s]
  c.density += p["line"] * line
  return _box((f.gap[s] > 0) & (f.field[s] < 0), _full(c))


def _render_emphysema(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  del t  # lucency, flat domes and sparse vessels are part of the anatomy
  a, s, g = c.a, lesion.side, c.grid
  lo, hi = a.lucency_band[s]
  weight = _soft(lo - g.v, 0.04) * _soft(g.v - hi, 0.04)
  c.density -= a.lucency[s] * weight * c.air[s]
  box = _box((weight > 0.5) & (c.f.field[s] < 0), _full(c))
  for bu, bv, br in lesion.params["bullae"]:
    win = g.around(bu, bv, br * 1.2)
    rho = np.sqrt((g.u[win] - bu) ** 2 + (g.v[win] - bv) ** 2) * (1.0 / br)
    inside = _soft((rho - 1.0) * br, c.edge) * c.aerated[s][win]
    wall = _soft(np.abs(rho - 1.0) * br - 0.0015, c.edge) * c.aerated[s][win]
    c.density[win] += 0.08 * wall - 0.6 * a.lucency[s] * inside
    c.vessel_mask[win] *= 1.0 - inside
    box = _union(box, _box(inside > 0.5, win))
  return box


def _render_edema(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  p, s, g = lesion.params, lesion.side, c.grid
  (u0, v0), r = p["center"], p["radius"]
  win = g.around(u0, v0, 2.2 * r)
  u, v = g.u[win], g.v[win]
  du, dv = (u - u0) * (1.0 / r), (v - v0) * (1.0 / (1.3 * r))
  puffs = np.zeros(u.shape, np.float32)
  for pu, pv, pr in p["puffs"]:
    puffs += np.exp(((u - pu) ** 2 + (v - pv) ** 2) * (-0.5 / (pr * pr)))
  haze = np.exp(-(du * du + dv * dv)) * (0.4 + 0.6 * (1.0 - np.exp(-puffs))) * c.aerated[s][win]
  c.density[win] += p["density"] * haze
  box = _level_box(haze, win, t["box_level"])
  if len(p["kerley"]):
    lines = _lines(g, p["kerley"], np.ones(len(p["kerley"]))) * c.aerated[s]
    c.density += p["kerley_density"] * lines
    box = _union(box, _level_box(lines, _full(c), 0.3))
  return box


def _render_fibrosis(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  p, s = lesion.params, lesion.side
  lines = _lines(c.grid, p["lines"], np.ones(len(p["lines"]))) * c.aerated[s]
  c.density += p["density"] * lines
  return _level_box(lines, _full(c), t["box_level"])


def _render_hernia(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  del t
  p, g = lesion.params, c.grid
  (u0, v0), r = p["center"], p["radius"]
  win = g.around(u0, v0, 1.2 * r)
  u, v = g.u[win], g.v[win]
  rho = np.sqrt((u - u0) ** 2 + (v - v0) ** 2) * (1.0 / r)
  sac = _soft((rho - 1.0) * r, c.edge)
  fluid = _soft(v0 + p["level"] * r - v, c.edge)  # below the air-fluid level
  wall = _soft(np.abs(rho - 1.0) * r - p["wall"], c.edge)
  c.density[win] += sac * (p["fluid"] * fluid - p["air"] * (1.0 - fluid)) + 0.1 * wall
  return _box(sac > 0.5, win)


def _render_cardiomegaly(c: _Canvas, lesion: _Lesion, t: dict[str, Any]) -> Box | None:
  del lesion, t  # the enlarged heart is already part of the anatomy
  return _box((c.f.heart < 0) & (c.f.diaphragm < 0), _full(c))


_RENDERERS = {"Nodule": _render_lump, "Mass": _render_lump, "Effusion": _render_effusion,
              "Pleural_Thickening": _render_pleural_thickening, "Consolidation": _render_patch,
              "Infiltration": _render_infiltration, "Pneumonia": _render_patch,
              "Cardiomegaly": _render_cardiomegaly, "Pneumothorax": _render_pneumothorax,
              "Atelectasis": _render_atelectasis, "Edema": _render_edema,
              "Emphysema": _render_emphysema, "Fibrosis": _render_fibrosis,
              "Hernia": _render_hernia}
# Findings recorded at a fixed place (DESIGN: the heart and a hiatal hernia sit left and low).
_FIXED_ZONE = {"Cardiomegaly": "lower", "Hernia": "lower"}


def _anatomy_map(c: _Canvas) -> np.ndarray:
  """The label map of the rendered anatomy (ids index ANATOMY_NAMES)."""
  f = c.f
  out = np.zeros((c.grid.size, c.grid.size), np.uint8)
  body = c.body < 0
  out[body] = BODY
  out[body & (f.diaphragm > 0)] = ABDOMEN
  above = f.diaphragm < 0
  mediastinum = (c.grid.u > f.med_r) & (c.grid.u < f.med_l) & above & (f.rib < 0)
  out[mediastinum] = MEDIASTINUM
  out[(f.heart < 0) & above] = HEART
  out[f.lung[RIGHT] < 0] = RIGHT_LUNG
  out[f.lung[LEFT] < 0] = LEFT_LUNG
  return out


def _expose(c: _Canvas, study: Study) -> np.ndarray:
  """Density -> 8-bit film: blur, window, gamma, heel effect and noise."""
  x = study.exposure
  size = c.grid.size
  density = _blur(c.density, x["blur"] * size)
  image = np.clip((density - x["black"]) * (1.0 / (x["white"] - x["black"])), 0.0, 1.0)
  image **= x["gamma"]
  # Heel effect and uneven film: a brightness ramp in a random direction.
  ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  angle = math.radians(x["gradient_angle"])
  image += (x["gradient"] * math.cos(angle)) * ramp[None, :]
  image += (x["gradient"] * math.sin(angle)) * ramp[:, None]
  # Triangular noise from random bytes: close to Gaussian and far cheaper to draw.
  raw = np.random.default_rng(study.noise_seed).bytes(2 * size * size)
  noise = np.frombuffer(raw, np.int8).reshape(2, size, size).sum(0, dtype=np.float32)
  image += (x["noise"] / _TRIANGULAR_STD) * noise
  return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


_TRIANGULAR_STD = math.sqrt(2 * (256**2 - 1) / 12)  # std of the sum of two random int8


def render(study: Study, image_size: int) -> Rendered:
  """Renders a study: the image, its anatomy label map and its finding instances."""
  c = _Canvas(study, image_size)
  lungs = study.lungs
  instances = []
  for lesion in study.lesions:
    box = _RENDERERS[lesion.finding](c, lesion, FINDINGS[lesion.finding])
    if box is None:
      continue
    zone = _FIXED_ZONE.get(lesion.finding)
    if zone is None:
      _, v = c.grid.to_canonical(box[0] + box[2] / 2, box[1] + box[3] / 2)
      zone = label_lib.ZONES[lungs.zone(lesion.side, v)]
    instances.append(Instance(lesion.finding, label_lib.SIDES[lesion.side], zone, box))
  _add_vessels(c)
  return Rendered(_expose(c, study), _anatomy_map(c), instances)


def render_example(seed: int, image_size: int = 256, findings: Iterable[str] = (),
                   view: str | None = None) -> Rendered:
  """Renders one image of a random patient with the given findings (none: a normal image)."""
  rng = np.random.default_rng([seed, 0, _STREAM_EXAMPLE, 0])
  anatomy = sample_anatomy(rng)
  return render(sample_study(rng, anatomy, findings, view), image_size)


# ---------------------------------------------------------------------------------------------
# Labels: which findings an image has


# Independent random streams per (seed, patient, purpose, follow-up): the rendering, the labels
# and the label noise of one image never depend on how many workers drew the others.
_STREAM_PATIENT, _STREAM_IMAGE, _STREAM_LABELS, _STREAM_NOISE = 0, 1, 2, 3
_STREAM_SPLIT, _STREAM_EXAMPLE, _STREAM_PREVIEW = 4, 5, 6


def resolve_prevalence(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
  """The per-image rate of every label: the defaults with `overrides` applied (names checked)."""
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(label_lib.NIH_LABELS))
  if unknown:
    raise ValueError(f"prevalence for unknown labels {unknown}; labels are "
                     f"{list(label_lib.NIH_LABELS)}")
  prevalence = {name: float(overrides.get(name, DEFAULT_PREVALENCE[name]))
                for name in label_lib.NIH_LABELS}
  bad = {k: v for k, v in prevalence.items() if not 0.0 <= v <= 1.0}
  if bad:
    raise ValueError(f"prevalences must lie in [0, 1]: {bad}")
  return prevalence


def abnormal_rates(prevalence: Mapping[str, float], no_finding: float) -> np.ndarray:
  """Per-label draw probabilities for abnormal images, in NIH_LABELS order.

  An image is normal with probability `no_finding`; otherwise each label is drawn independently
  with rate q_k, redrawing until at least one is set. The q_k are solved so that every label's
  overall rate equals `prevalence[k]`: q_k = r_k c with r_k = p_k / (1 - no_finding) and
  c = P(at least one label) = 1 - prod(1 - r_k c).
  """
  if not 0.0 <= no_finding < 1.0:
    raise ValueError(f"no_finding must lie in [0, 1), got {no_finding}")
  r = np.array([prevalence[n] for n in label_lib.NIH_LABELS]) / (1.0 - no_finding)
  if r.max() > 1.0:
    raise ValueError(f"a label's prevalence ({max(prevalence.values())}) exceeds the abnormal "
                     f"fraction 1 - no_finding = {1 - no_finding}")
  if r.sum() <= 1.0:
    raise ValueError(
        f"prevalences sum to {sum(prevalence.values()):.3f}, at most the abnormal fraction "
        f"{1 - no_finding:.3f}: every abnormal image needs a finding, so raise prevalences or "
        f"--no-finding")
  lo, hi = 1e-9, 1.0  # bisection on c: f(c) = 1 - prod(1 - r c) - c is > 0 below the root
  for _ in range(100):
    c = (lo + hi) / 2
    lo, hi = (c, hi) if 1.0 - np.prod(1.0 - r * c) > c else (lo, c)
  return r * lo


def sample_findings(rng: np.random.Generator, rates: np.ndarray, no_finding: float) -> list[str]:
  """The findings of one image (empty for 'No Finding'); `rates` from `abnormal_rates`."""
  if rng.random() < no_finding:
    return []
  while True:
    hits = np.flatnonzero(rng.random(len(rates)) < rates)
    if len(hits):
      return [label_lib.NIH_LABELS[i] for i in hits]


# ---------------------------------------------------------------------------------------------
# Dataset generation


@dataclasses.dataclass(frozen=True)
class _Job:
  """What a worker needs to render one patient."""

  patient: int
  seed: int
  image_size: int
  rates: tuple[float, ...]
  no_finding: float
  label_noise: float
  out_dir: str | None  # None: encode only (benchmark)


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Level 1: a third of the time of the default level for ~10 % larger files.
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _render_patient(job: _Job) -> list[dict[str, Any]]:
  """Renders (and writes) every image of one patient; returns their table rows."""
  seed, pid = job.seed, job.patient
  rng = np.random.default_rng([seed, pid, _STREAM_PATIENT, 0])
  anatomy = sample_anatomy(rng)
  num_images = 1 + int(rng.choice(len(FOLLOW_UP_WEIGHTS), p=FOLLOW_UP_WEIGHTS))
  age, years_per_visit = int(rng.integers(18, 86)), float(rng.uniform(0.0, 0.8))
  sex = "F" if anatomy.female else "M"
  rates = np.array(job.rates)
  rows = []
  for fu in range(num_images):
    findings = sample_findings(np.random.default_rng([seed, pid, _STREAM_LABELS, fu]), rates,
                               job.no_finding)
    image_rng = np.random.default_rng([seed, pid, _STREAM_IMAGE, fu])
    study = sample_study(image_rng, follow_up(image_rng, anatomy), findings)
    rendered = render(study, job.image_size)
    name = f"{pid:08d}_{fu:03d}.png"
    image, anatomy_map = _png(rendered.image), _png(rendered.anatomy)
    if job.out_dir is not None:
      with open(os.path.join(job.out_dir, "images", name), "wb") as f:
        f.write(image)
      with open(os.path.join(job.out_dir, EXTRAS, "anatomy", name), "wb") as f:
        f.write(anatomy_map)
    truth = {i.finding for i in rendered.instances}
    flips = np.random.default_rng([seed, pid, _STREAM_NOISE, fu]).random(len(label_lib.NIH_LABELS))
    reported = [n for n, flip in zip(label_lib.NIH_LABELS, flips < job.label_noise)
                if (n in truth) != flip]
    rows.append(dict(image=name, patient=pid, follow_up=fu, age=int(age + fu * years_per_visit),
                     sex=sex, view=study.view, truth=sorted(truth), labels=sorted(reported),
                     instances=rendered.instances))
  return rows


def _default_workers() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _map(fn, jobs: Sequence[_Job], workers: int) -> list:
  """`fn` over jobs in order, in `workers` processes (spawned: safe after JAX has started)."""
  if workers <= 1 or len(jobs) <= 1:
    return [fn(job) for job in jobs]
  chunk = max(1, len(jobs) // (8 * workers))
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    return list(pool.map(fn, jobs, chunksize=chunk))


def _test_patients(seed: int, num_patients: int, test_fraction: float) -> set[int]:
  """Patient ids of the test split: a seeded draw of round(fraction x patients), at least one
  patient in each split when both are asked for."""
  count = round(test_fraction * num_patients)
  if 0.0 < test_fraction < 1.0 and num_patients >= 2:
    count = min(max(count, 1), num_patients - 1)
  order = np.random.default_rng([seed, 0, _STREAM_SPLIT, 0]).permutation(num_patients)
  return {int(i) + 1 for i in order[:count]}


def generate(out_dir: str | os.PathLike, num_patients: int, image_size: int = 512, seed: int = 0,
             *, workers: int | None = None, test_fraction: float = 0.2, label_noise: float = 0.0,
             prevalence: Mapping[str, float] | None = None,
             no_finding: float = DEFAULT_NO_FINDING, overwrite: bool = False) -> dict[str, Any]:
  """Writes a phantom dataset in the NIH layout (module docstring) and returns its summary.

  Args:
    out_dir: the dataset folder; written atomically (a temporary sibling renamed at the end).
    num_patients: patients (1 to 5 images each); patient ids are 1..num_patients.
    image_size: side of the square images, in pixels.
    seed: everything is a function of the seed (and the arguments below, except `workers`).
    workers: processes to render with (default: all cores); the output does not depend on it.
    test_fraction: fraction of patients in test_list.txt (the rest in train_val_list.txt).
    label_noise: probability that each of the 14 labels in Data_Entry is flipped; the extras
      (fine labels, boxes) keep the rendered truth.
    prevalence: per-image rates overriding DEFAULT_PREVALENCE, by label name.
    no_finding: fraction of images with no finding.
    overwrite: replace a non-empty `out_dir` (refused otherwise).
  """
  if num_patients < 1 or num_patients > 99_999_999:
    raise ValueError(f"num_patients must be in [1, 99999999], got {num_patients}")
  if image_size < 32:
    raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if not 0.0 <= test_fraction <= 1.0 or not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"test_fraction ({test_fraction}) and label_noise ({label_noise}) must lie "
                     "in [0, 1]")
  prevalence_all = resolve_prevalence(prevalence)
  rates = abnormal_rates(prevalence_all, no_finding)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
  tmp = f"{out_dir}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(os.path.join(tmp, "images"))
    os.makedirs(os.path.join(tmp, EXTRAS, "anatomy"))
    jobs = [_Job(pid, seed, image_size, tuple(rates.tolist()), no_finding, label_noise, tmp)
            for pid in range(1, num_patients + 1)]
    rows = [row for rows in _map(_render_patient, jobs, workers or _default_workers())
            for row in rows]
    test = _test_patients(seed, num_patients, test_fraction)
    arguments = dict(num_patients=num_patients, image_size=image_size, seed=seed,
                     test_fraction=test_fraction, label_noise=label_noise,
                     prevalence=dict(prevalence or {}), no_finding=no_finding)
    summary = _write_tables(tmp, rows, test, image_size, arguments, prevalence_all, no_finding)
    writer.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return summary


def _write_tables(out: str, rows: list[dict[str, Any]], test: set[int], size: int,
                  arguments: dict[str, Any], prevalence: dict[str, float],
                  no_finding: float) -> dict[str, Any]:
  """Writes the CSVs, split lists and phantom_info.json; returns the summary."""
  spacing = f"{FIELD_OF_VIEW_MM / size:.6g}"
  entries, boxes, fine = [DATA_ENTRY_HEADER], [BBOX_HEADER], [FINE_LABELS_HEADER]
  splits = {TRAIN_VAL_LIST: [], TEST_LIST: []}
  for row in rows:
    name = row["image"]
    labels = "|".join(row["labels"]) or label_lib.NO_FINDING
    entries.append(f"{name},{labels},{row['follow_up']},{row['patient']},{row['age']},"
                   f"{row['sex']},{row['view']},{size},{size},{spacing},{spacing}")
    is_test = row["patient"] in test
    splits[TEST_LIST if is_test else TRAIN_VAL_LIST].append(name)
    largest = {}
    for inst in row["instances"]:
      fine.append(f"{name},{inst.finding},{inst.side},{inst.zone},{','.join(map(str, inst.box))}")
      area = inst.box[2] * inst.box[3]
      if inst.finding in BBOX_NAMES and area > largest.get(inst.finding, (-1,))[0]:
        largest[inst.finding] = (area, inst.box)
    if is_test:  # NIH boxed test images only, one box per (image, class)
      for finding in sorted(largest):
        x, y, w, h = (float(v) for v in largest[finding][1])
        boxes.append(f"{name},{BBOX_NAMES[finding]},{x},{y},{w},{h}")
  for path, lines in ((DATA_ENTRY, entries), (BBOX_LIST, boxes),
                      (os.path.join(EXTRAS, FINE_LABELS), fine)):
    with open(os.path.join(out, path), "w", newline="") as f:
      f.write("\n".join(lines) + "\n")
  for path, names in splits.items():
    with open(os.path.join(out, path), "w", newline="") as f:
      f.write("\n".join(names))  # NIH's lists end without a newline
  counts = {n: sum(n in r["truth"] for r in rows) for n in label_lib.NIH_LABELS}
  reported = {n: sum(n in r["labels"] for r in rows) for n in label_lib.NIH_LABELS}
  summary = dict(
      generator="data_prep.phantom", generator_version=GENERATOR_VERSION,
      seed=arguments["seed"], arguments=arguments,
      prevalences=dict(prevalence, **{label_lib.NO_FINDING: no_finding}),
      anatomy_names=list(ANATOMY_NAMES), label_names=list(label_lib.NIH_LABELS),
      fine_label_names=list(label_lib.fine_vocabulary()),
      bbox_labels=[BBOX_NAMES[n] for n in label_lib.NIH_LABELS if n in BBOX_NAMES],
      num_patients=arguments["num_patients"], num_images=len(rows),
      num_train_val_images=len(splits[TRAIN_VAL_LIST]), num_test_images=len(splits[TEST_LIST]),
      num_instances=len(fine) - 1, num_boxes=len(boxes) - 1,
      rendered_positives=counts, reported_positives=reported,
      no_finding_images=sum(not r["labels"] for r in rows))
  with open(os.path.join(out, EXTRAS, INFO), "w") as f:
    json.dump(summary, f, indent=1)
    f.write("\n")
  return summary


# ---------------------------------------------------------------------------------------------
# Preview and benchmark


PREVIEW_CAPTION = 26  # pixels under each preview tile: two lines of text


def make_preview(path: str | os.PathLike, image_size: int = 256, seed: int = 0,
                 columns: int = 5) -> None:
  """Writes a grid: one normal image and one per label on the same patient, boxes in red and
  each tile captioned with its label and the instances' side/zone."""
  anatomy = sample_anatomy(np.random.default_rng([seed, 0, _STREAM_PREVIEW, 0]))
  normal = sample_study(np.random.default_rng([seed, 0, _STREAM_PREVIEW, 1]), anatomy, (), "PA")
  tiles = []
  for k, findings in enumerate([()] + [(n,) for n in label_lib.NIH_LABELS]):
    # Each finding placed by its own draws, seen with the normal tile's pose, exposure and noise.
    study = sample_study(np.random.default_rng([seed, 0, _STREAM_PREVIEW, 2 + k]), anatomy,
                         findings, "PA")
    study = dataclasses.replace(study, pose=normal.pose, exposure=normal.exposure,
                                noise_seed=normal.noise_seed, texture=normal.texture)
    rendered = render(study, image_size)
    places = ", ".join(f"{i.side}/{i.zone}" for i in rendered.instances)
    tiles.append((rendered, f"{findings[0]}\n{places}" if findings else label_lib.NO_FINDING))
  caption = PREVIEW_CAPTION
  rows = math.ceil(len(tiles) / columns)
  # A palette image: greys 0..254 for pixels and text, index 255 red for boxes.
  sheet = np.zeros((rows * (image_size + caption), columns * image_size), np.uint8)
  red = 255
  canvas = Image.new("P", (sheet.shape[1], sheet.shape[0]))
  for k, (rendered, _) in enumerate(tiles):
    r, c = divmod(k, columns)
    y0, x0 = r * (image_size + caption), c * image_size
    tile = np.minimum(rendered.image, 254)
    for inst in rendered.instances:
      x, y, w, h = inst.box
      tile[y, x:x + w] = tile[y + h - 1, x:x + w] = red
      tile[y:y + h, x] = tile[y:y + h, x + w - 1] = red
    sheet[y0:y0 + image_size, x0:x0 + image_size] = tile
  canvas.putdata(sheet.ravel().tolist())
  canvas.putpalette([v for g in range(255) for v in (g, g, g)] + [255, 0, 0])
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for k, (_, text) in enumerate(tiles):
    r, c = divmod(k, columns)
    draw.multiline_text((c * image_size + 3, r * (image_size + caption) + image_size + 2), text,
                        fill=254, font=font, spacing=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path, optimize=True)


def benchmark(num_images: int = 200, image_size: int = 256, seed: int = 0) -> tuple[float, float]:
  """Images per second in one process, as (per CPU-second, per wall-clock second): render and
  PNG-encode image and anatomy map as `generate` does, with the default prevalences.

  CPU time gives the rate of one core even when other processes share the machine.
  """
  rates = tuple(abnormal_rates(resolve_prevalence(), DEFAULT_NO_FINDING).tolist())
  wall, cpu, done, pid = time.perf_counter(), time.process_time(), 0, 0
  while done < num_images:
    pid += 1
    done += len(_render_patient(_Job(pid, seed, image_size, rates, DEFAULT_NO_FINDING, 0.0, None)))
  return done / (time.process_time() - cpu), done / (time.perf_counter() - wall)


# ---------------------------------------------------------------------------------------------
# Command line


def _prevalence_flag(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--prevalence wants Name=p, got {text!r}")
  try:
    return label_lib.canonical(name), float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--prevalence {text!r}: {value!r} is not a number") from None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_prep.phantom",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out", help="dataset folder to write (refused if not empty, see --overwrite)")
  p.add_argument("--num-patients", type=int, default=1000, help="patients, 1-5 images each")
  p.add_argument("--image-size", type=int, default=512, help="image side in pixels")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=None,
                 help="processes (default: all cores); the output does not depend on it")
  p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of test patients")
  p.add_argument("--label-noise", type=float, default=0.0,
                 help="rate at which each Data_Entry label is flipped (extras stay true)")
  p.add_argument("--prevalence", type=_prevalence_flag, action="append", default=[],
                 metavar="NAME=P", help="per-image rate of a label (repeatable)")
  p.add_argument("--no-finding", type=float, default=DEFAULT_NO_FINDING,
                 help="fraction of 'No Finding' images")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  p.add_argument("--preview", metavar="PATH",
                 help="write a grid of one normal image and one per label, then exit")
  p.add_argument("--benchmark", type=int, metavar="N",
                 help="render N images on one core, print images/s, then exit")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.preview:
    make_preview(args.preview, args.image_size, args.seed)
    print(f"wrote {args.preview}")
    return 0
  if args.benchmark:
    per_cpu, per_wall = benchmark(args.benchmark, args.image_size, args.seed)
    print(f"{per_cpu:.1f} images/s per core (CPU time; {per_wall:.1f} images/s wall clock) at "
          f"{args.image_size} px: render + PNG encode of image and anatomy map, "
          f"{args.benchmark} images")
    return 0
  if not args.out:
    _parser().error("--out is required (or --preview / --benchmark)")
  try:
    summary = generate(args.out, args.num_patients, args.image_size, args.seed,
                       workers=args.workers, test_fraction=args.test_fraction,
                       label_noise=args.label_noise, prevalence=dict(args.prevalence),
                       no_finding=args.no_finding, overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {summary['num_images']} images of {summary['num_patients']} patients "
        f"({summary['num_train_val_images']} train_val, {summary['num_test_images']} test), "
        f"{summary['num_instances']} finding instances, {summary['num_boxes']} boxes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
