"""The canvas: a density image of one study's normal anatomy, on its pixel grid.

`Canvas` evaluates the anatomy's fields on the pixels and adds soft tissue, lungs, heart,
mediastinum, abdomen, airways, ribs, clavicles, spine, breast shadows, the gastric bubble and
parenchymal texture; findings (`signatures`) then add their own density, and the vessels go on
last (`add_vessels`), so that emphysema's bullae can clear them. Densities are in units where
mediastinal soft tissue is about 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_prep.phantom.anatomy import (ABDOMEN, BODY, HEART, LEFT, LEFT_LUNG, MEDIASTINUM, RIGHT,
                                       RIGHT_LUNG, Anatomy, Fields)
from data_prep.phantom.raster import Grid, draw_lines, segment_distance, soft
from data_prep.phantom.study import Study

# Densities of the normal anatomy (mediastinal soft tissue ~ 1).
DENSITY = dict(body=0.55, body_center=0.18, lung_air=0.44, mediastinum=0.3, heart=0.28,
               abdomen=0.24, spine=0.06, rib=0.09, clavicle=0.16, vessel=0.16, hilum=0.12,
               trachea=0.2, breast=0.08, stomach=0.25, texture=0.025)


class Canvas:
  """The density image being built, with the anatomy's fields and masks on the pixel grid."""

  def __init__(self, study: Study, size: int):
    a = self.a = study.anatomy
    self.grid = grid = Grid(size, study.pose)
    self.edge = max(grid.pixel, 0.003)  # anatomical edges: sharp, yet never aliased
    self.f = f = Fields(a, grid.u, grid.v)
    self.body = _body_distance(a, grid.u, grid.v)
    air = []
    for s in (RIGHT, LEFT):
      space = f.field[s] if f.fluid[s] is None else np.maximum(f.field[s], -f.fluid[s])
      air.append(soft(space, self.edge))
    self.air = air  # the air space of each hemithorax, including a pneumothorax
    self.aerated = [soft(f.lung[s], self.edge) for s in (RIGHT, LEFT)]
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


def _anatomy_density(c: Canvas) -> np.ndarray:
  """Soft tissue, lungs, heart, mediastinum, abdomen and bones, before any finding."""
  a, f, g, e = c.a, c.f, c.grid, c.edge
  u, v = g.u, g.v
  d = DENSITY
  du = u - a.mid
  body = soft(c.body, 2 * e)
  bx = a.rx + a.body_pad
  edge_thinning = np.sqrt(np.clip(c.body * (-1.0 / 0.05), 0.0, 1.0))  # a round body's rim is thin
  out = (d["body"] * (0.5 + 0.5 * edge_thinning) * body
         + d["body_center"] * np.clip(1.0 - du * du * (1.0 / (bx * bx)), 0, 1) * body)
  abdomen = soft(-f.diaphragm, e) * body
  out += d["abdomen"] * abdomen * np.clip(0.75 + f.diaphragm * (0.25 / 0.1), 0.0, 1.0)
  heart = soft(f.heart, e)
  thickness = np.sqrt(np.clip(f.heart * (-2.0 / a.heart[3]), 0.0, 1.0))
  out += d["heart"] * heart * (0.7 + 0.3 * thickness) * (1.0 - abdomen)
  mediastinum = soft(np.maximum(np.maximum(f.med_r - u, u - f.med_l), f.diaphragm), e)
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


def _add_airways(c: Canvas, out: np.ndarray) -> None:
  """Trachea and main bronchi: dark air columns in the upper mediastinum."""
  a, g = c.a, c.grid
  carina = (a.mid + a.med_shift, (a.hilum[0][1] + a.hilum[1][1]) / 2 - 0.05)
  pieces = [((a.mid + a.med_shift, a.top - 0.12), carina, 0.012),
            (carina, (a.hilum[0][0] + 0.02, a.hilum[0][1]), 0.008),
            (carina, (a.hilum[1][0] - 0.02, a.hilum[1][1]), 0.008)]
  for (u0, v0), (u1, v1), half in pieces:
    win = g.window(min(u0, u1) - 0.02, min(v0, v1) - 0.02, max(u0, u1) + 0.02, max(v0, v1) + 0.02)
    dist = segment_distance(g.u[win], g.v[win], u0, v0, u1, v1)
    out[win] -= DENSITY["trachea"] * soft(dist - half, c.edge)
  for hu, hv in a.hilum:  # hilar vessels
    win = g.around(hu, hv, 0.06)
    du, dv = (g.u[win] - hu) * (1.0 / 0.025), (g.v[win] - hv) * (1.0 / 0.035)
    out[win] += DENSITY["hilum"] * np.exp(-(du * du + dv * dv))


def _add_ribs(c: Canvas, out: np.ndarray, du: np.ndarray, cover: np.ndarray) -> None:
  """Posterior ribs (bending down towards the chest wall) and fainter anterior ribs."""
  a, f, e = c.a, c.f, c.edge
  adu = np.abs(du)
  spacing = a.rib_spacing
  phase = a.rib_phase[0] + (a.rib_phase[1] - a.rib_phase[0]) * c.f.left_half
  region = (soft(f.rib - 0.025, 0.02) * np.clip((adu - 0.03) * (1.0 / 0.03), 0.0, 1.0)
            * (1.0 - 0.7 * cover))
  width = 0.42
  psi = (c.grid.v - a.rib_curve * adu * adu + 0.2 * adu - a.top) * (1.0 / spacing) + phase
  q = psi - np.floor(psi)
  dist = (np.abs(q - width / 2) - width / 2) * spacing  # < 0 inside a rib
  rib = soft(dist, e) * (0.75 + 0.25 * (1.0 - np.clip(dist * (-1.0 / 0.006), 0.0, 1.0)))
  out += DENSITY["rib"] * region * rib
  psi = (c.grid.v + 0.45 * adu - a.top) * (1.0 / (1.1 * spacing)) + phase
  q = psi - np.floor(psi)
  dist = (np.abs(q - 0.2) - 0.2) * spacing
  anterior = region * np.clip((adu - 0.1) * (1.0 / 0.05), 0.0, 1.0)
  out += 0.45 * DENSITY["rib"] * anterior * soft(dist, 2 * e)


def _add_clavicles(c: Canvas, out: np.ndarray) -> None:
  a, g = c.a, c.grid
  y = a.clavicle_y
  win = g.window(0.0, y - 0.12, 1.0, y + 0.05)
  u, v = g.u[win], g.v[win]
  adu = np.abs(u - a.mid - a.med_shift)
  t = adu - 0.04
  centre = y - 0.25 * t + 1.0 * t * (t - 0.26)
  half = 0.015 - 0.012 * t
  ends = np.clip(t * (1.0 / 0.01), 0.0, 1.0) * np.clip((0.3 - t) * (1.0 / 0.02), 0.0, 1.0)
  band = soft(np.abs(v - centre) - half, c.edge) * ends
  out[win] += DENSITY["clavicle"] * band


def _add_spine(c: Canvas, out: np.ndarray) -> None:
  """The vertebral column, faint behind the mediastinum, with a vertebral-body rhythm."""
  a, g = c.a, c.grid
  centre = a.mid + a.med_shift * 0.5
  win = g.window(centre - 0.05, 0.0, centre + 0.05, 1.0)
  u, v = g.u[win], g.v[win]
  column = soft(np.abs(u - centre) - 0.028, c.edge)
  rhythm = np.cos((v - a.top) * (2 * np.pi / 0.045))
  out[win] += DENSITY["spine"] * column * (0.85 + 0.15 * rhythm)


def _add_soft_tissue_extras(c: Canvas, out: np.ndarray) -> None:
  """Breast shadows (female patients) and the gastric air bubble under the left dome."""
  a, g = c.a, c.grid
  if a.female:  # over the lower lungs, densest at their sharp lower edge
    for sign in (-1.0, 1.0):
      cu, cv = a.mid + sign * 0.6 * a.rx, a.dome_y[0] - 0.1
      win = g.window(cu - 0.2, cv - 0.2, cu + 0.2, cv + 0.15)
      du, dv = (g.u[win] - cu) * (1.0 / 0.2), (g.v[win] - cv) * (1.0 / 0.12)
      shape = soft((du * du + dv * dv - 1.0) * 0.06, c.edge)
      out[win] += DENSITY["breast"] * shape * np.clip(0.5 + dv * 0.5, 0.0, 1.0)
  if a.stomach:
    cu, cv = a.dome_x[1] + 0.03, a.dome_y[1] + 0.05
    win = g.around(cu, cv, 0.06)
    du, dv = (g.u[win] - cu) * (1.0 / 0.045), (g.v[win] - cv) * (1.0 / 0.028)
    bubble = soft((du * du + dv * dv - 1.0) * 0.014, c.edge) * soft(-c.f.diaphragm[win], c.edge)
    out[win] -= DENSITY["stomach"] * bubble


def add_vessels(c: Canvas) -> None:
  """Adds the vessels inside the aerated lungs, save where bullae cleared them (`vessel_mask`)."""
  a = c.a
  if not len(a.vessels):
    return
  strength = np.sqrt(a.vessels[:, 4] / a.vessels[:, 4].max())
  layer = draw_lines(c.grid, a.vessels, strength, blur=0.002)
  visible = (c.aerated[0] + c.aerated[1]) * c.vessel_mask
  c.density += (DENSITY["vessel"] * a.vessel_keep) * layer * visible


def anatomy_map(c: Canvas) -> np.ndarray:
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
