"""Backbones by name: `build(cfg)` turns a config (`name` plus optional overrides) into a module.

Every backbone maps NHWC images to `{"C2", "C3", "C4", "C5"}` feature maps with torchvision's math.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from cxr_jax.backbones.densenet import DenseNet
from cxr_jax.backbones.resnet import ResNet

# name -> (module class, its fields for that name).
ARCHITECTURES = {
    "densenet121": (DenseNet, {"block_config": (6, 12, 24, 16)}),
    "densenet169": (DenseNet, {"block_config": (6, 12, 32, 32)}),
    "densenet201": (DenseNet, {"block_config": (6, 12, 48, 32)}),
    "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "block": "basic"}),
    "resnet34": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block": "basic"}),
    "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"}),
}
# Fields a config may override, per module class (besides `dtype` and `remat`).
OVERRIDES = {
    DenseNet: ("growth_rate", "block_config", "num_init_features", "bn_size"),
    ResNet: ("stage_sizes", "output_stride", "width"),
}


def resolve(cfg: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
  """Returns the module class and all its fields for a config (`name`, overrides, dtype, remat).

  A key set to None means "the architecture's default", so one config can hold placeholders for
  every family's overrides.

  Raises:
    ValueError: for an unknown name or override key, naming the valid ones.
  """
  fields = {key: value for key, value in cfg.items() if value is not None}
  name = fields.pop("name", None)
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(ARCHITECTURES)}")
  cls, defaults = ARCHITECTURES[name]
  valid = (*OVERRIDES[cls], "dtype", "remat")
  unknown = sorted(set(fields) - set(valid))
  if unknown:
    raise ValueError(f"unknown {name} config keys {unknown}; valid keys: name, {', '.join(valid)}")
  fields = {**defaults, **fields}
  for key in ("block_config", "stage_sizes"):
    if key in fields:
      fields[key] = tuple(fields[key])  # module fields must be hashable; configs may hold lists
      if len(fields[key]) != 4:  # one per stage C2..C5
        raise ValueError(f"{name} {key} needs 4 entries, got {fields[key]}")
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  return cls, fields


def build(cfg: Mapping[str, Any]) -> DenseNet | ResNet:
  """The backbone module a config describes, e.g. `build({"name": "resnet50", "output_stride": 8})`."""
  cls, fields = resolve(cfg)
  return cls(**fields)
