"""The 14 findings: their parameters, how each changes the anatomy, where its instances go.

A finding acts in two steps (`sample_study` runs them): `start_findings` draws, in a fixed order,
each finding's anatomy changes (heart size, diaphragm, fluid, pneumothorax, ...) and its instances
(`Lesion`: label and side); `place_lesions` then places the localised instances in the final
lungs, so that nothing lands in fluid or a collapsed lung. How an instance looks is drawn here
too, into `Lesion.params`; `signatures` renders it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from data_prep.phantom.anatomy import (AP_HEART_MAGNIFICATION, LEFT, RIGHT, Anatomy, LungMap,
                                       draw, ellipse_extent, side_tuple)

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


@dataclasses.dataclass
class Lesion:
  """A finding instance to render: label, the patient's side and its drawn parameters."""

  finding: str
  side: int
  params: dict[str, Any] = dataclasses.field(default_factory=dict)


def start_findings(rng: np.random.Generator, a: Anatomy, findings: set[str],
                   view: str) -> tuple[Anatomy, list[Lesion]]:
  """Runs the start of each of `findings`: the anatomy they leave and their unplaced instances."""
  lesions: list[Lesion] = []
  for name in FINDINGS:  # a fixed order keeps the draws reproducible
    if name in findings:
      start = _STARTS.get(name, _start_one_side)
      a, new = start(rng, a, FINDINGS[name], view)
      lesions += [Lesion(name, side, params) for side, params in new]
  return a, lesions


def place_lesions(rng: np.random.Generator, lesions: Sequence[Lesion], a: Anatomy,
                  lungs: LungMap) -> None:
  """Places the localised instances in the final lungs (`lungs`), filling their params."""
  for lesion in lesions:
    place = _PLACES.get(lesion.finding)
    if place:
      place(rng, lesion, a, lungs, FINDINGS[lesion.finding])


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
  ctr = draw(rng, t["ctr"]) * (AP_HEART_MAGNIFICATION if view == "AP" else 1.0)
  half_w, half_h = a.heart_extent()
  new_rx = hrx * ctr / a.ctr()
  new_ry = hry * (ctr / a.ctr()) ** 0.7
  new_w, new_h = ellipse_extent(new_rx, new_ry, a.heart_tilt)
  # The heart grows mostly to the patient's left and stays on the diaphragm.
  heart = (hcx + 0.7 * (new_w - half_w), hcy - 0.3 * (new_h - half_h), new_rx, new_ry)
  return dataclasses.replace(a, heart=heart), [(LEFT, {})]


def _start_emphysema(rng, a, t, view):
  del view
  drop, flat = draw(rng, t["lower_dome"]), draw(rng, t["flatten"])
  lower = bool(rng.random() < t["lower_predominant"])
  a = dataclasses.replace(
      a, dome_y=(a.dome_y[0] + drop, a.dome_y[1] + drop),
      dome_k=(a.dome_k[0] * flat, a.dome_k[1] * flat), vessel_keep=draw(rng, t["vessel_keep"]))
  bands, new = [], []
  for side in (RIGHT, LEFT):
    cut = a.top + (a.dome_y[side] - a.top) * (0.45 if lower else 0.55)
    bands.append((cut, 2.0) if lower else (-1.0, cut))
    n = int(rng.integers(t["bullae"][0], t["bullae"][1] + 1))
    new.append((side, dict(lower=lower, bullae=n)))
  luc = draw(rng, t["lucency"])
  return dataclasses.replace(a, lucency=(luc, luc), lucency_band=tuple(bands)), new


def _start_atelectasis(rng, a, t, view):
  del view
  side = int(rng.integers(2))
  shift = draw(rng, t["shift"]) * (-1 if side == RIGHT else 1)  # towards the collapsed side
  hcx, hcy, hrx, hry = a.heart
  a = dataclasses.replace(
      a, dome_y=side_tuple(a.dome_y, side, a.dome_y[side] - draw(rng, t["raise_dome"])),
      med_shift=a.med_shift + shift, heart=(hcx + shift, hcy, hrx, hry))
  return a, [(side, {})]


def _start_fibrosis(rng, a, t, view):
  del view
  sides = (RIGHT, LEFT) if rng.random() < t["bilateral"] else (int(rng.integers(2)),)
  zone = _pick_zone(rng, t["zones"])
  dome_y = a.dome_y
  for side in sides:
    dome_y = side_tuple(dome_y, side, dome_y[side] - draw(rng, t["raise_dome"]))
  return dataclasses.replace(a, dome_y=dome_y), [(side, dict(zone=zone)) for side in sides]


def _start_effusion(rng, a, t, view):
  del view
  sides = (RIGHT, LEFT) if rng.random() < t["bilateral"] else (int(rng.integers(2)),)
  fluid, meniscus = a.fluid, a.meniscus
  new = []
  for side in sides:
    fluid = side_tuple(fluid, side, draw(rng, t["height"]))
    meniscus = side_tuple(meniscus, side, draw(rng, t["meniscus"]))
    new.append((side, dict(density=draw(rng, t["density"]))))
  return dataclasses.replace(a, fluid=fluid, meniscus=meniscus), new


def _start_pneumothorax(rng, a, t, view):
  del view
  side = int(rng.integers(2))
  bottom = a.top + draw(rng, t["extent"]) * (a.dome_y[side] - a.top)
  a = dataclasses.replace(a, gap=side_tuple(a.gap, side, draw(rng, t["gap"])),
                          gap_bottom=side_tuple(a.gap_bottom, side, bottom))
  return a, [(side, dict(lucency=draw(rng, t["lucency"]), width=draw(rng, t["line_width"]),
                         line=draw(rng, t["line_density"])))]


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
  r = draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), r)
  lesion.params.update(center=(u, v), radius=r, density=draw(rng, t["density"]))


def _place_mass(rng, lesion, a, lungs, t):
  del a
  r = draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.7 * r)
  lobes = [(u, v, r)]
  for _ in range(int(rng.integers(t["lobes"][0], t["lobes"][1] + 1))):
    angle = rng.uniform(0, 2 * np.pi)
    lobes.append((u + 0.55 * r * math.cos(angle), v + 0.55 * r * math.sin(angle),
                  r * draw(rng, t["lobe_size"])))
  lesion.params.update(lobes=lobes, radius=1.6 * r, center=(u, v),
                       density=draw(rng, t["density"]))


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
  r = draw(rng, t["radius"])
  zone = _pick_zone(rng, t["zones"])
  u, v = lungs.point(rng, lesion.side, zone, 0.5 * r)
  blobs = [(u + 0.5 * r * rng.uniform(-1, 1), v + 0.5 * r * rng.uniform(-1, 1),
            r * rng.uniform(0.5, 0.8), r * rng.uniform(0.4, 0.7)) for _ in range(4)]
  p = dict(center=(u, v), radius=r, blobs=blobs, density=draw(rng, t["density"]))
  if lesion.finding == "Consolidation":
    p["bronchi"] = _bronchograms(rng, u, v, r, lesion.side,
                                 int(rng.integers(t["bronchograms"][0], t["bronchograms"][1] + 1)),
                                 draw(rng, t["bronchogram_width"]))
    if rng.random() < t["fissure"]:  # a lobar patch stops at a straight fissure
      p["fissure"] = (v + 0.4 * r, 1.0) if zone == 0 else (v - 0.4 * r, -1.0)
  else:
    p["halo"] = draw(rng, t["halo"])
    if rng.random() < t["bronchograms"]:
      p["bronchi"] = _bronchograms(rng, u, v, r, lesion.side, 2, 0.005)
  lesion.params.update(p)


def _place_infiltration(rng, lesion, a, lungs, t):
  del a
  r = draw(rng, t["radius"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.3 * r)
  n = int(rng.integers(t["blobs"][0], t["blobs"][1] + 1))
  rho, phi = r * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
  blobs = np.stack([u + rho * np.cos(phi), v + rho * np.sin(phi),
                    rng.uniform(*t["blob_radius"], n), rng.uniform(0.5, 1.0, n)], 1)
  lesion.params.update(center=(u, v), radius=r + t["blob_radius"][1] * 2, blobs=blobs.tolist(),
                       density=draw(rng, t["density"]))


def _place_atelectasis(rng, lesion, a, lungs, t):
  del a
  length = draw(rng, t["length"])
  u, v = lungs.point(rng, lesion.side, _pick_zone(rng, t["zones"]), 0.45 * length)
  tilt = math.radians(draw(rng, t["tilt"]))
  du, dv = 0.5 * length * math.cos(tilt), 0.5 * length * math.sin(tilt)
  lesion.params.update(ends=(u - du, v - dv, u + du, v + dv), center=(u, v), radius=length,
                       thickness=draw(rng, t["thickness"]), density=draw(rng, t["density"]))


def _place_pleural_thickening(rng, lesion, a, lungs, t):
  del a
  top, bottom = lungs.limits[lesion.side]
  length = draw(rng, t["length"])
  if rng.random() < t["apical"]:
    v0 = top - 0.02
  else:
    v0 = rng.uniform(top + 0.1, bottom - 0.05 - length)
  lesion.params.update(rows=(v0, v0 + length), thickness=draw(rng, t["thickness"]),
                       density=draw(rng, t["density"]), phase=float(rng.uniform(0, 2 * np.pi)))


def _place_edema(rng, lesion, a, lungs, t):
  hu, hv = a.hilum[lesion.side]
  sign = -1.0 if lesion.side == RIGHT else 1.0
  r = draw(rng, t["radius"])
  top, bottom = lungs.limits[lesion.side]
  lines = []
  width = draw(rng, t["kerley_width"])
  for _ in range(int(rng.integers(t["kerley"][0], t["kerley"][1] + 1))):
    v = rng.uniform(bottom - 0.3 * (bottom - top), bottom - 0.08)
    edge = _lateral_edge(lungs, lesion.side, v)
    length = draw(rng, t["kerley_length"])
    u0 = edge - sign * 0.006
    lines.append((u0, v, u0 - sign * length, v, width))
  centre = (hu + sign * 0.35 * r, hv + 0.02)
  n = int(rng.integers(t["puffs"][0], t["puffs"][1] + 1))  # alveolar fluid is fluffy, not smooth
  rho, phi = r * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
  puffs = np.stack([centre[0] + rho * np.cos(phi), centre[1] + 1.3 * rho * np.sin(phi),
                    rng.uniform(*t["puff_radius"], n)], 1)
  lesion.params.update(center=centre, radius=r, puffs=puffs.tolist(),
                       density=draw(rng, t["haze"]), kerley=np.array(lines, np.float32),
                       kerley_density=draw(rng, t["kerley_density"]))


def _lateral_edge(lungs: LungMap, side: int, v: float) -> float:
  """The canonical u of a lung's outer border at height v (from the coarse map)."""
  row = min(LungMap.CELLS - 1, int(v * LungMap.CELLS))
  inside = np.flatnonzero(lungs.lung[side][row] < 0)
  if not len(inside):
    return 0.5
  col = inside[0] if side == RIGHT else inside[-1]
  return float(lungs.u[row, col] + (-0.5 if side == RIGHT else 0.5) / LungMap.CELLS)


def _place_emphysema(rng, lesion, a, lungs, t):
  del a
  zone = 2 if lesion.params["lower"] else 0
  lesion.params["bullae"] = [
      (*lungs.point(rng, lesion.side, zone, 0.05), draw(rng, t["bulla_radius"]))
      for _ in range(lesion.params["bullae"])]


def _place_fibrosis(rng, lesion, a, lungs, t):
  del a
  r = draw(rng, t["region"])
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
  lesion.params.update(center=(u, v), radius=r, lines=segments, density=draw(rng, t["density"]))


def _place_hernia(rng, lesion, a, lungs, t):
  del lungs
  r = draw(rng, t["radius"])
  # Behind the heart, just left of the midline and just above the diaphragm.
  u = a.mid + a.med_shift + draw(rng, t["offset"])
  v = float(a.dome_at(LEFT, u)) - draw(rng, t["lift"]) * r
  lesion.params.update(center=(u, v), radius=r, fluid=draw(rng, t["fluid"]),
                       air=draw(rng, t["air"]), level=draw(rng, t["level"]), wall=t["wall"])


_STARTS = {"Nodule": _start_nodule, "Cardiomegaly": _start_cardiomegaly,
           "Emphysema": _start_emphysema, "Atelectasis": _start_atelectasis,
           "Fibrosis": _start_fibrosis, "Effusion": _start_effusion,
           "Pneumothorax": _start_pneumothorax, "Hernia": _start_hernia, "Edema": _start_edema}
_PLACES = {"Nodule": _place_nodule, "Mass": _place_mass, "Consolidation": _place_patch,
           "Pneumonia": _place_patch, "Infiltration": _place_infiltration,
           "Atelectasis": _place_atelectasis, "Pleural_Thickening": _place_pleural_thickening,
           "Edema": _place_edema, "Emphysema": _place_emphysema, "Fibrosis": _place_fibrosis,
           "Hernia": _place_hernia}
