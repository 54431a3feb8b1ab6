"""Anatomy-XNet (`cxr_jax.methods.anatomy_xnet`) in plain PyTorch: the network with the keys of
`anatomy_xnet.torch_names`, a port of the flax code (see `anatomy_xnet.py` for the wiring). Its
loss is the baseline's (`torch_modules.baseline_loss`).

`mirror(config, task)` is Anatomy-XNet's entry in `cxr_jax.interop.registry`. `forward(x, anatomy)`
takes NCHW images and the (B, H, W) uint8 region-id maps; maps are returned NHWC, as the flax model
returns them. The masks are resized with torch's own `adaptive_avg_pool2d` ("area") or
`interpolate` ("bilinear"), so the parity tests check the flax resize matrices against them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax.interop import torch_modules
from cxr_jax.methods import anatomy_xnet


class AnatomyAwareAttention(nn.Module):
  """`anatomy_xnet.AnatomyAwareAttention` on NCHW maps (keys `avg`, `max`, `masked_avg`,
  `masked_max`, `excite`: 1x1 convs with bias; `bn`)."""

  def __init__(self, channels: int, reduction: float, dropout: float):
    super().__init__()
    hidden = int(channels * reduction)
    for name in anatomy_xnet.DESCRIPTORS:
      self.add_module(name, nn.Conv2d(channels, hidden, 1))
    self.excite = nn.Conv2d(hidden, channels, 1)
    self.dropout = nn.Dropout(dropout)
    self.bn = nn.BatchNorm2d(channels)

  def forward(self, features, mask):
    masked = features * mask
    pooled = {"avg": features.mean(dim=(2, 3), keepdim=True),
              "max": features.amax(dim=(2, 3), keepdim=True),
              "masked_avg": masked.mean(dim=(2, 3), keepdim=True),
              "masked_max": masked.amax(dim=(2, 3), keepdim=True)}
    summed = sum(F.leaky_relu(self.get_submodule(name)(pooled[name]), anatomy_xnet.LEAKY_SLOPE)
                 for name in anatomy_xnet.DESCRIPTORS)
    weight = self.dropout(torch.sigmoid(self.excite(summed)))
    return self.bn(weight * masked + (1 - weight) * features)


class AnatomyXNet(nn.Module):
  """`anatomy_xnet.Model` in torch: forward(x NCHW, anatomy (B, H, W)) returns the flax model's
  outputs under its names."""

  def __init__(self, num_classes: int, backbone_cfg: Mapping[str, Any], in_channels: int,
               groups: tuple[tuple[str, tuple[int, ...]], ...], fusion: str, reduction: float,
               attention_dropout: float, mask_resize: str, dropout: float):
    super().__init__()
    self.backbone = torch_modules.backbone(backbone_cfg, in_channels)
    width = self.backbone.out_channels
    self.group_names = tuple(name for name, _ in groups)
    for name, ids in groups:
      self.add_module(f"a3_{name}", AnatomyAwareAttention(width, reduction, attention_dropout))
      # Not persistent: the config determines the ids, the state_dict holds only weights.
      self.register_buffer(f"ids_{name}", torch.tensor(ids), persistent=False)
    self.fusion, self.mask_resize = fusion, mask_resize
    depth = width * len(groups) if groups and fusion == "concat" else width
    self.classifier = nn.Conv2d(depth, num_classes, 1)
    self.dropout = nn.Dropout(dropout)

  def _mask(self, anatomy, ids, size):
    """(B, H, W) ids -> (B, 1, *size) float: 1 inside the group, resized as `mask_resize`."""
    inside = (anatomy.unsqueeze(-1) == ids).any(dim=-1).unsqueeze(1).float()
    if self.mask_resize == "area":
      return F.adaptive_avg_pool2d(inside, size)
    return F.interpolate(inside, size=size, mode="bilinear", align_corners=False)

  def _attend(self, features, anatomy):
    attended = [self.get_submodule(f"a3_{name}")(
        features, self._mask(anatomy, getattr(self, f"ids_{name}"), features.shape[2:]))
                for name in self.group_names]
    return torch.cat(attended, dim=1) if self.fusion == "concat" else sum(attended)

  def forward(self, x, anatomy=None) -> dict[str, torch.Tensor]:
    features = self.backbone(x)["C5"]
    attended = self._attend(features, anatomy) if self.group_names else features
    cams = self.classifier(attended)  # (B, K, h, w)
    weights = torch.softmax(F.logsigmoid(cams).flatten(2), dim=-1)  # Omega, (B, K, h*w)
    pooled = self.dropout(torch.einsum("bkp,bdp->bkd", weights, attended.flatten(2)))
    logits = torch.einsum("bkd,kd->bk", pooled, self.classifier.weight.flatten(1))
    nhwc = lambda t: t.permute(0, 2, 3, 1)
    return {"logits": logits + self.classifier.bias, "cams": nhwc(cams),
            "features": nhwc(features), "attended": nhwc(attended)}


def mirror(config: Mapping[str, Any], task: Any) -> AnatomyXNet:
  """The mirror of `anatomy_xnet.build(config, task)` for `config.model.channels`-channel
  images."""
  model = config["model"]
  fields = anatomy_xnet.settings(model)
  groups = (anatomy_xnet.group_ids(fields["groups"], task.anatomy_names) if fields["a3"]
            else ())
  return AnatomyXNet(task.num_classes, model["backbone"], model["channels"], groups,
                     fusion=fields["fusion"], reduction=fields["reduction"],
                     attention_dropout=fields["attention_dropout"],
                     mask_resize=fields["mask_resize"], dropout=model["dropout"])
