"""The anatomy segmenter: stage 1 of Anatomy-XNet (Kamal et al., JBHI 2022), which segments organs
on a small organ-annotated set (JSRT with SCR masks) and pseudo-labels the large classification
sets with them (`cxr_jax.pseudolabel`). The paper names neither the segmenter's architecture nor
its loss; everything below is our choice (`config.model.segmenter`, `DEFAULTS`;
docs/methods/anatomy_xnet.md).

  encoder: a torchvision-exact DenseNet or ResNet (`config.model.backbone`): C2..C5
  decoder, from C5 up to C2 (U-Net style): at each skip, bilinear upsampling of the map to the
    skip's size, concatenation with it, then 2 x (3x3 conv -> BN -> ReLU) of `decoder_features[i]`
  classifier: 1x1 conv (with bias) to K regions at C2's stride, then bilinear upsampling to the
    image size: `logits` (B, H, W, K), one per pixel and region (`config.data.target=anatomy`:
    the dataset's `anatomy_names`, background first)

Scores are the per-pixel softmax over regions. Loss (`config.loss.segmenter`, `LOSS_DEFAULTS`):
`ce_weight` x the pixel-mean cross-entropy + `dice_weight` x (1 - soft Dice), the soft Dice
averaged over the regions other than background that the batch holds, each pooled over the
batch's pixels; every example weighs by its `weight` (padding 0).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses, methods
from cxr_jax.interop import convert
from cxr_jax.methods import Method, Task

# `config.model.segmenter`: the decoder's widths, one per skip from C4 down to C2 (ours).
DEFAULTS = dict(decoder_features=(256, 128, 64))
# `config.loss.segmenter`: the two terms' weights and the soft Dice's smoothing (ours).
LOSS_DEFAULTS = dict(ce_weight=1.0, dice_weight=1.0, dice_smooth=1.0)
SKIPS = ("C4", "C3", "C2")


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.segmenter` over `DEFAULTS`, checked."""
  fields = methods.fields(model_cfg.get("segmenter", {}), "config.model.segmenter", DEFAULTS)
  if len(fields["decoder_features"]) != len(SKIPS):
    raise ValueError(f"config.model.segmenter.decoder_features needs {len(SKIPS)} widths (for "
                     f"{SKIPS}), got {fields['decoder_features']!r}")
  return fields


def upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w, C) maps to `size` (half-pixel centres: torch's
  `interpolate(..., mode="bilinear", align_corners=False)` when enlarging)."""
  if x.shape[1:3] == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


class DecoderBlock(nn.Module):
  """Upsample to the skip, concatenate it, then two 3x3 conv -> BN -> ReLU."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    x = jnp.concatenate([upsample(x, skip.shape[1:3]).astype(skip.dtype), skip], axis=-1)
    for i in (1, 2):
      x = layers.conv(self.features, 3, padding=1, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                                   name=f"bn{i}")(x))
    return x


class Model(nn.Module):
  """Encoder + U-Net decoder + per-pixel classifier; returns `logits` (B, H, W, K)."""

  backbone: nn.Module
  num_classes: int
  decoder_features: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, Any]:
    stages = self.backbone(images, train=train)
    x = stages["C5"]
    for i, (skip, features) in enumerate(zip(SKIPS, self.decoder_features)):
      x = DecoderBlock(features, self.dtype, name=f"decoder{i}")(x, stages[skip], train=train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return dict(logits=upsample(logits.astype(jnp.float32), images.shape[1:3]))


def build(config: Mapping[str, Any], task: Task) -> Model:
  """The segmenter for `config.model` (`backbone`, `segmenter`) and `config.dtype`."""
  dtype = jnp.dtype(config["dtype"])
  return Model(backbone=backbones.build({**config["model"]["backbone"], "dtype": dtype}),
               num_classes=task.num_classes,
               decoder_features=tuple(settings(config["model"])["decoder_features"]), dtype=dtype)


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The mirror's keys: `backbone.` + torchvision's, then `decoder{i}.conv{1,2}.weight`,
  `decoder{i}.bn{1,2}.*` and `classifier.{weight,bias}`."""
  return convert.TorchNames((convert.backbone_scope(model_cfg["backbone"], flax="backbone",
                                                    torch="backbone"),
                             convert.Scope("", "")))


def loss_settings(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.loss.segmenter` over `LOSS_DEFAULTS`, checked."""
  return methods.fields(loss_cfg.get("segmenter", {}), "config.loss.segmenter", LOSS_DEFAULTS)


def soft_dice(probs: jax.Array, onehot: jax.Array, weight: jax.Array, smooth: float) -> jax.Array:
  """1 - mean soft Dice over the regions (background, index 0, left out) present in the
  weighted batch; each region's Dice pools every pixel of the batch."""
  w = weight[:, None, None, None]
  overlap = jnp.sum(probs * onehot * w, axis=(0, 1, 2))
  total = jnp.sum((probs + onehot) * w, axis=(0, 1, 2))
  dice = (2 * overlap + smooth) / (total + smooth)
  present = (jnp.sum(onehot * w, axis=(0, 1, 2)) > 0).at[0].set(False)
  return 1.0 - jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ce_weight * cross-entropy + dice_weight * soft Dice loss (module docstring); terms
  `seg_ce` and `seg_dice`."""
  fields = loss_settings(config["loss"])
  logits = outputs["logits"]
  onehot = jax.nn.one_hot(batch["anatomy"].astype(jnp.int32), task.num_classes, dtype=jnp.float32)
  per_pixel = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  ce = losses.masked_mean(jnp.mean(per_pixel, axis=(1, 2)), weight)
  dice = soft_dice(jax.nn.softmax(logits, axis=-1), onehot, weight, fields["dice_smooth"])
  total = fields["ce_weight"] * ce + fields["dice_weight"] * dice
  return total, {"seg_ce": ce, "seg_dice": dice}


METHOD = Method(build=build, loss=loss, scores="softmax", targets=("anatomy",))
