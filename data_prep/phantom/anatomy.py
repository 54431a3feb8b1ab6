"""A patient's normal anatomy in the canonical frame, and where its lungs are.

Geometry lives in a canonical frame: u (viewer's left to right) and v (top to bottom), both in
[0, 1] of the image width; the patient's right is on the viewer's left (low u). A patient is drawn
once (`sample_anatomy`), varied a little per visit (`follow_up`) and per view (`ap_projection`);
findings then change it further (`findings`). `Fields` gives the signed distances of the rib
cage, diaphragm, mediastinum, heart and lungs at any canonical points; `LungMap` holds the lungs
on a coarse grid, for zones and for placing finding instances.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum", "abdomen")
BACKGROUND, BODY, RIGHT_LUNG, LEFT_LUNG, HEART, MEDIASTINUM, ABDOMEN = range(len(ANATOMY_NAMES))
RIGHT, LEFT = 0, 1  # index into labels.SIDES: the patient's right is on the viewer's left

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
DOME_MEDIAL = 0.35  # curvature of a dome's medial half relative to its lateral half
# An AP film is taken with the detector behind the patient, the source close in front: the heart,
# far from the detector, is magnified, and the clavicles project higher.
AP_HEART_MAGNIFICATION = 1.1
AP_CLAVICLE_RAISE = 0.03


def draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  """A uniform draw in [low, high) as a Python float."""
  # Python floats keep float32 arrays float32 under NumPy 2's promotion rules.
  return float(rng.uniform(*bounds))


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
    """v of the lung apices (the top of the rib-cage outline)."""
    return self.cy - self.ry

  def heart_extent(self) -> tuple[float, float]:
    """Half-width and half-height of the (tilted) heart outline."""
    return ellipse_extent(self.heart[2], self.heart[3], self.heart_tilt)

  def ctr(self) -> float:
    """Cardiothoracic ratio: heart width over the rib cage's widest inner width."""
    return self.heart_extent()[0] / self.rx

  def dome_at(self, side: int, u):
    """Height of a hemidiaphragm at u: steep towards the chest wall, gentle towards the heart."""
    d = u - self.dome_x[side]
    # k d^2 on the lateral half and DOME_MEDIAL k d^2 on the medial half, without a branch.
    even, odd = (1.0 + DOME_MEDIAL) / 2, (1.0 - DOME_MEDIAL) / 2 * (1.0 if side == LEFT else -1.0)
    return self.dome_y[side] + self.dome_k[side] * (even * d * d + odd * d * np.abs(d))


def ellipse_extent(rx: float, ry: float, tilt: float) -> tuple[float, float]:
  """Half-width and half-height of an ellipse with semi-axes rx, ry rotated by `tilt` radians."""
  c, s = math.cos(tilt), math.sin(tilt)
  return math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)


def side_tuple(pair: tuple, side: int, value) -> tuple:
  """A (right, left) pair with the entry of `side` replaced by `value`."""
  return (value, pair[1]) if side == RIGHT else (pair[0], value)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  """A random patient's normal anatomy, including its vascular tree."""
  a = {k: draw(rng, v) for k, v in ANATOMY.items()}
  rx, cy = a["thorax_rx"], a["thorax_cy"]
  dome_y = (a["dome_y"], a["dome_y"] + a["dome_drop"])
  dome_k = (a["dome_k"], a["dome_k"] * draw(rng, (0.9, 1.1)))
  hw = a["mediastinum_hw"]
  # The heart: its right border a little beyond the mediastinum, its base sunk into the left dome.
  tilt = math.radians(a["heart_tilt"])
  half_w = a["ctr"] * rx
  long_axis = half_w / math.hypot(math.cos(tilt), a["heart_aspect"] * math.sin(tilt))
  short_axis = long_axis * a["heart_aspect"]
  half_h = ellipse_extent(long_axis, short_axis, tilt)[1]
  hcx = 0.5 - hw - 0.03 + half_w
  dome_below_heart = dome_y[1] + dome_k[1] * DOME_MEDIAL * (hcx - 0.5 - 0.5 * rx) ** 2
  hcy = dome_below_heart - half_h * (1 - 2 * a["heart_sink"])
  anatomy = Anatomy(
      mid=0.5, rx=rx, cy=cy, ry=cy - a["thorax_top"], box=a["thorax_box"],
      body_pad=a["body_pad"], dome_x=(0.5 - 0.5 * rx, 0.5 + 0.5 * rx), dome_y=dome_y,
      dome_k=dome_k, med_shift=0.0, med_hw=hw, knob=a["aortic_knob"],
      heart=(hcx, hcy, long_axis, short_axis), heart_tilt=tilt,
      hilum=((0.5 - hw - 0.02, a["hilum_y"] + 0.015), (0.5 + hw + 0.02, a["hilum_y"])),
      rib_spacing=a["rib_spacing"], rib_phase=(draw(rng, (0, 1)), draw(rng, (0, 1))),
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
  return Fields(a, np.asarray(u, np.float32), np.asarray(v, np.float32)).lung[side]


class Fields:
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


class LungMap:
  """The lungs on a coarse canonical grid: zone limits and random points inside a lung."""

  CELLS = 64

  def __init__(self, a: Anatomy):
    c = (np.arange(self.CELLS, dtype=np.float32) + 0.5) / self.CELLS
    self.u, self.v = np.meshgrid(c, c)
    fields = Fields(a, self.u, self.v)
    field = Fields(a, self.u, self.v, aerated=False).lung
    self.lung = fields.lung
    self.limits = []
    for s in (RIGHT, LEFT):
      rows = self.v[field[s] < 0]
      self.limits.append((float(rows.min()), float(rows.max())))

  def zone(self, side: int, v: float) -> int:
    """The zone of height v in one lung: 0, 1, 2 for its upper, middle, lower third."""
    top, bottom = self.limits[side]
    return int(np.clip((v - top) / (bottom - top) * 3, 0, 2))

  def zone_range(self, side: int, zone: int) -> tuple[float, float]:
    """The (top, bottom) heights of one zone of one lung."""
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


def follow_up(rng: np.random.Generator, a: Anatomy) -> Anatomy:
  """The same patient on another day: inspiration, heart size and mediastinum vary a little."""
  lift = float(rng.normal(0, 0.008))
  hcx, hcy, hrx, hry = a.heart
  size = float(rng.uniform(0.97, 1.03))
  return dataclasses.replace(
      a, dome_y=(a.dome_y[0] + lift, a.dome_y[1] + lift), med_shift=float(rng.normal(0, 0.004)),
      heart=(hcx, hcy + lift * 0.5, hrx * size, hry * size))


def ap_projection(a: Anatomy) -> Anatomy:
  """The anatomy as an AP film shows it: the heart magnified about the midline, clavicles higher."""
  hcx, hcy, hrx, hry = a.heart
  m = AP_HEART_MAGNIFICATION
  return dataclasses.replace(a, heart=(a.mid + (hcx - a.mid) * m, hcy, hrx * m, hry * m),
                             clavicle_y=a.clavicle_y - AP_CLAVICLE_RAISE)
