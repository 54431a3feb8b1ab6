"""Anatomy-XNet (Kamal, Zunaed, Nizam, Hasan, "Anatomy-XNet: An Anatomy Aware Convolutional Neural
Network for Thoracic Disease Classification in Chest X-rays", IEEE JBHI 26(11), 2022): an
ImageNet DenseNet-121, anatomy-aware attention (A3) driven by organ masks that are an input at
train and test time, and probabilistic weighted average pooling (PWAP). The paper's verified core
is those three parts and the masks' origin (a semi-supervised segmenter); the wiring below is the
research note's reference design (same-lab ThoraX-PriorNet's `MaskedAttention` for A3, PCAM
pooling for PWAP), every unknown a field (docs/methods/anatomy_xnet.md).

  F = relu(norm5(DenseNet(image)))            (B, h, w, C), the backbone's C5
  per organ group g of `groups`: M_g = 1 where the anatomy map's id is one of g's, resized to
    (h, w) (`mask_resize`); A3_g: F_m = F * M_g;
    v = sum over d in (GAP F, GMP F, GAP F_m, GMP F_m) of LeakyReLU_0.2(conv1x1_d(d))  (C -> rC)
    w = dropout(sigmoid(conv1x1(v)))          (B, 1, 1, C), `attention_dropout`
    A_g = BN(w * F_m + (1 - w) * F)
  X = [A_g for g] (`fusion="concat"`, D = G*C) or sum_g A_g ("sum", D = C); `a3=False`: X = F
  PWAP: L = classifier(X), a 1x1 conv D -> K   (B, h, w, K), returned as `cams`
        Omega_k = sigmoid(L_k) / sum_p sigmoid(L_k)(p);  x_k = sum_p Omega_k(p) X(p)   (B, K, D)
        logit_k = classifier_k(dropout(x_k)), the same weights   `logits` (B, K)

The loss is the baseline's (`config.loss`'s classification loss, term `cls_loss`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import backbones, layers, methods
from cxr_jax.interop import convert
from cxr_jax.methods import Method, Task, baseline

FUSIONS = ("concat", "sum")
MASK_RESIZES = ("area", "bilinear")
LEAKY_SLOPE = 0.2  # the reference design's LeakyReLU after each descriptor conv
# A3's four descriptor convs, by the descriptor they read, in this order.
DESCRIPTORS = ("avg", "max", "masked_avg", "masked_max")
# A3's convs start as torch's Conv2d default kernel, U(+-1/sqrt(fan_in)) (the reference code keeps
# torch's defaults), with zero bias; the PWAP classifier as PCAM's, N(0, 0.01) with zero bias.
A3_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
CLASSIFIER_INIT = nn.initializers.normal(0.01)
# A group's name becomes a module name (`a3_<name>`) in flax and torch.
GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# `config.model.anatomy_xnet`, every field our choice (docs/methods/anatomy_xnet.md). `groups`:
# "name=region+region,...", regions named as in the dataset's `anatomy_names`.
DEFAULTS = dict(groups="lungs=right_lung+left_lung,heart=heart", a3=True, fusion="concat",
                reduction=1.0, attention_dropout=0.1, mask_resize="area")


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.anatomy_xnet` over `DEFAULTS`, checked."""
  fields = methods.fields(model_cfg.get("anatomy_xnet", {}), "config.model.anatomy_xnet", DEFAULTS,
                          {"a3": (True, False), "fusion": FUSIONS, "mask_resize": MASK_RESIZES})
  if not fields["reduction"] > 0:
    raise ValueError(f"config.model.anatomy_xnet.reduction must be > 0, got {fields['reduction']}")
  return fields


def parse_groups(spec: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """"lungs=right_lung+left_lung,heart=heart" -> (("lungs", ("right_lung", "left_lung")),
  ("heart", ("heart",))), refusing malformed entries, bad or repeated group names."""
  groups = []
  for entry in filter(None, (part.strip() for part in spec.split(","))):
    name, sep, regions = entry.partition("=")
    regions = tuple(filter(None, (r.strip() for r in regions.split("+"))))
    if not sep or not regions or not GROUP_NAME.match(name.strip()):
      raise ValueError(f"config.model.anatomy_xnet.groups: bad entry {entry!r}; expected "
                       "name=region+region (name: letters, digits, _), e.g. "
                       f"{DEFAULTS['groups']!r}")
    groups.append((name.strip(), regions))
  names = [name for name, _ in groups]
  if not groups or len(set(names)) != len(names):
    raise ValueError(f"config.model.anatomy_xnet.groups={spec!r}: give one or more groups with "
                     "distinct names")
  return tuple(groups)


def group_ids(spec: str, anatomy_names: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """Each group of `spec` with the ids of its regions in the dataset's anatomy maps.

  Raises:
    ValueError: naming the regions the dataset's `anatomy_names` lack, and those names.
  """
  groups = parse_groups(spec)
  missing = sorted({r for _, regions in groups for r in regions if r not in anatomy_names})
  if missing:
    raise ValueError(f"config.model.anatomy_xnet.groups={spec!r} names anatomy regions {missing} "
                     f"that the dataset lacks; its anatomy_names: {list(anatomy_names)} (a dataset "
                     "without anatomy maps gets them from python -m cxr_jax.pseudolabel)")
  return tuple((name, tuple(anatomy_names.index(r) for r in regions)) for name, regions in groups)


def resize_matrix(kind: str, out_size: int, in_size: int) -> np.ndarray:
  """(out, in) float64 weights of a 1-D resize, torch's for each `kind` of MASK_RESIZES.

  "area": output i is the mean of inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1
  (`F.adaptive_avg_pool2d`, `F.interpolate(mode="area")`), so a resized mask holds the fraction
  of each feature cell inside the organ. "bilinear": `F.interpolate(mode="bilinear",
  align_corners=False)`, which samples at half-pixel centres, clamped at 0, without antialiasing
  (the reference code's; on a downsampled mask it reads only the 2 x 2 pixels nearest each
  cell's centre).
  """
  matrix = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  if kind == "area":
    for i in rows:
      start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
      matrix[i, start:end] = 1 / (end - start)
    return matrix
  if kind != "bilinear":
    raise ValueError(f"mask_resize={kind!r}: choose from {MASK_RESIZES}")
  src = np.maximum((rows + 0.5) * in_size / out_size - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(int), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  np.add.at(matrix, (rows, low), 1 - (src - low))
  np.add.at(matrix, (rows, high), src - low)
  return matrix


def group_mask(anatomy: jax.Array, ids: tuple[int, ...], size: tuple[int, int],
               kind: str) -> jax.Array:
  """(B, H, W) region ids -> (B, *size, 1) float32: 1 inside the group's regions, resized."""
  inside = jnp.any(anatomy[..., None] == jnp.asarray(ids, anatomy.dtype), axis=-1)
  rows = jnp.asarray(resize_matrix(kind, size[0], anatomy.shape[1]), jnp.float32)
  cols = jnp.asarray(resize_matrix(kind, size[1], anatomy.shape[2]), jnp.float32)
  # Exact weights: a cell's fraction should not drift with the backend's matmul precision.
  mask = jnp.einsum("yh,bhw,xw->byx", rows, inside.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)
  return mask[..., None]


def pwap_weights(logit_maps: jax.Array) -> jax.Array:
  """(B, h, w, K) logit maps -> Omega, sigmoid(L) normalised to sum 1 over space per class.

  Computed as a softmax of log-sigmoid over space, the same ratio without the 0/0 of maps whose
  sigmoid underflows everywhere."""
  b, h, w, k = logit_maps.shape
  flat = jax.nn.log_sigmoid(logit_maps.reshape(b, h * w, k))
  return jax.nn.softmax(flat, axis=1).reshape(b, h, w, k)


def pwap_pool(features: jax.Array, weights: jax.Array) -> jax.Array:
  """x_k = sum_p Omega_k(p) X(p): (B, h, w, D) and (B, h, w, K) -> (B, K, D), one pooled
  vector per class."""
  return jnp.einsum("bhwk,bhwd->bkd", weights, features, precision=jax.lax.Precision.HIGHEST)


class AnatomyAwareAttention(nn.Module):
  """A3 (module docstring): features (B, h, w, C) and a mask (B, h, w, 1) in [0, 1] ->
  BN(w * F_m + (1 - w) * F), w the per-channel weight of the anatomy-restricted features.

  Attributes:
    reduction: r, the descriptor convs' width in multiples of C.
    dropout: the rate of the dropout on w.
  """

  reduction: float = 1.0
  dropout: float = 0.1

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    channels = features.shape[-1]
    masked = features * mask
    pooled = {"avg": jnp.mean(features, axis=(1, 2), keepdims=True),
              "max": jnp.max(features, axis=(1, 2), keepdims=True),
              "masked_avg": jnp.mean(masked, axis=(1, 2), keepdims=True),
              "masked_max": jnp.max(masked, axis=(1, 2), keepdims=True)}
    hidden = int(channels * self.reduction)
    convs = {name: nn.Conv(hidden, (1, 1), kernel_init=A3_INIT, name=name) for name in DESCRIPTORS}
    summed = sum(nn.leaky_relu(convs[name](pooled[name]), LEAKY_SLOPE) for name in DESCRIPTORS)
    weight = nn.sigmoid(nn.Conv(channels, (1, 1), kernel_init=A3_INIT, name="excite")(summed))
    weight = nn.Dropout(self.dropout, deterministic=not train)(weight)
    return layers.BatchNorm(use_running_average=not train, name="bn")(
        weight * masked + (1 - weight) * features)


class Model(nn.Module):
  """Anatomy-XNet's network; see the module docstring.

  Attributes:
    backbone: the DenseNet (any backbone whose C5 is the map to attend).
    num_classes: K.
    groups: ((group name, its region ids), ...), one A3 each; unused when `a3` is False.
    a3, fusion, reduction, attention_dropout, mask_resize: the `config.model.anatomy_xnet`
      fields (`DEFAULTS`).
    dropout: the rate on PWAP's pooled vectors.
    dtype: the backbone's compute dtype; A3 and PWAP run in at least float32.
  """

  backbone: nn.Module
  num_classes: int
  groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
  a3: bool = True
  fusion: str = "concat"
  reduction: float = 1.0
  attention_dropout: float = 0.1
  mask_resize: str = "area"
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def _attend(self, features: jax.Array, anatomy: jax.Array, train: bool) -> jax.Array:
    """X: each group's A3 output, concatenated or summed (`fusion`)."""
    attended = []
    for name, ids in self.groups:
      mask = group_mask(anatomy, ids, features.shape[1:3], self.mask_resize).astype(features.dtype)
      attended.append(AnatomyAwareAttention(self.reduction, self.attention_dropout,
                                            name=f"a3_{name}")(features, mask, train=train))
    return jnp.concatenate(attended, axis=-1) if self.fusion == "concat" else sum(attended)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, anatomy: jax.Array) -> dict[str, jax.Array]:
    wide = jnp.promote_types(self.dtype, jnp.float32)
    features = self.backbone(images, train=train)["C5"].astype(wide)
    attended = self._attend(features, anatomy, train) if self.a3 else features
    classifier = nn.Conv(self.num_classes, (1, 1), kernel_init=CLASSIFIER_INIT, name="classifier")
    cams = classifier(attended)
    pooled = nn.Dropout(self.dropout, deterministic=not train)(
        pwap_pool(attended, pwap_weights(cams)))
    params = classifier.variables["params"]
    # Class k's pooled vector through class k's classifier weights only.
    logits = jnp.einsum("bkd,dk->bk", pooled, params["kernel"][0, 0]) + params["bias"]
    return dict(logits=logits.astype(jnp.float32), cams=cams.astype(jnp.float32),
                features=features, attended=attended)


def build(config: Mapping[str, Any], task: Task) -> Model:
  """Anatomy-XNet for `config.model` (`backbone`, `anatomy_xnet`, `dropout`) and `config.dtype`;
  the groups' regions must be in `task.anatomy_names` (with `a3`)."""
  dtype = jnp.dtype(config["dtype"])
  model_cfg = config["model"]
  fields = settings(model_cfg)
  groups = group_ids(fields["groups"], task.anatomy_names) if fields["a3"] else ()
  return Model(backbone=backbones.build({**model_cfg["backbone"], "dtype": dtype}),
               num_classes=task.num_classes, groups=groups, a3=fields["a3"],
               fusion=fields["fusion"], reduction=fields["reduction"],
               attention_dropout=fields["attention_dropout"], mask_resize=fields["mask_resize"],
               dropout=model_cfg["dropout"], dtype=dtype)


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The mirror's keys: `backbone.` + torchvision's, then `a3_<group>.{avg,max,masked_avg,
  masked_max,excite}.{weight,bias}`, `a3_<group>.bn.*` and `classifier.{weight,bias}`."""
  return convert.TorchNames((
      convert.backbone_scope(model_cfg["backbone"], flax="backbone", torch="backbone"),
      convert.Scope("", "")))


METHOD = Method(build=build, loss=baseline.loss, inputs=("anatomy",))
