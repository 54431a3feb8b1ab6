"""Flax variables <-> PyTorch state_dicts, in both directions, by declared rules.

A model's torch names are data, not code: `TorchNames` lists `Scope`s, each mapping a flax
subtree (e.g. `backbone`) to a torch module prefix (e.g. `features`) plus ordered regex renames for
the keys below it. Leaves are identified by collection, name and rank, unless `TorchNames.kinds`
declares a kernel's kind by its torch key (rank alone cannot tell a transposed convolution, or a
kernel of another rank-3+ layer, from a convolution):

  flax                        torch                 values
  params/.../kernel, rank>=3  weight                conv: (*spatial, I, O) <-> (O, I, *spatial)
  kind "conv_transpose"       weight                flax `nn.ConvTranspose` (transpose_kernel=False,
                                                    padding k-1-p) (*spatial, I, O) <-> torch
                                                    ConvTranspose (I, O, *spatial), spatially flipped
  kind "as_is"                weight                the same array in both (e.g. a bilinear form)
  params/.../kernel, rank 2   weight                dense: (in, out) <-> (out, in); a Linear listed
                                                    in `TorchNames.flatten` also permutes the
                                                    NHWC flatten order to torch's NCHW order
  params/.../scale            weight                BatchNorm / LayerNorm scale
  params/.../<name>           <name>                as is (bias, learned scalars)
  batch_stats/.../mean, var   running_mean, running_var
  (export only)               num_batches_tracked   int64 0 beside every running_var
  `TorchNames.constants`      <key>                 fixed arrays the config determines (e.g. the
                                                    random hashes of a Tensor Sketch): exported
                                                    beside the variables, and an import refuses a
                                                    file whose values differ

Every method declares its names, with its plain-torch mirror and loss, in
`cxr_jax.interop.registry`. Export needs only numpy (`to_state_dict` + `state_dict_to_safetensors`);
reading `.pth` files needs torch, `.safetensors` and `.npz` files do not.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.numpy
from flax import traverse_util

from cxr_jax import backbones
from cxr_jax.backbones.densenet import DenseNet
from cxr_jax.backbones.resnet import ResNet

COLLECTIONS = ("params", "batch_stats")
KINDS = ("conv", "conv_transpose", "dense", "flattened_dense", "as_is")

# torchvision's published DenseNet files predate its module renames (`norm.1` -> `norm1`); its own
# loader (`torchvision/models/densenet.py::_load_state_dict`) applies this same regex.
LEGACY_RENAMES = (
    (r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
     r"\1\2"),
)

Rule = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Scope:
  """Flax module path `flax` is torch module `torch`; `rules` rename the keys below it, in order.

  Paths are dotted and "" is the root. Each rule is `re.sub(pattern, replacement, key)` on the
  key relative to the scope, leaf included (e.g. "layer1.block0.conv1.weight").
  """

  flax: str
  torch: str
  rules: tuple[Rule, ...] = ()


@dataclasses.dataclass(frozen=True)
class TorchNames:
  """How a flax model's variables are named in its torch mirror's state_dict.

  Attributes:
    scopes: the first scope holding a module names it, so list nested scopes before outer ones.
    flatten: torch key of a Linear's weight -> (H, W, C) of the NHWC map it takes flattened.
    kinds: ((regex over torch keys, kind), ...): the first match declares a kernel's kind, one of
      KINDS; kernels matching none are told by rank (module docstring).
    constants: torch key -> array for the mirror's buffers that are no flax variable but a
      function of the config: the model recomputes them, the file carries them so that torch
      needs no config, and an import checks the two agree.
  """

  scopes: tuple[Scope, ...]
  flatten: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
  kinds: tuple[tuple[str, str], ...] = ()
  constants: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def kind(self, key: str, rank: int) -> str:
    """The declared kind of the kernel with torch key `key`, else its kind by rank."""
    for pattern, kind in self.kinds:
      if re.search(pattern, key):
        if kind not in KINDS:
          raise ValueError(f"kernel kind {kind!r} for {key}: choose from {KINDS}")
        return kind
    if rank >= 3:
      return "conv"
    return "flattened_dense" if key in self.flatten else "dense"

  def key(self, module_path: str, leaf: str) -> str:
    """The torch key of leaf `leaf` (already in torch's terms) of flax module `module_path`."""
    for scope in self.scopes:
      if _within(module_path, scope.flax):
        key = _join(module_path[len(scope.flax):].lstrip("."), leaf)
        for pattern, replacement in scope.rules:
          key = re.sub(pattern, replacement, key)
        return _join(scope.torch, key)
    raise ValueError(f"flax module {module_path!r} is in no scope; scopes: {[s.flax for s in self.scopes]}")


# torchvision's layout per backbone class: prefix of the backbone, renames below it, head name.
_RESNET_RULES = (
    (r"^(layer\d+)\.block(\d+)\.", r"\1.\2."),
    (r"\.downsample\.conv\.", ".downsample.0."),
    (r"\.downsample\.bn\.", ".downsample.1."),
)
TORCHVISION_LAYOUT = {
    DenseNet: ("features", (), "classifier"),
    ResNet: ("", _RESNET_RULES, "fc"),
}


def backbone_scope(backbone_cfg: Mapping[str, Any], *, flax: str = "", torch: str = "") -> Scope:
  """The scope of a backbone at flax path `flax`, named as torchvision names it under `torch`."""
  cls, _ = backbones.resolve(backbone_cfg)
  prefix, rules, _ = TORCHVISION_LAYOUT[cls]
  return Scope(flax, _join(torch, prefix), rules)


def baseline_names(model_cfg: Mapping[str, Any]) -> TorchNames:
  """torchvision's own keys: `features.*` + `classifier.*` (DenseNet), `conv1...` + `fc.*` (ResNet)."""
  cls, _ = backbones.resolve(model_cfg["backbone"])
  head = TORCHVISION_LAYOUT[cls][2]
  return TorchNames((backbone_scope(model_cfg["backbone"], flax="backbone"), Scope("head", head)))


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One flax leaf, its torch key and the value transforms between the two layouts."""

  path: tuple[str, ...]  # (collection, *modules, name)
  key: str
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix and name else prefix or name


def _within(module_path: str, scope: str) -> bool:
  """Whether dotted `module_path` is `scope` or below it ("" holds everything)."""
  return not scope or module_path == scope or module_path.startswith(scope + ".")


def _identity(x):
  return x


def _conv_perm(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Axis permutations flax (*spatial, I, O) -> torch (O, I, *spatial), and back."""
  spatial = tuple(range(rank - 2))
  return (rank - 1, rank - 2, *spatial), (*(s + 2 for s in spatial), 1, 0)


def _flatten_transforms(hwc: tuple[int, int, int]):
  """A Linear on a flattened map: flax rows run over (H, W, C), torch columns over (C, H, W)."""
  h, w, c = hwc

  def to_torch(k):
    return k.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)

  def from_torch(t):
    return t.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)

  return to_torch, from_torch


def _conv_transpose_transforms(rank: int):
  """flax ConvTranspose (*spatial, I, O), unflipped, <-> torch ConvTranspose (I, O, *spatial):
  torch's kernel is the gradient of a convolution's, so its spatial axes run backwards."""
  spatial = tuple(range(rank - 2))
  flip = tuple(slice(None, None, -1) for _ in spatial)

  def to_torch(k):
    return k[flip].transpose(rank - 2, rank - 1, *spatial)

  def from_torch(t):
    return t.transpose(*(s + 2 for s in spatial), 0, 1)[flip]

  return to_torch, from_torch


def _kernel_transforms(kind: str, rank: int, hwc: tuple[int, int, int] | None):
  """(to_torch, from_torch) of a kernel of `kind` (see KINDS)."""
  if kind == "conv":
    forward, backward = _conv_perm(rank)
    return (lambda x: x.transpose(forward)), (lambda x: x.transpose(backward))
  if kind == "conv_transpose":
    return _conv_transpose_transforms(rank)
  if kind == "flattened_dense":
    return _flatten_transforms(hwc)
  if kind == "dense":
    return np.transpose, np.transpose
  return _identity, _identity


def _leaf(path: tuple[str, ...], rank: int, names: TorchNames) -> _Leaf:
  """Identifies a flax leaf by collection, name and rank or declared kind (module docstring)."""
  collection, modules, name = path[0], ".".join(path[1:-1]), path[-1]
  if collection == "batch_stats":
    if name not in ("mean", "var"):
      raise ValueError(f"batch_stats leaf {'/'.join(path)} is not a BatchNorm mean or var")
    return _Leaf(path, names.key(modules, f"running_{name}"), _identity, _identity)
  if name == "kernel":
    key = names.key(modules, "weight")
    kind = names.kind(key, rank)
    return _Leaf(path, key, *_kernel_transforms(kind, rank, names.flatten.get(key)))
  return _Leaf(path, names.key(modules, "weight" if name == "scale" else name), _identity, _identity)


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """Leaves of `params` and `batch_stats` keyed by (collection, *modules, name)."""
  unknown = sorted(set(variables) - set(COLLECTIONS))
  if unknown:
    raise ValueError(f"cannot convert collections {unknown}; only {list(COLLECTIONS)}")
  return {(c, *path): value for c in COLLECTIONS
          for path, value in traverse_util.flatten_dict(dict(variables.get(c, {}))).items()}


def _leaves(variables: Mapping[str, Any], names: TorchNames) -> list[_Leaf]:
  """Every leaf with its torch key, grouped per module (params, then batch stats, as in torch)."""
  by_module: dict[tuple[str, ...], list[_Leaf]] = {}
  for path, value in _flat(variables).items():
    by_module.setdefault(path[1:-1], []).append(_leaf(path, np.ndim(value), names))
  leaves = [leaf for group in by_module.values() for leaf in group]
  keys: dict[str, str] = {}
  for leaf in leaves:
    flax_name = "/".join(leaf.path)
    if keys.setdefault(leaf.key, flax_name) != flax_name:
      raise ValueError(f"flax leaves {keys[leaf.key]} and {flax_name} both map to torch key {leaf.key!r}")
  return leaves


def _torch_shape(leaf: _Leaf, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  # A zero-stride array of the flax shape reshapes and transposes as a view: no memory is touched.
  return leaf.to_torch(np.broadcast_to(np.float32(0), flax_shape)).shape


def to_state_dict(variables: Mapping[str, Any], names: TorchNames) -> dict[str, np.ndarray]:
  """Flax `params` (+ `batch_stats`) as a torch-named numpy state_dict (no torch needed)."""
  flat = _flat(variables)
  state_dict = {}
  for leaf in _leaves(variables, names):
    # An owned, writable copy: `torch.from_numpy` warns on the read-only views jax hands out.
    state_dict[leaf.key] = np.array(leaf.to_torch(np.asarray(flat[leaf.path])), order="C")
    if leaf.path[0] == "batch_stats" and leaf.path[-1] == "var":
      # flax does not count BatchNorm updates; torch only reads the count when momentum is None.
      state_dict[names.key(".".join(leaf.path[1:-1]), "num_batches_tracked")] = np.array(0, np.int64)
  state_dict.update({key: np.array(value, order="C") for key, value in names.constants.items()})
  return state_dict


def from_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                    names: TorchNames) -> dict[str, Any]:
  """Flax variables shaped like `template` (arrays or `jax.ShapeDtypeStruct`s) from a state_dict.

  Strict: every template leaf must be in `state_dict` with the matching shape, every one of
  `names.constants` with the same value, and every key of `state_dict` (but
  `num_batches_tracked`) must be used. Values become numpy arrays of the template's dtypes.

  Raises:
    ValueError: listing every missing, mismatched, differing and unused key.
  """
  flat = _flat(template)
  leaves = _leaves(template, names)
  missing, mismatched, _, values = _take(state_dict, leaves, flat)
  absent, differing = _check_constants(state_dict, names.constants)
  unused = [key for key in _unused(state_dict, leaves) if key not in names.constants]
  if missing or absent or mismatched or differing or unused:
    raise ValueError(_problems(missing=missing + absent, mismatched=mismatched,
                               differing=differing, unused=unused))
  return _unflatten(values, template)


def _check_constants(state_dict, constants) -> tuple[list[str], list[str]]:
  """(missing keys, keys whose values differ from the config's) of `TorchNames.constants`."""
  missing = [f"{key} (a constant of the config)" for key in constants if key not in state_dict]
  differing = [f"{key}: the file's values are not the ones the config derives"
               for key, value in constants.items()
               if key in state_dict and not np.array_equal(np.asarray(state_dict[key]), value)]
  return missing, differing


def _take(state_dict, leaves, flat, *, sum_rgb=False):
  """Converts the values of `leaves` from `state_dict`.

  With `sum_rgb`, a 1-input-channel conv takes the sum of a 3-channel kernel from the file: the
  same response to a gray image (R = G = B) as the RGB model.

  Returns:
    (missing keys, mismatched keys, adapted keys, {flax path: value}).
  """
  missing, mismatched, adapted, values = [], [], [], {}
  for leaf in leaves:
    if leaf.key not in state_dict:
      missing.append(f"{leaf.key} (flax {'/'.join(leaf.path)})")
      continue
    value = np.asarray(state_dict[leaf.key])
    expected = _torch_shape(leaf, flat[leaf.path].shape)
    rgb_for_gray = (value.ndim == 4 and value.shape[1] == 3
                    and expected == (value.shape[0], 1, *value.shape[2:]))
    if sum_rgb and rgb_for_gray:
      value = value.sum(axis=1, keepdims=True)
      adapted.append(f"{leaf.key}: RGB kernel summed to 1 input channel")
    if value.shape != expected:
      mismatched.append(f"{leaf.key}: file {value.shape}, model {expected} (flax {'/'.join(leaf.path)})")
      continue
    values[leaf.path] = leaf.from_torch(value).astype(flat[leaf.path].dtype)
  return missing, mismatched, adapted, values


def _unused(state_dict, leaves) -> list[str]:
  """Keys of `state_dict` no leaf reads (`num_batches_tracked` has no flax counterpart)."""
  used = {leaf.key for leaf in leaves}
  return [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]


def _problems(**lists: list[str]) -> str:
  parts = [f"{kind} keys ({len(keys)}):\n  " + "\n  ".join(keys) for kind, keys in lists.items() if keys]
  return "state_dict does not fit the model; " + "\n".join(parts)


def _unflatten(flat: Mapping[tuple[str, ...], Any], like: Mapping[str, Any]) -> dict[str, Any]:
  """Nested variables with the collections of `like` (an empty one stays empty)."""
  return {c: traverse_util.unflatten_dict({p[1:]: v for p, v in flat.items() if p[0] == c}) for c in like}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state_dict of numpy arrays from `.safetensors`, `.npz` or `.pth`/`.pt` (the last needs torch)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return safetensors.numpy.load_file(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      return dict(data)
  if path.endswith((".pth", ".pt")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch; without it, give the weights as .safetensors or .npz"
                        ) from e
    try:
      # weights_only: tensors and plain containers only; a pickle that would run code is refused
      # before anything in it runs.
      state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: refused by torch.load(weights_only=True), which reads tensors "
                       f"only; the file holds other objects (maybe code): {e}") from e
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
      found = list(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
      raise ValueError(f"{path} holds no plain state_dict of tensors (found {found}); "
                       "save model.state_dict()")
    return {k: v.detach().numpy() for k, v in state_dict.items()}
  raise ValueError(f"{path}: unknown weights format; expected .safetensors, .npz, .pth or .pt")


def state_dict_to_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a numpy state_dict that torch loads with `safetensors.torch.load_file` (no torch needed)."""
  data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state_dict.items()})
  # Written by Python, not `save_file`: safetensors 0.8 creates its files mode 0600, unreadable to
  # anyone the export is shared with; open() honours the umask like every other output.
  with open(path, "wb") as f:
    f.write(data)


def rename_legacy(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Applies `LEGACY_RENAMES`; returns the renamed state_dict and the old names it changed."""
  renamed, changed = {}, []
  for key, value in state_dict.items():
    new = key
    for pattern, replacement in LEGACY_RENAMES:
      new = re.sub(pattern, replacement, new)
    if new != key:
      changed.append(key)
    renamed[new] = value
  return renamed, changed


# Wrappers whose prefix a whole-model checkpoint may carry: torch's DataParallel (`module.`) and
# HAM's `AttentionNet`, which holds the network as `model` (its checkpoints: `module.model.`).
WRAPPER_PREFIXES = ("module.", "model.")


def strip_wrappers(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """Removes, in turn, each of WRAPPER_PREFIXES that every key carries; returns the state_dict
  and the prefix removed ("" for none)."""
  removed = ""
  for prefix in WRAPPER_PREFIXES:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
      state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
      removed += prefix
  return dict(state_dict), removed


def load_model(path: str | os.PathLike, variables: Mapping[str, Any], names: TorchNames
               ) -> dict[str, Any]:
  """Every variable of a model from a whole-model state_dict file in the method's torch names
  (`config.init_from=model=PATH`): our exports, or the authors' checkpoints, their wrapper
  prefixes (`module.model.`) removed. Strict, like `from_state_dict`; values take the dtypes of
  `variables`.

  Raises:
    ValueError: naming the file and listing every missing, mismatched and unused key.
  """
  state_dict, removed = strip_wrappers(load_state_dict_file(path))
  try:
    return from_state_dict(state_dict, variables, names)
  except ValueError as e:
    stripped = f" (after removing the prefix {removed!r})" if removed else ""
    raise ValueError(f"{os.fspath(path)}{stripped}: {e}") from None


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did; `str()` gives the summary the trainer prints."""

  loaded: list[str]  # torch keys copied into the model
  adapted: list[str]  # "key: how" for values changed to fit (an RGB stem summed to one channel)
  renamed: list[str]  # legacy file keys renamed before matching
  fresh: list[str]  # flax leaves outside the loaded scope, left as initialised
  unused: list[str]  # file keys nothing was loaded from

  def __str__(self) -> str:
    lines = [f"loaded {len(self.loaded)} tensors"]
    if self.renamed:
      lines.append(f"renamed {len(self.renamed)} legacy keys (e.g. {self.renamed[0]})")
    lines += [f"adapted {item}" for item in self.adapted]
    lines.append(f"not loaded, kept as initialised ({len(self.fresh)}): {', '.join(self.fresh) or '-'}")
    lines.append(f"in the file but unused ({len(self.unused)}): {', '.join(self.unused) or '-'}")
    return "\n".join(lines)


def load_pretrained(path: str | os.PathLike, variables: Mapping[str, Any],
                    backbone_cfg: Mapping[str, Any], *, scope: str = "backbone"
                    ) -> tuple[dict[str, Any], LoadReport]:
  """Fills the backbone at flax subtree `scope` of `variables` from a torchvision weights file.

  This is `config.init_from`: e.g. torchvision's `densenet121-a639ec97.pth` (legacy key names
  are renamed) into one backbone of the model (described by `backbone_cfg`), leaving the rest as
  initialised. The file is read with torchvision's own key names, whatever the method calls the
  backbone in its mirror, so one ImageNet file serves every backbone of every method. A 1-channel
  stem takes the sum of the file's RGB kernel. Loaded leaves become numpy arrays.

  Raises:
    ValueError: when a leaf of the scope is missing from the file or has another shape.
  """
  names = TorchNames((backbone_scope(backbone_cfg, flax=scope),))
  state_dict, renamed = rename_legacy(load_state_dict_file(path))
  flat = _flat(variables)
  within = {c: {k: v for k, v in dict(variables.get(c, {})).items() if k == scope}
            for c in COLLECTIONS if c in variables}
  if not within.get("params"):
    raise ValueError(f"the model has no parameter subtree {scope!r} to load {os.fspath(path)} into")
  leaves = _leaves(within, names)
  missing, mismatched, adapted, values = _take(state_dict, leaves, flat, sum_rgb=True)
  if missing or mismatched:
    raise ValueError(f"{os.fspath(path)} does not fit {scope}: "
                     + _problems(missing=missing, mismatched=mismatched))
  report = LoadReport(loaded=[leaf.key for leaf in leaves], adapted=adapted, renamed=renamed,
                      fresh=["/".join(p) for p in flat if p not in values],
                      unused=_unused(state_dict, leaves))
  return _unflatten({**flat, **values}, variables), report
