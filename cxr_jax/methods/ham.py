"""HAM's network (Ouyang et al., "Learning Hierarchical Attention for Weakly-supervised Chest X-Ray
Abnormality Localization and Diagnosis", IEEE TMI 2021), numerically equal to the authors' model
(`oyxhust/HAM`, `models/AttentionModel/resnet.py`), as `shared/fixtures/ham_reference/` checks.

  ResNet-50 at output stride 8 (every block of layer3 dilated 2, of layer4 dilated 4) -> e4
  FA module: conva (conv3x3 2048->512 + BN) -> FABlock -> convb (conv3x3 512->512 + BN), no ReLU
  fusion head: concat(e4, FA out) -> conv3x3 2560->512 + BN + ReLU + Dropout2d(0.1) -> F
  LSE pooling (r = 6) -> bias-free heads `anomaly_fc` (1) and `cls_fc` (K)
  CAMs: ReLU(F . stop_gradient(head weights)), raw (h, w) and refined at the input size

Flax names follow the authors' state_dict keys (`torch_names`): a name `x_i` is item `i` of the
authors' `nn.Sequential` `x`.

Its training losses, as the authors' `train()` computes them (`utils/net_utils.py`), `ham_losses`:

  total = 0.01*ano + 1*cls + 0.5*ex + 0.001*bound + 0.001*union

- `ano_loss`, `cls_loss`: torch's `BCELoss` on the sigmoid of the abnormality / disease logits, its
  logs clamped at -100 (`clamped_bce`); the abnormality label is the max of the disease labels.
- `ex_loss`: box supervision of the refined disease maps of box-annotated ("helper") images, a soft
  Dice per class over the batch (`box_loss`).
- `bound_loss`: each positive class's raw CAM should lie under the abnormality CAM.
- `union_loss`: the abnormality CAM should lie under the max of the positive classes' raw CAMs; the
  one-sided training version, not the symmetric one HAM only logs in validation.
Bound and union use the raw (ReLU'd, un-normalised) CAMs at CAM resolution, with labels zeroing the
maps of negative classes and a soft mask `sigmoid(100*(map - 0.75))` on the raw values; the box term
uses the refined maps at input resolution, like the masks. Every batch-level term takes a
per-example `weight` (B,) (0 for padding), so a padded example counts in no term.

As a method (`config.model.name=ham`), `loss` feeds the pipeline's batches to `ham_losses`: box
masks are drawn from the boxes of the records marked `box_supervised` (`data_prep.nih --box-list`),
and `config.loss.ham_weights` weighs the terms. `config.model.ham` holds the architecture
(`DEFAULTS`: the authors' values); its `fa` and `pooling` switches serve the ablations.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax import backbones, layers, losses, methods
from cxr_jax.backbones.resnet import ResNet
from cxr_jax.interop import convert
from cxr_jax.metrics import localization
from cxr_jax.methods import Method, Task

# HAM initialises every Conv2d with `kaiming_normal_(mode="fan_out", nonlinearity="relu")`
# (untruncated) and keeps PyTorch's default Linear init, uniform(+-1/sqrt(fan_in)).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

LSE_R = 6.0  # `lse_r` of HAM's utils/config.py
# `cam_w`, `cam_sigma`: the refined maps' soft threshold sigmoid(CAM_W * (N - CAM_SIGMA)); the
# bound and union losses use the same slope on raw CAMs at CAM_LOSS_THRESHOLD.
CAM_W, CAM_SIGMA = 100.0, 0.4
ZERO_RANGE = 1e-5  # a constant map's min-max range, as HAM's `refine_cams`


class FABlock(nn.Module):
  """HAM's foreground-attention block on a (B, H, W, C) map.

  A channel gate from a global-context vector (softmax-weighted sum over positions) scales
  conv2(x); a one-channel spatial term t = conv3(.) is gated by sigmoid(bn4(conv4(t))), and the
  result is added, times the learned scalar `gamma` (initialised 0), to every channel of x.
  """

  reduction: int = 8
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    conv = dict(dtype=self.dtype, kernel_init=CONV_INIT)
    logits = layers.conv(1, 1, name="conv1", **conv)(x).reshape(b, h * w)
    context = jnp.einsum("bp,bpc->bc", jax.nn.softmax(logits, axis=-1), x.reshape(b, h * w, c))
    dense = dict(use_bias=False, dtype=self.dtype, kernel_init=LINEAR_INIT)
    gate = nn.Dense(c // self.reduction, name="channel_fc_0", **dense)(context)
    gate = jax.nn.sigmoid(nn.Dense(c, name="channel_fc_2", **dense)(nn.relu(gate)))
    gated = layers.conv(c, 1, name="conv2", **conv)(x) * gate[:, None, None, :]
    t = layers.conv(1, 1, name="conv3", **conv)(gated)
    z = layers.conv(1, 3, padding=1, name="conv4", **conv)(t)
    z = jax.nn.sigmoid(layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype,
                                        name="bn4")(z))
    gamma = self.param("gamma", nn.initializers.zeros, (1,), jnp.float32)
    # The one-channel term (B, H, W, 1) broadcasts over all C channels, as in HAM.
    return gamma.astype(x.dtype) * (t * z) + x


class FAModule(nn.Module):
  """conva (conv3x3 + BN) -> FABlock -> convb (conv3x3 + BN), with no ReLU anywhere."""

  features: int = 512
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv_bn(name, x):  # the authors' nn.Sequential(conv3x3, BN): items `name_0`, `name_1`
      x = layers.conv(self.features, 3, padding=1, dtype=self.dtype, kernel_init=CONV_INIT,
                      name=f"{name}_0")(x)
      return layers.BatchNorm(use_running_average=not self.train, dtype=self.dtype, name=f"{name}_1")(x)

    x = FABlock(train=self.train, dtype=self.dtype, name="fa")(conv_bn("conva", x))
    return conv_bn("convb", x)


class CamHead(nn.Module):
  """A bias-free linear head on the pooled vector and, with its weights held constant
  (stop_gradient, HAM's `.detach()`), ReLU class activation maps on the feature map."""

  features: int

  @nn.compact
  def __call__(self, pooled: jax.Array, fmap: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", LINEAR_INIT, (fmap.shape[-1], self.features), jnp.float32)
    kernel = kernel.astype(fmap.dtype)
    return pooled @ kernel, nn.relu(fmap @ jax.lax.stop_gradient(kernel))


def lse_pool(x: jax.Array, r: float = LSE_R) -> jax.Array:
  """Log-sum-exp pooling over the spatial axes: (logsumexp(r x) - log(H W)) / r, (B,H,W,C) -> (B,C)."""
  return (jax.nn.logsumexp(r * x, axis=(1, 2)) - math.log(x.shape[1] * x.shape[2])) / r


def normalize_cams(maps: jax.Array) -> jax.Array:
  """Per-sample, per-class min-max over (H, W) of (B, H, W, K) maps; a zero range becomes 1e-5."""
  low = jnp.min(maps, axis=(1, 2), keepdims=True)
  spread = jnp.max(maps, axis=(1, 2), keepdims=True) - low
  return (maps - low) / jnp.where(spread == 0, jnp.asarray(ZERO_RANGE, maps.dtype), spread)


def refine_cams(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """HAM's `refine_cams`: upsample to `size`, min-max normalise, sigmoid(100 (N - 0.4))."""
  normalized = normalize_cams(layers.resize_align_corners(maps, size))
  return jax.nn.sigmoid(CAM_W * (normalized - CAM_SIGMA))


POOLINGS = ("lse", "avg")


def pool(fmap: jax.Array, pooling: str, lse_r: float) -> jax.Array:
  """(B, H, W, C) -> (B, C): HAM's LSE pooling, or the average (LSE as r -> 0) for ablations."""
  if pooling == "lse":
    return lse_pool(fmap, lse_r)
  if pooling == "avg":
    return jnp.mean(fmap, axis=(1, 2))
  raise ValueError(f"model.ham.pooling must be one of {POOLINGS}, got {pooling!r}")


class Model(nn.Module):
  """HAM's network; see the module docstring.

  Attributes:
    backbone: a ResNet, normally ResNet-50 at output stride 8 (`build` sets it).
    num_classes: K, the disease outputs.
    fa: whether the FA module runs (HAM: yes); without it the fusion head sees e4 alone (ablation).
    fa_features, head_features: widths of the FA module and of the fusion head (HAM: 512, 512).
    dropout: the fusion head's channel dropout (Dropout2d) rate.
    pooling, lse_r: "lse" with r (HAM: r = 6) or "avg" (ablation), see `pool`.
    dtype: compute dtype of the convolutions. Pooling, heads and maps run in at least float32
      (the LSE and the slope-100 sigmoid are sensitive), and every output has that dtype.
  """

  backbone: nn.Module
  num_classes: int
  fa: bool = True
  fa_features: int = 512
  head_features: int = 512
  dropout: float = 0.1
  pooling: str = "lse"
  lse_r: float = LSE_R
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    e4 = self.backbone(images, train=train)["C5"]
    x = e4
    if self.fa:
      x = jnp.concatenate([e4, FAModule(self.fa_features, train, self.dtype, name="fa_layer")(e4)],
                          axis=-1)
    x = layers.conv(self.head_features, 3, padding=1, dtype=self.dtype, kernel_init=CONV_INIT,
                    name="cls_head_0")(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="cls_head_1")(x))
    # Dropout2d: whole channels are dropped, the mask broadcasts over H and W (NHWC).
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train, name="cls_head_3")(x)
    fmap = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    pooled = pool(fmap, self.pooling, self.lse_r)
    abnormality_logit, abnormality_cam = CamHead(1, name="anomaly_fc")(pooled, fmap)
    logits, cams = CamHead(self.num_classes, name="cls_fc")(pooled, fmap)
    size = images.shape[1:3]
    return dict(logits=logits, abnormality_logit=abnormality_logit[:, 0], cams=cams,
                abnormality_cam=abnormality_cam, refined_cams=refine_cams(cams, size),
                refined_abnormality_cam=refine_cams(abnormality_cam, size), pooled=pooled)


def backbone_config(backbone_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone config with HAM's output stride 8 where none is set; only ResNets fit HAM."""
  cfg = {key: value for key, value in backbone_cfg.items() if value is not None}
  cfg.setdefault("output_stride", 8)
  if backbones.resolve(cfg)[0] is not ResNet:
    raise ValueError(f"HAM needs a ResNet backbone, got {backbone_cfg.get('name')!r}")
  return cfg


# `config.model.ham`: HAM's architecture (the authors' values); `fa` and `pooling` exist for the
# ablations of docs/methods/ham.md. The fusion head's dropout is `config.model.dropout` (HAM: 0.1).
DEFAULTS = dict(fa=True, fa_features=512, head_features=512, pooling="lse", lse_r=LSE_R)


def settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model.ham` over `DEFAULTS`, plus the dropout: the `Model` fields a config sets."""
  own = methods.fields(model_cfg.get("ham", {}), "config.model.ham", DEFAULTS,
                       {"pooling": POOLINGS})
  return {**own, "dropout": model_cfg["dropout"]}


def build(config: Mapping[str, Any], task: Task) -> Model:
  """HAM's network for `config.model` (backbone at output stride 8 unless set, `model.ham`,
  `model.dropout`) and `config.dtype`. HAM learns the finding labels, whose indices its boxes use."""
  if task.target != "labels":
    raise ValueError(f"HAM learns config.data.target=labels (its boxes index the findings), got "
                     f"{task.target!r}")
  dtype = jnp.dtype(config["dtype"])
  backbone = backbones.build({**backbone_config(config["model"]["backbone"]), "dtype": dtype})
  return Model(backbone=backbone, num_classes=task.num_classes, dtype=dtype,
               **settings(config["model"]))


def torch_names(model_cfg: Mapping[str, Any]) -> convert.TorchNames:
  """The authors' state_dict keys (`AttentionNet(...).model.state_dict()`): torchvision's ResNet
  keys for the backbone (`conv1.weight`, `layer3.0.conv2.weight`), then `fa_layer.conva.0.weight`,
  `fa_layer.fa.channel_fc.2.weight`, `cls_head.1.running_mean`, `cls_fc.weight`, ..."""
  return convert.TorchNames((
      convert.backbone_scope(backbone_config(model_cfg["backbone"]), flax="backbone"),
      convert.Scope("", "", ((r"_(\d+)\.", r".\1."),)),
  ))


# HAM's `utils/config.py`.
LOSS_WEIGHTS = {"ano_loss": 0.01, "cls_loss": 1.0, "ex_loss": 0.5, "bound_loss": 0.001,
                "union_loss": 0.001}
CAM_LOSS_THRESHOLD = 0.75  # `cam_loss_sigma`: on raw CAM values
FLOOR = 1e-5  # every denominator of HAM's losses is floored here
LOG_CLAMP = -100.0  # torch's BCELoss clamps its logs here


def _clamped_log(log, x: jax.Array, finite: jax.Array) -> jax.Array:
  """max(log(x), -100); where `finite` is False (log(x) = -inf) -100 with a zero gradient, rather
  than the NaN of 0*inf."""
  return jnp.where(finite, jnp.maximum(log(jnp.where(finite, x, 0.5)), LOG_CLAMP), LOG_CLAMP)


def clamped_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise torch `BCELoss(sigmoid(logits), targets)`:
  -[y*max(log p, -100) + (1-y)*max(log(1-p), -100)] with p = sigmoid(logits), log(1-p) taken as
  log1p(-p) as torch does.

  Unlike a logits-based BCE, this saturates at 100 for confidently wrong logits (|logit| >~ 37 in
  float64), exactly as HAM's loss does.
  """
  p = jax.nn.sigmoid(logits)
  return -(targets * _clamped_log(jnp.log, p, p > 0)
           + (1 - targets) * _clamped_log(jnp.log1p, -p, p < 1))


def bce_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean clamped BCE over examples (and classes, for (B, K) logits), each example weighed by
  `weight` (B,): HAM's `anoLoss` for (B,) logits and `clsLoss` for (B, K)."""
  example_weight = jnp.reshape(weight, weight.shape + (1,) * (logits.ndim - 1))
  return losses.masked_mean(clamped_bce(logits, targets),
                            jnp.broadcast_to(example_weight, logits.shape))


def box_loss_per_class(refined_cams: jax.Array, masks: jax.Array,
                       box_weight: jax.Array) -> jax.Array:
  """HAM's `exClsLosses`, (K,): per class c over the batch,
  sum_b v_bc*sum_p (A_bc - M_bc)^2 / max(sum_b v_bc*(sum_p A_bc + sum_p M_bc), 1e-5).

  Args:
    refined_cams: A (B, H, W, K), the refined disease maps in [0, 1].
    masks: M (B, H, W, K), the binary box masks, at the resolution of `refined_cams`.
    box_weight: v (B, K), 1 where example b is a helper image tagged with class c (times its
      example weight), else 0.
  """
  squared_error = jnp.sum(jnp.square(refined_cams - masks), axis=(1, 2))
  mass = jnp.sum(refined_cams, axis=(1, 2)) + jnp.sum(masks, axis=(1, 2))
  return (jnp.sum(squared_error * box_weight, axis=0)
          / jnp.maximum(jnp.sum(mass * box_weight, axis=0), FLOOR))


def _mean_over_present(per_class: jax.Array, class_weight: jax.Array) -> jax.Array:
  """Sum over classes / number of classes with any weight in the batch (at least 1), as HAM
  averages `exClsLoss` and `boundLoss`: classes absent from the batch count as nothing."""
  present = jnp.sum(class_weight, axis=0) > 0
  return jnp.sum(per_class) / jnp.maximum(jnp.sum(present), 1)


def box_loss(refined_cams: jax.Array, masks: jax.Array, helper: jax.Array, bbox_tags: jax.Array,
             weight: jax.Array) -> jax.Array:
  """HAM's `exClsLoss`: `box_loss_per_class` averaged over the classes that have a box in the batch.

  Args:
    refined_cams, masks: (B, H, W, K), as in `box_loss_per_class`.
    helper: (B,) 1 for a box-supervised ("helper") image, else 0; other images drop out.
    bbox_tags: (B, K) the classes an image's boxes belong to.
    weight: (B,) example weights.
  """
  box_weight = bbox_tags * (helper * weight)[:, None]
  return _mean_over_present(box_loss_per_class(refined_cams, masks, box_weight), box_weight)


def _hidden_maps(cams: jax.Array, abnormality_cam: jax.Array,
                 labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The raw maps with negative labels zeroed: H_c (B, h, w, K) and H_a (B, h, w, 1)."""
  abnormal = jnp.max(labels, axis=-1)
  return cams * labels[:, None, None, :], abnormality_cam * abnormal[:, None, None, None]


def _uncovered_fraction(inner: jax.Array, outer: jax.Array) -> jax.Array:
  """[sum_p inner - sum_p min(inner, outer)*sigmoid(100*(inner - 0.75))] / max(sum_p inner, 1e-5)
  per map, over axes (1, 2): the share of `inner`'s confident mass that `outer` does not cover."""
  covered = jnp.minimum(inner, outer) * jax.nn.sigmoid(CAM_W * (inner - CAM_LOSS_THRESHOLD))
  total = jnp.sum(inner, axis=(1, 2))
  return (total - jnp.sum(covered, axis=(1, 2))) / jnp.maximum(total, FLOOR)


def _weighted_average(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_b weights*values / max(sum_b weights, 1e-5) over the batch axis."""
  return jnp.sum(values * weights, axis=0) / jnp.maximum(jnp.sum(weights, axis=0), FLOOR)


def bound_loss_per_class(cams: jax.Array, abnormality_cam: jax.Array, labels: jax.Array,
                         weight: jax.Array) -> jax.Array:
  """HAM's `boundLosses`, (K,): per class, the mean over its positive examples of the share of the
  disease CAM not under the abnormality CAM (0 for a class without positives).

  Args:
    cams: (B, h, w, K) raw disease CAMs (after the ReLU, not normalised).
    abnormality_cam: (B, h, w, 1) raw abnormality CAM.
    labels: (B, K) binary disease labels.
    weight: (B,) example weights.
  """
  disease, abnormality = _hidden_maps(cams, abnormality_cam, labels)
  return _weighted_average(_uncovered_fraction(disease, abnormality), labels * weight[:, None])


def bound_loss(cams: jax.Array, abnormality_cam: jax.Array, labels: jax.Array,
               weight: jax.Array) -> jax.Array:
  """HAM's `boundLoss`: `bound_loss_per_class` averaged over the classes with a positive example."""
  return _mean_over_present(bound_loss_per_class(cams, abnormality_cam, labels, weight),
                            labels * weight[:, None])


def union_loss_per_example(cams: jax.Array, abnormality_cam: jax.Array,
                           labels: jax.Array) -> jax.Array:
  """(B,) the share of each example's abnormality CAM not under the max of its positive classes'
  CAMs (0 for an example without positives). Arguments as in `bound_loss_per_class`."""
  disease, abnormality = _hidden_maps(cams, abnormality_cam, labels)
  return _uncovered_fraction(abnormality, jnp.max(disease, axis=-1, keepdims=True))[:, 0]


def union_loss(cams: jax.Array, abnormality_cam: jax.Array, labels: jax.Array,
               weight: jax.Array) -> jax.Array:
  """HAM's training `unionLoss`: `union_loss_per_example` averaged over the abnormal examples."""
  abnormal = jnp.max(labels, axis=-1)
  return _weighted_average(union_loss_per_example(cams, abnormality_cam, labels),
                           abnormal * weight)


def ham_losses(outputs: Mapping[str, Any], labels: jax.Array, masks: jax.Array,
               helper: jax.Array, bbox_tags: jax.Array, weight: jax.Array | None = None,
               loss_weights: Mapping[str, float] = LOSS_WEIGHTS,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """HAM's weighted training loss and its five unweighted terms.

  Args:
    outputs: the network's `logits` (B, K), `abnormality_logit` (B,) or (B, 1), raw CAMs
      `cams` (B, h, w, K) and `abnormality_cam` (B, h, w, 1), and refined disease maps
      `refined_cams` (B, H, W, K).
    labels: (B, K) binary disease labels; the abnormality label is their max.
    masks: (B, H, W, K) binary box masks at the resolution of `refined_cams`.
    helper: (B,) 1 for box-supervised images.
    bbox_tags: (B, K) each image's box classes (only read where `helper` is 1).
    weight: (B,) example weights, 0 for padding; all ones when None.
    loss_weights: the weight of each term in the total, by term name.

  Returns:
    (sum loss_weights[name]*term, {"ano_loss", "cls_loss", "ex_loss", "bound_loss", "union_loss"}).
  """
  if weight is None:
    weight = jnp.ones(labels.shape[:1], labels.dtype)
  abnormal = jnp.max(labels, axis=-1)
  terms = {
      # The reshape takes (B,) or (B, 1), and fails rather than broadcast to (B, B).
      "ano_loss": bce_loss(outputs["abnormality_logit"].reshape(abnormal.shape), abnormal, weight),
      "cls_loss": bce_loss(outputs["logits"], labels, weight),
      "ex_loss": box_loss(outputs["refined_cams"], masks, helper, bbox_tags, weight),
      "bound_loss": bound_loss(outputs["cams"], outputs["abnormality_cam"], labels, weight),
      "union_loss": union_loss(outputs["cams"], outputs["abnormality_cam"], labels, weight),
  }
  return sum(loss_weights[name] * value for name, value in terms.items()), terms


def box_masks(boxes: jax.Array, box_labels: jax.Array, num_classes: int,
              size: int) -> jax.Array:
  """(B, size, size, K) float masks: per class, the union of that class's boxes, covering every
  pixel a box overlaps, as the localization evaluators draw them.

  Args:
    boxes: (B, N, 4) normalised [xmin, ymin, xmax, ymax].
    box_labels: (B, N) class index of each box, -1 for padding.
  """
  col0, row0, col1, row1 = jnp.moveaxis(localization.box_pixel_ranges(boxes, size, jnp), -1, 0)
  pixels = jnp.arange(size, dtype=col0.dtype)
  inside = lambda low, high: ((pixels >= low[..., None]) & (pixels < high[..., None])).astype(
      jnp.float32)  # (B, N, S)
  classes = (box_labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)  # padding: none
  # A box's mask is the outer product of its rows and columns; overlapping boxes count once.
  return jnp.einsum("bnh,bnw,bnk->bhwk", inside(row0, row1), inside(col0, col1),
                    classes).clip(max=1.0)


def loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], *, task: Task,
         config: Mapping[str, Any], weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """HAM's losses on a pipeline batch, weighted by `config.loss.ham_weights` (the authors' when
  absent). Labels are the task's targets where known: an unknown or ignored label counts as a
  negative, as every label of HAM's NIH lists is known. The box term reads the boxes of the
  images marked `box_supervised` (data_prep.nih --box-list) and is 0 in a batch without any."""
  targets, mask = task.targets(batch)
  labels = targets * mask
  refined = outputs["refined_cams"]
  masks = box_masks(batch["boxes"], batch["box_labels"], task.num_classes, refined.shape[1])
  bbox_tags = jnp.any(batch["box_labels"][..., None] == jnp.arange(task.num_classes), axis=1)
  return ham_losses(outputs, labels, masks.astype(refined.dtype),
                    batch["box_supervised"].astype(refined.dtype),
                    bbox_tags.astype(refined.dtype), weight,
                    loss_weights=config["loss"].get("ham_weights", LOSS_WEIGHTS))


METHOD = Method(build=build, loss=loss)
