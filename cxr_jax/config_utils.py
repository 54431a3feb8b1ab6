"""Checks on a resolved config, and the copy of it that every run keeps in its workdir."""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from cxr_jax import layers, losses, methods, optim, parallel
from cxr_jax.data import labels, mixture, pipeline
from cxr_jax.metrics import classification, evaluators

CONFIG_FILE = "config.json"


def get(config: Any, path: str) -> Any:
  """`get(config, "data.image_size")`: a dotted lookup for error messages and tools."""
  for part in path.split("."):
    config = config[part]
  return config


def _choice(config, path: str, choices) -> list[str]:
  value = get(config, path)
  return [] if value in choices else [f"config.{path}={value!r}: choose from {list(choices)}"]


def _interval(config, path: str) -> list[str]:
  """A (low, high) pair with 0 <= low <= high <= 1, as the soft targets' intervals must be."""
  value = get(config, path)
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    return [f"config.{path}={value!r}: give (low, high)"]
  if not 0.0 <= low <= high <= 1.0:
    return [f"config.{path}={value!r}: need 0 <= low <= high <= 1"]
  return []


def _positive(config, path: str) -> list[str]:
  value = get(config, path)
  return [] if value > 0 else [f"config.{path}={value!r}: must be > 0"]


def _non_negative(config, path: str) -> list[str]:
  value = get(config, path)
  return [] if value >= 0 else [f"config.{path}={value!r}: must be >= 0 (0: never)"]


def _evaluators(config) -> list[str]:
  try:
    evaluators.parse(config.eval.evaluators)
  except ValueError as e:
    return [f"config.eval.evaluators: {e}"]
  return []


def _data(config) -> list[str]:
  """One dataset (`data.dir`) or a mixture of several (`data.mixture`), well formed."""
  if config.data.mixture:
    problems = []
    if config.data.dir or config.data.prepare:
      problems.append("config.data.mixture is set: leave config.data.dir and config.data.prepare "
                      "empty (each member is a prepared folder)")
    try:
      mixture.parse(config.data.mixture, config.data.mixture_weights)
    except ValueError as e:
      problems.append(str(e))
    return problems
  if config.data.mixture_weights:
    return ["config.data.mixture_weights is set without config.data.mixture"]
  if not config.data.dir:
    return ["config.data.dir is empty: point it at a folder prepared by data_prep (or list "
            "several in config.data.mixture)"]
  return []


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every bad value, before anything expensive starts."""
  problems = []
  problems += _choice(config, "model.name", methods.available())
  problems += _choice(config, "model.normalization", layers.PRESETS)
  problems += _choice(config, "model.channels", (1, 3))
  problems += _choice(config, "loss.name", losses.NAMES)
  problems += _choice(config, "loss.class_counts", losses.CLASS_COUNTS)
  problems += _choice(config, "data.target", methods.TARGETS)
  problems += _choice(config, "eval.uncertain", ("mask", "policy"))
  problems += _choice(config, "eval.study_level", ("", *classification.STUDY_POOLS))
  problems += _choice(config, "checkpoint.best_mode", ("max", "min"))
  problems += optim.check_groups(config.optim)
  problems += _evaluators(config)
  problems += _choice(config, "optim.name", optim.OPTIMIZERS)
  problems += _choice(config, "optim.schedule", optim.SCHEDULES)
  problems += _choice(config, "data.uncertainty", labels.POLICIES)
  problems += _choice(config, "data.on_bad_record", pipeline.ON_BAD_RECORD)
  problems += _choice(config, "parallel.distributed", parallel.MODES)
  for path in ("train.steps", "train.global_batch", "train.log_every", "eval.global_batch",
               "data.image_size", "optim.lr", "checkpoint.keep", "checkpoint.every",
               "parallel.heartbeat_timeout_s", "parallel.shutdown_timeout_s"):
    problems += _positive(config, path)
  for path in ("train.eval_every", "checkpoint.keep_best", "optim.warmup_steps"):
    problems += _non_negative(config, path)
  if not config.checkpoint.best_metric.startswith("val/"):
    problems.append(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r}: name a "
                    "validation metric, e.g. val/mean_auc or val/loc/ham/mean_tiou")
  try:
    jnp.dtype(config.dtype)
  except TypeError:
    problems.append(f"config.dtype={config.dtype!r} is not a dtype (float32, bfloat16, ...)")
  try:
    labels.parse_policy_overrides(config.data.uncertainty_per_label)
  except ValueError as e:
    problems.append(f"config.data.uncertainty_per_label: {e}")
  for path in ("data.lsr_zeros", "data.lsr_ones"):
    problems += _interval(config, path)
  problems += _data(config)
  if problems:
    raise ValueError("bad config:\n  " + "\n  ".join(problems))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for CLIs that take `--config`, turning an override of a field the config
  lacks (ml_collections raises AttributeError; KeyError or TypeError when a section on the way to
  it is missing or is a plain field, `--config.nosuch.field`; ValueError for a path that does not
  parse, `--config.as`) into a one-line error that names it."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  try:
    return flags.FLAGS(argv)
  except ValueError as e:
    if not (overrides and str(e).startswith("Could not parse")):  # ml_collections' path parser
      raise
    raise SystemExit(f"FATAL: a config override names no field of the config: {e} (overrides "
                     f"given: {', '.join(overrides)})") from None
  except (AttributeError, KeyError, TypeError) as e:
    if not isinstance(e, AttributeError) and not overrides:
      raise
    cause = e.args[0] if e.args else e
    cause = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
    hint = " ".join(str(cause).split())  # e.g. 'lrr' Did you mean "lr" instead of "lrr"?
    raise SystemExit(f"FATAL: a config override names no field of the config: {hint} "
                     f"(overrides given: {', '.join(overrides)})") from None


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """The config as {"section.field": value}."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config as JSON into the workdir."""
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


# Fields added to the config after runs were saved without them, each with the value that means
# what such a run did, so that evaluating or resuming an older run keeps working.
ADDED_FIELDS = {"eval.classes": "", "eval.study_level": "", "data.lsr_zeros": (0.0, 0.3),
                "data.lsr_ones": (0.55, 0.85), "data.mixture": "", "data.mixture_weights": "",
                "data.on_bad_record": "raise", "parallel.heartbeat_timeout_s": 30,
                "parallel.shutdown_timeout_s": 30}


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (ADDED_FIELDS filled in where it lacks
  them)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a training run?")
  with open(path) as f:
    saved = json.load(f)
  for dotted, value in ADDED_FIELDS.items():
    section, field = dotted.split(".")
    saved.setdefault(section, {}).setdefault(field, value)
  return ml_collections.ConfigDict(saved)
