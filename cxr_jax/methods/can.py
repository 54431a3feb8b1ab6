"""CAN (Ma, Wang, Hoi, "Multi-label Thoracic Disease Image Classification with Cross-Attention
Networks", MICCAI 2019): two backbones fused by a Hadamard product, trained with a multi-label
balance loss and an attention loss. The paper's verified core is the two DenseNet-121 branches,
the element-wise product of their spatially aligned maps, and the loss's two parts and purposes;
the wiring below and every loss formula are our reading (docs/methods/can.md), each a field.

  branch A: `backbone` -> F_A (B, h, w, C);  branch B: `backbone_b` -> F_B, resized (align
            corners) to F_A's size when its backbone differs
  gating "cross": M_A = sigmoid(BN(conv1x1(F_A))), M_B likewise (`attention_a`, `attention_b`);
            G_A = F_A * M_B, G_B = F_B * M_A, each branch gated by the other's map
  gating "none": G_A = F_A, G_B = F_B
  fusion "hadamard": H = G_A * G_B;  "concat": H = [G_A, G_B]
  head: GAP(H) -> dropout -> `head` Dense(K) -> `logits`; `cams` = `head` at every position of H
  branch heads (`branch_heads`): GAP(G_A) -> dropout -> `head_a` -> `logits_a`; B likewise

`gating="none", fusion="hadamard", branch_heads=False` is the plain minimum H = F_A * F_B
(`PLAIN_HADAMARD`).

Symmetry. Two branches that start from the same weights (one ImageNet file for both backbones
through `config.init_from=PATH`), see the same image and are wired and trained symmetrically stay
equal, and H collapses to F^2. Here the attention convs and branch heads are initialised from
different keys and the two branch heads draw different dropout masks, so the branches part after
the first step even then; `symmetric=True` switches both off (one key, one mask), the ablation that
shows the collapse. Different weights for branch B (`init_from=backbone=A,backbone_b=B`, or another
`backbone_b`) break it further.

The loss (`config.loss.can` over `LOSS_DEFAULTS`) is

  cls(logits) + att_weight * attention loss

where cls is `config.loss`'s classification loss (CAN's recipes set `balanced_focal`, the
multi-label balance loss of `cxr_jax.losses`; `bce` is the "plain BCE" ablation) and the attention
loss is "deep_supervision", cls(logits_a) + cls(logits_b), or "consistency", the mean squared
difference of the two branches' channel-mean attention maps, each L2-normalised over positions.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses, methods
from cxr_jax.interop import convert
from cxr_jax.methods import Method, Task

GATINGS = ("cross", "none")
FUSIONS = ("hadamard", "concat")
ATTENTION_LOSSES = ("deep_supervision", "consistency")
NORM_FLOOR = 1e-12  # the attention maps' L2 norm floor in the consistency loss
# Kernel initialisers: the attention convs as every conv here (PyTorch's kaiming_normal_), the
# heads as flax's Dense.
ATTENTION_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
HEAD_INIT = nn.initializers.lecun_normal()


class AttentionMap(nn.Module):
  """1x1 conv (bias-free) -> BatchNorm -> sigmoid: a branch's attention map, `features` wide."""

  features: int
  kernel_init: Callable[..., jax.Array] = ATTENTION_INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv(self.features, 1, kernel_init=self.kernel_init, dtype=self.dtype,
                    name="conv")(x)
    return nn.sigmoid(layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                                       name="bn")(x))


def _keyed(init: Callable[..., jax.Array], key: jax.Array) -> Callable[..., jax.Array]:
  """`init` with its key replaced by `key`: two modules given one key start equal."""
  return lambda _, shape, dtype=jnp.float32: init(key, shape, dtype)


class Model(nn.Module):
  """CAN's network; see the module docstring.

  Attributes:
    backbone, backbone_b: branches A and B (independent weights).
    num_classes: K.
    gating, fusion, branch_heads, symmetric: the `config.model.can` fields (`DEFAULTS`).
    dropout: the rate before every linear head.
    dtype: compute dtype of the backbones and attention maps; fusion and heads run in at least
      float32.
  """

  backbone: nn.Module
  backbone_b: nn.Module
  num_classes: int
  gating: str = "cross"
  fusion: str = "hadamard"
  branch_heads: bool = True
  symmetric: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def _branch_inits(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kernel initialisers of the branch-specific layers: flax's own per-module keys, or with
    `symmetric` one shared key per layer kind, so A's and B's layers start equal."""
    if not self.symmetric or not self.is_initializing():
      return {}, {}
    attention_key, head_key = jax.random.split(self.make_rng("params"))
    shared = dict(attention=_keyed(ATTENTION_INIT, attention_key),
                  head=_keyed(HEAD_INIT, head_key))
    return shared, shared

  def _gated(self, fa: jax.Array, fb: jax.Array, train: bool, inits) -> dict[str, jax.Array]:
    """G_A, G_B and, with cross gating, the attention maps M_A, M_B."""
    if self.gating == "none":
      return dict(gated_a=fa, gated_b=fb)
    maps = {}
    for branch, x, width, init in (("a", fa, fb.shape[-1], inits[0]),
                                   ("b", fb, fa.shape[-1], inits[1])):
      kw = {"kernel_init": init["attention"]} if init else {}
      maps[branch] = AttentionMap(width, dtype=self.dtype, name=f"attention_{branch}", **kw)(
          x, train=train).astype(fa.dtype)
    return dict(gated_a=fa * maps["b"], gated_b=fb * maps["a"], attention_a=maps["a"],
                attention_b=maps["b"])

  def _branch_logits(self, gated: Mapping[str, jax.Array], train: bool, inits) -> dict:
    """`logits_a`, `logits_b` of the deep-supervision heads (dropout masks drawn per head, or
    one mask for both with `symmetric`)."""
    rng = self.make_rng("dropout") if train and self.symmetric and self.dropout > 0 else None
    out = {}
    for branch, init in (("a", inits[0]), ("b", inits[1])):
      pooled = layers.global_avg_pool(gated[f"gated_{branch}"])
      dropped = nn.Dropout(self.dropout, deterministic=not train)(pooled, rng=rng)
      kw = {"kernel_init": init["head"]} if init else {}
      out[f"logits_{branch}"] = nn.Dense(self.num_classes, name=f"head_{branch}", **kw)(dropped)
    return out

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    wide = jnp.promote_types(self.dtype, jnp.float32)
    fa = self.backbone(images, train=train)["C5"]
    fb = self.backbone_b(images, train=train)["C5"]
    if fb.shape[1:3] != fa.shape[1:3]:
      fb = layers.resize_align_corners(fb, fa.shape[1:3])
    if self.fusion == "hadamard" and fa.shape[-1] != fb.shape[-1]:
      raise ValueError(f"config.model.can.fusion='hadamard' multiplies the branches' maps, whose "
                       f"channels differ ({fa.shape[-1]} vs {fb.shape[-1]}): use backbones of "
                       f"one width, or fusion='concat'")
    fa, fb = fa.astype(wide), fb.astype(wide)
    inits = self._branch_inits()
    gated = self._gated(fa, fb, train, inits)
    if self.fusion == "hadamard":
      fused = gated["gated_a"] * gated["gated_b"]
    else:
      fused = jnp.concatenate([gated["gated_a"], gated["gated_b"]], axis=-1)
    head = nn.Dense(self.num_classes, name="head")
    logits = head(nn.Dropout(self.dropout, deterministic=not train)(
        layers.global_avg_pool(fused)))
    outputs = dict(logits=logits, cams=head(fused), features_a=fa, features_b=fb, **gated)
    if self.branch_heads:
      outputs.update(self._branch_logits(gated, train, inits))
    return outputs


# `config.model.can`, every field our choice (docs/methods/can.md). `backbone_b` is branch B's
# backbone config; None gives B the config of `config.model.backbone` (its own weights).
DEFAULTS = dict(gating="cross", fusion="hadamard", branch_heads=True, symmetric=False,
                backbone_b=None)
# The paper's verified minimum: H = F_A * F_B -> GAP -> Dense (no gates, no branch heads).
PLAIN_HADAMARD = dict(gating="none", fusion="hadamard", branch_heads=False)


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.can` over `DEFAULTS`, checked."""
  return methods.fields(model_cfg.get("can", {}), "config.model.can", DEFAULTS,
                        {"gating": GATINGS, "fusion": FUSIONS, "branch_heads": (True, False),
                         "symmetric": (True, False)})


def backbone_b_config(model_cfg: Mapping[str, Any]) -> Mapping[str, Any]:
  """Branch B's backbone config: `config.model.can.backbone_b`, else `config.model.backbone`."""
  return settings(model_cfg)["backbone_b"] or model_cfg["backbone"]


def backbone_paths(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """`Method.backbones`: A from `model.backbone`; B from `model.can.backbone_b` when set."""
  b_path = "model.can.backbone_b" if settings(config["model"])["backbone_b"] else "model.backbone"
  return (("backbone", "model.backbone"), ("backbone_b", b_path))


def build(config: Mapping[str, Any], task: Task) -> Model:
  """CAN's network for `config.model` (`backbone`, `can`, `dropout`) and `config.dtype`."""
  dtype = jnp.dtype(config["dtype"])
  model_cfg = config["model"]
  fields = settings(model_cfg)
  backbone_of = lambda cfg: backbones.build({**cfg, "dtype": dtype})
  return Model(backbone=backbone_of(model_cfg["backbone"]),
               backbone_b=backbone_of(backbone_b_config(model_cfg)), num_classes=task.num_classes,
               gating=fields["gating"], fusion=fields["fusion"],
               branch_heads=fields["branch_heads"], symmetric=fields["symmetric"],
               dropout=model_cfg["dropout"], dtype=dtype)


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The mirror's keys: `backbone.` and `backbone_b.` + torchvision's keys, then
  `attention_{a,b}.conv.weight`, `attention_{a,b}.bn.*`, `head.*`, `head_{a,b}.*`."""
  return convert.TorchNames((
      convert.backbone_scope(model_cfg["backbone"], flax="backbone", torch="backbone"),
      convert.backbone_scope(backbone_b_config(model_cfg), flax="backbone_b", torch="backbone_b"),
      convert.Scope("", "")))


# `config.loss.can`: the attention term, our reading of the paper (docs/methods/can.md).
LOSS_DEFAULTS = dict(att_weight=1.0, attention_loss="deep_supervision")


def loss_settings(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.loss.can` over `LOSS_DEFAULTS`, checked."""
  return methods.fields(loss_cfg.get("can", {}), "config.loss.can", LOSS_DEFAULTS,
                        {"attention_loss": ATTENTION_LOSSES})


def channel_mean_map(attention: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, h*w): the channel mean at each position, L2-normalised over positions."""
  m = jnp.mean(attention.astype(jnp.float32), axis=-1).reshape(attention.shape[0], -1)
  return m / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(m), axis=-1, keepdims=True), NORM_FLOOR ** 2))


def consistency_loss(attention_a: jax.Array, attention_b: jax.Array,
                     weight: jax.Array) -> jax.Array:
  """Weighted mean over examples of the mean squared difference of the normalised maps."""
  per_example = jnp.mean(jnp.square(channel_mean_map(attention_a) - channel_mean_map(attention_b)),
                         axis=-1)
  return losses.masked_mean(per_example, weight)


def attention_term(outputs: Mapping[str, Any], classify: Callable[[jax.Array], jax.Array],
                   kind: str, weight: jax.Array) -> jax.Array:
  """The attention loss `kind` of ATTENTION_LOSSES, or a clear error when the model lacks what
  it needs."""
  if kind == "deep_supervision":
    if "logits_a" not in outputs:
      raise ValueError("config.loss.can.attention_loss='deep_supervision' needs branch heads: set "
                       "config.model.can.branch_heads=True, or config.loss.can.att_weight=0")
    return classify(outputs["logits_a"]) + classify(outputs["logits_b"])
  if "attention_a" not in outputs:
    raise ValueError("config.loss.can.attention_loss='consistency' compares attention maps: set "
                     "config.model.can.gating='cross', or config.loss.can.att_weight=0")
  return consistency_loss(outputs["attention_a"], outputs["attention_b"], weight)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """cls(logits) + att_weight * the attention loss (module docstring); terms `cls_loss` and
  `att_loss` (0 when att_weight is 0), each weighted by example."""
  fields = loss_settings(config["loss"])
  targets, mask = task.targets(batch)
  classify = lambda logits: losses.classification_loss(logits, targets, mask * weight[:, None],
                                                       config["loss"], task)
  cls = classify(outputs["logits"])
  if fields["att_weight"] == 0:
    return cls, {"cls_loss": cls, "att_loss": jnp.zeros_like(cls)}
  att = attention_term(outputs, classify, fields["attention_loss"], weight)
  return cls + fields["att_weight"] * att, {"cls_loss": cls, "att_loss": att}


METHOD = Method(build=build, loss=loss, backbones=backbone_paths)
