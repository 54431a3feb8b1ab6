"""Shared multi-label losses. Every loss takes a mask: entries with mask 0 (unknown labels,
ignored uncertain labels, padding) contribute nothing, and the mean runs over the rest.

- `bce`: binary cross-entropy with logits (CheXNet).
- `wbce`: class-weighted BCE, W-CEL of Wang et al. (CVPR 2017): positives of a class weigh
  (|P| + |N|) / |P| and negatives (|P| + |N|) / |N|, with |P| and |N| counted within the batch
  (`loss.class_counts="batch"`, the paper's) or on the training split (`"train"`, from the task).
- `focal`: focal loss (Lin et al. 2017) with focusing parameter gamma and optional alpha.
- `balanced_focal`: focal loss with W-CEL's class weights, CAN's multi-label balance loss (our
  reading, docs/methods/can.md): positives of a class weigh (|P| + |N|) / |P|, negatives
  (|P| + |N|) / |N|, each focal-modulated with gamma; counts from the training split ("train") or
  the batch with +1 added to |P| and |N| ("batch"), so a class absent from the batch stays finite.
- `msml`: the multi-label softmax loss (MSML) of `cxr_jax.methods.msml`, in two readings: each
  positive against the pooled negatives ("pos_vs_neg"), or a softmax over every known label with
  the target spread evenly over the positives ("normalized_target").
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

NAMES = ("bce", "wbce", "focal", "balanced_focal")
CLASS_COUNTS = ("batch", "train")


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over entries where `mask` is 1 (0 when the mask is empty)."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bce_terms(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy with logits, numerically stable."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def bce(logits, targets, mask) -> jax.Array:
  """Masked mean binary cross-entropy."""
  return masked_mean(bce_terms(logits, targets), mask)


def weighted_bce(logits, targets, mask, counts=None) -> jax.Array:
  """W-CEL: BCE with per-class positive/negative weights from label counts: the batch's, or
  `counts` = (positives, negatives) per class when given."""
  if counts is None:
    counts = jnp.sum(targets * mask, axis=0), jnp.sum((1 - targets) * mask, axis=0)
  pos, neg = counts
  total = pos + neg
  # A class with no positives (or negatives) in the batch keeps weight 1 for what it has.
  w_pos = jnp.where(pos > 0, total / jnp.maximum(pos, 1.0), 1.0)
  w_neg = jnp.where(neg > 0, total / jnp.maximum(neg, 1.0), 1.0)
  weights = targets * w_pos + (1 - targets) * w_neg
  return masked_mean(weights * bce_terms(logits, targets), mask)


def focal(logits, targets, mask, *, gamma: float = 2.0, alpha: float = -1.0) -> jax.Array:
  """Focal loss; alpha < 0 disables the class-balance factor."""
  p = jax.nn.sigmoid(logits)
  p_t = targets * p + (1 - targets) * (1 - p)
  terms = bce_terms(logits, targets) * (1 - p_t) ** gamma
  if alpha >= 0:
    terms = terms * (targets * alpha + (1 - targets) * (1 - alpha))
  return masked_mean(terms, mask)


def balanced_focal(logits, targets, mask, counts=None, *, gamma: float = 2.0) -> jax.Array:
  """Class-balanced focal BCE in log space: -[b+ (1-p)^g y log p + b- p^g (1-y) log(1-p)],
  masked mean; b+, b- from `counts` = (positives, negatives) per class, or from the batch's
  counts each plus 1 when None."""
  if counts is None:
    counts = (jnp.sum(targets * mask, axis=0) + 1.0, jnp.sum((1 - targets) * mask, axis=0) + 1.0)
  pos, neg = counts
  total = pos + neg
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  positive_terms = (total / jnp.maximum(pos, 1.0)) * jnp.exp(gamma * log_not_p) * log_p
  negative_terms = (total / jnp.maximum(neg, 1.0)) * jnp.exp(gamma * log_p) * log_not_p
  return masked_mean(-(targets * positive_terms + (1 - targets) * negative_terms), mask)


def classification_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                        loss_config: Mapping[str, Any], task: Any = None) -> jax.Array:
  """The multi-label loss named by `config.loss.name`, on float32 logits.

  `mask` already carries the example weights (0 for padding); `task` (a `cxr_jax.methods.Task`)
  supplies training-split class counts when `loss.class_counts="train"`.
  """
  logits = logits.astype(jnp.float32)
  name = loss_config["name"]
  if name == "bce":
    return bce(logits, targets, mask)
  if name == "wbce":
    counts = task.counts() if loss_config["class_counts"] == "train" else None
    return weighted_bce(logits, targets, mask, counts)
  if name == "focal":
    return focal(logits, targets, mask, gamma=loss_config["focal_gamma"],
                 alpha=loss_config["focal_alpha"])
  if name == "balanced_focal":
    counts = task.counts() if loss_config["class_counts"] == "train" else None
    return balanced_focal(logits, targets, mask, counts, gamma=loss_config["focal_gamma"])
  raise ValueError(f"config.loss.name={name!r}; choose from {NAMES}")


MSML_VARIANTS = ("pos_vs_neg", "normalized_target")
# Stands for "absent" in a log-sum-exp: finite, unlike -inf, whose all-masked rows give NaN
# gradients, and so large that exp(MASKED_LOGIT - s) is exactly 0 in float32.
MASKED_LOGIT = -1e9


def _pos_vs_neg(logits: jax.Array, positive: jax.Array, negative: jax.Array,
                count: jax.Array) -> jax.Array:
  """(B,) mean over positives p of softplus(LSE_{n in N}(s_n) - s_p); 0 for a row without any."""
  lse_negatives = jax.nn.logsumexp(jnp.where(negative, logits, MASKED_LOGIT), axis=-1)
  per_label = jax.nn.softplus(lse_negatives[:, None] - logits)
  return jnp.sum(jnp.where(positive, per_label, 0.0), axis=-1) / count


def _normalized_target(logits: jax.Array, positive: jax.Array, known: jax.Array,
                       count: jax.Array) -> jax.Array:
  """(B,) -sum_p (1/|P|) log softmax(s)_p, the softmax over the known labels only."""
  log_probs = jax.nn.log_softmax(jnp.where(known, logits, MASKED_LOGIT), axis=-1)
  return -jnp.sum(jnp.where(positive, log_probs, 0.0), axis=-1) / count


def msml(logits: jax.Array, targets: jax.Array, mask: jax.Array, weight: jax.Array,
         variant: str = "pos_vs_neg") -> jax.Array:
  """The multi-label softmax loss, a weighted mean over the rows that have a positive.

  A label is positive where target 1 and mask > 0, negative where target 0 and mask > 0; a label
  with mask 0 (unknown, an ignored uncertain label) is neither. Rows without a positive weigh 0
  and the mean divides by the weighted count of rows with one; a row without negatives costs
  ~0 ("pos_vs_neg"), its limit.

  Args:
    logits: (B, C) scores; computed in float32.
    targets: (B, C) 0/1 labels.
    mask: (B, C) 1 where a label is known.
    weight: (B,) example weights, 0 for padding.
    variant: one of MSML_VARIANTS (module docstring).
  """
  logits = logits.astype(jnp.float32)
  known = mask > 0
  positive = known & (targets > 0.5)
  count = jnp.sum(positive, axis=-1).astype(jnp.float32)
  denominator = jnp.maximum(count, 1.0)
  if variant == "pos_vs_neg":
    per_row = _pos_vs_neg(logits, positive, known & ~positive, denominator)
  elif variant == "normalized_target":
    per_row = _normalized_target(logits, positive, known, denominator)
  else:
    raise ValueError(f"MSML variant {variant!r}: choose from {MSML_VARIANTS}")
  return masked_mean(per_row, weight * (count > 0))
