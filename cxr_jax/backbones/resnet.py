"""ResNet-18/34/50 (He et al., 2016) with torchvision's math (v1.5: stride on the 3x3 conv).

Module names mirror torchvision's (`conv1`, `bn1`, `layer1`..`layer4`), except that a stage's
blocks are `block0`, `block1`, ... (torchvision: `0`, `1`, ...) and a projection shortcut is
`downsample/conv` + `downsample/bn` (torchvision: `downsample.0` + `downsample.1`);
`cxr_jax.interop.convert` holds the rules that map one to the other.

Output stride 16 or 8 dilates the last one or two stages as HAM does: every block of a dilated
stage is dilated (the first included), its 3x3 convs pad by the dilation, and its first block has
stride 1 but keeps its 1x1 projection shortcut. (torchvision's `replace_stride_with_dilation`
instead gives a stage's first block the previous stage's dilation.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax import layers

# torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, untruncated.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Per output stride: (stride, dilation) of stages 1..4.
STAGE_GEOMETRY = {
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}
# Per block kind: output channels as a multiple of the stage width.
EXPANSION = {"basic": 1, "bottleneck": 4}


class _Downsample(nn.Module):
  """The 1x1 projection shortcut: conv (carrying the block's stride) + BatchNorm."""

  features: int
  stride: int
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.features, 1, stride=self.stride, dtype=self.dtype, kernel_init=_KERNEL_INIT,
                    name="conv")(x)
    return layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name="bn")(x)


class _Block(nn.Module):
  """A BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1 expanding by 4)."""

  kind: str
  width: int
  stride: int
  dilation: int
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    out_features = self.width * EXPANSION[self.kind]
    if self.kind == "basic":
      convs = ((self.width, 3, self.stride), (out_features, 3, 1))
    else:
      convs = ((self.width, 1, 1), (self.width, 3, self.stride), (out_features, 1, 1))
    y = x
    for i, (features, kernel, stride) in enumerate(convs, start=1):
      # Only the 3x3 convs are dilated; they pad by the dilation to keep the map size.
      dilation = self.dilation if kernel == 3 else 1
      y = layers.conv(features, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation,
                      dtype=self.dtype, kernel_init=_KERNEL_INIT, name=f"conv{i}")(y)
      y = layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name=f"bn{i}")(y)
      if i < len(convs):
        y = nn.relu(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_features:
      shortcut = _Downsample(out_features, self.stride, self.train, self.dtype, name="downsample")(x)
    return nn.relu(y + shortcut)


class _Stage(nn.Module):
  """`num_blocks` blocks; the first carries the stride, all share the dilation."""

  kind: str
  width: int
  num_blocks: int
  stride: int
  dilation: int
  train: bool
  dtype: Any
  remat: bool

  @nn.compact
  def __call__(self, x):
    specs = [(f"block{i}", (self.kind, self.width, self.stride if i == 0 else 1, self.dilation, self.train,
                            self.dtype))
             for i in range(self.num_blocks)]
    for block in layers.make_blocks(_Block, specs, remat=self.remat):
      x = block(x)
    return x


class ResNet(nn.Module):
  """ResNet feature extractor; returns the outputs of layer1..layer4 as C2..C5.

  Attributes:
    stage_sizes: number of blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50).
    output_stride: 32, 16 or 8 (see the module docstring).
    width: channels of the stem and of stage 1's 3x3 convs, doubling per stage (torchvision: 64);
      narrower ResNets train on the phantom on a CPU.
    dtype: compute dtype; parameters stay float32.
    remat: recompute each block in the backward pass instead of storing its activations.
  """

  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  block: str = "bottleneck"
  output_stride: int = 32
  width: int = 64
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
    """Maps NHWC images with any channel count to the stage feature maps."""
    if self.output_stride not in STAGE_GEOMETRY:
      raise ValueError(f"output_stride must be one of {sorted(STAGE_GEOMETRY)}, got {self.output_stride}")
    if self.block not in EXPANSION:
      raise ValueError(f"block must be one of {sorted(EXPANSION)}, got {self.block!r}")
    x = layers.conv(self.width, 7, stride=2, padding=3, dtype=self.dtype, kernel_init=_KERNEL_INIT, name="conv1")(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = {}
    geometry = STAGE_GEOMETRY[self.output_stride]
    for i, (num_blocks, (stride, dilation)) in enumerate(zip(self.stage_sizes, geometry)):
      x = _Stage(self.block, self.width * 2**i, num_blocks, stride, dilation, train, self.dtype, self.remat,
                 name=f"layer{i + 1}")(x)
      stages[f"C{i + 2}"] = x
    return stages
