"""MSML (Ge et al., "Chest X-rays Classification: A Multi-Label and Fine-Grained Problem", 2018):
a multi-label softmax loss and a fine-grained (bilinear-pooling) head, as far as the paper's
abstract lets us tell; every detail it leaves open is a field below (docs/methods/msml.md).

  backbone C5 -> `reduce` (1x1 conv to `features` -> BN -> ReLU) -> x (B, H, W, F)
  "bilinear": G = mean over positions of x_a x_b^T (F x F), flattened
  "compact":  the Tensor Sketch of G to `sketch_dim` (Pham & Pagh 2013, as compact bilinear pooling
              in Gao et al. 2016), its hashes and signs drawn from `sketch_seed`
  both:       signed sqrt sign(g) sqrt(|g| + 1e-8) -> L2 normalise -> `pooled`
  "gap":      `pooled` = GAP(C5), no reduction (the BCE baseline's head, with MSML available)
  then dropout -> `classifier` Dense(K) -> `logits`, and `anchor` Dense(1) -> `anchor_logit`

With one stream x_b = x_a; with `streams=2`, x_b comes from a second backbone
(`config.model.msml.backbone_b`), its C5 resized (align corners) to the first's size and reduced by
its own `reduce_b`. `anchor_logit` (B,) is a "No Finding" logit, never part of `logits` (B, K):
the scores stay the sigmoid of the K disease logits.

The loss (`config.loss.msml` over `LOSS_DEFAULTS`) is

  bce_weight * config.loss's classification loss on `logits`
  + msml_weight * MSML (`cxr_jax.losses.msml`) on [logits, anchor_logit],

the anchor positive iff the row has no known positive, so every row has a positive and the anchor
pins the per-image shift MSML alone leaves free. `bce_weight=0` is MSML alone.

The compact head's count-sketch hashes and signs are no flax variable: the trainer's state holds
`params` (all trained) and `batch_stats` (BatchNorm's) only, and a constant belongs in neither.
They are drawn in numpy from `sketch_seed` (`sketch_constants`) by the flax model and the torch
mirror alike; `torch_names` declares them as `TorchNames.constants`, so an export writes them into
`model.safetensors` (the mirror's buffers `sketch.hashes`, `sketch.signs`, loaded strictly) and an
import (`init_from=model=PATH`) refuses a file whose hashes are not the config's seed's.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import backbones, layers, losses, methods
from cxr_jax.interop import convert
from cxr_jax.methods import Method, Task

HEADS = ("bilinear", "compact", "gap")
SQRT_EPSILON = 1e-8  # inside the signed square root: a finite gradient at g = 0
NORM_FLOOR = 1e-12  # the L2 norm's floor, torch's `F.normalize` default
SKETCHES = 2  # a Tensor Sketch of an outer product sketches each factor with its own hash


def sketch_constants(features: int, sketch_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The Tensor Sketch's (hashes int64, signs float32 +-1), each (2, features): one count sketch
  per factor of the outer product, drawn from `seed` the same way in both frameworks."""
  rng = np.random.default_rng(seed)
  hashes = rng.integers(0, sketch_dim, size=(SKETCHES, features), dtype=np.int64)
  signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(SKETCHES, features))
  return hashes, signs


def bilinear_pool(xa: jax.Array, xb: jax.Array) -> jax.Array:
  """(B, P, F) x (B, P, F) -> (B, F*F): mean over positions p of x_a[p] x_b[p]^T, flattened."""
  gram = jnp.einsum("bpi,bpj->bij", xa, xb, precision=jax.lax.Precision.HIGHEST) / xa.shape[1]
  return gram.reshape(xa.shape[0], -1)


def sketch_bins(hashes: np.ndarray, signs: np.ndarray,
                sketch_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(bin, sign) of each entry (i, j) of the flattened F x F bilinear features under the Tensor
  Sketch: bin (h_1[i] + h_2[j]) mod D, sign s_1[i] s_2[j]."""
  bins = (hashes[0][:, None] + hashes[1][None, :]) % sketch_dim
  return bins.reshape(-1), (signs[0][:, None] * signs[1][None, :]).reshape(-1)


def compact_bilinear_pool(xa: jax.Array, xb: jax.Array, hashes: np.ndarray, signs: np.ndarray,
                          sketch_dim: int) -> jax.Array:
  """(B, P, F) x (B, P, F) -> (B, sketch_dim): the Tensor Sketch of `bilinear_pool`, whose inner
  products approximate those of the bilinear features.

  The sketch is linear, so sketching the pooled G equals pooling the per-position sketches
  IFFT(FFT(CS_1 x_a) * FFT(CS_2 x_b)) of Gao et al. Summing G's signed entries into their bins
  gives the same vector without FFT rounding, whose noise around bins that should be 0 the
  signed square root magnifies, and costs less than a (F, D) projection at every position.
  """
  bins, entry_signs = sketch_bins(hashes, signs, sketch_dim)
  values = bilinear_pool(xa, xb) * entry_signs.astype(xa.dtype)
  return jnp.zeros((xa.shape[0], sketch_dim), values.dtype).at[:, bins].add(values)


def signed_sqrt_l2(g: jax.Array) -> jax.Array:
  """sign(g) sqrt(|g| + 1e-8), then each row divided by its L2 norm (floored at 1e-12)."""
  y = jnp.sign(g) * jnp.sqrt(jnp.abs(g) + SQRT_EPSILON)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(y), axis=-1, keepdims=True), NORM_FLOOR ** 2))
  return y / norm


class Reduce(nn.Module):
  """1x1 conv (bias-free) -> BatchNorm -> ReLU: the channel reduction before bilinear pooling."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv(self.features, 1, dtype=self.dtype, name="conv")(x)
    return nn.relu(layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x))


class Model(nn.Module):
  """MSML's network; see the module docstring.

  Attributes:
    backbone, backbone_b: the streams' backbones; `backbone_b` None for one stream.
    num_classes: K, the disease logits.
    head: one of HEADS.
    features: the reduced width F of each stream (bilinear and compact heads).
    sketch_dim, sketch_seed: the compact head's output size and hash seed.
    anchor: whether the model has the No-Finding `anchor_logit`.
    dropout: the rate before the linear heads.
    dtype: compute dtype of backbones and reductions; pooling and heads run in at least float32.
  """

  backbone: nn.Module
  num_classes: int
  backbone_b: nn.Module | None = None
  head: str = "bilinear"
  features: int = 512
  sketch_dim: int = 8192
  sketch_seed: int = 0
  anchor: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def _streams(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """The reduced maps x_a, x_b as (B, P, F) in float32 or wider; x_b is x_a with one stream."""
    wide = jnp.promote_types(self.dtype, jnp.float32)
    xa = Reduce(self.features, self.dtype, name="reduce")(
        self.backbone(images, train=train)["C5"], train=train)
    xb = xa
    if self.backbone_b is not None:
      c5b = self.backbone_b(images, train=train)["C5"]
      c5b = layers.resize_align_corners(c5b, xa.shape[1:3])
      xb = Reduce(self.features, self.dtype, name="reduce_b")(c5b, train=train)
    flat = lambda x: x.astype(wide).reshape(x.shape[0], -1, x.shape[-1])
    return flat(xa), flat(xb)

  def _pooled(self, images: jax.Array, train: bool) -> jax.Array:
    if self.head == "gap":
      c5 = self.backbone(images, train=train)["C5"]
      return layers.global_avg_pool(c5.astype(jnp.promote_types(self.dtype, jnp.float32)))
    xa, xb = self._streams(images, train)
    if self.head == "bilinear":
      return signed_sqrt_l2(bilinear_pool(xa, xb))
    hashes, signs = sketch_constants(self.features, self.sketch_dim, self.sketch_seed)
    return signed_sqrt_l2(compact_bilinear_pool(xa, xb, hashes, signs, self.sketch_dim))

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    pooled = self._pooled(images, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    outputs = dict(logits=nn.Dense(self.num_classes, name="classifier")(x), pooled=pooled)
    if self.anchor:
      outputs["anchor_logit"] = nn.Dense(1, name="anchor")(x)[:, 0]
    return outputs


# `config.model.msml`: the architecture, every field our choice (docs/methods/msml.md).
# `backbone_b` is the second stream's backbone config, needed only with `streams=2`. The dropout
# before the heads is `config.model.dropout`.
DEFAULTS = dict(head="bilinear", streams=1, features=512, sketch_dim=8192, sketch_seed=0,
                anchor=True, backbone_b=None)


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.msml` over `DEFAULTS`, checked."""
  fields = methods.fields(model_cfg.get("msml", {}), "config.model.msml", DEFAULTS,
                          {"head": HEADS, "streams": (1, 2)})
  if fields["streams"] == 2 and fields["head"] == "gap":
    raise ValueError("config.model.msml.streams=2 pools two streams bilinearly: it needs "
                     "config.model.msml.head='bilinear' or 'compact', not 'gap'")
  if fields["streams"] == 2 and not fields["backbone_b"]:
    raise ValueError("config.model.msml.streams=2 needs config.model.msml.backbone_b, the second "
                     "stream's backbone config (e.g. {'name': 'densenet121'})")
  return fields


def backbone_paths(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """`Method.backbones`: the second stream's backbone exists only with `streams=2`."""
  first = (("backbone", "model.backbone"),)
  if settings(config["model"])["streams"] == 2:
    return first + (("backbone_b", "model.msml.backbone_b"),)
  return first


def build(config: Mapping[str, Any], task: Task) -> Model:
  """MSML's network for `config.model` (`backbone`, `msml`, `dropout`) and `config.dtype`."""
  dtype = jnp.dtype(config["dtype"])
  fields = settings(config["model"])
  backbone_of = lambda cfg: backbones.build({**cfg, "dtype": dtype})
  backbone_b = backbone_of(fields["backbone_b"]) if fields["streams"] == 2 else None
  return Model(backbone=backbone_of(config["model"]["backbone"]), backbone_b=backbone_b,
               num_classes=task.num_classes, head=fields["head"], features=fields["features"],
               sketch_dim=fields["sketch_dim"], sketch_seed=fields["sketch_seed"],
               anchor=fields["anchor"], dropout=config["model"]["dropout"], dtype=dtype)


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The mirror's keys: `backbone.` (`backbone_b.`) + torchvision's keys, `reduce.conv.weight`,
  `reduce.bn.*`, `classifier.*`, `anchor.*`, and for the compact head the constants
  `sketch.hashes`, `sketch.signs` (module docstring)."""
  fields = settings(model_cfg)
  scopes = [convert.backbone_scope(model_cfg["backbone"], flax="backbone", torch="backbone")]
  if fields["streams"] == 2:
    scopes.append(convert.backbone_scope(fields["backbone_b"], flax="backbone_b",
                                         torch="backbone_b"))
  constants = {}
  if fields["head"] == "compact":
    hashes, signs = sketch_constants(fields["features"], fields["sketch_dim"], fields["sketch_seed"])
    constants = {"sketch.hashes": hashes, "sketch.signs": signs}
  return convert.TorchNames((*scopes, convert.Scope("", "")), constants=constants)


# `config.loss.msml`: the training objective (our reading of the paper, docs/methods/msml.md).
# `bce_weight=0` is MSML alone; `anchor` adds the model's `anchor_logit` to MSML's logits.
LOSS_DEFAULTS = dict(bce_weight=1.0, msml_weight=1.0, anchor=True, variant="pos_vs_neg")


def loss_settings(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.loss.msml` over `LOSS_DEFAULTS`, checked."""
  return methods.fields(loss_cfg.get("msml", {}), "config.loss.msml", LOSS_DEFAULTS,
                        {"variant": losses.MSML_VARIANTS})


def with_anchor(logits: jax.Array, anchor_logit: jax.Array, targets: jax.Array,
                mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MSML's (logits, targets, mask) over K + 1 labels: the anchor, always known, is positive iff
  the row has no known positive."""
  no_finding = 1.0 - jnp.max(targets * (mask > 0), axis=-1)
  column = lambda x: x[:, None].astype(jnp.float32)
  return (jnp.concatenate([logits.astype(jnp.float32), column(anchor_logit)], axis=-1),
          jnp.concatenate([targets, column(no_finding)], axis=-1),
          jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=-1))


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """bce_weight * the configured classification loss + msml_weight * MSML (module docstring);
  terms `bce_loss`, `msml_loss`, each weighted by example."""
  fields = loss_settings(config["loss"])
  targets, mask = task.targets(batch)
  bce = losses.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                   config["loss"], task)
  logits = outputs["logits"]
  if fields["anchor"]:
    if "anchor_logit" not in outputs:
      raise ValueError("config.loss.msml.anchor=True needs the model's anchor_logit: set "
                       "config.model.msml.anchor=True, or config.loss.msml.anchor=False")
    logits, targets, mask = with_anchor(logits, outputs["anchor_logit"], targets, mask)
  value = losses.msml(logits, targets, mask, weight, fields["variant"])
  total = fields["bce_weight"] * bce + fields["msml_weight"] * value
  return total, {"bce_loss": bce, "msml_loss": value}


METHOD = Method(build=build, loss=loss, backbones=backbone_paths)
