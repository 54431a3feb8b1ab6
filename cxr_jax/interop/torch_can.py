"""CAN (`cxr_jax.methods.can`) in plain PyTorch: the network with the keys of `can.torch_names`
and its loss, each a port of the flax code (see `can.py` for the wiring and the loss).

`mirror(config, task)` and `loss(outputs, batch, *, task, config, weight)` are CAN's entry in
`cxr_jax.interop.registry`. Maps are returned NHWC, as the flax model returns them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax.interop import torch_modules
from cxr_jax.methods import can


class AttentionMap(nn.Module):
  """`can.AttentionMap`: 1x1 conv (bias-free) -> BatchNorm -> sigmoid (keys `conv.weight`,
  `bn.*`)."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, features, 1, bias=False)
    self.bn = nn.BatchNorm2d(features)

  def forward(self, x):
    return torch.sigmoid(self.bn(self.conv(x)))


class CAN(nn.Module):
  """`can.Model` in torch: forward(x NCHW) returns the flax model's outputs under its names."""

  def __init__(self, num_classes: int, backbone_cfg: Mapping[str, Any],
               backbone_b_cfg: Mapping[str, Any], in_channels: int, gating: str, fusion: str,
               branch_heads: bool, dropout: float):
    super().__init__()
    self.backbone = torch_modules.backbone(backbone_cfg, in_channels)
    self.backbone_b = torch_modules.backbone(backbone_b_cfg, in_channels)
    width_a, width_b = self.backbone.out_channels, self.backbone_b.out_channels
    self.gating, self.fusion = gating, fusion
    if gating == "cross":
      self.attention_a = AttentionMap(width_a, width_b)
      self.attention_b = AttentionMap(width_b, width_a)
    self.dropout = nn.Dropout(dropout)
    self.head = nn.Linear(width_a if fusion == "hadamard" else width_a + width_b, num_classes)
    self.branch_heads = branch_heads
    if branch_heads:
      self.head_a = nn.Linear(width_a, num_classes)
      self.head_b = nn.Linear(width_b, num_classes)

  def _gated(self, fa, fb) -> dict[str, torch.Tensor]:
    if self.gating == "none":
      return {"gated_a": fa, "gated_b": fb}
    ma, mb = self.attention_a(fa), self.attention_b(fb)
    return {"gated_a": fa * mb, "gated_b": fb * ma, "attention_a": ma, "attention_b": mb}

  def forward(self, x) -> dict[str, torch.Tensor]:
    fa = self.backbone(x)["C5"]
    fb = self.backbone_b(x)["C5"]
    if fb.shape[2:] != fa.shape[2:]:
      fb = F.interpolate(fb, size=fa.shape[2:], mode="bilinear", align_corners=True)
    gated = self._gated(fa, fb)
    if self.fusion == "hadamard":
      fused = gated["gated_a"] * gated["gated_b"]
    else:
      fused = torch.cat([gated["gated_a"], gated["gated_b"]], dim=1)
    cams = torch.einsum("bchw,kc->bhwk", fused, self.head.weight) + self.head.bias
    nhwc = lambda t: t.permute(0, 2, 3, 1)
    outputs = {"logits": self.head(self.dropout(fused.mean(dim=(2, 3)))), "cams": cams,
               "features_a": nhwc(fa), "features_b": nhwc(fb),
               **{name: nhwc(value) for name, value in gated.items()}}
    if self.branch_heads:
      outputs["logits_a"] = self.head_a(self.dropout(gated["gated_a"].mean(dim=(2, 3))))
      outputs["logits_b"] = self.head_b(self.dropout(gated["gated_b"].mean(dim=(2, 3))))
    return outputs


def mirror(config: Mapping[str, Any], task: Any) -> CAN:
  """The mirror of `can.build(config, task)` for `config.model.channels`-channel images."""
  model = config["model"]
  fields = can.settings(model)
  return CAN(task.num_classes, model["backbone"], can.backbone_b_config(model), model["channels"],
             gating=fields["gating"], fusion=fields["fusion"], branch_heads=fields["branch_heads"],
             dropout=model["dropout"])


# ---------------------------------------------------------------- losses


def consistency_loss(attention_a, attention_b, weight):
  """`can.consistency_loss` on NHWC maps."""
  def normalised(m):
    m = m.float().mean(dim=-1).flatten(1)
    return F.normalize(m, dim=-1, eps=can.NORM_FLOOR)
  per_example = (normalised(attention_a) - normalised(attention_b)).square().mean(dim=-1)
  return (per_example * weight).sum() / weight.sum().clamp(min=1.0)


def loss(outputs, batch, *, task, config, weight):
  """`can.loss` in torch, on a batch of tensors: (total, {"cls_loss", "att_loss"})."""
  fields = can.loss_settings(config["loss"])
  targets, mask = batch[task.target], batch[task.mask_key]
  classify = lambda logits: torch_modules.classification_loss(
      logits, targets, mask * weight[:, None], config["loss"], task)
  cls = classify(outputs["logits"])
  if fields["att_weight"] == 0:
    return cls, {"cls_loss": cls, "att_loss": torch.zeros_like(cls)}
  if fields["attention_loss"] == "deep_supervision":
    att = classify(outputs["logits_a"]) + classify(outputs["logits_b"])
  else:
    att = consistency_loss(outputs["attention_a"], outputs["attention_b"], weight)
  return cls + fields["att_weight"] * att, {"cls_loss": cls, "att_loss": att}
