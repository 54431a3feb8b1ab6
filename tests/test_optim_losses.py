"""Losses against direct formulas, and optimizers against PyTorch's own on the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from cxr_jax import losses, methods, optim, train

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
  weight = np.array([1, 1, 1, 1, 1, 0], np.float32)
  cfg = dict(name="bce", focal_gamma=2.0, focal_alpha=-1.0, class_counts="batch")
  np.testing.assert_allclose(
      losses.classification_loss(jnp.asarray(LOGITS), TARGETS, MASK * weight[:, None], cfg),
      losses.bce(LOGITS[:5], TARGETS[:5], MASK[:5]), rtol=1e-6)
  with pytest.raises(ValueError, match="choose from"):
    losses.classification_loss(jnp.asarray(LOGITS), TARGETS, MASK, dict(cfg, name="mse"))


def test_wcel_weights_from_training_counts():
  """W-CEL with the task's training-split counts instead of the batch's."""
  task = methods.Task(target="labels", class_names=("a", "b", "c"), positives=(1, 3, 2),
                      negatives=(9, 1, 2))
  cfg = dict(name="wbce", focal_gamma=2.0, focal_alpha=-1.0, class_counts="train")
  pos, neg = np.array([1.0, 3, 2]), np.array([9.0, 1, 2])
  weights = TARGETS * (pos + neg) / pos + (1 - TARGETS) * (pos + neg) / neg
  expected = np.sum(weights * reference_bce(LOGITS, TARGETS) * MASK) / MASK.sum()
  np.testing.assert_allclose(
      losses.classification_loss(jnp.asarray(LOGITS), TARGETS, MASK, cfg, task), expected,
      rtol=1e-5)


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


def test_schedules():
  cfg = common.get_config().optim
  cfg.update(lr=1.0, schedule="cosine", warmup_steps=10, final_lr_fraction=0.0)
  schedule = optim.make_schedule(cfg, 110, cfg.lr)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cfg.update(schedule="step", warmup_steps=0, step_boundaries=(20, 40), step_factor=0.1)
  schedule = optim.make_schedule(cfg, 100, cfg.lr)
  np.testing.assert_allclose([schedule(19), schedule(20), schedule(40)], [1.0, 0.1, 0.01], rtol=1e-6)



def test_parameter_groups_scale_lr_and_weight_decay_and_freeze_by_regex():
  """big_vision-style groups: the first matching pattern sets a leaf's multipliers; frozen leaves
  never move and keep no optimizer state."""
  cfg = common.get_config().optim
  cfg.update(name="sgd", lr=1.0, schedule="constant", momentum=0.0, weight_decay=0.5,
             lr_mults=(("^backbone/", 0.1), ("^branch/", 0.5)),
             wd_mults=((r"/bias$", 0.0),), frozen="^frozen/")
  params = {"backbone": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
            "branch": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)},
            "frozen": {"kernel": jnp.ones(2)}}
  groups = optim.describe_groups(params, cfg)
  assert groups["backbone/kernel"] == "lr x0.1, wd x1" and groups["backbone/bias"] == "lr x0.1, wd x0"
  assert groups["branch/kernel"] == "lr x0.5, wd x1" and groups["head/kernel"] == "lr x1, wd x1"
  assert groups["frozen/kernel"] == "frozen"
  tx, _ = optim.make_optimizer(cfg, 100)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # SGD with coupled L2: update = -lr x (grad + wd x param) = -lr x (1 + 0.5 wd_mult).
  np.testing.assert_allclose(updates["backbone"]["kernel"], [-0.15, -0.15], rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["bias"], [-0.1, -0.1], rtol=1e-6)
  np.testing.assert_allclose(updates["branch"]["kernel"], [-0.75, -0.75], rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], [-1.5, -1.5], rtol=1e-6)
  np.testing.assert_array_equal(updates["frozen"]["kernel"], [0.0, 0.0])


def test_bad_group_rules_are_config_errors():
  cfg = common.get_config().optim
  cfg.update(lr_mults=(("([", 0.1),), wd_mults=(("x",),), frozen="*")
  problems = " ".join(optim.check_groups(cfg))
  assert "optim.lr_mults" in problems and "optim.wd_mults" in problems and "optim.frozen" in problems


def test_logged_learning_rate_is_the_one_the_step_applied():
  """Fault 7: step s (1-based) applies schedule(s - 1), optax counting updates from 0."""
  cfg = common.get_config().optim
  cfg.update(name="sgd", lr=1.0, momentum=0.0, schedule="cosine", warmup_steps=4)
  tx, schedule = optim.make_optimizer(cfg, 20)
  params = {"head": {"w": jnp.zeros(1)}}
  state = tx.init(params)
  for step in range(1, 7):
    updates, state = tx.update({"head": {"w": jnp.ones(1)}}, state, params)
    applied = -float(updates["head"]["w"][0])
    assert applied == pytest.approx(train.learning_rate(schedule, step), abs=1e-7), step


def test_gradients_are_clipped_to_the_global_norm():
  cfg = common.get_config().optim
  cfg.update(name="sgd", lr=1.0, momentum=0.0, clip_norm=1.0)
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"head": {"w": jnp.zeros(2)}}
  updates, _ = tx.update({"head": {"w": jnp.array([3.0, 4.0])}}, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], [-0.6, -0.8], rtol=1e-6)
