"""One image's study: view, pose, exposure, the anatomy it shows and its finding instances.

`sample_study` draws everything one image needs up front, so that rendering draws nothing: the
renderer turns a `Study` into pixels at any size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np

from data_prep.phantom.anatomy import Anatomy, LungMap, ap_projection, draw
from data_prep.phantom.findings import FINDINGS, Lesion, place_lesions, start_findings
from data_prep.phantom.raster import Pose

# Per-image variation: pose (degrees, canonical shift, scale) and exposure.
POSE = dict(rotation=(-5.0, 5.0), shift=(-0.035, 0.035), scale=(0.92, 1.04))
EXPOSURE = dict(
    PA=dict(black=(-0.06, 0.04), white=(1.25, 1.5), gamma=(0.8, 1.2)),
    AP=dict(black=(-0.12, -0.02), white=(1.35, 1.65), gamma=(0.85, 1.25)),
    noise=(0.008, 0.03), blur=(0.0005, 0.0025), gradient=(0.0, 0.1), gradient_angle=(0.0, 360.0))
AP_FRACTION = 0.4
TEXTURE_CELLS = 24


@dataclasses.dataclass
class Study:
  """Everything needed to render one image, drawn up front so that rendering draws nothing."""

  view: str
  pose: Pose
  exposure: dict[str, float]
  anatomy: Anatomy
  lesions: list[Lesion]
  noise_seed: int
  texture: np.ndarray  # small grid of lung-parenchyma mottling, upsampled to the image
  lungs: LungMap  # the final lungs on a coarse grid, for zones


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
  pose = _sample_pose(rng)
  exposure = _sample_exposure(rng, view)
  a = ap_projection(anatomy) if view == "AP" else anatomy
  a, lesions = start_findings(rng, a, findings, view)
  lung_map = LungMap(a)
  place_lesions(rng, lesions, a, lung_map)
  texture = rng.standard_normal((TEXTURE_CELLS, TEXTURE_CELLS)).astype(np.float32)
  return Study(view, pose, exposure, a, lesions, int(rng.integers(2**31)), texture, lung_map)


def _sample_pose(rng: np.random.Generator) -> Pose:
  return Pose(math.radians(draw(rng, POSE["rotation"])), draw(rng, POSE["shift"]),
              draw(rng, POSE["shift"]), draw(rng, POSE["scale"]))


def _sample_exposure(rng: np.random.Generator, view: str) -> dict[str, float]:
  exposure = {k: draw(rng, v) for k, v in EXPOSURE[view].items()}
  exposure.update({k: draw(rng, EXPOSURE[k])
                   for k in ("noise", "blur", "gradient", "gradient_angle")})
  return exposure
