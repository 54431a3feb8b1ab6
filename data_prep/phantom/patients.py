"""One patient at a time: the unit of work of `generate`'s worker processes, and its speed.

A patient has 1 to 5 images (follow-ups of the same anatomy, a little changed per visit), each
with its own findings; `render_patient` renders, PNG-encodes and writes them, and returns their
table rows. `benchmark` times exactly that work in one process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from cxr_jax.data import labels as label_lib
from data_prep import common
from data_prep.phantom import streams
from data_prep.phantom.anatomy import Anatomy, follow_up, sample_anatomy
from data_prep.phantom.prevalence import (DEFAULT_NO_FINDING, abnormal_rates, resolve_prevalence,
                                          sample_findings)
from data_prep.phantom.render import Rendered, render
from data_prep.phantom.study import Study, sample_study

FOLLOW_UP_WEIGHTS = (0.35, 0.25, 0.17, 0.13, 0.10)  # P(1..5 images per patient)
# Level 1: a third of the time of the default level for ~10 % larger files.
_PNG_COMPRESS_LEVEL = 1


@dataclasses.dataclass(frozen=True)
class Job:
  """What a worker needs to render one patient."""

  patient: int
  seed: int
  image_size: int
  rates: tuple[float, ...]
  no_finding: float
  label_noise: float
  out_dirs: tuple[str, str] | None  # folders of the images and anatomy maps; None: encode only


def render_patient(job: Job) -> list[dict[str, Any]]:
  """Renders (and writes) every image of one patient; returns their table rows."""
  seed, pid = job.seed, job.patient
  rng = np.random.default_rng([seed, pid, streams.PATIENT, 0])
  anatomy = sample_anatomy(rng)
  num_images = 1 + int(rng.choice(len(FOLLOW_UP_WEIGHTS), p=FOLLOW_UP_WEIGHTS))
  age, years_per_visit = int(rng.integers(18, 86)), float(rng.uniform(0.0, 0.8))
  sex = "F" if anatomy.female else "M"
  rates = np.array(job.rates)
  rows = []
  for fu in range(num_images):
    study, rendered = _render_visit(job, anatomy, rates, fu)
    name = f"{pid:08d}_{fu:03d}.png"
    _encode_and_write(job, name, rendered)
    truth = {i.finding for i in rendered.instances}
    rows.append(dict(image=name, patient=pid, follow_up=fu, age=int(age + fu * years_per_visit),
                     sex=sex, view=study.view, truth=sorted(truth),
                     labels=_reported_labels(job, fu, truth), instances=rendered.instances))
  return rows


def _render_visit(job: Job, anatomy: Anatomy, rates: np.ndarray,
                  fu: int) -> tuple[Study, Rendered]:
  """Follow-up `fu`: its findings from the label stream, its scene from the image stream."""
  findings = sample_findings(np.random.default_rng([job.seed, job.patient, streams.LABELS, fu]),
                             rates, job.no_finding)
  image_rng = np.random.default_rng([job.seed, job.patient, streams.IMAGE, fu])
  study = sample_study(image_rng, follow_up(image_rng, anatomy), findings)
  return study, render(study, job.image_size)


def _encode_and_write(job: Job, name: str, rendered: Rendered) -> None:
  """PNG-encodes the image and its anatomy map; writes them unless the job only encodes."""
  pngs = [common.encode_png(Image.fromarray(pixels), compress_level=_PNG_COMPRESS_LEVEL)
          for pixels in (rendered.image, rendered.anatomy)]
  if job.out_dirs is not None:
    for folder, png in zip(job.out_dirs, pngs):
      with open(os.path.join(folder, name), "wb") as f:
        f.write(png)


def _reported_labels(job: Job, fu: int, truth: set[str]) -> list[str]:
  """The labels Data_Entry reports: the rendered truth, each label flipped at `label_noise`."""
  flips = np.random.default_rng([job.seed, job.patient, streams.NOISE, fu]).random(
      len(label_lib.NIH_LABELS))
  return sorted(n for n, flip in zip(label_lib.NIH_LABELS, flips < job.label_noise)
                if (n in truth) != flip)


def benchmark(num_images: int = 200, image_size: int = 256, seed: int = 0) -> tuple[float, float]:
  """Images per second in one process, as (per CPU-second, per wall-clock second): render and
  PNG-encode image and anatomy map as `generate` does, with the default prevalences.

  CPU time gives the rate of one core even when other processes share the machine.
  """
  rates = tuple(abnormal_rates(resolve_prevalence(), DEFAULT_NO_FINDING).tolist())
  wall, cpu, done, pid = time.perf_counter(), time.process_time(), 0, 0
  while done < num_images:
    pid += 1
    done += len(render_patient(Job(pid, seed, image_size, rates, DEFAULT_NO_FINDING, 0.0, None)))
  return done / (time.process_time() - cpu), done / (time.perf_counter() - wall)
