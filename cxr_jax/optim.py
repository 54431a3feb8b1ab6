"""Optimizers and learning-rate schedules from `config.optim`, with PyTorch's semantics.

- `adam`: Adam with *coupled* L2 (`weight_decay * param` added to the gradient first), as
  `torch.optim.Adam(weight_decay=...)` does.
- `adamw`: Adam with decoupled weight decay (`torch.optim.AdamW`).
- `sgd`: SGD with momentum (optionally Nesterov) and coupled L2 (`torch.optim.SGD`).
Schedules: `constant`, `cosine` (to `final_lr_fraction * lr`), `step` (multiply by `step_factor`
at each of `step_boundaries`), each after `warmup_steps` of linear warmup from 0.
Parameter groups are chosen by regular expressions over parameter paths (`"backbone/conv0/kernel"`,
`"branch_b/features/.../scale"`), as big_vision's optax config does; the first matching pattern
wins and unmatched parameters keep multiplier 1:
  lr_mults   ((pattern, multiplier), ...)  learning rate x multiplier, e.g. (("^backbone/", 0.1),)
  wd_mults   ((pattern, multiplier), ...)  weight decay x multiplier, e.g. ((".*/(bias|scale)$", 0.),)
  frozen     pattern                       parameters that never change (no optimizer state)
Gradients are clipped to a global norm first when `clip_norm > 0`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg: Mapping[str, Any], total_steps: int, lr: float) -> optax.Schedule:
  """The learning rate at each step for a base rate `lr`."""
  name, warmup = cfg["schedule"], cfg["warmup_steps"]
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={name!r}; choose from {SCHEDULES}")
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                       alpha=cfg["final_lr_fraction"])
  else:
    main = optax.piecewise_constant_schedule(
        lr, {int(b) - warmup: cfg["step_factor"] for b in cfg["step_boundaries"]})
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _optimizer(cfg: Mapping[str, Any], schedule: optax.Schedule) -> optax.GradientTransformation:
  name, wd = cfg["name"], cfg["weight_decay"]
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"]),
                       optax.scale_by_learning_rate(schedule))
  if name == "adamw":
    return optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.sgd(schedule, momentum=cfg["momentum"] or None,
                                 nesterov=cfg["nesterov"]))
  raise ValueError(f"config.optim.name={name!r}; choose from {OPTIMIZERS}")


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def _first_match(rules, path: str, default: float = 1.0) -> float:
  for pattern, value in rules:
    if re.search(pattern, path):
      return float(value)
  return default


def _group_names(cfg: Mapping[str, Any]) -> dict[tuple[float, float], str]:
  """Every (lr multiplier, wd multiplier) pair the rules can give, named `group<i>`.

  optax needs every group before it sees the parameters; plain names keep checkpoint paths clean.
  """
  lr_mults = sorted({1.0} | {float(m) for _, m in cfg["lr_mults"]})
  wd_mults = sorted({1.0} | {float(m) for _, m in cfg["wd_mults"]})
  pairs = [(lr, wd) for lr in lr_mults for wd in wd_mults]
  return {pair: f"group{i}" for i, pair in enumerate(pairs)}


def param_groups(params: Any, cfg: Mapping[str, Any]) -> Any:
  """The group of every parameter leaf: "frozen", or the name of its (lr, wd) multipliers."""
  names = _group_names(cfg)

  def label(keys, _):
    path = _path(keys)
    if cfg["frozen"] and re.search(cfg["frozen"], path):
      return "frozen"
    return names[(_first_match(cfg["lr_mults"], path), _first_match(cfg["wd_mults"], path))]
  return jax.tree_util.tree_map_with_path(label, params)


def describe_groups(params: Any, cfg: Mapping[str, Any]) -> dict[str, str]:
  """{parameter path: "frozen" or "lr x<m>, wd x<m>"}, for the log and for tests."""
  pairs = {name: pair for pair, name in _group_names(cfg).items()}
  flat = jax.tree_util.tree_flatten_with_path(param_groups(params, cfg))[0]
  return {_path(keys): (label if label == "frozen" else "lr x{:g}, wd x{:g}".format(*pairs[label]))
          for keys, label in flat}


def check_groups(cfg: Mapping[str, Any]) -> list[str]:
  """Problems with the group rules of `config.optim` (bad regexes, non-numeric multipliers)."""
  problems = []
  patterns = [(f"optim.{field}", rule) for field in ("lr_mults", "wd_mults")
              for rule in cfg[field]]
  for where, rule in patterns:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[1], (int, float)) or rule[1] < 0):
      problems.append(f"config.{where}: {rule!r} is not (pattern, multiplier >= 0)")
      continue
    problems += _check_regex(where, rule[0])
  if cfg["frozen"]:
    problems += _check_regex("optim.frozen", cfg["frozen"])
  return problems


def _check_regex(where: str, pattern: Any) -> list[str]:
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    return [f"config.{where}: {pattern!r} is not a regular expression ({e})"]
  return []


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     Callable[[int], Any]]:
  """Returns (optimizer, schedule of the base learning rate) for `config.optim`.

  Each group gets the config's optimizer with its learning rate and weight decay scaled; frozen
  parameters get zero updates and keep no optimizer state.
  """
  def group_tx(lr_mult: float, wd_mult: float) -> optax.GradientTransformation:
    scaled = dict(cfg, weight_decay=cfg["weight_decay"] * wd_mult)
    return _optimizer(scaled, make_schedule(cfg, total_steps, cfg["lr"] * lr_mult))

  transforms = {name: group_tx(*pair) for pair, name in _group_names(cfg).items()}
  transforms["frozen"] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, lambda params: param_groups(params, cfg))
  if cfg["clip_norm"] > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), tx)
  return tx, make_schedule(cfg, total_steps, cfg["lr"])
