"""CAN (`cxr_jax.methods.can`, `cxr_jax.interop.torch_can`, `losses.balanced_focal`): the wiring
and its variants, symmetry breaking (and the collapse without it) through the trainer's step, the
balance and attention losses, and the torch mirror, loss and export against flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import datasets
from cxr_jax import experiment, losses, methods, parallel, steps
from cxr_jax.data import pipeline, writer
from cxr_jax.interop import convert, registry, torch_can, torch_modules
from cxr_jax.methods import can
from parity import assert_close_to_scale, randomize

TINY_DENSENET = {"name": "densenet121", "growth_rate": 4, "block_config": (1, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
# At output stride 16 its C5 is twice the DenseNet's and 64 channels wide, not 20.
TINY_RESNET = {"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 8, "output_stride": 16}
SIZE, NUM_CLASSES = 64, 5
VARIANTS = {
    "cross": {},
    "concat": {"fusion": "concat"},
    "no-gating": {"gating": "none"},
    "plain_hadamard": can.PLAIN_HADAMARD,
    "resnet-b-concat": {"fusion": "concat", "backbone_b": TINY_RESNET},
}


def config(model_can=None, loss_can=None, loss_name="balanced_focal"):
  return {"model": {"name": "can", "backbone": TINY_DENSENET, "channels": 3, "dropout": 0.2,
                    "can": dict(model_can or {})},
          "loss": {"name": loss_name, "class_counts": "batch", "focal_gamma": 2.0,
                   "focal_alpha": -1.0, "can": dict(loss_can or {})},
          "dtype": "float32"}


def task():
  return methods.Task(target="labels", class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
                      positives=(3, 10, 1, 40, 7), negatives=(97, 90, 99, 60, 93))


def images(n=2, seed=7):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)), jnp.float32)


def init(cfg, x, seed=0):
  model = can.build(cfg, task())
  return model, jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(x)


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_and_cams_whose_mean_is_the_logit(variant):
  cfg = config(VARIANTS[variant])
  x = images()
  model, variables = init(cfg, x)
  out = model.apply(variables, x, train=False)
  h = SIZE // 32  # the tiny DenseNet's C5
  assert out["logits"].shape == (2, NUM_CLASSES)
  assert out["cams"].shape == (2, h, h, NUM_CLASSES)
  np.testing.assert_allclose(out["cams"].mean(axis=(1, 2)), out["logits"], rtol=1e-5, atol=1e-6)
  fields = can.settings(cfg["model"])
  assert ("attention_a" in out) == (fields["gating"] == "cross")
  assert ("logits_a" in out) == fields["branch_heads"]
  params = variables["params"]
  assert set(params) >= {"backbone", "backbone_b", "head"}
  if fields["gating"] == "cross":
    # Each map gates the other branch: as wide as that branch's C5.
    assert out["attention_a"].shape[-1] == out["features_b"].shape[-1]
    assert out["attention_b"].shape[-1] == out["features_a"].shape[-1]
    np.testing.assert_allclose(out["gated_a"], out["features_a"] * out["attention_b"], rtol=1e-6)
  if variant == "plain_hadamard":
    pooled = (out["features_a"] * out["features_b"]).mean(axis=(1, 2))
    np.testing.assert_allclose(out["logits"], pooled @ params["head"]["kernel"]
                               + params["head"]["bias"], rtol=1e-5, atol=1e-6)


def test_hadamard_of_branches_of_different_widths_is_refused():
  with pytest.raises(ValueError, match="channels differ.*fusion='concat'"):
    init(config({"backbone_b": TINY_RESNET}), images())


@pytest.mark.parametrize("field, value, message", [
    ("gating", "both", "config.model.can.gating must be one of"),
    ("fusion", "sum", "config.model.can.fusion must be one of"),
    ("symetric", True, r"unknown config.model.can fields \['symetric'\]"),
])
def test_bad_fields_are_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    can.build(config({field: value}), task())


def test_backbones_and_their_config_paths():
  assert can.backbone_paths(config()) == (("backbone", "model.backbone"),
                                          ("backbone_b", "model.backbone"))
  assert can.backbone_paths(config({"backbone_b": TINY_RESNET}))[1] == (
      "backbone_b", "model.can.backbone_b")


def test_symmetric_starts_the_branch_layers_equal_and_the_default_does_not():
  x = images()
  for symmetric in (True, False):
    _, variables = init(config({"symmetric": symmetric}), x)
    p = variables["params"]
    for a, b in (("attention_a", "attention_b"), ("head_a", "head_b")):
      same = jax.tree.map(np.array_equal, p[a], p[b])
      assert all(jax.tree.leaves(same)) == symmetric, (a, symmetric)


# ---------------------------------------------------------------- symmetry through training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 16, "val": 4, "test": 4})


def features_after_one_step(data_dir, symmetric):
  """C5 of both branches after one step of the trainer, both backbones starting from the same
  weights (as from one ImageNet file through `init_from=PATH`)."""
  cfg = datasets.tiny_config(data_dir)
  cfg.model.name = "can"
  cfg.model.dropout = 0.5
  cfg.model.can = {"symmetric": symmetric}
  cfg.loss.name = "balanced_focal"
  cfg.loss.can = dict(can.LOSS_DEFAULTS)
  manifest = writer.load_manifest(data_dir)
  mesh = parallel.make_mesh(jax.devices()[:1])
  run = experiment.assemble(cfg, manifest)
  batch = pipeline.host_fields(experiment.train_dataset(cfg, manifest, run.method)[0])[0]
  variables = steps.init_variables(run.model, cfg, jax.random.PRNGKey(0), batch, run.method)
  for collection in ("params", "batch_stats"):
    variables[collection]["backbone_b"] = variables[collection]["backbone"]
  state = steps.create_state(run.model, run.tx, cfg, mesh, batch, run.method, variables)
  step = steps.make_train_step(run.model, run.tx, run.method, run.task, cfg, mesh)
  state, metrics = step(state, parallel.to_global(batch, mesh))
  assert float(metrics["att_loss"]) > 0
  out = steps.apply_model(run.model, run.method, cfg,
                          {"params": state.params, "batch_stats": state.batch_stats}, batch)
  return np.asarray(out["features_a"]), np.asarray(out["features_b"])


def test_branches_part_after_one_step(data_dir):
  fa, fb = features_after_one_step(data_dir, symmetric=False)
  assert np.abs(fa - fb).max() > 1e-3 * np.abs(fa).max()


def test_without_the_symmetry_breakers_the_branches_stay_equal(data_dir):
  """The control of the test above: identical starts and symmetric training do collapse."""
  fa, fb = features_after_one_step(data_dir, symmetric=True)
  assert_close_to_scale(fb, fa, rel=1e-6, name="features_b vs features_a")


# ---------------------------------------------------------------- the losses


def balanced_focal_by_hand(logits, targets, pos, neg, gamma):
  p = 1 / (1 + np.exp(-logits))
  total = pos + neg
  terms = -(targets * (total / pos) * (1 - p) ** gamma * np.log(p)
            + (1 - targets) * (total / neg) * p ** gamma * np.log(1 - p))
  return terms.mean()


def test_balance_loss_hand_value_with_training_and_smoothed_batch_counts():
  logits = np.array([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
  targets = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  mask = np.ones_like(targets)
  pos, neg = np.array([2.0, 5.0, 1.0]), np.array([8.0, 5.0, 9.0])
  got = losses.balanced_focal(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                              (jnp.asarray(pos), jnp.asarray(neg)), gamma=2.0)
  np.testing.assert_allclose(got, balanced_focal_by_hand(logits, targets, pos, neg, 2.0), rtol=1e-6)
  # Batch counts, each + 1: class 1 has no positive in the batch and stays finite.
  batch = losses.balanced_focal(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(batch, balanced_focal_by_hand(
      logits, targets, targets.sum(0) + 1, (1 - targets).sum(0) + 1, 2.0), rtol=1e-6)


def test_balance_loss_down_weights_easy_examples_and_is_stable_in_log_space():
  easy, hard = jnp.array([[8.0]]), jnp.array([[-8.0]])
  one = jnp.ones((1, 1))
  counts = (jnp.array([1.0]), jnp.array([1.0]))
  assert losses.balanced_focal(easy, one, one, counts) < 1e-6 * losses.balanced_focal(
      hard, one, one, counts)
  extreme = jnp.array([[200.0, -200.0]])
  value, grad = jax.value_and_grad(lambda z: losses.balanced_focal(
      z, jnp.array([[0.0, 1.0]]), jnp.ones((1, 2))))(extreme)
  assert np.isfinite(value) and np.all(np.isfinite(grad)) and value > 100


def test_loss_terms_and_their_checks():
  rng = np.random.default_rng(3)
  batch = {"labels": jnp.asarray((rng.random((4, NUM_CLASSES)) < 0.3), jnp.float32),
           "label_mask": jnp.ones((4, NUM_CLASSES))}
  outputs = {k: jnp.asarray(rng.normal(size=(4, NUM_CLASSES)), jnp.float32)
             for k in ("logits", "logits_a", "logits_b")}
  weight = jnp.ones(4)
  cfg = config(loss_can={"att_weight": 0.5})
  total, terms = can.loss(outputs, batch, task=task(), config=cfg, weight=weight)
  cls = lambda z: losses.balanced_focal(z, batch["labels"], batch["label_mask"])
  np.testing.assert_allclose(terms["cls_loss"], cls(outputs["logits"]), rtol=1e-6)
  np.testing.assert_allclose(terms["att_loss"], cls(outputs["logits_a"]) + cls(outputs["logits_b"]),
                             rtol=1e-6)
  np.testing.assert_allclose(total, terms["cls_loss"] + 0.5 * terms["att_loss"], rtol=1e-6)
  plain = {"logits": outputs["logits"]}
  with pytest.raises(ValueError, match="needs branch heads"):
    can.loss(plain, batch, task=task(), config=cfg, weight=weight)
  with pytest.raises(ValueError, match="compares attention maps"):
    can.loss(plain, batch, task=task(), config=config(loss_can={"attention_loss": "consistency"}),
             weight=weight)
  total, terms = can.loss(plain, batch, task=task(), config=config(loss_can={"att_weight": 0.0}),
                          weight=weight)
  assert float(terms["att_loss"]) == 0.0 and float(total) == float(terms["cls_loss"])


def test_consistency_is_zero_for_proportional_maps_and_ignores_padding():
  rng = np.random.default_rng(4)
  a = jnp.asarray(rng.random((3, 4, 4, 6)), jnp.float32)
  np.testing.assert_allclose(can.consistency_loss(a, 2.5 * a, jnp.ones(3)), 0.0, atol=1e-12)
  b = jnp.asarray(rng.random((3, 4, 4, 6)), jnp.float32)
  garbage = b.at[2].set(1e3 * rng.random((4, 4, 6)))
  weight = jnp.array([1.0, 1.0, 0.0])
  assert float(can.consistency_loss(a, b, weight)) > 0
  np.testing.assert_allclose(can.consistency_loss(a, garbage, weight),
                             can.consistency_loss(a, b, weight), rtol=1e-6)


# ---------------------------------------------------------------- torch


# Relative to each output's largest value: about 4x the largest measured flax-vs-torch float32
# difference over the variants and outputs (7.2e-7, the CAMs without gating; logits 4.4e-7).
PARITY_REL = 3e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_model_loads_strictly_into_the_mirror_and_matches_every_output(variant, tmp_path):
  cfg = config(VARIANTS[variant])
  x = images()
  model, variables = init(cfg, x)
  variables = randomize(variables)
  path = tmp_path / "model.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(variables, registry.torch_names(cfg)),
                                    path)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  mirror = registry.build_mirror(cfg, task()).eval()
  mirror.load_state_dict(safetensors.torch.load_file(path), strict=True)
  with torch.no_grad():
    got = mirror(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))
  assert got.keys() == want.keys()
  for name, value in want.items():
    assert_close_to_scale(got[name].numpy(), np.asarray(value), rel=PARITY_REL, name=name)
  back = convert.load_model(path, variables, registry.torch_names(cfg))
  jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize("loss_name, loss_can, class_counts", [
    ("balanced_focal", {}, "train"),
    ("balanced_focal", {"attention_loss": "consistency", "att_weight": 0.3}, "batch"),
    ("bce", {}, "batch"),
    ("balanced_focal", {"att_weight": 0.0}, "batch"),
])
def test_torch_loss_matches_the_flax_loss(loss_name, loss_can, class_counts):
  rng = np.random.default_rng(8)
  n = 6
  batch = {"labels": (rng.random((n, NUM_CLASSES)) < 0.3).astype(np.float32),
           "label_mask": (rng.random((n, NUM_CLASSES)) < 0.8).astype(np.float32)}
  outputs = {k: rng.normal(scale=2, size=(n, NUM_CLASSES)).astype(np.float32)
             for k in ("logits", "logits_a", "logits_b")}
  outputs.update({k: rng.random((n, 2, 2, 7)).astype(np.float32)
                  for k in ("attention_a", "attention_b")})
  weight = np.array([1, 1, 1, 1, 1, 0], np.float32)
  cfg = config(loss_can=loss_can, loss_name=loss_name)
  cfg["loss"]["class_counts"] = class_counts
  want_total, want_terms = can.loss(jax.tree.map(jnp.asarray, outputs),
                                    jax.tree.map(jnp.asarray, batch), task=task(), config=cfg,
                                    weight=jnp.asarray(weight))
  total, terms = torch_can.loss({k: torch.from_numpy(v) for k, v in outputs.items()},
                                {k: torch.from_numpy(v) for k, v in batch.items()},
                                task=task(), config=cfg, weight=torch.from_numpy(weight))
  assert terms.keys() == want_terms.keys()
  for name, value in dict(terms, total=total).items():
    assert_close_to_scale(value.numpy(), np.asarray(dict(want_terms, total=want_total)[name]),
                          rel=1e-6, name=name)


def test_torch_balance_loss_matches_flax_with_training_counts():
  rng = np.random.default_rng(9)
  logits = rng.normal(scale=3, size=(8, NUM_CLASSES)).astype(np.float32)
  targets = (rng.random((8, NUM_CLASSES)) < 0.4).astype(np.float32)
  mask = (rng.random((8, NUM_CLASSES)) < 0.9).astype(np.float32)
  cfg = config()["loss"]
  for counts in ("train", "batch"):
    cfg = dict(cfg, class_counts=counts)
    want = losses.classification_loss(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.asarray(mask), cfg, task())
    got = torch_modules.classification_loss(torch.from_numpy(logits), torch.from_numpy(targets),
                                            torch.from_numpy(mask), cfg, task())
    assert_close_to_scale(got.numpy(), np.asarray(want), rel=1e-6, name=counts)
