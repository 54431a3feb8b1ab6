"""HAM's network (cxr_jax.methods.ham) against the authors' own PyTorch model.

The reference is `shared/fixtures/ham_reference/` (see its README): the authors' network with
weights and an input given by a numpy formula, run in float64 (and float32) by torch. Our flax
model, loaded with the same weights through `ham.torch_names`, must give the same logits, CAMs,
refined maps and intermediates: to ~1e-10 of each tensor's scale in float64, and within the
README's measured-times-ten bounds in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import backbones, layers, methods
from cxr_jax.interop import convert
from cxr_jax.methods import ham
from parity import assert_close_to_scale, relative_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "..", "shared", "fixtures", "ham_reference", "reference.json")
CONFIG = {"model": {"backbone": {"name": "resnet50"}, "dropout": 0.1}}  # HAM's model fields
# float64 agreement, relative to each tensor's largest value: room above what float64 rounding
# leaves after ~60 layers with values up to ~1e3 (measured: <= 3e-14; 5e-13 for the refined
# abnormality map, which the slope-100 sigmoid amplifies).
REL64 = 1e-10

# Captured flax intermediates (module path of the `__call__` output) -> fixture name.
INTERMEDIATES = {
    ("backbone", "layer1"): "e1_layer1",
    ("backbone", "layer2"): "e2_layer2",
    ("backbone", "layer3"): "e3_layer3",
    ("backbone", "layer4"): "e4_layer4",
    ("fa_layer", "conva_1"): "fa_conva_out",
    ("fa_layer", "fa", "conv1"): "fa_block_conv1_attention_logits",
    ("fa_layer", "fa", "channel_fc_2"): "fa_block_channel_fc_out_before_sigmoid",
    ("fa_layer", "fa", "conv3"): "fa_block_conv3_t",
    ("fa_layer", "fa", "bn4"): "fa_block_bn4_out_before_sigmoid",
    ("fa_layer", "fa"): "fa_block_out",
    ("fa_layer",): "e4_fa_fa_module_out",
    ("cls_head_3",): "e4_cat_cls_head_out",
}


@pytest.fixture(scope="module")
def reference():
  with open(REFERENCE) as f:
    return json.load(f)


def formula_h(p: int, n: int) -> np.ndarray:
  """The README's values h in [-0.5, 0.5), float64."""
  v = np.sin(12.9898 * (np.arange(n, dtype=np.float64) + p)) * 43758.5453
  return v - np.floor(v) - 0.5


def formula_state_dict(reference, gamma: float) -> dict[str, np.ndarray]:
  """The fixture's weights (float64) for every key of the authors' state_dict."""
  state_dict = {}
  for key, shape, _, rule in reference["weights"]["state_dict_keys"]:
    h = formula_h(sum(key.encode()) % 1000, int(np.prod(shape))).reshape(shape)
    if rule.startswith("num_batches_tracked"):
      state_dict[key] = np.zeros(shape, np.int64)
    elif rule.startswith("other"):  # fa_layer.fa.gamma, the one key outside the formula
      assert key == "fa_layer.fa.gamma"
      state_dict[key] = np.full(shape, gamma)
    else:
      state_dict[key] = {"running_mean": lambda: 0.2 * h, "running_var": lambda: 1 + 2 * h * h,
                         "bias": lambda: 0.2 * h, "weight_1d": lambda: 1 + 0.4 * h,
                         "weight_nd": lambda: h * np.sqrt(24 / np.prod(shape[1:]))}[rule]()
  return state_dict


def formula_input(reference) -> np.ndarray:
  """The fixture's input, NHWC float64, after checking the README's sum, first and last value."""
  checks = reference["input"]
  x = 4 * formula_h(0, 2 * 3 * 64 * 64)
  np.testing.assert_allclose(x.sum(), checks["check_sum"], rtol=1e-12)
  np.testing.assert_array_equal(x[:5], checks["check_first5"])
  assert x[-1] == checks["check_last"]
  return x.reshape(2, 3, 64, 64).transpose(0, 2, 3, 1)


def forward(reference, dtype, gammas):
  """Outputs and captured intermediates (NCHW numpy float64) of the fixture's forward per gamma."""
  task = methods.Task(target="labels", class_names=tuple(reference["config"]["classes"]))
  model = ham.build({**CONFIG, "dtype": dtype}, task)
  images = jnp.asarray(formula_input(reference), dtype)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), dict(abstract))
  apply = jax.jit(lambda v: model.apply(v, images, train=False, capture_intermediates=True,
                                        mutable=["intermediates"]))
  results = []
  for gamma in gammas:
    # float32 takes the float64 formula values rounded once, as the README's float32 run.
    variables = convert.from_state_dict(formula_state_dict(reference, gamma), template,
                                        ham.torch_names(CONFIG["model"]))
    outputs, state = apply(variables)
    # HAM's min-max maps just before the sigmoid, from the raw CAMs as `refine_cams` makes them.
    for name, cams in (("normalized_cams", "cams"), ("normalized_abnormality_cam", "abnormality_cam")):
      upsampled = layers.resize_align_corners(outputs[cams], images.shape[1:3])
      outputs[name] = ham.normalize_cams(upsampled)
    for path, name in INTERMEDIATES.items():
      node = state["intermediates"]
      for part in path:
        node = node[part]
      outputs[name] = node["__call__"][0]
    # NCHW float64 numpy, as the fixture stores tensors.
    outputs = {k: np.asarray(v, np.float64) for k, v in outputs.items()}
    outputs = {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in outputs.items()}
    results.append(outputs)
  return results


@pytest.fixture(scope="module")
def float64_outputs(reference):
  """Case A (gamma 0.5) and the gamma-0 case, in float64."""
  with jax.enable_x64(True):
    return forward(reference, jnp.float64, (reference["weights"]["gamma_value"], 0.0))


@pytest.fixture(scope="module")
def float32_outputs(reference):
  with jax.default_matmul_precision("highest"):
    return forward(reference, jnp.float32, (reference["weights"]["gamma_value"],))[0]


# Model output -> (fixture entry of forward_caseA.float64, reshape of ours to the fixture's shape).
OUTPUTS = {
    "logits": "disease_logits",
    "abnormality_logit": "abnormality_logit",
    "cams": "disease_cams_raw",
    "abnormality_cam": "abnormality_cam_raw",
    "refined_cams": "disease_cams_refined",
    "refined_abnormality_cam": "abnormality_cam_refined",
    "normalized_cams": "disease_cams_normalized_before_sigmoid",
    "normalized_abnormality_cam": "abnormality_cam_normalized_before_sigmoid",
    "pooled": "pooled_lse",
}


def expected_entries(reference):
  """(our name, fixture entry) for every case-A output and intermediate."""
  case = reference["forward_caseA"]["float64"]
  stored = {**case, **case["intermediates"]}
  return [(ours, stored[name]) for ours, name in OUTPUTS.items()] + [
      (name, stored[name]) for name in INTERMEDIATES.values()]


def check_entry(actual, entry, name, *, rel, rel_sums):
  """Compares a full tensor to the scale of its values, or a summarised one by sum, sum of squares
  and the stored values at indices."""
  if "values" in entry:
    expected = np.asarray(entry["values"])
    assert_close_to_scale(actual.reshape(expected.shape), expected, rel=rel, name=name)
    diff, scale = relative_error(actual.reshape(expected.shape), expected)
    print(f"{name}: max |diff| / max |ref| = {diff / scale:.2g}")
    return
  assert list(actual.shape) == entry["shape"], name
  flat = actual.reshape(-1)
  np.testing.assert_allclose(flat.sum(), entry["sum"], rtol=rel_sums, err_msg=f"{name} sum")
  np.testing.assert_allclose((flat**2).sum(), entry["sum_sq"], rtol=rel_sums, err_msg=f"{name} sum_sq")
  scale = max(abs(entry["min"]), abs(entry["max"]))
  diff = np.abs(flat[entry["flat_indices"]] - entry["values_at_indices"]).max()
  assert diff <= rel * scale, f"{name} values_at_indices: max diff {diff:.3g}, scale {scale:.3g}"
  print(f"{name}: rel. sum {abs(flat.sum() / entry['sum'] - 1):.2g}, "
        f"rel. sum_sq {abs((flat**2).sum() / entry['sum_sq'] - 1):.2g}, "
        f"values_at_indices {diff / scale:.2g} of max")


def test_torch_names_are_the_authors_keys(reference):
  task = methods.Task(target="labels", class_names=tuple(reference["config"]["classes"]))
  model = ham.build({**CONFIG, "dtype": "float32"}, task)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dict(abstract))
  state_dict = convert.to_state_dict(zeros, ham.torch_names(CONFIG["model"]))
  expected = {key: tuple(shape) for key, shape, _, _ in reference["weights"]["state_dict_keys"]}
  assert {k: v.shape for k, v in state_dict.items()} == expected
  assert sum(v.size for k, v in state_dict.items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
             ) == reference["weights"]["num_parameters"]


def test_case_a_float64(reference, float64_outputs):
  outputs = float64_outputs[0]
  for name, entry in expected_entries(reference):
    check_entry(outputs[name], entry, name, rel=REL64, rel_sums=REL64)


def test_gamma0_float64(reference, float64_outputs):
  """gamma = 0 (HAM's init) cuts the FA block's spatial branch; case A keeps it."""
  outputs, expected = float64_outputs[1], reference["forward_caseA"]["gamma0_float64"]
  assert_close_to_scale(outputs["logits"], expected["disease_logits"], rel=REL64, name="logits")
  assert_close_to_scale(outputs["abnormality_logit"], np.ravel(expected["abnormality_logit"]),
                        rel=REL64, name="abnormality_logit")
  assert_close_to_scale(outputs["pooled"], expected["pooled_lse"]["values"], rel=REL64, name="pooled")
  print("gamma 0 logits: max |diff| / max |ref| = %.2g" % np.divide(*relative_error(
      outputs["logits"], expected["disease_logits"])))


def test_case_a_float32(reference, float32_outputs):
  """The README's suggested float32 bounds, about ten times torch's own float32 error."""
  outputs = float32_outputs
  for name, entry in expected_entries(reference):
    if "values" not in entry:
      check_entry(outputs[name], entry, name, rel=1e-4, rel_sums=1e-4)
      continue
    expected = np.asarray(entry["values"])
    actual = outputs[name].reshape(expected.shape)
    if name.startswith("normalized"):
      atol = 1e-3
    elif name.startswith("refined"):
      atol = 1e-2
    else:
      atol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol, err_msg=name)
    diff, scale = relative_error(actual, expected)
    print(f"{name}: max |diff| = {diff:.2g}, / max |ref| = {diff / scale:.2g}")


def test_train_mode_and_dtypes():
  """Training runs (BatchNorm batch statistics, channel dropout) and the outputs are float32 for a
  bfloat16 compute dtype; a one-block-per-stage ResNet keeps it quick."""
  backbone = backbones.build({"name": "resnet50", "stage_sizes": (1, 1, 1, 1), "output_stride": 8,
                                  "dtype": jnp.bfloat16})
  model = ham.Model(backbone=backbone, num_classes=3, dtype=jnp.bfloat16)
  images = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  outputs, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)},
                           mutable=["batch_stats"])
  shapes = {"logits": (2, 3), "abnormality_logit": (2,), "cams": (2, 4, 4, 3),
            "abnormality_cam": (2, 4, 4, 1), "refined_cams": (2, 32, 32, 3),
            "refined_abnormality_cam": (2, 32, 32, 1), "pooled": (2, 512)}
  assert {k: v.shape for k, v in outputs.items()} == shapes
  assert all(v.dtype == jnp.float32 and np.isfinite(v).all() for v in outputs.values())


def test_cam_head_weights_get_no_gradient_from_the_maps():
  """The CAMs use the head weights under stop_gradient (HAM's `.detach()`): only the logits train them."""
  head = ham.CamHead(2)
  pooled, fmap = jnp.ones((1, 4)), jnp.ones((1, 3, 3, 4))
  params = head.init(jax.random.key(0), pooled, fmap)
  grads = jax.grad(lambda p: head.apply(p, pooled, fmap)[1].sum())(params)
  np.testing.assert_array_equal(grads["params"]["kernel"], 0.0)
  grads = jax.grad(lambda p: head.apply(p, pooled, fmap)[0].sum())(params)
  np.testing.assert_array_equal(grads["params"]["kernel"], 1.0)


def test_resize_align_corners_endpoints_and_midpoints():
  """Corners map onto corners, and a 2-pixel ramp interpolates linearly between them."""
  maps = jnp.asarray([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None]
  resized = np.asarray(layers.resize_align_corners(maps, (3, 5)))[0, :, :, 0]
  np.testing.assert_allclose(resized, [[0, 0.25, 0.5, 0.75, 1], [1, 1.25, 1.5, 1.75, 2],
                                       [2, 2.25, 2.5, 2.75, 3]])


def test_normalize_cams_zero_range():
  """A constant map (HAM's zero range, not exercised by the fixture) becomes 0, not NaN."""
  maps = jnp.full((1, 4, 4, 1), 3.0)
  np.testing.assert_array_equal(np.asarray(ham.normalize_cams(maps)), 0.0)


def test_lse_grad_cam_is_the_cam_after_min_max():
  """With LSE pooling and a linear head, Grad-CAM's channel weights are the head weights / (H W)
  (the LSE gradient is a softmax over positions), so min-max normalised Grad-CAM equals the CAM
  HAM draws (research note A.2, "Activation vs gradient attention")."""
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 5, 7, 16)))
  weights = jnp.asarray(rng.normal(size=(16, 3)))
  grads = jax.jacrev(lambda f: ham.lse_pool(f) @ weights)(features)  # (2, 3, 2, 5, 7, 16)
  alpha = jnp.einsum("bcbhwk->bck", grads) / (5 * 7)  # mean over positions of each sample's own
  grad_cam = jax.nn.relu(jnp.einsum("bhwk,bck->bhwc", features, alpha))
  cam = jax.nn.relu(features @ weights)
  np.testing.assert_allclose(alpha, jnp.broadcast_to(weights.T / (5 * 7), alpha.shape), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(ham.normalize_cams(grad_cam), ham.normalize_cams(cam), atol=1e-5)


def test_ham_trains_and_evaluates_through_the_platform(tmp_path):
  """`config.model.name=ham` through the trainer and the evaluators: all five loss terms logged,
  the box term on the marked training records only, its raw CAMs scored by both localization
  protocols. Then weight exchange: the export loads strictly into the torch mirror (the authors'
  keys), and a checkpoint saved the authors' way (`module.model.` keys, a `.pth`) initialises a
  new run with exactly the trained variables (`init_from=model=PATH`)."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  import datasets  # pylint: disable=g-import-not-at-top
  from cxr_jax import evaluate, experiment, export, train  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import registry  # pylint: disable=g-import-not-at-top

  data_dir = datasets.write(tmp_path / "data", {"train": 16, "val": 8, "test": 8},
                            box_supervised=frozenset(range(0, 16, 2)))
  config = datasets.tiny_config(data_dir, steps=2, eval_every=2)
  config.model.name = "ham"
  config.model.dropout = 0.1
  config.model.backbone.update(name="resnet50", growth_rate=None, block_config=None,
                               num_init_features=None, bn_size=None, stage_sizes=(1, 1, 1, 1),
                               width=8)
  config.checkpoint.every = 2
  config.eval.evaluators = "classification,ham_localization,wang_localization"
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(ham.LOSS_WEIGHTS) <= set(last["train"]) and set(ham.LOSS_WEIGHTS) <= set(last["val"])
  assert last["train"]["ex_loss"] > 0  # half the training records are marked
  assert last["val"]["ex_loss"] == 0  # no validation record is
  result = evaluate.evaluate(str(tmp_path / "run"), "test", "latest", n_boot=0)
  assert result["localization"]["ham_localization"]["classes"]["Nodule"]["n_pairs"] == 8

  export.export(str(tmp_path / "run"), str(tmp_path / "torch"), "latest")
  exported = safetensors.torch.load_file(str(tmp_path / "torch" / export.WEIGHTS))
  run, trained, _ = experiment.restore_for_inference(str(tmp_path / "run"), "latest")
  mirror = registry.build_mirror(run.config, run.task)
  mirror.load_state_dict(exported, strict=True)
  authors = tmp_path / "ham_best_auc.pth"
  torch.save({f"module.model.{k}": v for k, v in mirror.state_dict().items()}, authors)
  run.config.init_from = f"model={authors}"
  example = experiment.example_batch(experiment.local_examples(
      run.config, run.manifest, run.method, "val"))
  loaded = experiment.initial_state(run, example)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params),
               jax.device_get(trained.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.batch_stats),
               jax.device_get(trained.batch_stats))
  torch.save({f"module.model.{k}": v for k, v in list(mirror.state_dict().items())[1:]}, authors)
  with pytest.raises(ValueError, match=r"after removing the prefix 'module.model.'.*missing keys \(1\)"):
    experiment.initial_state(run, example)