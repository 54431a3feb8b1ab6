"""Methods: one paper, one module. Each module exposes

  build(config, num_classes) -> Model     a linen module; Model(images, train=..., **inputs) -> dict
                                          with at least `logits` (B, K) in float32
  loss(outputs, batch, config) -> (scalar, dict of scalar metrics)
  INPUTS: tuple of batch keys (besides `image`) that the model reads, e.g. ("anatomy",)

The trainer finds a method by `config.model.name` and knows nothing else about it.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def available() -> list[str]:
  """Names of the methods in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str) -> ModuleType:
  """The method module called `name`, with a clear error listing the available ones."""
  if name not in available():
    raise ValueError(f"config.model.name={name!r} is not a method; available: {available()}")
  return importlib.import_module(f"{__name__}.{name}")
