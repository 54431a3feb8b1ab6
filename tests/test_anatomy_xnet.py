"""Anatomy-XNet (`cxr_jax.methods.anatomy_xnet`, `cxr_jax.interop.torch_anatomy_xnet`): shapes of
every variant, PWAP's properties, A3 with a full mask, the organ groups and their errors, the mask
resizes against torch's, the torch mirror on every output with a strict export round trip, and
the traced export with its anatomy input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import datasets
from cxr_jax import export, methods, train
from cxr_jax.data import labels
from cxr_jax.interop import convert, registry
from cxr_jax.methods import anatomy_xnet
from parity import assert_close_to_scale, randomize

TINY_DENSENET = {"name": "densenet121", "growth_rate": 4, "block_config": (1, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
SIZE, NUM_CLASSES = 64, 5
ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum",
                 "abdomen")  # the phantom's
VARIANTS = {
    "default": {},
    "sum": {"fusion": "sum"},
    "bilinear-r0.5": {"mask_resize": "bilinear", "reduction": 0.5},
    "three-groups": {"groups": "right=right_lung,left=left_lung,heart=heart+mediastinum"},
    "a3-off": {"a3": False},
}


def config(model_axn=None, dropout=0.1):
  return {"model": {"name": "anatomy_xnet", "backbone": TINY_DENSENET, "channels": 3,
                    "dropout": dropout, "anatomy_xnet": dict(model_axn or {})},
          "loss": {"name": "bce", "class_counts": "batch", "focal_gamma": 2.0,
                   "focal_alpha": -1.0},
          "dtype": "float32"}


def task(anatomy_names=ANATOMY_NAMES):
  return methods.Task(target="labels", class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
                      anatomy_names=anatomy_names)


def inputs(n=2, seed=7, size=SIZE):
  """Random images and blocky anatomy maps (8 x 8 px regions of random ids)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
  blocks = rng.integers(0, len(ANATOMY_NAMES), (n, size // 8, size // 8), dtype=np.uint8)
  return x, jnp.asarray(np.kron(blocks, np.ones((8, 8), np.uint8)))


def init(cfg, x, anatomy, seed=0):
  model = anatomy_xnet.build(cfg, task())
  return model, jax.jit(lambda x, a: model.init(jax.random.key(seed), x, train=False,
                                                anatomy=a))(x, anatomy)


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_and_parameters(variant):
  cfg = config(VARIANTS[variant])
  x, anatomy = inputs()
  model, variables = init(cfg, x, anatomy)
  out = model.apply(variables, x, train=False, anatomy=anatomy)
  h, c = SIZE // 32, out["features"].shape[-1]  # the tiny DenseNet's C5
  fields = anatomy_xnet.settings(cfg["model"])
  groups = len(anatomy_xnet.parse_groups(fields["groups"])) if fields["a3"] else 0
  depth = c * groups if groups and fields["fusion"] == "concat" else c
  assert out["logits"].shape == (2, NUM_CLASSES) and out["logits"].dtype == jnp.float32
  assert out["cams"].shape == (2, h, h, NUM_CLASSES) and out["cams"].dtype == jnp.float32
  assert out["features"].shape == (2, h, h, c) and out["attended"].shape == (2, h, h, depth)
  a3 = {k for k in variables["params"] if k.startswith("a3_")}
  assert len(a3) == groups and set(variables["params"]) == {"backbone", "classifier"} | a3
  if groups:
    block = variables["params"][sorted(a3)[0]]
    assert block["avg"]["kernel"].shape == (1, 1, c, int(c * fields["reduction"]))
  else:
    np.testing.assert_array_equal(out["attended"], out["features"])


def test_train_mode_draws_dropout_and_updates_batch_stats():
  x, anatomy = inputs()
  model, variables = init(config(), x, anatomy)
  out, updates = model.apply(variables, x, train=True, anatomy=anatomy,
                             rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
  assert np.all(np.isfinite(out["logits"]))
  assert set(updates["batch_stats"]) == {"backbone", "a3_lungs", "a3_heart"}


# ---------------------------------------------------------------- PWAP


def test_pwap_weights_sum_to_one_over_space_per_class():
  logit_maps = jnp.asarray(np.random.default_rng(0).normal(scale=5, size=(3, 4, 5, 6)),
                           jnp.float32)
  weights = anatomy_xnet.pwap_weights(logit_maps)
  np.testing.assert_allclose(weights.sum(axis=(1, 2)), np.ones((3, 6)), rtol=1e-6)
  sigmoid = jax.nn.sigmoid(logit_maps)
  np.testing.assert_allclose(weights, sigmoid / sigmoid.sum(axis=(1, 2), keepdims=True),
                             rtol=1e-5)
  # Finite where sigmoid underflows everywhere: the log-space form has no 0/0.
  assert np.all(np.isfinite(anatomy_xnet.pwap_weights(jnp.full((1, 2, 2, 1), -200.0))))


def test_pwap_of_a_constant_logit_map_is_global_average_pooling():
  features = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 7)), jnp.float32)
  pooled = anatomy_xnet.pwap_pool(features, anatomy_xnet.pwap_weights(jnp.full((2, 4, 4, 3), 1.7)))
  for k in range(3):
    np.testing.assert_allclose(pooled[:, k], features.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_pwap_is_class_specific():
  """Two classes whose maps peak at different positions pool the features there."""
  features = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 7)), jnp.float32)
  maps = np.full((1, 4, 4, 2), -30.0, np.float32)
  maps[0, 0, 0, 0] = maps[0, 3, 2, 1] = 30.0
  pooled = anatomy_xnet.pwap_pool(features, anatomy_xnet.pwap_weights(jnp.asarray(maps)))
  np.testing.assert_allclose(pooled[0, 0], features[0, 0, 0], rtol=1e-5)
  np.testing.assert_allclose(pooled[0, 1], features[0, 3, 2], rtol=1e-5)


def test_logits_are_each_class_pooled_vector_through_its_own_weights():
  x, anatomy = inputs()
  model, variables = init(config(), x, anatomy)
  variables = randomize(variables)
  out = model.apply(variables, x, train=False, anatomy=anatomy)
  pooled = anatomy_xnet.pwap_pool(out["attended"], anatomy_xnet.pwap_weights(out["cams"]))
  head = variables["params"]["classifier"]
  want = np.einsum("bkd,dk->bk", pooled, head["kernel"][0, 0]) + head["bias"]
  np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
  cams = np.einsum("bhwd,dk->bhwk", out["attended"], head["kernel"][0, 0]) + head["bias"]
  np.testing.assert_allclose(out["cams"], cams, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- A3 and the masks


def test_a3_with_an_all_ones_mask_is_bn_of_the_features():
  """F_m == F, so w * F_m + (1 - w) * F == F whatever w: the output is BN(F) (fresh statistics:
  F / sqrt(1 + eps)); a partial mask changes it."""
  features = jnp.asarray(np.abs(np.random.default_rng(3).normal(size=(2, 4, 4, 6))), jnp.float32)
  block = anatomy_xnet.AnatomyAwareAttention()
  ones = jnp.ones((2, 4, 4, 1))
  variables = block.init(jax.random.key(0), features, ones, train=False)
  out = block.apply(variables, features, ones, train=False)
  np.testing.assert_allclose(out, features / np.sqrt(1 + 1e-5), rtol=1e-6)
  half = ones.at[:, :2].set(0.0)
  assert np.abs(block.apply(variables, features, half, train=False) - out).max() > 1e-3


def test_group_masks_select_the_group_regions():
  anatomy = jnp.asarray(np.array([[[2, 3], [4, 0]]], np.uint8))
  mask = anatomy_xnet.group_mask(anatomy, (2, 3), (2, 2), "area")
  np.testing.assert_array_equal(mask[0, :, :, 0], [[1, 1], [0, 0]])
  coarse = anatomy_xnet.group_mask(anatomy, (2, 3), (1, 1), "area")
  np.testing.assert_allclose(coarse[0, 0, 0, 0], 0.5)  # the fraction of the cell inside


@pytest.mark.parametrize("kind", anatomy_xnet.MASK_RESIZES)
@pytest.mark.parametrize("out_size, in_size", [(2, 64), (5, 37), (7, 7), (16, 512), (7, 4)])
def test_resize_matrices_equal_torch(kind, out_size, in_size):
  rng = np.random.default_rng(out_size * in_size)
  image = rng.random((1, 1, in_size, in_size))
  if kind == "area":
    want = F.adaptive_avg_pool2d(torch.from_numpy(image), out_size)
  else:
    want = F.interpolate(torch.from_numpy(image), size=(out_size, out_size), mode="bilinear",
                         align_corners=False)
  matrix = anatomy_xnet.resize_matrix(kind, out_size, in_size)
  np.testing.assert_allclose(matrix @ image[0, 0] @ matrix.T, want[0, 0].numpy(), rtol=1e-12,
                             atol=1e-12)


def test_groups_parse_and_bad_groups_are_refused_clearly():
  assert anatomy_xnet.group_ids(anatomy_xnet.DEFAULTS["groups"], ANATOMY_NAMES) == (
      ("lungs", (2, 3)), ("heart", (4,)))
  x, anatomy = inputs()
  with pytest.raises(ValueError, match=r"names anatomy regions \['left_lungs', 'lung'\] that the "
                     r"dataset lacks; its anatomy_names: \['background', 'body', 'right_lung'"):
    anatomy_xnet.build(config({"groups": "lungs=lung+left_lungs,heart=heart"}), task())
  with pytest.raises(ValueError, match="lacks; its anatomy_names: \\[\\]"):
    anatomy_xnet.build(config(), task(anatomy_names=()))
  for spec in ("lungs", "lungs=", "2x=heart", "a=heart,a=heart", ""):
    with pytest.raises(ValueError, match="config.model.anatomy_xnet.groups"):
      anatomy_xnet.parse_groups(spec)
  with pytest.raises(ValueError, match="config.model.anatomy_xnet.fusion must be one of"):
    anatomy_xnet.build(config({"fusion": "max"}), task())
  with pytest.raises(ValueError, match=r"unknown config.model.anatomy_xnet fields \['group'\]"):
    anatomy_xnet.build(config({"group": "lungs=right_lung"}), task())
  # Without A3 no anatomy is read, so no region needs to exist.
  anatomy_xnet.build(config({"a3": False, "groups": "x=nothing"}), task(anatomy_names=()))


# ---------------------------------------------------------------- torch


# Relative to each output's largest value: about 4x the largest measured flax-vs-torch float32
# difference over the variants, outputs and 3 seeds (1.3e-6, the backbone's C5; logits 1.9e-7,
# CAMs 2.9e-7).
PARITY_REL = 5e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_weights_load_strictly_into_the_mirror_and_match_every_output(variant, tmp_path):
  cfg = config(VARIANTS[variant])
  x, anatomy = inputs(n=3, size=72)  # 72 px: a 2 x 2 C5, 9 px per cell (area bins of 9 and 9)
  model, variables = init(cfg, x, anatomy)
  variables = randomize(variables)
  path = tmp_path / "model.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(variables, registry.torch_names(cfg)),
                                    path)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda v, x, a: model.apply(v, x, train=False, anatomy=a))(variables, x,
                                                                                anatomy)
  mirror = registry.build_mirror(cfg, task()).eval()
  mirror.load_state_dict(safetensors.torch.load_file(path), strict=True)
  with torch.no_grad():
    got = mirror(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
                 anatomy=torch.from_numpy(np.array(anatomy)))
  assert got.keys() == want.keys()
  for name, value in want.items():
    assert_close_to_scale(got[name].numpy(), np.asarray(value), rel=PARITY_REL, name=name)
  back = convert.load_model(path, variables, registry.torch_names(cfg))
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_trained_model_exports_and_the_traced_model_reads_the_anatomy(tmp_path):
  """Two trainer steps on a tiny prepared dataset with anatomy maps, `cxr_jax.export`, and the
  traced model.pt (image, anatomy) -> scores: equal to the mirror's, and its scores move with
  the anatomy map."""
  data_dir = datasets.write(tmp_path / "ds", {"train": 16, "val": 4, "test": 4})
  cfg = datasets.tiny_config(data_dir, steps=2, eval_every=2)
  cfg.model.name = "anatomy_xnet"
  cfg.checkpoint.every = 2
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(cfg, workdir)
  assert {"loss", "cls_loss"} <= set(last["train"])
  out = export.export(workdir, str(tmp_path / "torch"))
  spec = json.load(open(os.path.join(out["out"], "preprocessing.json")))
  assert spec["extra_inputs"] == ["anatomy"]
  model = torch.jit.load(os.path.join(out["out"], "model.pt"))
  rng = np.random.default_rng(0)
  image = torch.from_numpy(rng.random((2, 1, 32, 32), np.float32))
  lungs = torch.full((2, 32, 32), 2, dtype=torch.uint8)  # datasets.ANATOMY_NAMES: right_lung
  with torch.no_grad():
    scores, elsewhere = model(image, lungs), model(image, torch.zeros_like(lungs))
  assert scores.shape == (2, len(labels.NIH_LABELS)) and torch.all((scores >= 0) & (scores <= 1))
  assert (scores - elsewhere).abs().max() > 0
