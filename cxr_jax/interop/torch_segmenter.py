"""The anatomy segmenter (`cxr_jax.methods.segmenter`) in plain PyTorch, with the keys of
`segmenter.torch_names`, and its loss; each a port of the flax code.

`mirror(config, task)` and `loss(outputs, batch, *, task, config, weight)` are the segmenter's
entry in `cxr_jax.interop.registry`. `logits` are returned NHWC (B, H, W, K), as the flax model
returns them, so the exported predictor's softmax runs over the last axis.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax.interop import torch_modules
from cxr_jax.methods import segmenter


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
  """`segmenter.upsample`: bilinear, half-pixel centres."""
  if tuple(x.shape[2:]) == tuple(size):
    return x
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DecoderBlock(nn.Module):
  """`segmenter.DecoderBlock` (keys `conv{1,2}.weight`, `bn{1,2}.*`)."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(features)

  def forward(self, x, skip):
    x = torch.cat([upsample(x, skip.shape[2:]), skip], dim=1)
    x = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(x)))


def stage_channels(backbone: nn.Module, in_channels: int) -> dict[str, int]:
  """Channels of each stage output, read off one small forward pass in eval mode (so no
  BatchNorm statistic moves)."""
  backbone.eval()
  with torch.no_grad():
    stages = backbone(torch.zeros(1, in_channels, 64, 64))
  backbone.train()
  return {name: value.shape[1] for name, value in stages.items()}


class Segmenter(nn.Module):
  """`segmenter.Model` in torch: forward(x NCHW) returns {"logits": (B, H, W, K)}."""

  def __init__(self, num_classes: int, backbone_cfg: Mapping[str, Any], in_channels: int,
               decoder_features: Sequence[int]):
    super().__init__()
    self.backbone = torch_modules.backbone(backbone_cfg, in_channels)
    channels = stage_channels(self.backbone, in_channels)
    width = channels["C5"]
    for i, (skip, features) in enumerate(zip(segmenter.SKIPS, decoder_features)):
      # Named decoder0.. as in flax (an nn.ModuleList would add a `.N.` level to the keys).
      self.add_module(f"decoder{i}", DecoderBlock(width + channels[skip], features))
      width = features
    self.classifier = nn.Conv2d(width, num_classes, 1)

  def forward(self, x) -> dict[str, torch.Tensor]:
    stages = self.backbone(x)
    y = stages["C5"]
    for i, skip in enumerate(segmenter.SKIPS):
      y = getattr(self, f"decoder{i}")(y, stages[skip])
    logits = upsample(self.classifier(y), x.shape[2:])
    return {"logits": logits.permute(0, 2, 3, 1)}


def mirror(config: Mapping[str, Any], task: Any) -> Segmenter:
  """The mirror of `segmenter.build(config, task)` for `config.model.channels`-channel images."""
  model = config["model"]
  return Segmenter(task.num_classes, model["backbone"], model["channels"],
                   segmenter.settings(model)["decoder_features"])


def loss(outputs, batch, *, task, config, weight):
  """`segmenter.loss` in torch: (total, {"seg_ce", "seg_dice"})."""
  fields = segmenter.loss_settings(config["loss"])
  logits = outputs["logits"].float()
  onehot = F.one_hot(batch["anatomy"].long(), task.num_classes).float()
  per_pixel = -(onehot * F.log_softmax(logits, dim=-1)).sum(-1)
  ce = (per_pixel.mean(dim=(1, 2)) * weight).sum() / weight.sum().clamp(min=1.0)
  probs, w = torch.softmax(logits, dim=-1), weight[:, None, None, None]
  overlap = (probs * onehot * w).sum(dim=(0, 1, 2))
  total = ((probs + onehot) * w).sum(dim=(0, 1, 2))
  dice = (2 * overlap + fields["dice_smooth"]) / (total + fields["dice_smooth"])
  present = (onehot * w).sum(dim=(0, 1, 2)) > 0
  present[0] = False
  dice_loss = 1.0 - torch.where(present, dice, torch.zeros_like(dice)).sum() / present.sum().clamp(min=1)
  return (fields["ce_weight"] * ce + fields["dice_weight"] * dice_loss,
          {"seg_ce": ce, "seg_dice": dice_loss})
