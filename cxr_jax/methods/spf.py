"""SPF, spatially-preserving flattening (Srivathsa, Mahmood, Syeda-Mahmood, ISBI 2022): the feature
maps are auto-encoded while they are flattened, and the classifier reads only the autoencoder's
bottleneck, a flattened but still spatially laid-out vector. Backbone, autoencoder and classifier
train jointly. The paper's layer-level design is unknown; every layer below is our choice, named
by its field of `config.model.spf` (`DEFAULTS`; docs/methods/spf.md).

  backbone C5 (B, h, w, C)
  reduce: 1x1 conv -> BN -> ReLU                             T (B, h, w, reduce_channels)
  encoder: n x (3x3 conv stride 2 -> BN -> ReLU)             (B, grid, grid, bottleneck_channels)
  row-major flatten                                          z (B, grid^2 * bottleneck_channels)
  decoder: (n-1) x (4x4 transposed conv x2 -> BN -> ReLU), then a linear 4x4 transposed conv x2
                                                             reconstruction (B, h, w, reduce_channels)
  classifier on z: Dropout -> Dense(hidden) -> ReLU -> Dropout -> Dense(K)

n follows from C5 and the grid: h = w = grid * 2^n. The encoder halves the channels at each step
(never below `bottleneck_channels`) and ends at `bottleneck_channels`; the decoder mirrors it.
z is flattened in (row, column, channel) order, so each run of `bottleneck_channels` entries of z
belongs to one cell of the grid, one coarse image region.

The reconstruction target is T standardised per example and channel over (h, w) (`standardize`),
held constant (stop-gradient) unless `stop_gradient_target=False`: otherwise the backbone could
lower the error by shrinking T rather than by keeping its information in z.

Variants (`config.model.spf`): `autoencoder="fc"` flattens T -> Dense(grid^2 *
bottleneck_channels) -> ReLU = z -> Dense(h*w*reduce_channels) -> T's shape, for small maps; the
baselines `head="gap"` (global average pool of T) and `head="flatten"` (T flattened) feed the
same classifier and have no autoencoder.

Loss: the configured multi-label loss on the logits plus `rec_weight` (`config.loss.spf`,
`LOSS_DEFAULTS`) times the mean squared reconstruction error; rec_weight 0 is the "no
reconstruction loss" ablation, whose `rec_loss` is still logged.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses, methods
from cxr_jax.interop import convert
from cxr_jax.methods import Method, Task

HEADS = ("spf", "gap", "flatten")
AUTOENCODERS = ("conv", "fc")
# Encoder steps: torch Conv2d(3, stride=2, padding=1); decoder steps: ConvTranspose2d(4, stride=2,
# padding=1), which exactly doubles a side, so the decoder undoes the encoder's halvings.
ENCODER_KERNEL = 3
DECODER_KERNEL, DECODER_PADDING = 4, 1
STANDARDIZE_EPS = 1e-5

# `config.model.spf`: the architecture; every value is ours (the paper gives none).
DEFAULTS = dict(
    head="spf",  # what the classifier reads: "spf" (the bottleneck z), "gap" or "flatten" of T
    autoencoder="conv",  # "conv" (strided convs) or "fc" (dense layers on flattened T)
    reduce_channels=256,  # channels of T, the 1x1-reduced C5
    grid=4,  # side of the bottleneck's spatial grid
    bottleneck_channels=64,  # channels per grid cell; z has grid^2 * bottleneck_channels entries
    hidden=512,  # width of the classifier's hidden layer
    dropout=0.5,  # rate of both classifier dropouts (config.model.dropout is not read)
    stop_gradient_target=True,  # the reconstruction target gives no gradient to T
)
# `config.loss.spf`: weight of the reconstruction term in the total.
LOSS_DEFAULTS = dict(rec_weight=1.0)


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.spf` over `DEFAULTS`: the `Model` fields a config sets."""
  return methods.fields(model_cfg.get("spf", {}), "config.model.spf", DEFAULTS,
                        {"head": HEADS, "autoencoder": AUTOENCODERS})


def loss_settings(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.loss.spf` over `LOSS_DEFAULTS`."""
  return methods.fields(loss_cfg.get("spf", {}), "config.loss.spf", LOSS_DEFAULTS)


def encoder_steps(size: tuple[int, int], grid: int) -> int:
  """The number n of stride-2 steps from a (h, w) map down to the grid: h = w = grid * 2^n, n >= 1."""
  h, w = size
  ratio = h // grid
  if h != w or h % grid or ratio < 2 or ratio & (ratio - 1):
    raise ValueError(f"config.model.spf.grid={grid} does not fit the backbone's {h}x{w} C5: the "
                     f"conv autoencoder needs a square C5 whose side is grid * 2^n with n >= 1")
  return ratio.bit_length() - 1


def encoder_widths(reduce_channels: int, bottleneck_channels: int, steps: int) -> list[int]:
  """Output channels of each encoder step: halving from `reduce_channels`, never below the
  bottleneck, and the bottleneck's at the last step (256 -> [128, 64] for the defaults)."""
  return [max(reduce_channels // 2 ** (i + 1), bottleneck_channels) for i in range(steps - 1)] + [
      bottleneck_channels]


def c5_shape(backbone_cfg: Mapping[str, Any], image_size: int, channels: int) -> tuple[int, ...]:
  """(h, w, C) of the backbone's C5 for square `image_size` images, from shapes alone (no
  compute): the torch mirror sizes its layers by it."""
  model = backbones.build(backbone_cfg)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  outputs, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), images)
  return tuple(outputs["C5"].shape[1:])


def standardize(t: jax.Array) -> jax.Array:
  """Each channel of a (B, h, w, C) map to zero mean and unit variance over (h, w), per example,
  in at least float32. Per example rather than batch statistics, so the target of an example
  does not depend on its batch, nor on train or eval mode."""
  t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
  mean = jnp.mean(t, axis=(1, 2), keepdims=True)
  var = jnp.var(t, axis=(1, 2), keepdims=True)
  return (t - mean) * jax.lax.rsqrt(var + STANDARDIZE_EPS)


def conv_transpose(features: int, *, use_bias: bool, dtype: Any, name: str) -> nn.ConvTranspose:
  """A decoder upsampling: torch's ConvTranspose2d(4, stride=2, padding=1), which in flax pads
  k-1-p on each side with the kernel not transposed (convert's "conv_transpose" kind)."""
  pad = DECODER_KERNEL - 1 - DECODER_PADDING
  return nn.ConvTranspose(features, (DECODER_KERNEL, DECODER_KERNEL), strides=(2, 2),
                          padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                          name=name)


class ConvBNReLU(nn.Module):
  """conv -> BN -> ReLU: a 1x1 conv (stride 1), a 3x3 encoder conv (stride 2), or with
  `transpose` a decoder upsampling (`conv_transpose`)."""

  features: int
  stride: int = 1
  transpose: bool = False
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.transpose:
      conv = conv_transpose(self.features, use_bias=False, dtype=self.dtype, name="conv")
    else:
      kernel = 1 if self.stride == 1 else ENCODER_KERNEL
      conv = layers.conv(self.features, kernel, stride=self.stride, padding=kernel // 2,
                         dtype=self.dtype, name="conv")
    x = layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name="bn")(conv(x))
    return nn.relu(x)


class ConvAutoencoder(nn.Module):
  """T (B, h, w, C) -> (z (B, grid^2 * bottleneck_channels), reconstruction like T); the decoder
  reads only the bottleneck map, z before flattening."""

  grid: int
  bottleneck_channels: int
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    widths = encoder_widths(t.shape[-1], self.bottleneck_channels,
                            encoder_steps(t.shape[1:3], self.grid))
    step = dict(train=self.train, dtype=self.dtype)
    x = t
    for i, width in enumerate(widths):
      x = ConvBNReLU(width, stride=2, name=f"encoder_{i}", **step)(x)
    z = x.reshape(x.shape[0], -1)
    # The decoder restores each encoder step's input width, the last step T's, linearly.
    restored = [t.shape[-1], *widths[:-1]][::-1]
    for j, width in enumerate(restored[:-1]):
      x = ConvBNReLU(width, transpose=True, name=f"decoder_{j}", **step)(x)
    x = conv_transpose(restored[-1], use_bias=True, dtype=self.dtype,
                       name=f"decoder_{len(restored) - 1}")(x)
    return z, x


class DenseAutoencoder(nn.Module):
  """The "fc" variant: T flattened -> Dense(size) -> ReLU = z -> Dense(h*w*C) -> T's shape."""

  size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = nn.relu(nn.Dense(self.size, dtype=self.dtype, name="encoder")(t.reshape(t.shape[0], -1)))
    reconstruction = nn.Dense(t[0].size, dtype=self.dtype, name="decoder")(z)
    return z, reconstruction.reshape(t.shape)


class Classifier(nn.Module):
  """Dropout -> Dense(hidden) -> ReLU -> Dropout -> Dense(K) on a (B, D) vector."""

  hidden: int
  num_classes: int
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="output")(x)


class Model(nn.Module):
  """SPF's network (module docstring); fields as in `DEFAULTS`.

  Returns `logits` (B, K) and, for head "spf", the bottleneck `z` (B, D), the `reconstruction`
  and its `target` (B, h, w, reduce_channels), all float32 (or the compute dtype when wider).
  """

  backbone: nn.Module
  num_classes: int
  head: str = DEFAULTS["head"]
  autoencoder: str = DEFAULTS["autoencoder"]
  reduce_channels: int = DEFAULTS["reduce_channels"]
  grid: int = DEFAULTS["grid"]
  bottleneck_channels: int = DEFAULTS["bottleneck_channels"]
  hidden: int = DEFAULTS["hidden"]
  dropout: float = DEFAULTS["dropout"]
  stop_gradient_target: bool = DEFAULTS["stop_gradient_target"]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    c5 = self.backbone(images, train=train)["C5"]
    t = ConvBNReLU(self.reduce_channels, train=train, dtype=self.dtype, name="reduce")(c5)
    classifier = Classifier(self.hidden, self.num_classes, self.dropout, self.dtype,
                            name="classifier")
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    if self.head == "gap":
      return dict(logits=classifier(layers.global_avg_pool(t), train=train).astype(out_dtype))
    if self.head == "flatten":
      return dict(logits=classifier(t.reshape(t.shape[0], -1), train=train).astype(out_dtype))
    if self.autoencoder == "conv":
      autoencoder = ConvAutoencoder(self.grid, self.bottleneck_channels, train, self.dtype,
                                    name="autoencoder")
    else:
      autoencoder = DenseAutoencoder(self.grid ** 2 * self.bottleneck_channels, self.dtype,
                                     name="autoencoder")
    z, reconstruction = autoencoder(t)
    target = standardize(t)
    if self.stop_gradient_target:
      target = jax.lax.stop_gradient(target)
    return dict(logits=classifier(z, train=train).astype(out_dtype), z=z.astype(out_dtype),
                reconstruction=reconstruction.astype(out_dtype), target=target.astype(out_dtype))


def build(config: Mapping[str, Any], task: Task) -> Model:
  """SPF's network for `config.model` (any backbone, `model.spf`) and `config.dtype`; learns
  either target field."""
  loss_settings(config["loss"])  # a bad loss field fails here, at start, not at the first step
  dtype = jnp.dtype(config["dtype"])
  backbone = backbones.build({**config["model"]["backbone"], "dtype": dtype})
  return Model(backbone=backbone, num_classes=task.num_classes, dtype=dtype,
               **settings(config["model"]))


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The mirror's keys (`cxr_jax.interop.torch_spf`): torchvision's backbone keys under
  `backbone.` (`backbone.features.conv0.weight`, `backbone.layer1.0.conv1.weight`), then
  `reduce.conv.weight`, `autoencoder.encoder.0.bn.running_mean`, `autoencoder.decoder.1.weight`,
  `classifier.hidden.weight`, ... The mirror flattens in flax's (h, w, C) order, so no Linear
  needs the NCHW permutation."""
  return convert.TorchNames(
      (convert.backbone_scope(model_cfg["backbone"], flax="backbone", torch="backbone"),
       convert.Scope("", "", ((r"(encoder|decoder)_(\d+)\.", r"\1.\2."),))),
      # The conv decoder's transposed kernels, in a step (`.conv.weight`) or the last one bare.
      kinds=((r"^autoencoder\.decoder\.\d+\.(conv\.)?weight$", "conv_transpose"),))


def reconstruction_loss(reconstruction: jax.Array, target: jax.Array,
                        weight: jax.Array) -> jax.Array:
  """Mean squared error over (h, w, C) per example, averaged over examples weighed by `weight`."""
  per_example = jnp.mean(jnp.square(reconstruction - target), axis=(1, 2, 3))
  return losses.masked_mean(per_example, weight)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """cls_loss (`config.loss`'s multi-label loss) + rec_weight * rec_loss. The heads without an
  autoencoder ("gap", "flatten") have no `rec_loss` term at all."""
  targets, mask = task.targets(batch)
  cls_loss = losses.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                        config["loss"], task)
  if "reconstruction" not in outputs:
    return cls_loss, {"cls_loss": cls_loss}
  rec_loss = reconstruction_loss(outputs["reconstruction"], outputs["target"], weight)
  total = cls_loss + loss_settings(config["loss"])["rec_weight"] * rec_loss
  return total, {"cls_loss": cls_loss, "rec_loss": rec_loss}


METHOD = Method(build=build, loss=loss)
