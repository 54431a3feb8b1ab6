"""Plain-PyTorch mirrors of every cxr_jax model, built from the same config (torch only).

The backbones use torchvision's exact module names (`features.denseblock1.denselayer1.norm1`,
`layer1.0.conv1`), so their state_dicts also load into torchvision; the baseline *is* torchvision's
classifier layout (`features.*` + `classifier.*`, or `conv1...` + `fc.*`). Like the flax models,
`forward` takes NCHW images (and a method's extra inputs by name) and returns a dict: the
backbones `{"C2".."C5"}`, the methods what their flax models return (`logits`, `cams` NHWC as in
flax, ...). Each method's mirror and torch loss are named in `cxr_jax.interop.registry`;
`cxr_jax.interop.convert` moves weights between the two frameworks.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from cxr_jax import backbones
from cxr_jax.backbones import densenet as flax_densenet
from cxr_jax.backbones import resnet as flax_resnet
from cxr_jax.interop import convert


class _DenseLayer(nn.Module):
  """norm1-relu1-conv1 (1x1)-norm2-relu2-conv2 (3x3); returns only the new features."""

  def __init__(self, in_features: int, growth_rate: int, bn_size: int):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(in_features)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

  def forward(self, x):
    return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
  """Dense layers `denselayer1..n`, each fed the concatenation of everything before it."""

  def __init__(self, num_layers: int, in_features: int, growth_rate: int, bn_size: int):
    super().__init__({f"denselayer{i + 1}": _DenseLayer(in_features + i * growth_rate, growth_rate, bn_size)
                      for i in range(num_layers)})

  def forward(self, x):
    for layer in self.values():
      x = torch.cat([x, layer(x)], dim=1)
    return x


class _Transition(nn.Sequential):
  """norm-relu-conv (1x1)-pool (2x2 average)."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__(collections.OrderedDict(
        norm=nn.BatchNorm2d(in_features), relu=nn.ReLU(),
        conv=nn.Conv2d(in_features, out_features, 1, bias=False), pool=nn.AvgPool2d(2, 2)))


class DenseNet(nn.Module):
  """torchvision's DenseNet `features`; forward returns C2..C5 like `cxr_jax.backbones.DenseNet`."""

  def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
               num_init_features: int = 64, bn_size: int = 4, in_channels: int = 3):
    super().__init__()
    layers = collections.OrderedDict(
        conv0=nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False),
        norm0=nn.BatchNorm2d(num_init_features), relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, 2, padding=1))
    channels = num_init_features
    for i, num_layers in enumerate(block_config):
      layers[f"denseblock{i + 1}"] = _DenseBlock(num_layers, channels, growth_rate, bn_size)
      channels += num_layers * growth_rate
      if i < len(block_config) - 1:
        layers[f"transition{i + 1}"] = _Transition(channels, channels // 2)
        channels //= 2
    layers["norm5"] = nn.BatchNorm2d(channels)
    self.features = nn.Sequential(layers)
    self.num_blocks = len(block_config)
    self.out_channels = channels

  def forward(self, x) -> dict[str, torch.Tensor]:
    f = self.features
    x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
    stages = {}
    for i in range(1, self.num_blocks + 1):
      x = f.get_submodule(f"denseblock{i}")(x)
      if i < self.num_blocks:
        stages[f"C{i + 1}"] = x
        x = f.get_submodule(f"transition{i}")(x)
    stages[f"C{self.num_blocks + 1}"] = F.relu(f.norm5(x))
    return stages


class _Block(nn.Module):
  """torchvision's BasicBlock or Bottleneck, dilated like `cxr_jax.backbones.resnet`."""

  def __init__(self, kind: str, in_features: int, width: int, stride: int, dilation: int):
    super().__init__()
    out_features = width * flax_resnet.EXPANSION[kind]
    if kind == "basic":
      convs = ((in_features, width, 3, stride), (width, out_features, 3, 1))
    else:
      convs = ((in_features, width, 1, 1), (width, width, 3, stride), (width, out_features, 1, 1))
    for i, (cin, cout, kernel, s) in enumerate(convs, start=1):
      d = dilation if kernel == 3 else 1
      setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, stride=s, padding=d * (kernel // 2), dilation=d,
                                          bias=False))
      setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
    self.num_convs = len(convs)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or in_features != out_features:
      self.downsample = nn.Sequential(nn.Conv2d(in_features, out_features, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_features))

  def forward(self, x):
    y = x
    for i in range(1, self.num_convs + 1):
      y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
      if i < self.num_convs:
        y = self.relu(y)
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """torchvision's ResNet without `fc`; forward returns C2..C5 like `cxr_jax.backbones.ResNet`."""

  def __init__(self, stage_sizes: tuple[int, ...] = (3, 4, 6, 3), block: str = "bottleneck",
               output_stride: int = 32, width: int = 64, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, padding=1)
    channels = width
    geometry = flax_resnet.STAGE_GEOMETRY[output_stride]
    for i, (num_blocks, (stride, dilation)) in enumerate(zip(stage_sizes, geometry)):
      stage_width = width * 2**i
      blocks = []
      for j in range(num_blocks):
        blocks.append(_Block(block, channels, stage_width, stride if j == 0 else 1, dilation))
        channels = stage_width * flax_resnet.EXPANSION[block]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.out_channels = channels

  def forward(self, x) -> dict[str, torch.Tensor]:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    stages = {}
    for i in range(1, self.num_stages + 1):
      x = getattr(self, f"layer{i}")(x)
      stages[f"C{i + 1}"] = x
    return stages


def _baseline_class(backbone_cls: type, head: str) -> type:
  """torchvision's classifier layout on `backbone_cls`: the backbone's own keys plus a Linear
  called `head` (`classifier` for DenseNet, `fc` for ResNet), as `densenet*(num_classes=K)`."""

  class Baseline(backbone_cls):
    """The baseline mirror: C5 -> global average pool -> dropout -> linear; CAMs from C5."""

    def __init__(self, num_classes: int, dropout: float = 0.0, **backbone):
      super().__init__(**backbone)
      self.dropout = nn.Dropout(dropout)
      setattr(self, head, nn.Linear(self.out_channels, num_classes))

    def forward(self, x) -> dict[str, Any]:
      stages = super().forward(x)
      linear = getattr(self, head)
      pooled = stages["C5"].mean(dim=(2, 3))
      return {"logits": linear(self.dropout(pooled)),
              "cams": linear(stages["C5"].permute(0, 2, 3, 1)), "pooled": pooled,
              "features": stages}

  Baseline.__name__ = Baseline.__qualname__ = f"{backbone_cls.__name__}Baseline"
  return Baseline


_BACKBONES = {flax_densenet.DenseNet: DenseNet, flax_resnet.ResNet: ResNet}
_BASELINES = {flax_cls: _baseline_class(_BACKBONES[flax_cls], layout[2])
              for flax_cls, layout in convert.TORCHVISION_LAYOUT.items()}


def resolve_mirror(backbone_cfg: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
  """The flax backbone class and the fields its mirror takes (all but dtype and remat)."""
  cls, fields = backbones.resolve(backbone_cfg)
  return cls, {k: v for k, v in fields.items() if k not in ("dtype", "remat")}


def backbone(backbone_cfg: Mapping[str, Any], in_channels: int = 3) -> nn.Module:
  """The mirror of `cxr_jax.backbones.build(backbone_cfg)` for `in_channels`-channel images."""
  cls, fields = resolve_mirror(backbone_cfg)
  return _BACKBONES[cls](**fields, in_channels=in_channels)


def baseline(config: Mapping[str, Any], task: Any) -> nn.Module:
  """The mirror of `cxr_jax.methods.baseline.build(config, task)`."""
  model = config["model"]
  cls, fields = resolve_mirror(model["backbone"])
  return _BASELINES[cls](task.num_classes, model["dropout"], **fields, in_channels=model["channels"])


# Score functions of `cxr_jax.methods.SCORES`, by the same names.
SCORES = {"sigmoid": torch.sigmoid, "softmax": lambda logits: torch.softmax(logits, dim=-1)}


def _masked_mean(values, mask):
  return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _class_counts(targets, mask, loss_config: Mapping[str, Any], task: Any, smoothing: float):
  """Per-class (positives, negatives): the task's training counts, or the batch's plus
  `smoothing`, as `config.loss.class_counts` says."""
  if loss_config["class_counts"] == "train":
    return tuple(torch.as_tensor(np.array(c), device=targets.device) for c in task.counts())
  return ((targets * mask).sum(0) + smoothing, ((1 - targets) * mask).sum(0) + smoothing)


def classification_loss(logits, targets, mask, loss_config: Mapping[str, Any], task: Any = None):
  """`cxr_jax.losses.classification_loss` in torch: BCE, W-CEL, focal or balanced focal over a
  weighted mask."""
  logits = logits.float()
  terms = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
  name = loss_config["name"]
  if name == "balanced_focal":
    pos, neg = _class_counts(targets, mask, loss_config, task, smoothing=1.0)
    total = pos + neg
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    gamma = loss_config["focal_gamma"]
    terms = -(targets * (total / pos.clamp(min=1.0)) * torch.exp(gamma * log_not_p) * log_p
              + (1 - targets) * (total / neg.clamp(min=1.0)) * torch.exp(gamma * log_p) * log_not_p)
  elif name == "wbce":
    pos, neg = _class_counts(targets, mask, loss_config, task, smoothing=0.0)
    total = pos + neg
    w_pos = torch.where(pos > 0, total / pos.clamp(min=1.0), torch.ones_like(pos))
    w_neg = torch.where(neg > 0, total / neg.clamp(min=1.0), torch.ones_like(neg))
    terms = terms * (targets * w_pos + (1 - targets) * w_neg)
  elif name == "focal":
    p = torch.sigmoid(logits)
    p_t = targets * p + (1 - targets) * (1 - p)
    terms = terms * (1 - p_t) ** loss_config["focal_gamma"]
    alpha = loss_config["focal_alpha"]
    if alpha >= 0:
      terms = terms * (targets * alpha + (1 - targets) * (1 - alpha))
  elif name != "bce":
    raise ValueError(f"no torch loss for config.loss.name={name!r}")
  return _masked_mean(terms, mask)


def baseline_loss(outputs, batch, *, task, config, weight):
  """`cxr_jax.methods.baseline.loss` in torch, on a batch of tensors."""
  targets, mask = batch[task.target], batch[task.mask_key]
  value = classification_loss(outputs["logits"], targets, mask * weight[:, None], config["loss"],
                              task)
  return value, {"cls_loss": value}


class Predictor(nn.Module):
  """A method's mirror with its input preparation and score function: the deployable model.

  `forward(image, *inputs)` takes (B, 1, H, W) pixel/255 and then the method's extra inputs in
  their declared order, and returns the method's scores (B, K). `mean` and `std` hold one value
  per model input channel; broadcasting the one-channel image against them is the channel
  replication of `cxr_jax.layers.normalize_images`, so a traced Predictor is the whole model
  (what `cxr_jax.export` writes as `model.pt`).
  """

  def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
               scores: str = "sigmoid", inputs: Sequence[str] = ()):
    super().__init__()
    self.model = model
    self.scores = scores
    self.inputs = tuple(inputs)
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

  def forward(self, x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    outputs = self.model((x - self.mean) / self.std, **dict(zip(self.inputs, inputs)))
    return SCORES[self.scores](outputs["logits"])


class SegmentThenClassify(nn.Module):
  """A segmenter's Predictor feeding its anatomy maps to a classifier's Predictor: the deployable
  model of an anatomy-guided method (Anatomy-XNet) from the image alone.

  `forward(image)` takes (B, 1, H, W) pixel/255 at the classifier's size; the segmenter sees it
  area-resized to `segmenter_size`, its per-pixel probabilities are upsampled bilinearly to H x W
  and their argmax is the anatomy map the classifier reads (as `cxr_jax.pseudolabel` writes
  maps); returns the classifier's scores (B, K).
  """

  def __init__(self, segmenter: Predictor, classifier: Predictor, segmenter_size: int):
    super().__init__()
    self.segmenter, self.classifier, self.segmenter_size = segmenter, classifier, segmenter_size

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    small = F.interpolate(x, size=(self.segmenter_size, self.segmenter_size), mode="area")
    probs = self.segmenter(small).permute(0, 3, 1, 2)
    probs = F.interpolate(probs, size=x.shape[2:], mode="bilinear", align_corners=False)
    return self.classifier(x, probs.argmax(dim=1).to(torch.uint8))
