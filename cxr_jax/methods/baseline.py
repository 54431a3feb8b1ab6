"""The CheXNet baseline (Rajpurkar et al. 2017): backbone -> global average pooling -> dropout ->
Dense(K), trained with a multi-label loss from `cxr_jax.losses` (BCE, W-CEL or focal).

Its class activation maps (Zhou et al. 2016) are the head applied at every position of C5:
`cams[b, y, x, k] = C5[b, y, x] . W[:, k] + bias[k]`, so their spatial mean is exactly the logit.

The head is named `head`; `cxr_jax.interop` maps it to torchvision's `classifier` (DenseNet) or
`fc` (ResNet), so an exported baseline has exactly torchvision's state_dict keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses
from cxr_jax.methods import Method, Task


class Model(nn.Module):
  """Backbone + GAP + dropout + linear classifier; returns logits, CAMs and the stage features."""

  backbone: nn.Module
  num_classes: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, Any]:
    features = self.backbone(images, train=train)
    pooled = layers.global_avg_pool(features["C5"])
    head = nn.Dense(self.num_classes, dtype=self.dtype, name="head")
    logits = head(nn.Dropout(self.dropout, deterministic=not train)(pooled))
    return dict(logits=logits.astype(jnp.float32), cams=head(features["C5"]).astype(jnp.float32),
                pooled=pooled, features=features)


def build(config: Mapping[str, Any], task: Task) -> Model:
  """The baseline described by `config.model` and `config.dtype`, with one output per class."""
  dtype = jnp.dtype(config["dtype"])
  return Model(backbone=backbones.build({**config["model"]["backbone"], "dtype": dtype}),
               num_classes=task.num_classes, dropout=config["model"]["dropout"], dtype=dtype)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The configured multi-label classification loss over the task's targets."""
  targets, mask = task.targets(batch)
  value = losses.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                     config["loss"], task)
  return value, {"cls_loss": value}


METHOD = Method(build=build, loss=loss)
