"""Rendering: a study becomes an 8-bit radiograph, its anatomy label map and its instances.

The canvas holds the normal anatomy's density, each finding adds its signature, the vessels go on
last, and the exposure turns density into grey levels (dense = bright): blur, window, gamma, a
heel-effect ramp and noise. Each instance is recorded with the patient's side and the lung zone
(upper, middle, lower third) of its box's centre.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np

from cxr_jax.data import labels as label_lib
from data_prep.phantom import streams
from data_prep.phantom.anatomy import sample_anatomy
from data_prep.phantom.canvas import Canvas, add_vessels, anatomy_map
from data_prep.phantom.findings import Lesion
from data_prep.phantom.raster import Box, gaussian_blur
from data_prep.phantom.signatures import add_lesion
from data_prep.phantom.study import Study, sample_study

# Findings recorded at a fixed place (DESIGN: the heart and a hiatal hernia sit left and low).
_FIXED_ZONE = {"Cardiomegaly": "lower", "Hernia": "lower"}


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


def _expose(c: Canvas, study: Study) -> np.ndarray:
  """Density -> 8-bit film: blur, window, gamma, heel effect and noise."""
  x = study.exposure
  size = c.grid.size
  density = gaussian_blur(c.density, x["blur"] * size)
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
  c = Canvas(study, image_size)
  instances = []
  for lesion in study.lesions:
    box = add_lesion(c, lesion)
    if box is not None:
      zone = _zone(c, study, lesion, box)
      instances.append(Instance(lesion.finding, label_lib.SIDES[lesion.side], zone, box))
  add_vessels(c)
  return Rendered(_expose(c, study), anatomy_map(c), instances)


def _zone(c: Canvas, study: Study, lesion: Lesion, box: Box) -> str:
  """The zone an instance is recorded in: fixed for some findings, else that of its box's centre
  in the study's final lungs."""
  zone = _FIXED_ZONE.get(lesion.finding)
  if zone is not None:
    return zone
  _, v = c.grid.to_canonical(box[0] + box[2] / 2, box[1] + box[3] / 2)
  return label_lib.ZONES[study.lungs.zone(lesion.side, v)]


def render_example(seed: int, image_size: int = 256, findings: Iterable[str] = (),
                   view: str | None = None) -> Rendered:
  """Renders one image of a random patient with the given findings (none: a normal image)."""
  rng = np.random.default_rng([seed, 0, streams.EXAMPLE, 0])
  anatomy = sample_anatomy(rng)
  return render(sample_study(rng, anatomy, findings, view), image_size)
