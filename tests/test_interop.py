"""Tests of cxr_jax.interop: the torch mirrors, flax <-> torch conversion, and torchvision itself.

Weights come from the formula of `shared/fixtures/torchvision_reference/README.md` (no init
compiles): for torch keys as the README defines it, and for flax-born models the same formula on
the flax path. Full-size models are converted without compiling; the flax forwards that compare
numbers run at 64 px, full size only against torchvision's reference.
"""

import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import linen as nn
from flax import traverse_util

from configs import common
from cxr_jax import backbones, methods
from cxr_jax.data import labels
from cxr_jax.interop import convert, registry
from cxr_jax.interop import torch_modules
from parity import assert_close_to_scale

REFERENCE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "torchvision_reference"
             / "reference.json")
TINY_DENSENET = {"name": "densenet121", "growth_rate": 8, "block_config": (2, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
SIZE = 64
NUM_CLASSES = 14


@pytest.fixture(autouse=True, scope="module")
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def formula_h(p: float, shape) -> np.ndarray:
  """The README's uniform-looking values in [-0.5, 0.5), float64, laid out in `shape` (C order)."""
  v = np.sin(12.9898 * (np.arange(int(np.prod(shape)), dtype=np.float64) + p)) * 43758.5453
  return (v - np.floor(v) - 0.5).reshape(shape)


def formula(key: str, shape, kind: str, fan_in: int = 0) -> np.ndarray:
  """The README's value of tensor `key`; kind: kernel (conv/linear weight), scale, bias, mean, var."""
  h = formula_h(float(sum(key.encode()) % 1000), shape)
  if kind == "kernel":
    return h * np.sqrt(24 / fan_in)
  return {"scale": 1 + 0.4 * h, "bias": 0.2 * h, "mean": 0.2 * h, "var": 1 + 2 * h * h}[kind]


def torch_formula_state_dict(keys) -> dict[str, np.ndarray]:
  """The reference weights for torchvision's `(key, shape, dtype)` list."""
  state_dict = {}
  for key, shape, dtype in keys:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
      state_dict[key] = np.zeros(shape, np.int64)
      continue
    kind = {"running_mean": "mean", "running_var": "var", "bias": "bias"}.get(leaf)
    kind = kind or ("scale" if len(shape) == 1 else "kernel")
    state_dict[key] = formula(key, tuple(shape), kind, int(np.prod(shape[1:]))).astype(dtype)
  return state_dict


def flax_formula_variables(abstract) -> dict:
  """A flax-born model: the formula on each flax path (a kernel's fan-in is all but its last axis)."""
  return traverse_util.unflatten_dict({
      path: formula("/".join(path), leaf.shape, path[-1], int(np.prod(leaf.shape[:-1]))).astype(np.float32)
      for path, leaf in traverse_util.flatten_dict(abstract).items()})


def formula_images(channels=3) -> np.ndarray:
  """The README's input, 4 * h with p = 0, as NCHW float32."""
  return (4 * formula_h(0.0, (2, 3, SIZE, SIZE)))[:, :channels].astype(np.float32)


def experiment(backbone: dict, channels: int = 3):
  """The project's base config with this backbone and input channel count."""
  config = common.get_config()
  config.data.image_size = SIZE  # the tests' input size, which mirrors may size their layers by
  config.model.backbone.update(backbone)
  config.model.channels = channels
  return config


def task(num_classes: int = NUM_CLASSES) -> methods.Task:
  """A finding-label task with `num_classes` outputs."""
  return methods.Task(target="labels", class_names=tuple(f"class{i}" for i in range(num_classes)),
                      anatomy_names=labels.ANATOMY_VOCABULARY)


# The package's own methods; a method registered from elsewhere (tests/toy_method.py, with its extra
# input and outputs) is checked by its own tests (tests/test_contract.py).
PACKAGE_METHODS = sorted(m.name for m in pkgutil.iter_modules(methods.__path__)
                         if m.name in methods.available())


# A backbone for each method that takes only some (HAM: a ResNet at output stride 8; SPF: a C5
# of 8x8 at 64 px, which its default 4x4 grid fits).
METHOD_BACKBONES = {"ham": {"name": "resnet50", "stage_sizes": (1, 1, 1, 1)},
                    "spf": {"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 8,
                            "output_stride": 8}}
# Methods whose loss reads the logits alone and `config.loss`; the others check their torch loss in
# their own tests (tests/test_ham_interop.py, tests/test_spf.py).
LOGITS_LOSS_METHODS = ("baseline",)


def flax_model(config, num_classes: int = NUM_CLASSES):
  return methods.get(config.model.name).build(config, task(num_classes))


def mirror_model(config, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
  return registry.build_mirror(config, task(num_classes))


def abstract_variables(model, channels=3, inputs=()):
  """The model's variables, abstract; `inputs` are the method's extra inputs (region-id maps)."""
  x = jax.ShapeDtypeStruct((2, SIZE, SIZE, channels), jnp.float32)
  extra = {name: jax.ShapeDtypeStruct((2, SIZE, SIZE), jnp.uint8) for name in inputs}
  return jax.eval_shape(lambda x, e: model.init(jax.random.key(0), x, train=False, **e), x, extra)


def zeros_like_abstract(abstract):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def randomize_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
  """Non-trivial BatchNorm state and affine parameters, so conversions that drop them show."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2), (m.running_mean, -0.2, 0.2),
                                  (m.running_var, 0.5, 2.0)):
          tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
  return module


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in module.state_dict().items()}


def named_outputs(out, layout: str) -> dict[str, np.ndarray]:
  """Every output of a model by name: a backbone's stage maps, or a method's outputs with its
  stage maps as `features/C2`...; stage maps as NCHW. Every other output (logits, cams, pooled,
  ...) is as returned: the mirrors return them in flax's layout (cams NHWC)."""
  stages, rest = (out["features"], {k: v for k, v in out.items() if k != "features"}) if (
      "features" in out) else (out, {})
  prefix = "features/" if "features" in out else ""
  named = {prefix + k: np.asarray(v).transpose(0, 3, 1, 2) if layout == "NHWC" else np.asarray(v)
           for k, v in stages.items()}
  named.update({k: np.asarray(v) for k, v in rest.items()})
  return named


def assert_torch_matches_flax(model, variables, mirror, channels, *, rel) -> None:
  """The torch mirror gives every output of the flax model (each stage map and every other
  output, e.g. logits, cams, pooled features) on the formula input, each within its `rel` of that
  output's largest value. `rel`: one bound for all, or {output name: bound} naming every output
  (`features` for all stage maps)."""
  x = formula_images(channels)
  flax_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    torch_out = mirror.eval()(torch.from_numpy(x))
  flax_named, torch_named = named_outputs(flax_out, "NHWC"), named_outputs(torch_out, "NCHW")
  assert flax_named.keys() == torch_named.keys()
  for name, want in flax_named.items():
    bound = rel[name.split("/")[0]] if isinstance(rel, dict) else rel
    assert_close_to_scale(torch_named[name], want, rel=bound, name=name)


# ---------------------------------------------------------------- torchvision as the reference


# Largest |float32 - float64 reference| allowed, relative to the largest |reference| of logits and
# pooled features (and of the logits for the spatial mean of the CAMs, which is the logits);
# measured (flax, torch mirror): densenet121 7.3e-7, 9.0e-7 of 1.1 and 4.1 (CAM mean 5.1e-7,
# 4.8e-7); resnet50 4.9e-7, 5.4e-7 of 556 and 913 (CAM mean 3.9e-7, 3.0e-7).
REFERENCE_REL = {"densenet121": 5e-6, "resnet50": 3e-6}
# Largest |torch mirror - flax| allowed at full size on the torchvision weights, per output as
# in `assert_torch_matches_flax`; measured: densenet121 stage maps 8.1e-7 (worst), cams 6.8e-7,
# logits 8.5e-7, pooled 2.9e-7; resnet50 stage maps 9.1e-7, cams 8.3e-7, logits 6.3e-7, pooled 4.0e-7.
FULL_SIZE_PARITY = {
    "densenet121": {"features": 4e-6, "cams": 4e-6, "logits": 5e-6, "pooled": 2e-6},
    "resnet50": {"features": 5e-6, "cams": 5e-6, "logits": 4e-6, "pooled": 2e-6},
}


@pytest.fixture(scope="module", params=sorted(REFERENCE_REL))
def reference(request):
  """torchvision's key list, logits and pooled features for the formula weights, the flax model and
  the parity bound."""
  with open(REFERENCE) as f:
    ref = json.load(f)["models"][request.param]
  config = experiment({"name": request.param})
  state_dict = torch_formula_state_dict(ref["state_dict_keys"])
  model = flax_model(config)
  variables = convert.from_state_dict(state_dict, abstract_variables(model), registry.torch_names(config))
  return ref, config, state_dict, model, variables, REFERENCE_REL[request.param]


@pytest.fixture(scope="module")
def reference_outputs(reference):
  """{"flax": outputs, "torch": outputs} of the flax model and the torch mirror (torchvision's
  formula weights, loaded strictly) on the formula input, as numpy; computed once per model."""
  _, config, state_dict, model, variables, _ = reference
  x = formula_images()
  flax_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
  mirror = mirror_model(config).eval()
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    torch_out = mirror(torch.from_numpy(x))
  return {"flax": jax.tree.map(np.asarray, flax_out), "torch": jax.tree.map(np.asarray, torch_out)}


def assert_reproduces_torchvision(out, ref, rel, framework):
  """Logits and pooled features as torchvision's float64 reference, and CAMs whose spatial mean is
  the reference logits (the head applied at every C5 position, averaged)."""
  assert out["cams"].shape == (2, 2, 2, NUM_CLASSES) and out["cams"].dtype == np.float32
  for key, actual, want in (("logits", out["logits"], ref["logits_float64"]),
                            ("pooled", out["pooled"], ref["pooled_features_float64"]),
                            ("cams spatial mean", out["cams"].astype(np.float64).mean(axis=(1, 2)),
                             ref["logits_float64"])):
    assert_close_to_scale(actual, want, rel=rel, name=f"{framework} {key}")


def test_flax_model_reproduces_torchvision_logits(reference, reference_outputs):
  ref, _, _, _, _, rel = reference
  assert_reproduces_torchvision(reference_outputs["flax"], ref, rel, "flax")


def test_torch_mirror_reproduces_torchvision_logits(reference, reference_outputs):
  ref, _, _, _, _, rel = reference
  assert_reproduces_torchvision(reference_outputs["torch"], ref, rel, "torch")


def test_torch_mirror_matches_flax_on_every_output_at_full_size(reference, reference_outputs):
  _, config, _, _, _, _ = reference
  flax_named = named_outputs(reference_outputs["flax"], "NHWC")
  torch_named = named_outputs(reference_outputs["torch"], "NCHW")
  assert flax_named.keys() == torch_named.keys() == {
      "logits", "cams", "pooled", "features/C2", "features/C3", "features/C4", "features/C5"}
  bounds = FULL_SIZE_PARITY[config.model.backbone.name]
  for name, want in flax_named.items():
    assert_close_to_scale(torch_named[name], want, rel=bounds[name.split("/")[0]], name=name)


def test_exported_baseline_has_exactly_torchvisions_keys(reference):
  ref, config, state_dict, _, variables, _ = reference
  exported = convert.to_state_dict(variables, registry.torch_names(config))
  assert {k: (list(v.shape), str(v.dtype)) for k, v in exported.items()} == {
      k: (shape, dtype) for k, shape, dtype in ref["state_dict_keys"]}
  assert len(exported) == len(ref["state_dict_keys"])
  assert all(np.array_equal(exported[k], state_dict[k]) for k in state_dict)


# ---------------------------------------------------------------- mirrors and round trips


ROUND_TRIP = [{"name": n} for n in backbones.ARCHITECTURES] + [{"name": "resnet50", "output_stride": 8}]


@pytest.mark.parametrize("backbone", ROUND_TRIP, ids=lambda b: "-os".join(str(v) for v in b.values()))
def test_torch_flax_torch_is_bit_exact(backbone):
  mirror = randomize_batch_norm(torch_modules.backbone(backbone))
  state_dict = numpy_state_dict(mirror)
  names = convert.TorchNames((convert.backbone_scope(backbone),))
  variables = convert.from_state_dict(state_dict, abstract_variables(backbones.build(backbone)), names)
  back = convert.to_state_dict(variables, names)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


# (backbone, input channels, largest |torch - flax| allowed relative to the output's largest |flax|
# value, measured as the worst of its stage maps, in the comment).
PARITY = [
    (TINY_DENSENET, 3, 2e-6),  # 3.8e-7
    ({"name": "resnet18", "stage_sizes": (1, 1, 1, 1)}, 3, 5e-6),  # 8.8e-7
    ({"name": "resnet34", "stage_sizes": (1, 1, 1, 1), "output_stride": 8}, 3, 5e-6),  # 8.0e-7
    ({"name": "resnet50", "stage_sizes": (1, 2, 1, 1), "output_stride": 16}, 3, 5e-6),  # 8.4e-7
    ({"name": "resnet50", "stage_sizes": (1, 1, 1, 2), "output_stride": 8}, 1, 5e-6),  # 9.1e-7
    # The phantom's HAM backbone (configs/phantom.py): narrow, output stride 8, one channel.
    ({"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 16, "output_stride": 8}, 1,
     5e-6),  # 6.7e-7
]


def parity_id(value) -> str:
  """Test ids: backbone fields, `3ch`, `rel5e-06`."""
  if isinstance(value, dict):
    return "-".join(map(str, value.values()))
  return f"{value}ch" if isinstance(value, int) else f"rel{value:g}"


@pytest.mark.parametrize("backbone, channels, rel", PARITY, ids=parity_id)
def test_flax_backbone_exported_to_torch_matches(backbone, channels, rel):
  model = backbones.build(backbone)
  variables = flax_formula_variables(abstract_variables(model, channels))
  state_dict = convert.to_state_dict(variables, convert.TorchNames((convert.backbone_scope(backbone),)))
  mirror = torch_modules.backbone(backbone, in_channels=channels)
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  assert_torch_matches_flax(model, variables, mirror, channels, rel=rel)


# rel as in PARITY, one per output (`features`: the worst stage map); measured in the comment.
METHOD_PARITY = [
    # features 4.1e-7, cams 3.4e-7, logits 5.2e-7, pooled 2.7e-7
    pytest.param("baseline", TINY_DENSENET, 1,
                 {"features": 2e-6, "cams": 2e-6, "logits": 3e-6, "pooled": 2e-6},
                 id="baseline-tiny-densenet121-1ch"),
    # features 6.3e-7, cams 7.4e-7, logits 7.1e-7, pooled 4.0e-7
    pytest.param("baseline", {"name": "resnet50", "stage_sizes": (1, 1, 1, 1)}, 3,
                 {"features": 4e-6, "cams": 4e-6, "logits": 4e-6, "pooled": 2e-6},
                 id="baseline-resnet50-1-1-1-1-3ch"),
]


@pytest.mark.parametrize("method, backbone, channels, rel", METHOD_PARITY)
def test_flax_method_exported_to_torch_matches(method, backbone, channels, rel, tmp_path):
  config = experiment(backbone, channels)
  config.model.name = method
  model = flax_model(config)
  variables = flax_formula_variables(abstract_variables(model, channels))
  path = tmp_path / "model.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(variables, registry.torch_names(config)), path)
  mirror = mirror_model(config)
  mirror.load_state_dict(safetensors.torch.load_file(path), strict=True)
  assert_torch_matches_flax(model, variables, mirror, channels, rel=rel)


def test_every_method_has_torch_names_a_mirror_and_a_loss():
  assert set(methods.available()) <= set(registry.SPECS)
  for name in PACKAGE_METHODS:
    config = experiment(METHOD_BACKBONES.get(name, TINY_DENSENET))
    config.model.name = name
    names = registry.torch_names(config)
    assert isinstance(names, convert.TorchNames), name
    mirror = mirror_model(config)
    assert isinstance(mirror, torch.nn.Module), name
    # The mirror's state_dict is what the names make of the flax model's variables.
    variables = zeros_like_abstract(abstract_variables(flax_model(config),
                                                       inputs=methods.get(name).inputs))
    assert sorted(convert.to_state_dict(variables, names)) == sorted(mirror.state_dict()), name
    assert callable(registry.torch_loss(config)), name


@pytest.mark.parametrize("loss", [
    pytest.param({"name": "bce"}, id="bce"),
    pytest.param({"name": "wbce", "class_counts": "batch"}, id="wbce-batch"),
    pytest.param({"name": "wbce", "class_counts": "train"}, id="wbce-train"),
    pytest.param({"name": "focal", "focal_gamma": 2.0, "focal_alpha": -1.0}, id="focal"),
    pytest.param({"name": "focal", "focal_gamma": 1.5, "focal_alpha": 0.25}, id="focal-alpha"),
])
def test_torch_loss_matches_the_flax_loss(loss):
  """Each method's torch loss (what the benchmark times) is its flax loss: terms and total."""
  rng = np.random.default_rng(0)
  batch_size, k = 6, 5
  logits = rng.normal(scale=2.0, size=(batch_size, k)).astype(np.float32)
  batch = {"labels": (rng.random((batch_size, k)) < 0.4).astype(np.float32),
           "label_mask": (rng.random((batch_size, k)) < 0.8).astype(np.float32)}
  weight = np.array([1, 1, 1, 1, 0, 0], np.float32)  # two padding examples
  counted = methods.Task(target="labels", class_names=tuple(f"class{i}" for i in range(k)),
                         positives=(3, 0, 10, 7, 1), negatives=(20, 9, 0, 7, 4))
  for name in LOGITS_LOSS_METHODS:
    config = experiment(TINY_DENSENET)
    config.model.name = name
    config.loss.update(loss)
    method = methods.get(name)
    want_total, want_terms = method.loss({"logits": jnp.asarray(logits)}, jax.tree.map(jnp.asarray, batch),
                                         task=counted, config=config, weight=jnp.asarray(weight))
    total, terms = registry.torch_loss(config)(
        {"logits": torch.from_numpy(logits)}, {k: torch.from_numpy(v) for k, v in batch.items()},
        task=counted, config=config, weight=torch.from_numpy(weight))
    assert terms.keys() == want_terms.keys(), name
    for term, value in dict(terms, total=total).items():
      want = dict(want_terms, total=want_total)[term]
      # measured: at most 1.2e-7 (float32 rounding; 0 for wbce-train)
      assert_close_to_scale(value.numpy(), np.asarray(want), rel=1e-6, name=f"{name} {term}")


class _FlatteningHead(nn.Module):
  """conv -> flatten (NHWC) -> dense, the shape of heads that flatten a feature map."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x))
    return nn.Dense(7, name="fc")(x.reshape(x.shape[0], -1))


class _TorchFlatteningHead(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    self.fc = torch.nn.Linear(5 * 4 * 3, 7)

  def forward(self, x):
    return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flattening_head_needs_and_gets_the_nchw_permutation():
  # H != W catches swapped axes.
  x = np.random.default_rng(0).normal(size=(2, 4, 3, 2)).astype(np.float32)
  model = _FlatteningHead()
  variables = model.init(jax.random.key(0), x)
  mirror = _TorchFlatteningHead()
  want = np.asarray(model.apply(variables, x))
  outputs = {}
  for flatten in ({}, {"fc.weight": (4, 3, 5)}):
    names = convert.TorchNames((convert.Scope("", ""),), flatten=flatten)
    state_dict = convert.to_state_dict(variables, names)
    mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    with torch.no_grad():
      outputs[bool(flatten)] = mirror(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    back = convert.from_state_dict(state_dict, variables, names)
    jax.tree.map(np.testing.assert_array_equal, back, dict(variables))
  assert_close_to_scale(outputs[True], want, rel=1e-6, name="flattened head")  # measured 1.2e-7
  assert np.abs(outputs[False] - want).max() > 1e-2


class _Upsampler(nn.Module):
  """A stride-2 4x4 transposed convolution, as a decoder upsamples (torch padding 1)."""

  @nn.compact
  def __call__(self, x):
    return nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), name="up")(x)


def test_transposed_convolution_needs_and_gets_its_declared_kind():
  """By rank alone a ConvTranspose kernel converts as a convolution's and the mirror computes
  something else; declared `conv_transpose`, torch's ConvTranspose2d gives flax's output, and the
  conversion inverts exactly."""
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)  # H != W, I != O
  model = _Upsampler()
  variables = model.init(jax.random.key(0), x)
  want = np.asarray(model.apply(variables, x))
  mirror = torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
  outputs = {}
  for kinds in ((), ((r"^up\.weight$", "conv_transpose"),)):
    names = convert.TorchNames((convert.Scope("", ""),), kinds=kinds)
    state_dict = {k.removeprefix("up."): v for k, v in convert.to_state_dict(variables, names).items()}
    if state_dict["weight"].shape != tuple(mirror.weight.shape):
      outputs[bool(kinds)] = None
      continue
    mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    with torch.no_grad():
      outputs[bool(kinds)] = mirror(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    back = convert.from_state_dict({f"up.{k}": v for k, v in state_dict.items()}, variables, names)
    jax.tree.map(np.testing.assert_array_equal, back, dict(variables))
  assert want.shape == (2, 10, 6, 3)
  assert_close_to_scale(outputs[True], want, rel=1e-6, name="transposed conv")
  assert outputs[False] is None or np.abs(outputs[False] - want).max() > 1e-2
  with pytest.raises(ValueError, match="kernel kind 'deconv'"):
    convert.to_state_dict(variables, convert.TorchNames((convert.Scope("", ""),),
                                                        kinds=((r"up", "deconv"),)))


# ---------------------------------------------------------------- import of published files


def legacy_densenet_names(state_dict):
  """torchvision's published DenseNet keys, as in densenet121-a639ec97.pth: `norm.1` for `norm1`,
  and no `num_batches_tracked` (torch 0.4.1 introduced it)."""
  return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state_dict.items()
          if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_load_pretrained_imagenet_pth_fills_the_backbone_only(name, tmp_path):
  config = experiment({"name": name})
  imagenet = randomize_batch_norm(mirror_model(config, 1000))
  published = imagenet.state_dict()
  if name.startswith("densenet"):
    published = legacy_densenet_names(published)
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
  torch.save(published, tmp_path / f"{name}.pth")
  abstract = abstract_variables(flax_model(config))
  fresh = jax.tree.map(lambda s: np.full(s.shape, 7, s.dtype), abstract)
  variables, report = convert.load_pretrained(tmp_path / f"{name}.pth", fresh, config.model.backbone)

  head = "classifier" if name.startswith("densenet") else "fc"
  backbone_only = {k: v for k, v in numpy_state_dict(imagenet).items() if not k.startswith(head + ".")}
  backbone_abstract = {c: {"backbone": abstract[c]["backbone"]} for c in abstract}
  expected = convert.from_state_dict(backbone_only, backbone_abstract, registry.torch_names(config))
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["backbone"],
                 expected[collection]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["head"], fresh["params"]["head"])
  assert report.unused == [f"{head}.weight", f"{head}.bias"]
  assert sorted(report.fresh) == ["params/head/bias", "params/head/kernel"]
  assert len(report.loaded) == len(jax.tree.leaves(abstract)) - 2
  # DenseNet-121 has 58 dense layers, each with 2 BatchNorms (4 tensors) and 2 convs.
  assert len(report.renamed) == (58 * 10 if name.startswith("densenet") else 0)
  assert "kept as initialised (2): params/head/" in str(report)


def test_load_pretrained_one_channel_stem_sums_rgb(tmp_path):
  rgb = numpy_state_dict(randomize_batch_norm(torch_modules.backbone(TINY_DENSENET)))
  np.savez(tmp_path / "rgb.npz", **rgb)
  config = experiment(TINY_DENSENET, channels=1)
  fresh = zeros_like_abstract(abstract_variables(flax_model(config), channels=1))
  variables, report = convert.load_pretrained(tmp_path / "rgb.npz", fresh, config.model.backbone)
  gray = rgb["features.conv0.weight"].sum(axis=1, keepdims=True)
  np.testing.assert_allclose(variables["params"]["backbone"]["conv0"]["kernel"], gray.transpose(2, 3, 1, 0),
                             rtol=1e-6)
  assert report.adapted == ["features.conv0.weight: RGB kernel summed to 1 input channel"]


def test_load_pretrained_rejects_another_architecture(tmp_path):
  resnet = numpy_state_dict(torch_modules.backbone({"name": "resnet18", "stage_sizes": (1, 1, 1, 1)}))
  convert.state_dict_to_safetensors(resnet, tmp_path / "resnet.safetensors")
  config = experiment(TINY_DENSENET)
  fresh = zeros_like_abstract(abstract_variables(flax_model(config)))
  with pytest.raises(ValueError, match=r"does not fit backbone: .*missing keys \(\d+\):\n  features.conv0.w"):
    convert.load_pretrained(tmp_path / "resnet.safetensors", fresh, config.model.backbone)


def test_load_pretrained_fills_a_backbone_under_any_scope_with_torchvisions_names(tmp_path):
  """A backbone a method keeps under another name (e.g. a second branch) reads the same
  torchvision file; a scope the model lacks is refused."""
  densenet = numpy_state_dict(randomize_batch_norm(torch_modules.backbone(TINY_DENSENET)))
  convert.state_dict_to_safetensors(densenet, tmp_path / "densenet.safetensors")
  config = experiment(TINY_DENSENET)
  fresh = zeros_like_abstract(abstract_variables(flax_model(config)))
  want, _ = convert.load_pretrained(tmp_path / "densenet.safetensors", fresh, config.model.backbone)
  renamed = {c: {("branch" if k == "backbone" else k): v for k, v in tree.items()}
             for c, tree in fresh.items()}
  variables, report = convert.load_pretrained(tmp_path / "densenet.safetensors", renamed,
                                              config.model.backbone, scope="branch")
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["branch"],
                 want[collection]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["head"], fresh["params"]["head"])
  assert not report.unused
  with pytest.raises(ValueError, match="no parameter subtree 'backbone'"):
    convert.load_pretrained(tmp_path / "densenet.safetensors", renamed, config.model.backbone)


def test_from_state_dict_lists_missing_mismatched_and_unused_keys():
  names = convert.TorchNames((convert.backbone_scope(TINY_DENSENET),))
  state_dict = numpy_state_dict(torch_modules.backbone(TINY_DENSENET))
  state_dict["features.norm5.bias"] = np.zeros(3, np.float32)
  state_dict["features.extra.weight"] = np.zeros(1, np.float32)
  del state_dict["features.conv0.weight"]
  with pytest.raises(ValueError) as error:
    convert.from_state_dict(state_dict, abstract_variables(backbones.build(TINY_DENSENET)), names)
  message = str(error.value)
  assert "missing keys (1):\n  features.conv0.weight (flax params/conv0/kernel)" in message
  assert ("mismatched keys (1):\n  features.norm5.bias: file (3,), model (17,) (flax params/norm5/bias)"
          in message)
  assert "unused keys (1):\n  features.extra.weight" in message


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import jax, numpy as np
from configs import common
from cxr_jax import methods
from cxr_jax.interop import convert, registry
from cxr_jax.methods import baseline
config = common.get_config()
config.model.backbone.update({backbone!r})
model = baseline.build(config, methods.Task(target="labels", class_names=("a", "b", "c")))
x = np.zeros((1, 32, 32, 3), np.float32)
abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
for suffix in ("safetensors", "npz"):
  variables, report = convert.load_pretrained("{dir}/w." + suffix, fresh, config.model.backbone)
  print(suffix, len(report.loaded))
state_dict = convert.to_state_dict(variables, registry.torch_names(config))
convert.state_dict_to_safetensors(state_dict, "{dir}/out.safetensors")
try:
  convert.load_state_dict_file("{dir}/w.pth")
except ImportError as e:
  print("pth:", e)
"""


def test_export_and_import_work_without_torch(tmp_path):
  """convert never imports torch: safetensors and npz load, and .pth asks for torch clearly."""
  mirror = torch_modules.backbone(TINY_DENSENET)
  convert.state_dict_to_safetensors(numpy_state_dict(mirror), tmp_path / "w.safetensors")
  np.savez(tmp_path / "w.npz", **numpy_state_dict(mirror))
  torch.save(mirror.state_dict(), tmp_path / "w.pth")
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH.format(backbone=TINY_DENSENET, dir=tmp_path)],
                          cwd=root, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
  leaves = len(jax.tree.leaves(abstract_variables(backbones.build(TINY_DENSENET))))
  assert f"safetensors {leaves}\nnpz {leaves}\n" in result.stdout
  assert "needs torch; without it, give the weights as .safetensors or .npz" in result.stdout
  assert sorted(safetensors.torch.load_file(tmp_path / "out.safetensors")) == sorted(
      mirror_model(experiment(TINY_DENSENET), 3).state_dict())
