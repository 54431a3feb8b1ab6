"""Losses against direct formulas, and optimizers against PyTorch's own on the same gradients."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from cxr_jax import losses, optim

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 3)).astype(np.float32) * 3
TARGETS = (RNG.random((6, 3)) < 0.4).astype(np.float32)
MASK = np.ones((6, 3), np.float32)
MASK[0, 1] = MASK[4, 2] = 0.0


def reference_bce(logits, targets):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  return -(targets * np.log(p) + (1 - targets) * np.log(1 - p))


def test_bce_ignores_masked_entries():
  want = (reference_bce(LOGITS, TARGETS) * MASK).sum() / MASK.sum()
  np.testing.assert_allclose(losses.bce(LOGITS, TARGETS, MASK), want, rtol=1e-5)
  garbage = np.where(MASK > 0, LOGITS, 1e4).astype(np.float32)
  np.testing.assert_allclose(losses.bce(garbage, TARGETS, MASK), want, rtol=1e-5)


def test_weighted_bce_uses_the_batch_class_balance():
  pos = (TARGETS * MASK).sum(0)
  neg = ((1 - TARGETS) * MASK).sum(0)
  weights = np.where(TARGETS > 0, (pos + neg) / np.maximum(pos, 1), (pos + neg) / np.maximum(neg, 1))
  want = (weights * reference_bce(LOGITS, TARGETS) * MASK).sum() / MASK.sum()
  np.testing.assert_allclose(losses.weighted_bce(LOGITS, TARGETS, MASK), want, rtol=1e-5)


def test_focal_is_bce_at_gamma_zero_and_down_weights_easy_examples():
  np.testing.assert_allclose(losses.focal(LOGITS, TARGETS, MASK, gamma=0.0),
                             losses.bce(LOGITS, TARGETS, MASK), rtol=1e-6)
  easy = np.array([[8.0]], np.float32)
  one = np.ones((1, 1), np.float32)
  assert losses.focal(easy, one, one, gamma=2.0) < 1e-3 * losses.bce(easy, one, one)


def test_classification_loss_masks_padding_and_rejects_unknown_names():
  batch = dict(labels=TARGETS, label_mask=MASK, valid=np.array([1, 1, 1, 1, 1, 0], np.float32))
  cfg = dict(name="bce", focal_gamma=2.0, focal_alpha=-1.0)
  np.testing.assert_allclose(losses.classification_loss(jnp.asarray(LOGITS), batch, cfg),
                             losses.bce(LOGITS[:5], TARGETS[:5], MASK[:5]), rtol=1e-6)
  with pytest.raises(ValueError, match="choose from"):
    losses.classification_loss(jnp.asarray(LOGITS), batch, dict(cfg, name="mse"))


@pytest.mark.parametrize("name, torch_cls, torch_kwargs", [
    ("adam", torch.optim.Adam, dict(weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(weight_decay=0.1, momentum=0.9, nesterov=True)),
])
def test_optimizers_follow_pytorch(name, torch_cls, torch_kwargs):
  cfg = common.get_config().optim
  cfg.update(name=name, lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True)
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {"head": {"w": RNG.normal(size=(4,)).astype(np.float32)}}
  weight = torch.nn.Parameter(torch.tensor(params["head"]["w"]))
  torch_opt = torch_cls([weight], lr=0.05, **torch_kwargs)
  state = tx.init(params)
  for _ in range(5):
    grad = RNG.normal(size=(4,)).astype(np.float32)
    updates, state = tx.update({"head": {"w": jnp.asarray(grad)}}, state, params)
    params = {"head": {"w": params["head"]["w"] + np.asarray(updates["head"]["w"])}}
    weight.grad = torch.tensor(grad)
    torch_opt.step()
  np.testing.assert_allclose(params["head"]["w"], weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules_and_backbone_learning_rate():
  cfg = common.get_config().optim
  cfg.update(lr=1.0, schedule="cosine", warmup_steps=10, final_lr_fraction=0.0)
  schedule = optim.make_schedule(cfg, 110, cfg.lr)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cfg.update(schedule="step", warmup_steps=0, step_boundaries=(20, 40), step_factor=0.1)
  schedule = optim.make_schedule(cfg, 100, cfg.lr)
  np.testing.assert_allclose([schedule(19), schedule(20), schedule(40)], [1.0, 0.1, 0.01], rtol=1e-6)

  cfg.update(name="sgd", schedule="constant", momentum=0.0, backbone_lr_mult=0.1, clip_norm=0.0)
  tx, _ = optim.make_optimizer(cfg, 100)
  params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  grads = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], [-1.0, -1.0])
  np.testing.assert_allclose(updates["backbone"]["w"], [-0.1, -0.1], rtol=1e-6)


def test_gradients_are_clipped_to_the_global_norm():
  cfg = common.get_config().optim
  cfg.update(name="sgd", lr=1.0, momentum=0.0, clip_norm=1.0)
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"head": {"w": jnp.zeros(2)}}
  updates, _ = tx.update({"head": {"w": jnp.array([3.0, 4.0])}}, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], [-0.6, -0.8], rtol=1e-6)
