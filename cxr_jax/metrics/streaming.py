"""What the streaming evaluators (localization, location_aware) share.

Every evaluator follows one protocol, `Evaluator`: `update` once per evaluation batch (padding
examples carry valid 0 and are skipped), then `result()` for the JSON report and `scalars()` for
the metric log. Evaluators keep a few numbers per example, never the batches themselves, so they
run over a whole test set in constant memory per example.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from cxr_jax.metrics.classification import json_float


@runtime_checkable
class Evaluator(Protocol):
  """A streaming evaluator: feed batches of numpy arrays, then read a report and log scalars."""

  def update(self, *batch: np.ndarray) -> None:
    """Adds one batch; examples whose `valid` entry is 0 are padding and skipped."""

  def result(self) -> dict[str, Any]:
    """The JSON-ready report (undefined values are None)."""

  def scalars(self) -> dict[str, float]:
    """A few headline numbers keyed for the metric log (NaN where undefined)."""


def ratio(numerator, denominator) -> np.ndarray:
  """Elementwise float64 numerator / denominator, NaN where the denominator is 0."""
  numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64),
                                               np.asarray(denominator, np.float64))
  out = np.full(numerator.shape, np.nan)
  return np.divide(numerator, denominator, out=out, where=denominator != 0)


def defined_mean(values, axis: int = 0) -> np.ndarray:
  """Mean over the finite entries along `axis`, NaN where there are none (no warning)."""
  values = np.asarray(values, np.float64)
  defined = np.isfinite(values)
  return ratio(np.where(defined, values, 0).sum(axis=axis), defined.sum(axis=axis))


def by_threshold(thresholds: Sequence[float], values) -> dict[str, float | None]:
  """{"0.1": value, ...}: one JSON entry per threshold, keyed by the threshold as written."""
  return {f"{t:g}": json_float(v) for t, v in zip(thresholds, values)}
