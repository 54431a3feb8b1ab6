"""MSML (`cxr_jax.methods.msml`) in plain PyTorch: the network with the keys of `msml.torch_names`
and its loss, each a port of the flax code (see `msml.py` and `cxr_jax.losses.msml` for the maths).

`mirror(config, task)` and `loss(outputs, batch, *, task, config, weight)` are MSML's entry in
`cxr_jax.interop.registry`. The compact head's hashes and signs are buffers (`sketch.hashes`,
`sketch.signs`) drawn from the same seed by `msml.sketch_constants`, so the exported state_dict
carries them and loads strictly.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax import losses
from cxr_jax.interop import torch_modules
from cxr_jax.methods import msml


class Reduce(nn.Module):
  """`msml.Reduce`: 1x1 conv (bias-free) -> BatchNorm -> ReLU, keys `conv.weight`, `bn.*`."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, features, 1, bias=False)
    self.bn = nn.BatchNorm2d(features)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TensorSketch(nn.Module):
  """`msml.compact_bilinear_pool` with its hashes and signs as buffers."""

  def __init__(self, features: int, sketch_dim: int, seed: int):
    super().__init__()
    hashes, signs = msml.sketch_constants(features, sketch_dim, seed)
    self.register_buffer("hashes", torch.from_numpy(hashes))
    self.register_buffer("signs", torch.from_numpy(signs))
    self.sketch_dim = sketch_dim

  def forward(self, xa, xb):
    """(B, P, F) x (B, P, F) -> (B, sketch_dim)."""
    bins = (self.hashes[0][:, None] + self.hashes[1][None, :]).remainder(self.sketch_dim).flatten()
    values = bilinear_pool(xa, xb) * (self.signs[0][:, None] * self.signs[1][None, :]).flatten()
    return values.new_zeros(values.shape[0], self.sketch_dim).index_add(1, bins, values)


def bilinear_pool(xa, xb):
  """`msml.bilinear_pool`: (B, P, F) x (B, P, F) -> (B, F*F)."""
  return (torch.einsum("bpi,bpj->bij", xa, xb) / xa.shape[1]).flatten(1)


def signed_sqrt_l2(g):
  """`msml.signed_sqrt_l2`: signed square root, then L2 normalisation of each row."""
  y = torch.sign(g) * torch.sqrt(g.abs() + msml.SQRT_EPSILON)
  return F.normalize(y, dim=-1, eps=msml.NORM_FLOOR)


class MSML(nn.Module):
  """`msml.Model` in torch: forward(x NCHW) returns `logits`, `pooled` and, with the anchor,
  `anchor_logit`, as the flax model does."""

  def __init__(self, num_classes: int, backbone_cfg: Mapping[str, Any], in_channels: int,
               head: str, streams: int, features: int, sketch_dim: int, sketch_seed: int,
               anchor: bool, dropout: float, backbone_b: Mapping[str, Any] | None):
    super().__init__()
    self.head = head
    self.backbone = torch_modules.backbone(backbone_cfg, in_channels)
    width = self.backbone.out_channels
    if head != "gap":
      self.reduce = Reduce(width, features)
      width = features * features
    if streams == 2:
      self.backbone_b = torch_modules.backbone(backbone_b, in_channels)
      self.reduce_b = Reduce(self.backbone_b.out_channels, features)
    if head == "compact":
      self.sketch = TensorSketch(features, sketch_dim, sketch_seed)
      width = sketch_dim
    self.streams = streams
    self.dropout = nn.Dropout(dropout)
    self.classifier = nn.Linear(width, num_classes)
    self.anchor = nn.Linear(width, 1) if anchor else None

  def _streams(self, x):
    """x_a, x_b as (B, P, F), positions in flax's row-major (H, W) order."""
    xa = self.reduce(self.backbone(x)["C5"])
    xb = xa
    if self.streams == 2:
      c5b = F.interpolate(self.backbone_b(x)["C5"], size=xa.shape[2:], mode="bilinear",
                          align_corners=True)
      xb = self.reduce_b(c5b)
    return xa.flatten(2).transpose(1, 2), xb.flatten(2).transpose(1, 2)

  def _pooled(self, x):
    if self.head == "gap":
      return self.backbone(x)["C5"].mean(dim=(2, 3))
    xa, xb = self._streams(x)
    if self.head == "bilinear":
      return signed_sqrt_l2(bilinear_pool(xa, xb))
    return signed_sqrt_l2(self.sketch(xa, xb))

  def forward(self, x) -> dict[str, torch.Tensor]:
    pooled = self._pooled(x)
    dropped = self.dropout(pooled)
    outputs = {"logits": self.classifier(dropped), "pooled": pooled}
    if self.anchor is not None:
      outputs["anchor_logit"] = self.anchor(dropped)[:, 0]
    return outputs


def mirror(config: Mapping[str, Any], task: Any) -> MSML:
  """The mirror of `msml.build(config, task)` for `config.model.channels`-channel images."""
  model = config["model"]
  return MSML(task.num_classes, model["backbone"], model["channels"], dropout=model["dropout"],
              **msml.settings(model))


# ---------------------------------------------------------------- losses


def msml_loss(logits, targets, mask, weight, variant: str = "pos_vs_neg"):
  """`cxr_jax.losses.msml` in torch: MSML averaged over the weighted rows with a positive."""
  logits = logits.float()
  known = mask > 0
  positive = known & (targets > 0.5)
  count = positive.sum(dim=-1).float()
  denominator = count.clamp(min=1.0)
  masked = torch.full_like(logits, losses.MASKED_LOGIT)
  if variant == "pos_vs_neg":
    lse_negatives = torch.where(known & ~positive, logits, masked).logsumexp(dim=-1)
    per_label = F.softplus(lse_negatives[:, None] - logits)
    per_row = torch.where(positive, per_label, torch.zeros_like(logits)).sum(-1) / denominator
  elif variant == "normalized_target":
    log_probs = torch.where(known, logits, masked).log_softmax(dim=-1)
    per_row = -torch.where(positive, log_probs, torch.zeros_like(logits)).sum(-1) / denominator
  else:
    raise ValueError(f"MSML variant {variant!r}: choose from {losses.MSML_VARIANTS}")
  row_weight = weight * (count > 0)
  return (per_row * row_weight).sum() / row_weight.sum().clamp(min=1.0)


def with_anchor(logits, anchor_logit, targets, mask):
  """`msml.with_anchor`: the anchor as a K+1-th label, positive iff no known positive."""
  no_finding = 1.0 - (targets * (mask > 0)).amax(dim=-1)
  return (torch.cat([logits.float(), anchor_logit.float()[:, None]], dim=-1),
          torch.cat([targets, no_finding[:, None]], dim=-1),
          torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1))


def loss(outputs, batch, *, task, config, weight):
  """`msml.loss` in torch, on a batch of tensors: (total, {"bce_loss", "msml_loss"})."""
  fields = msml.loss_settings(config["loss"])
  targets, mask = batch[task.target], batch[task.mask_key]
  bce = torch_modules.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                          config["loss"], task)
  logits = outputs["logits"]
  if fields["anchor"]:
    logits, targets, mask = with_anchor(logits, outputs["anchor_logit"], targets, mask)
  value = msml_loss(logits, targets, mask, weight, fields["variant"])
  total = fields["bce_weight"] * bce + fields["msml_weight"] * value
  return total, {"bce_loss": bce, "msml_loss": value}
