"""Parity of two computations of one output (flax vs torch, float32 vs a float64 reference).

Floating-point error in a network grows with the size of its values, so an element-wise
`rtol`/`atol` is either loose on large values or fails on values near zero. These checks bound
the largest difference by a fraction of the largest expected magnitude instead, a bound that can
sit close to the measured error whatever the output's scale.
"""

import numpy as np

# Scales below this are treated as this: an all-zero expected output still gets a finite bound.
SCALE_FLOOR = 1e-6


def relative_error(actual, expected) -> tuple[float, float]:
  """(max |actual - expected|, max |expected| floored at SCALE_FLOOR), in float64. A NaN in either
  makes the difference NaN, which no bound admits."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(f"shape {actual.shape} differs from the expected {expected.shape}")
  diff = float(np.abs(actual - expected).max(initial=0.0))
  return diff, max(float(np.abs(expected).max(initial=0.0)), SCALE_FLOOR)


def assert_close_to_scale(actual, expected, *, rel: float, name: str) -> None:
  """Asserts max |actual - expected| <= rel * max |expected| for arrays of any shape."""
  diff, scale = relative_error(actual, expected)
  assert diff <= rel * scale, (
      f"{name}: max |actual - expected| = {diff:.3g}, scale max |expected| = {scale:.3g}, "
      f"ratio {diff / scale:.3g} > allowed {rel:.3g}")
