"""Each method's PyTorch side, declared in one place: torch names, mirror, torch loss.

  SPECS["baseline"] = TorchSpec(names=convert.baseline_names,
                                mirror="cxr_jax.interop.torch_modules:baseline",
                                loss="cxr_jax.interop.torch_modules:baseline_loss")

`names(config.model)` says how the flax variables are named in the mirror's state_dict
(`cxr_jax.interop.convert`); `mirror(config, task)` builds the plain-torch module whose
`forward(images, **inputs)` returns the method's outputs (same names, same layouts); `loss` is the
method's loss in torch with the flax loss's signature (the benchmark times it). Mirror and loss are
named as "module:function" so this module imports no torch. The exported model takes the image
and then the method's `inputs` (`cxr_jax.methods.Method`) and returns its scores. A method defined
outside the package calls `register` beside `cxr_jax.methods.register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from cxr_jax.interop import convert


@dataclasses.dataclass(frozen=True)
class TorchSpec:
  """A method's torch names, mirror and loss (see the module docstring)."""

  names: Callable[[Mapping[str, Any]], convert.TorchNames]
  mirror: str
  loss: str


def _method_names(method: str) -> Callable[[Mapping[str, Any]], convert.TorchNames]:
  """`cxr_jax.methods.<method>.torch_names`, imported (with flax) only when asked."""
  def names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
    return importlib.import_module(f"cxr_jax.methods.{method}").torch_names(model_cfg)
  return names


def _own_mirror(method: str) -> TorchSpec:
  """A method whose names are `cxr_jax.methods.<method>.torch_names` and whose mirror and loss
  are `mirror` and `loss` of `cxr_jax.interop.torch_<method>`."""
  module = f"cxr_jax.interop.torch_{method}"
  return TorchSpec(names=_method_names(method), mirror=f"{module}:mirror", loss=f"{module}:loss")


SPECS: dict[str, TorchSpec] = {
    "baseline": TorchSpec(names=convert.baseline_names,
                          mirror="cxr_jax.interop.torch_modules:baseline",
                          loss="cxr_jax.interop.torch_modules:baseline_loss"),
    **{method: _own_mirror(method) for method in ("ham", "spf", "msml", "can", "segmenter")},
    # Anatomy-XNet's loss is the baseline's.
    "anatomy_xnet": TorchSpec(names=_method_names("anatomy_xnet"),
                              mirror="cxr_jax.interop.torch_anatomy_xnet:mirror",
                              loss="cxr_jax.interop.torch_modules:baseline_loss"),
}


def register(name: str, spec: TorchSpec) -> None:
  """Declares the torch side of a method registered with `cxr_jax.methods.register`."""
  SPECS[name] = spec


def get(config: Mapping[str, Any]) -> TorchSpec:
  """The torch spec of the method an experiment config describes (`config.model.name`)."""
  name = config["model"]["name"]
  if name not in SPECS:
    raise ValueError(f"no torch side declared for method {name!r}; declared: {sorted(SPECS)}")
  return SPECS[name]


def torch_names(config: Mapping[str, Any]) -> convert.TorchNames:
  """How the config's model names its variables in torch."""
  return get(config).names(config["model"])


def _load(reference: str) -> Callable[..., Any]:
  module, _, function = reference.partition(":")
  return getattr(importlib.import_module(module), function)


def build_mirror(config: Mapping[str, Any], task: Any):
  """The method's plain-torch mirror for `task` (imports torch)."""
  return _load(get(config).mirror)(config, task)


def torch_loss(config: Mapping[str, Any]) -> Callable[..., Any]:
  """The method's loss in torch: `loss(outputs, batch, *, task, config, weight)`."""
  return _load(get(config).loss)
