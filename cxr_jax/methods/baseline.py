"""The CheXNet baseline (Rajpurkar et al. 2017): backbone -> global average pooling -> dropout ->
Dense(K), trained with a multi-label loss from `cxr_jax.losses` (BCE, W-CEL or focal).

The head is named `head`; `cxr_jax.interop` maps it to torchvision's `classifier` (DenseNet) or
`fc` (ResNet), so an exported baseline has exactly torchvision's state_dict keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses

INPUTS: tuple[str, ...] = ()


class Model(nn.Module):
  """Backbone + GAP + dropout + linear classifier; returns logits and the stage features."""

  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, Any]:
    features = self.backbone(images, train=train)
    pooled = layers.global_avg_pool(features["C5"])
    x = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return dict(logits=logits.astype(jnp.float32), pooled=pooled, features=features)


def build(config: Mapping[str, Any], num_classes: int) -> Model:
  """The baseline described by `config.model` and `config.dtype`."""
  dtype = jnp.dtype(config["dtype"])
  return Model(backbone=backbones.build({**config["model"]["backbone"], "dtype": dtype}),
               num_classes=num_classes, dropout=config["model"]["dropout"], dtype=dtype)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
         config: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The configured multi-label classification loss."""
  value = losses.classification_loss(outputs["logits"], batch, config["loss"])
  return value, {"cls_loss": value}
