"""Parity of two computations of one output (flax vs torch, float32 vs a float64 reference).

Floating-point error in a network grows with the size of its values, so an element-wise
`rtol`/`atol` is either loose on large values or fails on values near zero. These checks bound
the largest difference by a fraction of the largest expected magnitude instead, a bound that can
sit close to the measured error whatever the output's scale.
"""

import jax
import numpy as np
from flax import traverse_util

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


def randomize(variables, seed=0):
  """Non-trivial BatchNorm statistics and affines and a non-zero FA gamma on initialised flax
  variables, so a conversion or mirror that drops any of them shows."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, variables))
  for path, value in flat.items():
    noise = rng.uniform(-1, 1, value.shape).astype(value.dtype)
    if path[-1] in ("scale", "var"):
      flat[path] = 1 + 0.3 * noise
    elif path[-1] in ("bias", "mean"):
      flat[path] = 0.2 * noise
    elif path[-1] == "gamma":
      flat[path] = np.full_like(value, 0.5)
  return traverse_util.unflatten_dict(flat)
