"""Tests of cxr_jax.backbones and cxr_jax.layers.

Full-size models are checked by shape through `jax.eval_shape` (no compile) and run once each at
64 px with numpy-filled weights; everything that needs init, gradients or training runs on tiny
configs. Numerical equality with torchvision is tested in test_interop.py.
"""

import json
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cxr_jax import backbones, layers

REFERENCE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "torchvision_reference"
             / "reference.json")
TINY_DENSENET = {"name": "densenet121", "growth_rate": 8, "block_config": (2, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
TINY_RESNET = {"name": "resnet50", "stage_sizes": (1, 2, 1, 1), "output_stride": 16}
TINY = [TINY_DENSENET, TINY_RESNET]
SIZE = 64  # full models
TINY_SIZE = 32


def shapes(cfg, size=SIZE, channels=3, batch=2):
  """Abstract variables and stage outputs of the backbone `cfg` describes (traced, not compiled)."""
  model = backbones.build(cfg)
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def numpy_variables(abstract, seed=0):
  """Plausible weights without compiling an init: He-normal kernels, random BatchNorm state."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  values = {}
  for path, leaf in flat.items():
    name = path[-1]
    if name == "kernel":
      values[path] = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ("scale", "var"):
      values[path] = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      values[path] = rng.normal(0, 0.1, leaf.shape)
  return traverse_util.unflatten_dict({p: v.astype(np.float32) for p, v in values.items()})


@pytest.fixture(scope="module", params=[TINY_DENSENET, TINY_RESNET], ids=["densenet", "resnet"])
def tiny(request):
  """A tiny model, numpy-filled variables and an input batch."""
  abstract, _ = shapes(request.param, TINY_SIZE)
  x = np.random.default_rng(1).normal(size=(2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
  return request.param, backbones.build(request.param), numpy_variables(abstract), x


def torchvision_param_count(name):
  """Trainable parameters of torchvision's model in reference.json, without its classifier."""
  with open(REFERENCE) as f:
    keys = json.load(f)["models"][name]["state_dict_keys"]
  return sum(int(np.prod(shape)) for key, shape, _ in keys
             if key.endswith(("weight", "bias")) and not key.startswith(("classifier.", "fc.")))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("cfg, strides, channels", [
    ({"name": "densenet121"}, (4, 8, 16, 32), (256, 512, 1024, 1024)),
    ({"name": "densenet169"}, (4, 8, 16, 32), (256, 512, 1280, 1664)),
    ({"name": "densenet201"}, (4, 8, 16, 32), (256, 512, 1792, 1920)),
    ({"name": "resnet18"}, (4, 8, 16, 32), (64, 128, 256, 512)),
    ({"name": "resnet34", "output_stride": 16}, (4, 8, 16, 16), (64, 128, 256, 512)),
    ({"name": "resnet50"}, (4, 8, 16, 32), (256, 512, 1024, 2048)),
    ({"name": "resnet50", "output_stride": 16}, (4, 8, 16, 16), (256, 512, 1024, 2048)),
    ({"name": "resnet50", "output_stride": 8}, (4, 8, 8, 8), (256, 512, 1024, 2048)),
], ids=lambda p: "-".join(map(str, p.values())) if isinstance(p, dict) else None)
def test_stage_shapes_channels_and_strides(cfg, strides, channels):
  _, out = shapes(cfg)
  assert list(out) == ["C2", "C3", "C4", "C5"]
  chex.assert_shape(list(out.values()), [(2, SIZE // s, SIZE // s, c) for s, c in zip(strides, channels)])
  chex.assert_type(list(out.values()), jnp.float32)


@pytest.mark.parametrize("name, total_with_1000_classes, classifier", [
    ("densenet121", 7_978_856, 1024 * 1000 + 1000),
    ("resnet50", 25_557_032, 2048 * 1000 + 1000),
])
def test_param_counts_equal_torchvision(name, total_with_1000_classes, classifier):
  variables, _ = shapes({"name": name})
  assert count(variables["params"]) == torchvision_param_count(name) == total_with_1000_classes - classifier
  bn_channels = count(variables["params"]) - count(
      [v for p, v in traverse_util.flatten_dict(variables["params"]).items() if p[-1] == "kernel"])
  assert count(variables["batch_stats"]) == bn_channels  # mean + var per BatchNorm channel = scale + bias


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_full_model_forward_at_64px(name):
  abstract, expected = shapes({"name": name})
  model = backbones.build({"name": name})
  x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(numpy_variables(abstract), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
  chex.assert_tree_all_finite(out)
  assert float(out["C5"].min()) >= 0  # both end in a ReLU (DenseNet: relu(norm5))


@pytest.mark.parametrize("cfg", [{"name": "densenet121"}, {"name": "resnet50", "output_stride": 8}],
                         ids=["densenet121", "resnet50-os8"])
def test_bfloat16_compute_keeps_float32_params(cfg):
  variables, out = shapes({**cfg, "dtype": "bfloat16"})
  chex.assert_type(jax.tree.leaves(variables), jnp.float32)
  chex.assert_type(list(out.values()), jnp.bfloat16)


@pytest.mark.parametrize("cfg, fan", [({**TINY_DENSENET, "block_config": (1, 1, 1, 1)}, "fan_in"),
                                      ({"name": "resnet18", "stage_sizes": (1, 1, 1, 1)}, "fan_out")],
                         ids=["densenet", "resnet"])
def test_init_follows_torchvision(cfg, fan):
  model = backbones.build(cfg)
  x = jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3))
  # The rbg key compiles much faster than threefry on CPU; the init scheme is the same.
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  for path, value in traverse_util.flatten_dict(variables).items():
    if path[-1] == "kernel":  # kaiming_normal_: std sqrt(2 / fan), untruncated
      h, w, cin, cout = value.shape
      std = np.sqrt(2 / (h * w * (cin if fan == "fan_in" else cout)))
      if value.size > 2000:
        assert abs(np.std(value) / std - 1) < 0.1, path
        assert np.abs(value).max() > 2.5 * std, path  # untruncated
    else:  # BatchNorm: weight 1, bias 0, running mean 0, running var 1
      np.testing.assert_array_equal(value, 1.0 if path[-1] in ("scale", "var") else 0.0, err_msg=str(path))


@pytest.mark.parametrize("cfg", TINY, ids=["densenet", "resnet"])
def test_one_channel_stem(cfg):
  variables, out = shapes(cfg, TINY_SIZE, channels=1)
  stem = "conv0" if "growth_rate" in cfg else "conv1"
  chex.assert_shape(variables["params"][stem]["kernel"], (7, 7, 1, None))  # HWIO: 1 input channel
  chex.assert_trees_all_equal_shapes(out, shapes(cfg, TINY_SIZE)[1])


def test_batch_stats_update_in_train_mode_only_with_torch_momentum(tiny):
  cfg, model, variables, x = tiny
  stem, conv = ("norm0", "conv0") if "growth_rate" in cfg else ("bn1", "conv1")
  (_, eval_state), (_, state) = jax.jit(lambda v, x: [
      model.apply(v, x, train=train, mutable=["batch_stats"]) for train in (False, True)])(variables, x)
  chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  pre_bn = jax.lax.conv_general_dilated(x, variables["params"][conv]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # torch's momentum 0.1: new = 0.9 * old + 0.1 * batch statistic.
  np.testing.assert_allclose(state["batch_stats"][stem]["mean"],
                             0.9 * variables["batch_stats"][stem]["mean"] + 0.1 * pre_bn.mean(axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-6)


def test_remat_keeps_names_and_gradients():
  cfg = {**TINY_DENSENET, "block_config": (1, 1, 1, 1)}
  variables = numpy_variables(shapes(cfg, TINY_SIZE)[0])
  x = np.random.default_rng(1).normal(size=(2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
  grads = []
  for remat in (False, True):
    model = backbones.build({**cfg, "remat": remat})

    def loss(params, model=model):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return sum(jnp.mean(v**2) for v in out.values())

    grads.append(jax.jit(jax.grad(loss))(variables["params"]))
  chex.assert_trees_all_close(*grads, rtol=1e-4, atol=1e-5)
  for cfg in TINY:  # the same variable names, shapes and dtypes with and without remat
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes(cfg, TINY_SIZE)[0],
                                                  shapes({**cfg, "remat": True}, TINY_SIZE)[0])


def test_build_accepts_config_dict_with_placeholders():
  cfg = ml_collections.ConfigDict({"name": "resnet18", "remat": False, "growth_rate": None,
                                   "block_config": None, "stage_sizes": [1, 1, 1, 1], "output_stride": 8})
  model = backbones.build(cfg)
  assert (model.stage_sizes, model.output_stride, model.block) == ((1, 1, 1, 1), 8, "basic")


@pytest.mark.parametrize("cfg, message", [
    ({"name": "densenet122"}, "valid names: densenet121, densenet169, densenet201, resnet18"),
    ({"name": "resnet50", "growth_rate": 8}, "valid keys: name, stage_sizes, output_stride, width, dtype, remat"),
    ({"name": "densenet121", "output_stride": 8}, "unknown densenet121 config keys ['output_stride']"),
    ({"name": "resnet18", "stage_sizes": [2, 2, 2]}, "resnet18 stage_sizes needs 4 entries, got (2, 2, 2)"),
])
def test_build_rejects_unknown_names_and_keys(cfg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    backbones.build(cfg)


def test_unsupported_output_stride_is_a_clear_error():
  with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 16, 32\]"):
    shapes({"name": "resnet18", "output_stride": 4})


def test_normalize_images_presets_and_channels():
  images = jnp.array([0, 51, 255], jnp.uint8).reshape(1, 1, 3, 1)
  unit = layers.normalize_images(images, **layers.PRESETS["unit"], channels=1)
  np.testing.assert_allclose(unit[..., 0], [[[-1.0, -0.6, 1.0]]], rtol=1e-6)
  net = layers.normalize_images(images, **layers.PRESETS["imagenet"], channels=3, dtype=jnp.bfloat16)
  chex.assert_shape(net, (1, 1, 3, 3))
  chex.assert_type(net, jnp.bfloat16)
  mean, std = (np.array(layers.PRESETS["imagenet"][k]) for k in ("mean", "std"))
  want = (np.array([0, 0.2, 1])[:, None] - mean) / std
  np.testing.assert_allclose(net[0, 0].astype(np.float32), want, rtol=1e-2)
  with pytest.raises(ValueError, match="mean has 3 values; expected 1 or 1"):
    layers.normalize_images(images, **layers.PRESETS["imagenet"], channels=1)


def test_global_avg_pool():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(layers.global_avg_pool(x), x.mean(axis=(1, 2)))
