"""SPF (`cxr_jax.methods.spf`) in plain PyTorch: the network and its loss, a port of the flax code
(see `spf.py` for the design).

`mirror(config, task)` and `loss(outputs, batch, *, task, config, weight)` are SPF's entry in
`cxr_jax.interop.registry`. The backbone is the torchvision-named mirror under `backbone`; every
flatten runs in flax's (h, w, C) order and every map comes out NHWC, so outputs and Linear weights
are flax's as they are. Layer sizes depend on C5's size, hence on `config.data.image_size`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from cxr_jax.interop import torch_modules
from cxr_jax.methods import spf


def nhwc_flatten(x: torch.Tensor) -> torch.Tensor:
  """(B, C, h, w) -> (B, h*w*C) in flax's row-major (h, w, C) order."""
  return x.permute(0, 2, 3, 1).flatten(1)


def standardize(t: torch.Tensor) -> torch.Tensor:
  """`spf.standardize` on (B, C, h, w): per example and channel over (h, w)."""
  mean = t.mean(dim=(2, 3), keepdim=True)
  var = t.var(dim=(2, 3), keepdim=True, unbiased=False)
  return (t - mean) * torch.rsqrt(var + spf.STANDARDIZE_EPS)


def conv_transpose(cin: int, cout: int, bias: bool) -> nn.ConvTranspose2d:
  """`spf.conv_transpose`: a x2 upsampling."""
  return nn.ConvTranspose2d(cin, cout, spf.DECODER_KERNEL, stride=2, padding=spf.DECODER_PADDING,
                            bias=bias)


class ConvBNReLU(nn.Module):
  """`spf.ConvBNReLU`: a 1x1 conv (stride 1), a 3x3 conv (stride 2), or an upsampling, then BN
  and ReLU."""

  def __init__(self, cin: int, cout: int, stride: int = 1, transpose: bool = False):
    super().__init__()
    if transpose:
      self.conv = conv_transpose(cin, cout, bias=False)
    else:
      kernel = 1 if stride == 1 else spf.ENCODER_KERNEL
      self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class ConvAutoencoder(nn.Module):
  """`spf.ConvAutoencoder` for a (channels, *hw) T: forward returns (z, reconstruction NCHW)."""

  def __init__(self, channels: int, hw: tuple[int, int], grid: int, bottleneck_channels: int):
    super().__init__()
    widths = spf.encoder_widths(channels, bottleneck_channels, spf.encoder_steps(hw, grid))
    inputs = [channels, *widths[:-1]]
    self.encoder = nn.ModuleList(ConvBNReLU(cin, cout, stride=2) for cin, cout in zip(inputs, widths))
    restored, sources = inputs[::-1], widths[::-1]
    self.decoder = nn.ModuleList(
        [ConvBNReLU(cin, cout, transpose=True) for cin, cout in zip(sources[:-1], restored[:-1])]
        + [conv_transpose(sources[-1], restored[-1], bias=True)])

  def forward(self, t):
    x = t
    for step in self.encoder:
      x = step(x)
    z = nhwc_flatten(x)
    for step in self.decoder:
      x = step(x)
    return z, x


class DenseAutoencoder(nn.Module):
  """`spf.DenseAutoencoder` for a (channels, h, w) T."""

  def __init__(self, size: int, bottleneck: int):
    super().__init__()
    self.encoder = nn.Linear(size, bottleneck)
    self.decoder = nn.Linear(bottleneck, size)

  def forward(self, t):
    b, c, h, w = t.shape
    z = torch.relu(self.encoder(nhwc_flatten(t)))
    return z, self.decoder(z).reshape(b, h, w, c).permute(0, 3, 1, 2)


class Classifier(nn.Module):
  """`spf.Classifier`: Dropout -> Linear(hidden) -> ReLU -> Dropout -> Linear(K)."""

  def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
    super().__init__()
    self.dropout = nn.Dropout(dropout)
    self.hidden = nn.Linear(in_features, hidden)
    self.output = nn.Linear(hidden, num_classes)

  def forward(self, x):
    return self.output(self.dropout(torch.relu(self.hidden(self.dropout(x)))))


class SPF(nn.Module):
  """`spf.Model` in torch: forward(x NCHW) returns its outputs by name, maps NHWC as in flax."""

  def __init__(self, backbone: nn.Module, c5: tuple[int, int, int], num_classes: int, *,
               head: str, autoencoder: str, reduce_channels: int, grid: int,
               bottleneck_channels: int, hidden: int, dropout: float, stop_gradient_target: bool):
    super().__init__()
    h, w, channels = c5
    self.backbone = backbone
    self.reduce = ConvBNReLU(channels, reduce_channels)
    self.head, self.stop_gradient_target = head, stop_gradient_target
    bottleneck = grid ** 2 * bottleneck_channels
    if head == "spf" and autoencoder == "conv":
      self.autoencoder = ConvAutoencoder(reduce_channels, (h, w), grid, bottleneck_channels)
    elif head == "spf":
      self.autoencoder = DenseAutoencoder(h * w * reduce_channels, bottleneck)
    in_features = {"spf": bottleneck, "gap": reduce_channels, "flatten": h * w * reduce_channels}[head]
    self.classifier = Classifier(in_features, hidden, num_classes, dropout)

  def forward(self, x) -> dict[str, torch.Tensor]:
    t = self.reduce(self.backbone(x)["C5"])
    if self.head == "gap":
      return {"logits": self.classifier(t.mean(dim=(2, 3)))}
    if self.head == "flatten":
      return {"logits": self.classifier(nhwc_flatten(t))}
    z, reconstruction = self.autoencoder(t)
    target = standardize(t)
    if self.stop_gradient_target:
      target = target.detach()
    nhwc = lambda m: m.permute(0, 2, 3, 1)
    return {"logits": self.classifier(z), "z": z, "reconstruction": nhwc(reconstruction),
            "target": nhwc(target)}


def mirror(config: Mapping[str, Any], task: Any) -> SPF:
  """The mirror of `spf.build(config, task)` for `config.data.image_size` images with
  `config.model.channels` channels."""
  model = config["model"]
  c5 = spf.c5_shape(model["backbone"], config["data"]["image_size"], model["channels"])
  backbone = torch_modules.backbone(model["backbone"], in_channels=model["channels"])
  return SPF(backbone, c5, task.num_classes, **spf.settings(model))


def reconstruction_loss(reconstruction, target, weight):
  """`spf.reconstruction_loss`: per-example MSE, averaged over examples weighed by `weight`."""
  per_example = (reconstruction - target).square().mean(dim=(1, 2, 3))
  return (per_example * weight).sum() / weight.sum().clamp(min=1.0)


def loss(outputs, batch, *, task, config, weight):
  """`spf.loss` in torch, on a batch of tensors."""
  targets, mask = batch[task.target], batch[task.mask_key]
  cls_loss = torch_modules.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                               config["loss"], task)
  if "reconstruction" not in outputs:
    return cls_loss, {"cls_loss": cls_loss}
  rec_loss = reconstruction_loss(outputs["reconstruction"], outputs["target"], weight)
  total = cls_loss + spf.loss_settings(config["loss"])["rec_weight"] * rec_loss
  return total, {"cls_loss": cls_loss, "rec_loss": rec_loss}
