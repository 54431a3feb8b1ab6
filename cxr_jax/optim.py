"""Optimizers and learning-rate schedules from `config.optim`, with PyTorch's semantics.

- `adam`: Adam with *coupled* L2 (`weight_decay * param` added to the gradient first), as
  `torch.optim.Adam(weight_decay=...)` does.
- `adamw`: Adam with decoupled weight decay (`torch.optim.AdamW`).
- `sgd`: SGD with momentum (optionally Nesterov) and coupled L2 (`torch.optim.SGD`).
Schedules: `constant`, `cosine` (to `final_lr_fraction * lr`), `step` (multiply by `step_factor`
at each of `step_boundaries`), each after `warmup_steps` of linear warmup from 0.
The backbone's learning rate is `lr * backbone_lr_mult`; every other parameter (the method's head)
uses `lr`. Gradients are clipped to a global norm first when `clip_norm > 0`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
BACKBONE = "backbone"  # the top-level parameter collection name of every method's backbone


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


def param_groups(params: Mapping[str, Any]) -> dict[str, str]:
  """Labels each top-level parameter collection `backbone` or `head`."""
  return {k: BACKBONE if k == BACKBONE else "head" for k in params}


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation,
                                                                     Callable[[int], Any]]:
  """Returns (optimizer, schedule of the head's learning rate) for `config.optim`."""
  head_schedule = make_schedule(cfg, total_steps, cfg["lr"])
  backbone_schedule = make_schedule(cfg, total_steps, cfg["lr"] * cfg["backbone_lr_mult"])
  tx = optax.multi_transform(
      {"head": _optimizer(cfg, head_schedule), BACKBONE: _optimizer(cfg, backbone_schedule)},
      lambda params: param_groups(params))
  if cfg["clip_norm"] > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), tx)
  return tx, head_schedule
