"""DenseNet (Huang et al., 2017) with torchvision's exact layer structure and module names.

`DenseNet()` is DenseNet-121; DenseNet-169 and -201 differ only in `block_config`. Sub-modules
are named as in torchvision's `features` (`conv0`, `norm0`, `denseblock1/denselayer1/norm1`,
`transition1/conv`, `norm5`), so `cxr_jax.interop.convert` maps weights by rule.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax import layers

# torchvision's `nn.init.kaiming_normal_(m.weight)`: fan_in, ReLU gain, untruncated normal.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class _DenseLayer(nn.Module):
  """norm1-relu-conv1 (1x1 bottleneck)-norm2-relu-conv2 (3x3); returns only the new features."""

  growth_rate: int
  bn_size: int
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self._norm("norm1")(x))
    x = layers.conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, kernel_init=_KERNEL_INIT,
                    name="conv1")(x)
    x = nn.relu(self._norm("norm2")(x))
    return layers.conv(self.growth_rate, 3, padding=1, dtype=self.dtype, kernel_init=_KERNEL_INIT,
                       name="conv2")(x)

  def _norm(self, name):
    return layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name=name)


class _DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of the block input and all earlier outputs."""

  num_layers: int
  growth_rate: int
  bn_size: int
  train: bool
  dtype: Any
  remat: bool

  @nn.compact
  def __call__(self, x):
    args = (self.growth_rate, self.bn_size, self.train, self.dtype)
    specs = [(f"denselayer{i + 1}", args) for i in range(self.num_layers)]
    for layer in layers.make_blocks(_DenseLayer, specs, remat=self.remat):
      x = jnp.concatenate([x, layer(x)], axis=-1)
    return x


class _Transition(nn.Module):
  """norm-relu-conv (1x1, halves the channels)-avgpool 2x2/2."""

  features: int
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name="norm")(x))
    x = layers.conv(self.features, 1, dtype=self.dtype, kernel_init=_KERNEL_INIT, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet feature extractor; returns the stage outputs C2..C5 (strides 4, 8, 16, 32).

  C2..C4 are the outputs of dense blocks 1..3 (before their transitions); C5 is
  relu(norm5(denseblock4)), the map torchvision's classifier pools.

  Attributes:
    growth_rate: channels each dense layer adds.
    block_config: number of dense layers in each of the four blocks.
    num_init_features: channels of the stem conv.
    bn_size: bottleneck width of a dense layer, in multiples of `growth_rate`.
    dtype: compute dtype; parameters stay float32.
    remat: recompute each dense layer in the backward pass instead of storing its activations.
  """

  growth_rate: int = 32
  block_config: tuple[int, ...] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
    """Maps NHWC images with any channel count to the stage feature maps."""
    x = layers.conv(self.num_init_features, 7, stride=2, padding=3, dtype=self.dtype,
                    kernel_init=_KERNEL_INIT, name="conv0")(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="norm0")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = {}
    channels = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = _DenseBlock(num_layers, self.growth_rate, self.bn_size, train, self.dtype, self.remat,
                      name=f"denseblock{i + 1}")(x)
      channels += num_layers * self.growth_rate
      if i < len(self.block_config) - 1:
        stages[f"C{i + 2}"] = x
        channels //= 2
        x = _Transition(channels, train, self.dtype, name=f"transition{i + 1}")(x)
    x = layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="norm5")(x)
    stages[f"C{len(self.block_config) + 1}"] = nn.relu(x)
    return stages
