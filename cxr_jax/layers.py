"""Small layers shared by backbones and methods.

Convolutions take explicit paddings (never 'SAME', which pads strided layers differently from
PyTorch) and BatchNorm uses PyTorch's defaults, so that weights move between the two frameworks
unchanged (see `cxr_jax.interop.convert`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's BatchNorm2d defaults (momentum 0.1 on the new statistic, eps 1e-5) in flax's terms.
# One training-time difference remains: torch updates running_var with the unbiased batch
# variance, flax with the biased one (a factor n/(n-1), n = batch x height x width per channel).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

PRESETS = {
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "unit": {"mean": 0.5, "std": 0.5},
}


class PointwiseConv(nn.Module):
  """A bias-free 1x1 stride-1 convolution computed as a matmul over the channel axis.

  The parameter (`kernel`, shape (1, 1, in, out), float32) and the math are `nn.Conv`'s. XLA:CPU
  runs a convolution's weight gradient as a whole-image convolution of transposed activations;
  as a matmul it needs no transposes, and DenseNet-121's train step is 15-25% faster on CPU.
  """

  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.dot(x, kernel[0, 0])


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    dtype: Any = jnp.float32,
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
    name: str | None = None,
) -> nn.Module:
  """A bias-free square conv with PyTorch's Conv2d geometry (symmetric explicit padding).

  The default init is PyTorch's `kaiming_normal_` (fan_in, ReLU gain, untruncated). A 1x1
  stride-1 conv is a `PointwiseConv`, with the same parameter.
  """
  if kernel == 1 and stride == 1 and padding == 0:
    return PointwiseConv(features, dtype=dtype, kernel_init=kernel_init, name=name)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      kernel_dilation=(dilation, dilation),
      use_bias=False,
      dtype=dtype,
      kernel_init=kernel_init,
      name=name,
  )


def normalize_images(
    images: jnp.ndarray,
    *,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    channels: int,
    dtype: Any = jnp.float32,
) -> jnp.ndarray:
  """Maps uint8 images (B, H, W, 1) to `(x / 255 - mean) / std` with `channels` channels.

  A grayscale image is replicated to 3 channels when `channels == 3` (ImageNet-pretrained stems).
  `mean` and `std` are scalars or one value per output channel (see `PRESETS`). The arithmetic
  runs in float32; the result is cast to `dtype`.
  """
  if images.shape[-1] not in (1, channels):
    raise ValueError(f"images have {images.shape[-1]} channels; expected 1 or {channels}")
  mean = jnp.asarray(mean, jnp.float32).reshape(-1)
  std = jnp.asarray(std, jnp.float32).reshape(-1)
  for stat_name, stat in (("mean", mean), ("std", std)):
    if stat.size not in (1, channels):
      raise ValueError(f"{stat_name} has {stat.size} values; expected 1 or {channels}")
  x = images.astype(jnp.float32) / 255.0
  x = jnp.broadcast_to(x, (*x.shape[:-1], channels))
  return ((x - mean) / std).astype(dtype)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the spatial axes of an NHWC map: (B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))


def make_blocks(block_cls: type[nn.Module], specs: Sequence[tuple[str, tuple[Any, ...]]], *,
                remat: bool) -> list[nn.Module]:
  """One `block_cls(*args, name=name)` per `(name, args)` in `specs`, for a backbone stage's loop.

  Call it inside a compact method: the blocks become submodules of that module. With `remat`,
  each block is recomputed in the backward pass instead of storing its activations; `nn.remat`
  wraps the class only, so parameter names and shapes, on which torchvision's weight mapping
  relies, are the same either way.
  """
  cls = nn.remat(block_cls) if remat else block_cls
  return [cls(*args, name=name) for name, args in specs]


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) float64 weights of 1-D linear interpolation with torch's align_corners=True: output i
  samples input position i * (in - 1) / (out - 1), so the end pixels' centres meet. Shared by the
  device-side resize below and the host-side one of `cxr_jax.metrics.localization`."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = scale * np.arange(out_size)
  low = np.minimum(np.floor(src).astype(int), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix


def resize_align_corners(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w, K) maps to (B, *size, K), as torch's
  `F.interpolate(mode="bilinear", align_corners=True)`. (`jax.image.resize` uses half-pixel
  centres, which shifts the maps by up to half a CAM pixel.)"""
  rows = jnp.asarray(align_corners_matrix(size[0], maps.shape[1]), maps.dtype)
  cols = jnp.asarray(align_corners_matrix(size[1], maps.shape[2]), maps.dtype)
  # Exact weights: the slope-100 sigmoid that follows amplifies any rounding 25 times.
  return jnp.einsum("yh,bhwk,xw->byxk", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)
