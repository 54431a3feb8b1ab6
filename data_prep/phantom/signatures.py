"""Finding signatures: how each of the 14 findings looks on the film, and its tight box.

Each renderer adds one instance's density to the canvas (nodule and mass blobs, consolidation
and pneumonia patches, infiltration, atelectasis bands, pleural thickening, effusion fluid,
pneumothorax air and its pleural line, emphysema lucency and bullae, edema haze and Kerley lines,
fibrosis lines, a hiatal hernia, the enlarged heart) and returns the instance's tight pixel box.
Findings that changed the anatomy (fluid, air, heart) are already in the canvas's fields and are
boxed by their region.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_prep.phantom.anatomy import RIGHT
from data_prep.phantom.canvas import Canvas
from data_prep.phantom.findings import FINDINGS, Lesion
from data_prep.phantom.raster import Box, draw_lines, segment_distance, soft


def add_lesion(c: Canvas, lesion: Lesion) -> Box | None:
  """Adds one instance's signature to the canvas; returns its tight pixel box, None when the
  instance fell outside the image."""
  return _RENDERERS[lesion.finding](c, lesion, FINDINGS[lesion.finding])


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


def _level_box(shape: np.ndarray, win: tuple[slice, slice], level: float) -> Box | None:
  """The box of where `shape` (a window of the image) exceeds `level` times its peak."""
  peak = float(shape.max()) if shape.size else 0.0
  return _box(shape > level * peak, win) if peak > 0 else None


def _render_lump(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
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


def _render_patch(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
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
      shape = np.maximum(shape, soft((rho - 1.0) * min(bru, brv), t["edge"]))
  if "fissure" in p:
    level, sign = p["fissure"]
    shape *= soft(sign * (v - level), c.edge)
  shape *= c.aerated[lesion.side][win]
  if halo:
    shape *= 0.85 + 0.15 * np.cos(u * 180.0 + 1.3 * lesion.side) * np.cos(v * 150.0 + u0 * 50)
  c.density[win] += p["density"] * shape
  if "bronchi" in p:
    bronchi = draw_lines(c.grid, p["bronchi"], np.ones(len(p["bronchi"])))[win]
    c.density[win] -= 0.6 * p["density"] * bronchi * np.clip(shape * 1.5 - 0.5, 0.0, 1.0)
  return _level_box(shape, win, t["box_level"])


def _render_infiltration(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
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


def _render_atelectasis(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  p = lesion.params
  (u0, v0), r = p["center"], p["radius"]
  win = c.grid.around(u0, v0, 0.6 * r + p["thickness"])
  u, v = c.grid.u[win], c.grid.v[win]
  dist = segment_distance(u, v, *p["ends"])
  shape = soft(dist - 0.5 * p["thickness"], max(c.edge, 0.004)) * c.aerated[lesion.side][win]
  c.density[win] += p["density"] * shape
  return _level_box(shape, win, t["box_level"])


def _hemithorax_window(c: Canvas, side: int, v0: float, v1: float):
  a = c.a
  if side == RIGHT:
    return c.grid.window(a.mid - a.rx - 0.03, v0, a.mid + a.med_shift, v1)
  return c.grid.window(a.mid + a.med_shift, v0, a.mid + a.rx + 0.03, v1)


def _render_pleural_thickening(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  p = lesion.params
  v0, v1 = p["rows"]
  win = _hemithorax_window(c, lesion.side, v0 - 0.03, v1 + 0.03)
  v = c.grid.v[win]
  thickness = p["thickness"] * (0.75 + 0.25 * np.sin(v * (2 * np.pi / 0.08) + p["phase"]))
  band = (soft(-(c.f.rib[win] + thickness), c.edge) * soft(c.f.field[lesion.side][win], c.edge)
          * soft(v0 - v, 0.015) * soft(v - v1, 0.015))
  c.density[win] += p["density"] * band
  return _level_box(band, win, t["box_level"])


def _full(c: Canvas):
  return slice(0, c.grid.size), slice(0, c.grid.size)


def _render_effusion(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  del t  # the fluid's shape is part of the anatomy
  fluid = c.f.fluid[lesion.side]
  c.density += lesion.params["density"] * soft(fluid, max(c.edge, 0.015))
  return _box(fluid < 0, _full(c))


def _render_pneumothorax(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  del t  # the air space is part of the anatomy
  p, s, f = lesion.params, lesion.side, c.f
  space = soft(-f.gap[s], c.edge) * c.air[s]
  c.density -= p["lucency"] * space
  line = soft(np.abs(f.gap[s]) - 0.5 * p["width"], c.edge) * c.air[s]
  c.density += p["line"] * line
  return _box((f.gap[s] > 0) & (f.field[s] < 0), _full(c))


def _render_emphysema(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  del t  # lucency, flat domes and sparse vessels are part of the anatomy
  a, s, g = c.a, lesion.side, c.grid
  lo, hi = a.lucency_band[s]
  weight = soft(lo - g.v, 0.04) * soft(g.v - hi, 0.04)
  c.density -= a.lucency[s] * weight * c.air[s]
  box = _box((weight > 0.5) & (c.f.field[s] < 0), _full(c))
  for bu, bv, br in lesion.params["bullae"]:
    win = g.around(bu, bv, br * 1.2)
    rho = np.sqrt((g.u[win] - bu) ** 2 + (g.v[win] - bv) ** 2) * (1.0 / br)
    inside = soft((rho - 1.0) * br, c.edge) * c.aerated[s][win]
    wall = soft(np.abs(rho - 1.0) * br - 0.0015, c.edge) * c.aerated[s][win]
    c.density[win] += 0.08 * wall - 0.6 * a.lucency[s] * inside
    c.vessel_mask[win] *= 1.0 - inside
    box = _union(box, _box(inside > 0.5, win))
  return box


def _render_edema(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
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
    lines = draw_lines(g, p["kerley"], np.ones(len(p["kerley"]))) * c.aerated[s]
    c.density += p["kerley_density"] * lines
    box = _union(box, _level_box(lines, _full(c), 0.3))
  return box


def _render_fibrosis(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  p, s = lesion.params, lesion.side
  lines = draw_lines(c.grid, p["lines"], np.ones(len(p["lines"]))) * c.aerated[s]
  c.density += p["density"] * lines
  return _level_box(lines, _full(c), t["box_level"])


def _render_hernia(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  del t
  p, g = lesion.params, c.grid
  (u0, v0), r = p["center"], p["radius"]
  win = g.around(u0, v0, 1.2 * r)
  u, v = g.u[win], g.v[win]
  rho = np.sqrt((u - u0) ** 2 + (v - v0) ** 2) * (1.0 / r)
  sac = soft((rho - 1.0) * r, c.edge)
  fluid = soft(v0 + p["level"] * r - v, c.edge)  # below the air-fluid level
  wall = soft(np.abs(rho - 1.0) * r - p["wall"], c.edge)
  c.density[win] += sac * (p["fluid"] * fluid - p["air"] * (1.0 - fluid)) + 0.1 * wall
  return _box(sac > 0.5, win)


def _render_cardiomegaly(c: Canvas, lesion: Lesion, t: dict[str, Any]) -> Box | None:
  del lesion, t  # the enlarged heart is already part of the anatomy
  return _box((c.f.heart < 0) & (c.f.diaphragm < 0), _full(c))


_RENDERERS = {"Nodule": _render_lump, "Mass": _render_lump, "Effusion": _render_effusion,
              "Pleural_Thickening": _render_pleural_thickening, "Consolidation": _render_patch,
              "Infiltration": _render_infiltration, "Pneumonia": _render_patch,
              "Cardiomegaly": _render_cardiomegaly, "Pneumothorax": _render_pneumothorax,
              "Atelectasis": _render_atelectasis, "Edema": _render_edema,
              "Emphysema": _render_emphysema, "Fibrosis": _render_fibrosis,
              "Hernia": _render_hernia}
