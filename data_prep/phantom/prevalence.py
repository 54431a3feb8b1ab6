"""Which findings an image has: per-label prevalences and the draw that honours them.

An image is normal ("No Finding") with probability `no_finding`; an abnormal image draws each
label independently, at rates solved so that every label's overall per-image rate equals its
prevalence (`abnormal_rates`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cxr_jax.data import labels as label_lib

# Per-image rates close to NIH ChestX-ray14's (Wang et al. 2017, v2020 file); Hernia raised from
# 0.2 % so that small phantom datasets still hold a few positives.
DEFAULT_PREVALENCE = {
    "Atelectasis": 0.10, "Cardiomegaly": 0.025, "Effusion": 0.12, "Infiltration": 0.18,
    "Mass": 0.05, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
    "Consolidation": 0.042, "Edema": 0.02, "Emphysema": 0.022, "Fibrosis": 0.015,
    "Pleural_Thickening": 0.03, "Hernia": 0.01,
}
DEFAULT_NO_FINDING = 0.5


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
