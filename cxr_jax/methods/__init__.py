"""Methods: one paper, one module, one contract.

Each method module defines `METHOD = Method(...)`. The trainer, evaluation, prediction, export and
the benchmark know no method by name: they look it up with `get(config.model.name)` and speak to it
only through these fields:

  build(config, task) -> linen Module   `module(images, train=..., **inputs)` returns a dict with
                                         `logits` (B, K) float32, optionally `cams` (B, h, w, K)
                                         float32 class activation maps, and anything else under the
                                         method's own names
  loss(outputs, batch, *, task, config, weight) -> (scalar, {term name: scalar})
                                         `weight` (B,) weighs each example (0 for padding) in
                                         every term; the trainer logs every term
  inputs      batch keys besides `image` the model reads (e.g. ("anatomy",)); the pipeline loads
              them because the method names them, and a dataset without them is refused at start
  scores      how logits become scores: a name in `SCORES` ("sigmoid" or "softmax"), used
              alike by evaluation, prediction and the exported PyTorch model
  backbones   ((top-level parameter subtree, dotted path of its backbone config), ...): the
              backbones that take torchvision weights from `config.init_from`; a function of
              the config returning them when the config decides how many there are
  targets     the task targets (`config.data.target`) the method learns: classifiers learn
              "labels" or "fine_labels" with (B, K) logits; a segmenter learns "anatomy", its
              `logits` per pixel (B, H, W, K) over the dataset's anatomy names

A method outside this package registers itself with `register(name, METHOD)`.
The task (`Task`) is built once from the dataset manifest and the config: what is learned, the
class names and their training-split counts.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# Score functions by name, over the class axis; `cxr_jax.interop.torch_modules` mirrors each.
SCORES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
}
# Target fields a task may learn, each with the batch key of its mask (anatomy maps have none:
# every pixel counts).
TARGETS = {"labels": "label_mask", "fine_labels": "fine_label_mask", "anatomy": None}
CLASSIFICATION_TARGETS = ("labels", "fine_labels")


@dataclasses.dataclass(frozen=True)
class Task:
  """What a run learns, built once from the dataset manifest and the config.

  Attributes:
    target: the batch field learned: "labels" (findings), "fine_labels" (`Finding|side|zone`) or
      "anatomy" (a segmenter's per-pixel region ids).
    class_names: names of the K outputs, in order.
    positives, negatives: per-class counts on the training split after the uncertainty policy
      (what the loss sees), or None when the dataset's manifest predates the counts.
    label_names, fine_label_names, anatomy_names: the dataset's vocabularies.
  """

  target: str
  class_names: tuple[str, ...]
  positives: tuple[int, ...] | None = None
  negatives: tuple[int, ...] | None = None
  label_names: tuple[str, ...] = ()
  fine_label_names: tuple[str, ...] = ()
  anatomy_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"task target {self.target!r}: choose from {list(TARGETS)}")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def mask_key(self) -> str | None:
    """The batch key of the target's mask (1 where a label counts); None for anatomy maps."""
    return TARGETS[self.target]

  def targets(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """(targets, mask) of the learned field in a batch, both (B, K)."""
    return batch[self.target], batch[self.mask_key]

  def counts(self) -> tuple[jax.Array, jax.Array]:
    """Training-split (positives, negatives) per class as float32 arrays, for class weights."""
    if self.positives is None or self.negatives is None:
      raise ValueError("this method needs per-class training counts, which the dataset's "
                       "cxr_manifest.json lacks: prepare the dataset again with data_prep")
    return jnp.asarray(self.positives, jnp.float32), jnp.asarray(self.negatives, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method's side of the contract (see the module docstring)."""

  build: Callable[[Mapping[str, Any], Task], Any]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  inputs: tuple[str, ...] = ()
  scores: str = "sigmoid"
  backbones: (tuple[tuple[str, str], ...]
              | Callable[[Mapping[str, Any]], tuple[tuple[str, str], ...]]) = (
                  ("backbone", "model.backbone"),)
  targets: tuple[str, ...] = CLASSIFICATION_TARGETS

  def __post_init__(self):
    if self.scores not in SCORES:
      raise ValueError(f"scores={self.scores!r}: choose from {list(SCORES)}")
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown:
      raise ValueError(f"targets {unknown}: choose from {list(TARGETS)}")

  def backbones_of(self, config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (parameter subtree, backbone config path) pairs of the model `config` describes."""
    return self.backbones(config) if callable(self.backbones) else self.backbones

  def score(self, logits: jax.Array) -> jax.Array:
    """Scores (probabilities) from logits, the way this method defines them."""
    return SCORES[self.scores](logits)


_REGISTERED: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
  """Makes a method defined outside this package available as `config.model.name=name`."""
  if name in _modules():
    raise ValueError(f"{name!r} is already a method of cxr_jax.methods")
  _REGISTERED[name] = method


def _modules() -> list[str]:
  """This package's method modules: those that define `METHOD` (a paper's module may hold its
  network and losses before it is a complete method, with a mirror and configs)."""
  return [m.name for m in pkgutil.iter_modules(__path__)
          if isinstance(getattr(importlib.import_module(f"{__name__}.{m.name}"), "METHOD", None),
                        Method)]


def fields(section: Mapping[str, Any], where: str, defaults: Mapping[str, Any],
           choices: Mapping[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
  """A method's own config fields: `section` (e.g. `config.model.ham`, absent = {}) over its
  `defaults`, refusing a field `defaults` lacks and a value outside its `choices`; `where`
  ("config.model.ham") names them in errors."""
  merged = {**defaults, **section}
  unknown = sorted(set(merged) - set(defaults))
  if unknown:
    raise ValueError(f"unknown {where} fields {unknown}; valid: {sorted(defaults)}")
  for name, valid in (choices or {}).items():
    if merged[name] not in valid:
      raise ValueError(f"{where}.{name} must be one of {valid}, got {merged[name]!r}")
  return merged


def available() -> list[str]:
  """Names of the methods: this package's modules and registered ones."""
  return sorted(set(_modules()) | set(_REGISTERED))


def get(name: str) -> Method:
  """The method called `name`, with a clear error listing the available ones."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _modules():
    raise ValueError(f"config.model.name={name!r} is not a method; available: {available()}")
  return importlib.import_module(f"{__name__}.{name}").METHOD
