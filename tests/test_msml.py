"""MSML (`cxr_jax.methods.msml`, `cxr_jax.losses.msml`, `cxr_jax.interop.torch_msml`): the loss's
properties and hand values, the heads, and the torch mirror, loss and export against flax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util

from cxr_jax import losses, methods
from cxr_jax.interop import convert, registry, torch_msml
from cxr_jax.methods import msml
from parity import assert_close_to_scale, randomize

TINY_DENSENET = {"name": "densenet121", "growth_rate": 4, "block_config": (1, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
# At output stride 16 its C5 is twice the DenseNet's, so the second stream is resized.
TINY_RESNET = {"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 8, "output_stride": 16}
SIZE, NUM_CLASSES = 64, 5
HEADS = {
    "bilinear": {"features": 8},
    "compact": {"head": "compact", "features": 8, "sketch_dim": 48},
    "gap": {"head": "gap"},
    "two-stream": {"features": 8, "streams": 2, "backbone_b": TINY_RESNET},
}


def config(model_msml=None, loss_msml=None, loss_name="bce"):
  return {"model": {"name": "msml", "backbone": TINY_DENSENET, "channels": 3, "dropout": 0.2,
                    "msml": dict(model_msml or {})},
          "loss": {"name": loss_name, "class_counts": "batch", "msml": dict(loss_msml or {})},
          "dtype": "float32"}


def task(num_classes=NUM_CLASSES):
  return methods.Task(target="labels", class_names=tuple(f"c{i}" for i in range(num_classes)))


def msml_value(logits, targets, mask, weight=None, variant="pos_vs_neg"):
  logits = np.asarray(logits, np.float32)
  weight = np.ones(logits.shape[0], np.float32) if weight is None else weight
  return float(losses.msml(jnp.asarray(logits), jnp.asarray(targets, jnp.float32),
                           jnp.asarray(mask, jnp.float32), jnp.asarray(weight, jnp.float32),
                           variant))


# ---------------------------------------------------------------- the loss


def test_one_positive_is_softmax_cross_entropy_over_it_and_the_negatives():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(4, 6)).astype(np.float32)
  targets = np.zeros((4, 6), np.float32)
  targets[np.arange(4), [0, 2, 5, 3]] = 1
  mask = np.ones((4, 6), np.float32)
  mask[1, 4] = mask[3, 0] = 0  # unknown labels drop out of the softmax
  want = np.mean([-jax.nn.log_softmax(logits[b][mask[b] > 0])[np.flatnonzero(targets[b][mask[b] > 0])[0]]
                  for b in range(4)])
  assert msml_value(logits, targets, mask) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("variant", losses.MSML_VARIANTS)
def test_msml_alone_ignores_a_constant_added_to_a_row(variant):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  batch = {"labels": (rng.random((5, 4)) < 0.4).astype(np.float32),
           "label_mask": (rng.random((5, 4)) < 0.8).astype(np.float32)}
  outputs = {"logits": logits, "anchor_logit": rng.normal(size=5).astype(np.float32)}
  shift = np.array([0.0, 5.0, -3.0, 20.0, 0.5], np.float32)
  shifted = {"logits": logits + shift[:, None], "anchor_logit": outputs["anchor_logit"] + shift}
  cfg = config(loss_msml={"bce_weight": 0.0, "variant": variant})

  def total(out):
    return float(msml.loss(out, batch, task=task(4), config=cfg, weight=jnp.ones(5))[0])

  assert total(outputs) > 0.1
  assert total(shifted) == pytest.approx(total(outputs), rel=1e-5)
  # BCE, by contrast, sees the shift: the default objective anchors the scale.
  default = config()
  assert float(msml.loss(shifted, batch, task=task(4), config=default, weight=jnp.ones(5))[0]) != (
      pytest.approx(float(msml.loss(outputs, batch, task=task(4), config=default,
                                    weight=jnp.ones(5))[0]), rel=1e-3))


@pytest.mark.parametrize("variant", losses.MSML_VARIANTS)
def test_gradients_are_finite_on_rows_without_positives_all_positive_and_all_masked(variant):
  logits = jnp.asarray([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0], [0.2, 0.1, 9.0], [1.0, 2.0, 3.0]])
  targets = jnp.asarray([[0, 0, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]], jnp.float32)
  mask = jnp.asarray([[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]], jnp.float32)
  grad = jax.grad(lambda s: losses.msml(s, targets, mask, jnp.ones(4), variant))(logits)
  assert np.isfinite(np.asarray(grad)).all()
  # Rows 0 (no positive) and 2 (nothing known) weigh nothing; row 3 trains.
  np.testing.assert_array_equal(np.asarray(grad[0]), 0.0)
  np.testing.assert_array_equal(np.asarray(grad[2]), 0.0)
  assert np.abs(np.asarray(grad[3])).max() > 1e-3
  if variant == "pos_vs_neg":  # no negatives: the loss is at its limit 0
    assert msml_value(logits[1:2], targets[1:2], mask[1:2]) == pytest.approx(0.0, abs=1e-7)


def test_hand_computed_value():
  logits = [[2.0, 0.0, -1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]
  targets = [[1, 0, 0, 1], [0, 0, 0, 0]]  # row 1 has no positive: it is not counted
  lse_negatives = math.log(math.exp(0.0) + math.exp(-1.0))
  softplus = lambda z: math.log1p(math.exp(z))
  want = (softplus(lse_negatives - 2.0) + softplus(lse_negatives - 1.0)) / 2
  assert msml_value(logits, targets, np.ones((2, 4))) == pytest.approx(want, rel=1e-6)
  assert want == pytest.approx(0.288726, abs=1e-6)  # the formula, by hand


def test_normalized_target_hand_value():
  logits = [[2.0, 0.0, -1.0, 1.0]]
  targets, mask = [[1, 0, 0, 1]], [[1, 1, 0, 1]]  # the -1 is unknown: outside the softmax
  log_z = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.0))
  want = -((2.0 - log_z) + (1.0 - log_z)) / 2
  assert msml_value(logits, targets, mask, variant="normalized_target") == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("variant", losses.MSML_VARIANTS)
def test_masked_labels_are_neither_positive_nor_negative(variant):
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 5)).astype(np.float32)
  targets = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 0, 1], [1, 1, 0, 0, 0]], np.float32)
  mask = np.ones((3, 5), np.float32)
  mask[:, 4] = 0
  value = msml_value(logits, targets, mask, variant=variant)
  # The masked column's target and logit change nothing; dropping it gives the same loss.
  changed_logits, changed_targets = logits.copy(), targets.copy()
  changed_logits[:, 4] = [9.0, -9.0, 30.0]
  changed_targets[:, 4] = 1 - targets[:, 4]
  assert msml_value(changed_logits, changed_targets, mask, variant=variant) == pytest.approx(value, rel=1e-6)
  assert msml_value(logits[:, :4], targets[:, :4], mask[:, :4], variant=variant) == pytest.approx(value, rel=1e-6)
  # Known, the same column changes the loss.
  assert msml_value(logits, targets, np.ones((3, 5)), variant=variant) != pytest.approx(value, rel=1e-3)


@pytest.mark.parametrize("variant", losses.MSML_VARIANTS)
def test_padding_changes_no_term(variant):
  rng = np.random.default_rng(3)
  batch = {"labels": (rng.random((4, 5)) < 0.4).astype(np.float32),
           "label_mask": np.ones((4, 5), np.float32)}
  outputs = {"logits": rng.normal(size=(4, 5)).astype(np.float32),
             "anchor_logit": rng.normal(size=4).astype(np.float32)}
  padded_batch = {k: np.concatenate([v, np.ones_like(v[:2])]) for k, v in batch.items()}
  padded_outputs = {k: np.concatenate([v, 50 * np.ones_like(v[:2])]) for k, v in outputs.items()}
  cfg = config(loss_msml={"variant": variant})
  total, terms = msml.loss(outputs, batch, task=task(), config=cfg, weight=jnp.ones(4))
  padded_total, padded_terms = msml.loss(padded_outputs, padded_batch, task=task(), config=cfg,
                                         weight=jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32))
  for name, value in dict(terms, total=total).items():
    assert float(dict(padded_terms, total=padded_total)[name]) == pytest.approx(float(value), rel=1e-6)


def test_the_anchor_is_the_positive_of_rows_without_a_known_finding():
  targets = jnp.asarray([[0, 0], [1, 0], [1, 0]], jnp.float32)
  mask = jnp.asarray([[1, 1], [1, 1], [0, 1]], jnp.float32)  # row 2's positive is unknown
  logits, ext_targets, ext_mask = msml.with_anchor(jnp.zeros((3, 2)), jnp.asarray([7.0, 8.0, 9.0]),
                                                   targets, mask)
  np.testing.assert_array_equal(np.asarray(ext_targets[:, 2]), [1, 0, 1])
  np.testing.assert_array_equal(np.asarray(ext_mask[:, 2]), [1, 1, 1])
  np.testing.assert_array_equal(np.asarray(logits[:, 2]), [7, 8, 9])


def test_the_total_weighs_its_terms_and_checks_its_fields():
  rng = np.random.default_rng(4)
  batch = {"labels": (rng.random((4, 5)) < 0.4).astype(np.float32),
           "label_mask": np.ones((4, 5), np.float32)}
  outputs = {"logits": rng.normal(size=(4, 5)).astype(np.float32),
             "anchor_logit": rng.normal(size=4).astype(np.float32)}
  cfg = config(loss_msml={"bce_weight": 0.3, "msml_weight": 2.0})
  total, terms = msml.loss(outputs, batch, task=task(), config=cfg, weight=jnp.ones(4))
  assert sorted(terms) == ["bce_loss", "msml_loss"]
  assert float(total) == pytest.approx(0.3 * float(terms["bce_loss"]) + 2 * float(terms["msml_loss"]),
                                       rel=1e-6)
  with pytest.raises(ValueError, match=r"config.loss.msml fields \['lambda'\]"):
    msml.loss(outputs, batch, task=task(), config=config(loss_msml={"lambda": 1}), weight=jnp.ones(4))
  with pytest.raises(ValueError, match="config.model.msml.anchor=True"):
    msml.loss({"logits": outputs["logits"]}, batch, task=task(), config=cfg, weight=jnp.ones(4))


# ---------------------------------------------------------------- the heads


@pytest.mark.parametrize("head", HEADS)
def test_output_shapes(head):
  cfg = config(HEADS[head])
  model = msml.build(cfg, task())
  images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], images)
  pooled = {"gap": 8, "compact": 48}.get(head, 8 * 8)  # the tiny DenseNet's C5 has 8 channels
  assert {k: v.shape for k, v in out.items()} == {
      "logits": (2, NUM_CLASSES), "anchor_logit": (2,), "pooled": (2, pooled)}
  no_anchor = msml.build(config({**HEADS[head], "anchor": False}), task())
  out = jax.eval_shape(lambda x: no_anchor.init_with_output(jax.random.key(0), x, train=False)[0], images)
  assert sorted(out) == ["logits", "pooled"]


@pytest.mark.parametrize("head", HEADS)
def test_training_gradients_are_finite_and_reach_every_parameter(head):
  cfg = config(HEADS[head])
  model = msml.build(cfg, task())
  images = jnp.asarray(np.random.default_rng(9).normal(size=(3, SIZE, SIZE, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  batch = {"labels": jnp.asarray([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], jnp.float32),
           "label_mask": jnp.ones((3, NUM_CLASSES))}

  def total(params):
    outputs, _ = model.apply({**variables, "params": params}, images, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return msml.loss(outputs, batch, task=task(), config=cfg, weight=jnp.ones(3))[0]

  grads = jax.jit(jax.grad(total))(variables["params"])
  for path, grad in traverse_util.flatten_dict(grads).items():
    assert np.isfinite(np.asarray(grad)).all(), path
  # The heads and every backbone learn from the loss.
  flat = traverse_util.flatten_dict(grads)
  for module in ("classifier", "anchor", "backbone") + (("backbone_b",) if head == "two-stream" else ()):
    assert max(np.abs(np.asarray(g)).max() for p, g in flat.items() if p[0] == module) > 0, module


def test_backbones_follow_the_streams_and_settings_are_checked():
  assert msml.METHOD.backbones_of(config()) == (("backbone", "model.backbone"),)
  assert msml.METHOD.backbones_of(config(HEADS["two-stream"])) == (
      ("backbone", "model.backbone"), ("backbone_b", "model.msml.backbone_b"))
  for fields, match in (({"streams": 2}, "needs config.model.msml.backbone_b"),
                        ({"streams": 2, "head": "gap", "backbone_b": TINY_RESNET}, "not 'gap'"),
                        ({"head": "trilinear"}, "config.model.msml.head"),
                        ({"reduce": 8}, r"config.model.msml fields \['reduce'\]")):
    with pytest.raises(ValueError, match=match):
      msml.build(config(fields), task())


def test_signed_sqrt_and_l2_give_unit_norm_features_with_finite_gradients():
  g = jnp.asarray(np.random.default_rng(5).normal(size=(3, 50)) ** 3, jnp.float32)
  g = g.at[2].set(0.0)  # an all-zero row (dead ReLUs) stays finite
  y = msml.signed_sqrt_l2(g)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y[:2]), axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y[0]), np.sign(g[0]) * np.sqrt(np.abs(g[0]) + 1e-8)
                             / np.linalg.norm(np.sqrt(np.abs(g[0]) + 1e-8)), rtol=1e-5)
  assert np.isfinite(np.asarray(jax.grad(lambda g: jnp.sum(msml.signed_sqrt_l2(g)[:, 0]))(g))).all()


def test_compact_sketch_approximates_the_bilinear_inner_product():
  """E <TS(G_1), TS(G_2)> = <G_1, G_2>, with a relative standard deviation of about
  sqrt((1 + 1/cos^2) / D) (1.7% here: D = 8192, cos(G_1, G_2) = 0.87). Measured over these 64
  pairs with seed 0: mean relative error -5e-5, root mean square 2.1%, worst 5.9%."""
  rng = np.random.default_rng(6)
  features, dim = 64, 8192
  hashes, signs = msml.sketch_constants(features, dim, seed=0)
  base = rng.normal(size=(64, 16, features))
  x1 = jnp.asarray(base + 0.3 * rng.normal(size=base.shape), jnp.float32)
  x2 = jnp.asarray(base + 0.3 * rng.normal(size=base.shape), jnp.float32)

  def inner(pool, *args):
    return np.sum(np.asarray(pool(x1, x1, *args)) * np.asarray(pool(x2, x2, *args)), axis=-1)

  error = inner(msml.compact_bilinear_pool, hashes, signs, dim) / inner(msml.bilinear_pool) - 1
  assert abs(error.mean()) < 0.005
  assert np.sqrt(np.mean(error ** 2)) < 0.03


def test_sketch_constants_follow_the_seed():
  hashes, signs = msml.sketch_constants(16, 100, seed=3)
  assert hashes.shape == signs.shape == (2, 16) and hashes.dtype == np.int64
  assert hashes.min() >= 0 and hashes.max() < 100 and set(np.unique(signs)) == {-1.0, 1.0}
  np.testing.assert_array_equal(msml.sketch_constants(16, 100, seed=3)[0], hashes)
  assert not np.array_equal(msml.sketch_constants(16, 100, seed=4)[0], hashes)


# ---------------------------------------------------------------- torch


def randomized_variables(model, images):
  """Initialised variables with non-trivial BatchNorm statistics and affines."""
  return randomize(jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images))


def exported(cfg, tmp_path):
  """(flax model, its variables, formula images NHWC, path of its exported model.safetensors)."""
  model = msml.build(cfg, task())
  images = jnp.asarray(np.random.default_rng(7).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  variables = randomized_variables(model, images)
  path = tmp_path / "model.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(variables, registry.torch_names(cfg)), path)
  return model, variables, images, path


# Relative to each output's largest value, the anchor logit compared with the logits (on its own
# it may sit near 0): about 5x the largest measured (flax vs torch, float32), which was
# logits 1.7e-7, 1.3e-7, 4.6e-7, 2.8e-7 and pooled 2.3e-7, 1.1e-7, 3.3e-7, 5.9e-7 for the
# bilinear, compact, gap and two-stream heads.
PARITY_REL = 3e-6


def comparable(outputs) -> dict[str, np.ndarray]:
  """The outputs as numpy, the anchor logit as a last column of the logits."""
  logits = np.concatenate([np.asarray(outputs["logits"]), np.asarray(outputs["anchor_logit"])[:, None]], -1)
  return {"logits+anchor_logit": logits, "pooled": np.asarray(outputs["pooled"])}


@pytest.mark.parametrize("head", HEADS)
def test_exported_model_loads_strictly_into_the_mirror_and_matches_every_output(head, tmp_path):
  cfg = config(HEADS[head])
  model, variables, images, path = exported(cfg, tmp_path)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  mirror = registry.build_mirror(cfg, task()).eval()
  mirror.load_state_dict(safetensors.torch.load_file(path), strict=True)
  with torch.no_grad():
    got = mirror(torch.from_numpy(np.array(images).transpose(0, 3, 1, 2)))
  assert got.keys() == want.keys()
  for name, value in comparable(want).items():
    assert_close_to_scale(comparable(got)[name], value, rel=PARITY_REL, name=name)
  if head != "gap":  # the bilinear features are L2-normalised
    np.testing.assert_allclose(np.linalg.norm(np.asarray(want["pooled"]), axis=-1), 1.0, rtol=1e-5)
  # Back into flax: every variable as it was.
  back = convert.load_model(path, variables, registry.torch_names(cfg))
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_compact_hashes_are_exported_and_a_wrong_seed_is_refused(tmp_path):
  cfg = config({**HEADS["compact"], "sketch_seed": 5})
  _, variables, _, path = exported(cfg, tmp_path)
  state_dict = safetensors.torch.load_file(path)
  hashes, signs = msml.sketch_constants(8, 48, seed=5)
  np.testing.assert_array_equal(state_dict["sketch.hashes"].numpy(), hashes)
  np.testing.assert_array_equal(state_dict["sketch.signs"].numpy(), signs)
  other = config({**HEADS["compact"], "sketch_seed": 6})
  with pytest.raises(ValueError, match=r"(?s)differing keys \(2\).*sketch.hashes"):
    convert.load_model(path, variables, registry.torch_names(other))
  without = {k: v.numpy() for k, v in state_dict.items() if not k.startswith("sketch.")}
  with pytest.raises(ValueError, match=r"(?s)missing keys \(2\).*sketch.hashes"):
    convert.from_state_dict(without, variables, registry.torch_names(cfg))
  # A model without the sketch has no use for them: they are unused keys there.
  with pytest.raises(ValueError, match=r"unused keys \(2\)"):
    convert.from_state_dict(state_dict, variables, registry.torch_names(config(HEADS["bilinear"])))


@pytest.mark.parametrize("fields, loss_name", [
    ({}, "bce"),
    ({"variant": "normalized_target", "bce_weight": 0.5}, "wbce"),
    ({"anchor": False, "msml_weight": 2.0}, "bce"),
    ({"bce_weight": 0.0}, "bce"),
])
def test_torch_loss_matches_the_flax_loss(fields, loss_name):
  rng = np.random.default_rng(8)
  batch = {"labels": (rng.random((6, NUM_CLASSES)) < 0.3).astype(np.float32),
           "label_mask": (rng.random((6, NUM_CLASSES)) < 0.8).astype(np.float32)}
  batch["labels"][0] = 0  # a No-Finding row
  outputs = {"logits": rng.normal(scale=2, size=(6, NUM_CLASSES)).astype(np.float32),
             "anchor_logit": rng.normal(size=6).astype(np.float32)}
  weight = np.array([1, 1, 1, 1, 1, 0], np.float32)
  cfg = config(loss_msml=fields, loss_name=loss_name)
  want_total, want_terms = msml.loss(jax.tree.map(jnp.asarray, outputs), jax.tree.map(jnp.asarray, batch),
                                     task=task(), config=cfg, weight=jnp.asarray(weight))
  total, terms = torch_msml.loss({k: torch.from_numpy(v) for k, v in outputs.items()},
                                 {k: torch.from_numpy(v) for k, v in batch.items()},
                                 task=task(), config=cfg, weight=torch.from_numpy(weight))
  assert terms.keys() == want_terms.keys()
  assert float(want_terms["msml_loss"]) > 0.05
  for name, value in dict(terms, total=total).items():
    assert_close_to_scale(value.numpy(), np.asarray(dict(want_terms, total=want_total)[name]),
                          rel=1e-6, name=name)
