"""HAM (`cxr_jax.methods.ham`) in plain PyTorch: the network with the authors' state_dict keys and
their training losses, each a term-by-term port of the flax code (see `ham.py` for the maths).

`mirror(config, task)` and `loss(outputs, batch, *, task, config, weight)` are HAM's entry in
`cxr_jax.interop.registry`. The mirror subclasses the ResNet mirror, so the backbone keeps
torchvision's unprefixed keys (`conv1.weight`, `layer3.0.conv2.weight`) and the authors' key order
follows: backbone, `fa_layer`, `cls_head`, `anomaly_fc`, `cls_fc`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax.interop import torch_modules
from cxr_jax.metrics import localization
from cxr_jax.methods import ham


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
  """The authors' nn.Sequential(conv3x3, BN), keys `0.weight`, `1.*`."""
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class FABlock(nn.Module):
  """`ham.FABlock` on NCHW maps: channel gate from a softmax-weighted global context, and a
  one-channel spatial term times `gamma` added to every channel."""

  def __init__(self, channels: int, reduction: int = 8):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1))  # first, as in the authors' key order
    self.conv1 = nn.Conv2d(channels, 1, 1, bias=False)
    self.channel_fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                    nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())
    self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
    self.conv3 = nn.Conv2d(channels, 1, 1, bias=False)
    self.conv4 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    self.bn4 = nn.BatchNorm2d(1)

  def forward(self, x):
    attention = torch.softmax(self.conv1(x).flatten(1), dim=-1)  # (B, HW)
    context = torch.einsum("bp,bcp->bc", attention, x.flatten(2))
    gated = self.conv2(x) * self.channel_fc(context)[:, :, None, None]
    t = self.conv3(gated)
    return self.gamma * (t * torch.sigmoid(self.bn4(self.conv4(t)))) + x


class FAModule(nn.Module):
  """`ham.FAModule`: conva (conv3x3 + BN) -> FABlock -> convb (conv3x3 + BN), no ReLU."""

  def __init__(self, in_channels: int, features: int = 512):
    super().__init__()
    self.conva = _conv_bn(in_channels, features)
    self.fa = FABlock(features)
    self.convb = _conv_bn(features, features)

  def forward(self, x):
    return self.convb(self.fa(self.conva(x)))


def lse_pool(x, r: float = ham.LSE_R):
  """`ham.lse_pool` on (B, C, H, W) -> (B, C)."""
  return (torch.logsumexp(r * x.flatten(2), dim=-1) - math.log(x.shape[2] * x.shape[3])) / r


def refine_cams(maps, size):
  """`ham.refine_cams` on (B, K, h, w) maps: align-corners upsampling to `size`, per-map min-max
  (a zero range becomes 1e-5), sigmoid(100 (N - 0.4))."""
  up = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
  low = up.amin(dim=(2, 3), keepdim=True)
  spread = up.amax(dim=(2, 3), keepdim=True) - low
  normalized = (up - low) / torch.where(spread == 0, torch.full_like(spread, ham.ZERO_RANGE), spread)
  return torch.sigmoid(ham.CAM_W * (normalized - ham.CAM_SIGMA))


def pool(x, pooling: str, lse_r: float):
  """`ham.pool` on (B, C, H, W) -> (B, C)."""
  return lse_pool(x, lse_r) if pooling == "lse" else x.mean(dim=(2, 3))


class HAM(torch_modules.ResNet):
  """`ham.Model` in torch: forward(x NCHW) returns its outputs by name, maps NHWC as in flax."""

  def __init__(self, num_classes: int, fa: bool = True, fa_features: int = 512,
               head_features: int = 512, dropout: float = 0.1, pooling: str = "lse",
               lse_r: float = ham.LSE_R, **backbone):
    super().__init__(**backbone)
    self.fa_layer = FAModule(self.out_channels, fa_features) if fa else None
    self.cls_head = nn.Sequential(
        nn.Conv2d(self.out_channels + (fa_features if fa else 0), head_features, 3, padding=1,
                  bias=False),
        nn.BatchNorm2d(head_features), nn.ReLU(), nn.Dropout2d(dropout))
    self.anomaly_fc = nn.Linear(head_features, 1, bias=False)
    self.cls_fc = nn.Linear(head_features, num_classes, bias=False)
    self.pooling, self.lse_r = pooling, lse_r

  def forward(self, x) -> dict[str, torch.Tensor]:
    e4 = super().forward(x)["C5"]
    fused = e4 if self.fa_layer is None else torch.cat([e4, self.fa_layer(e4)], dim=1)
    fmap = self.cls_head(fused)
    pooled = pool(fmap, self.pooling, self.lse_r)
    outputs = {"pooled": pooled}
    for name, head in (("abnormality", self.anomaly_fc), ("disease", self.cls_fc)):
      # The CAMs read the head weights detached (HAM's `.detach()`): only the logits train them.
      cams = F.relu(torch.einsum("bchw,kc->bkhw", fmap, head.weight.detach()))
      outputs[name] = (head(pooled), cams, refine_cams(cams, x.shape[2:]))
    logit, cam, refined = outputs.pop("abnormality")
    logits, cams, refined_cams = outputs.pop("disease")
    nhwc = lambda t: t.permute(0, 2, 3, 1)
    return dict(logits=logits, abnormality_logit=logit[:, 0], cams=nhwc(cams),
                abnormality_cam=nhwc(cam), refined_cams=nhwc(refined_cams),
                refined_abnormality_cam=nhwc(refined), pooled=pooled)


def mirror(config: Mapping[str, Any], task: Any) -> HAM:
  """The mirror of `ham.build(config, task)` for `config.model.channels`-channel images."""
  # ham's own backbone defaults (output stride 8), so both frameworks build the same ResNet.
  _, fields = torch_modules.resolve_mirror(ham.backbone_config(config["model"]["backbone"]))
  return HAM(task.num_classes, **ham.settings(config["model"]), **fields,
             in_channels=config["model"]["channels"])


# ---------------------------------------------------------------- losses (`ham.ham_losses`)


def clamped_bce(logits, targets):
  """`ham.clamped_bce`: torch's own BCELoss on the sigmoid, logs clamped at -100 (as HAM's code)."""
  return F.binary_cross_entropy(torch.sigmoid(logits), targets, reduction="none")


def bce_loss(logits, targets, weight):
  """`ham.bce_loss`: mean clamped BCE, each example weighed by `weight` (B,)."""
  example_weight = weight.reshape(weight.shape + (1,) * (logits.ndim - 1)).expand_as(logits)
  return (clamped_bce(logits, targets) * example_weight).sum() / example_weight.sum().clamp(min=1.0)


def _mean_over_present(per_class, class_weight):
  """`ham._mean_over_present`: sum over classes / number of classes with any weight (at least 1)."""
  present = (class_weight.sum(0) > 0).sum()
  return per_class.sum() / present.clamp(min=1)


def box_loss(refined_cams, masks, helper, bbox_tags, weight):
  """`ham.box_loss` (HAM's `exClsLoss`): per-class soft Dice over the batch's helper images."""
  box_weight = bbox_tags * (helper * weight)[:, None]
  squared_error = (refined_cams - masks).square().sum(dim=(1, 2))
  mass = refined_cams.sum(dim=(1, 2)) + masks.sum(dim=(1, 2))
  per_class = (squared_error * box_weight).sum(0) / (mass * box_weight).sum(0).clamp(min=ham.FLOOR)
  return _mean_over_present(per_class, box_weight)


def _hidden_maps(cams, abnormality_cam, labels):
  """`ham._hidden_maps`: raw (B, h, w, K) / (B, h, w, 1) maps with negative labels zeroed."""
  abnormal = labels.amax(dim=-1)
  return cams * labels[:, None, None, :], abnormality_cam * abnormal[:, None, None, None]


def _uncovered_fraction(inner, outer):
  """`ham._uncovered_fraction`: the share of `inner`'s confident mass not under `outer`."""
  covered = torch.minimum(inner, outer) * torch.sigmoid(ham.CAM_W * (inner - ham.CAM_LOSS_THRESHOLD))
  total = inner.sum(dim=(1, 2))
  return (total - covered.sum(dim=(1, 2))) / total.clamp(min=ham.FLOOR)


def _weighted_average(values, weights):
  return (values * weights).sum(0) / weights.sum(0).clamp(min=ham.FLOOR)


def bound_loss(cams, abnormality_cam, labels, weight):
  """`ham.bound_loss` (HAM's `boundLoss`): disease CAM mass outside the abnormality CAM."""
  disease, abnormality = _hidden_maps(cams, abnormality_cam, labels)
  class_weight = labels * weight[:, None]
  return _mean_over_present(
      _weighted_average(_uncovered_fraction(disease, abnormality), class_weight), class_weight)


def union_loss(cams, abnormality_cam, labels, weight):
  """`ham.union_loss` (HAM's training `unionLoss`): abnormality CAM mass outside the positive
  classes' max CAM, averaged over the abnormal examples."""
  disease, abnormality = _hidden_maps(cams, abnormality_cam, labels)
  per_example = _uncovered_fraction(abnormality, disease.amax(dim=-1, keepdim=True))[:, 0]
  return _weighted_average(per_example, labels.amax(dim=-1) * weight)


def ham_losses(outputs, labels, masks, helper, bbox_tags, weight,
               loss_weights: Mapping[str, float] = ham.LOSS_WEIGHTS):
  """`ham.ham_losses` in torch: (weighted total, the five unweighted terms by the same names)."""
  abnormal = labels.amax(dim=-1)
  terms = {
      "ano_loss": bce_loss(outputs["abnormality_logit"].reshape(abnormal.shape), abnormal, weight),
      "cls_loss": bce_loss(outputs["logits"], labels, weight),
      "ex_loss": box_loss(outputs["refined_cams"], masks, helper, bbox_tags, weight),
      "bound_loss": bound_loss(outputs["cams"], outputs["abnormality_cam"], labels, weight),
      "union_loss": union_loss(outputs["cams"], outputs["abnormality_cam"], labels, weight),
  }
  return sum(loss_weights[name] * value for name, value in terms.items()), terms


def box_masks(boxes, box_labels, num_classes: int, size: int):
  """`ham.box_masks`: (B, size, size, K) per-class unions of the boxes, as the evaluators draw them."""
  col0, row0, col1, row1 = localization.box_pixel_ranges(boxes, size, torch).unbind(-1)
  pixels = torch.arange(size, dtype=col0.dtype)
  inside = lambda low, high: ((pixels >= low[..., None]) & (pixels < high[..., None])).float()
  classes = (box_labels[..., None] == torch.arange(num_classes)).float()
  return torch.einsum("bnh,bnw,bnk->bhwk", inside(row0, row1), inside(col0, col1),
                      classes).clamp(max=1.0)


def loss(outputs, batch, *, task, config, weight):
  """HAM's loss on a batch of tensors, with the flax method's adapter: unlabelled entries count as
  negatives (labels = target * mask), box masks of the `box_supervised` images, and the weights of
  `config.loss.ham_weights` (the authors' when absent)."""
  labels = batch[task.target] * batch[task.mask_key]
  refined = outputs["refined_cams"]
  masks = box_masks(batch["boxes"], batch["box_labels"], task.num_classes, refined.shape[1])
  bbox_tags = (batch["box_labels"][..., None] == torch.arange(task.num_classes)).any(dim=1)
  return ham_losses(outputs, labels, masks.to(refined.dtype),
                    batch["box_supervised"].to(refined.dtype), bbox_tags.to(refined.dtype), weight,
                    loss_weights=config["loss"].get("ham_weights", ham.LOSS_WEIGHTS))
