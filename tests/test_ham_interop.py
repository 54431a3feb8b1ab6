"""HAM's torch side (`cxr_jax.interop.torch_ham`, registry entry "ham") against the flax model.

The mirror must carry the authors' 350 state_dict keys in their order, give every flax output from
converted flax weights, and reproduce the authors' own float64 numbers
(`shared/fixtures/ham_reference/`) by itself; the torch loss must equal `ham.ham_losses` term by
term, with the method's batch adapter.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import test_ham
from cxr_jax import methods
from cxr_jax.interop import convert, registry, torch_ham
from cxr_jax.methods import ham
from parity import assert_close_to_scale, randomize, relative_error

SMALL = {"name": "resnet50", "stage_sizes": (1, 1, 1, 1)}
# float32 flax vs torch, relative to each output's largest value: about 5x the largest error
# measured over the two float32 cases of test_mirror_matches_flax (logits 5.2e-6, abnormality
# logit 5.2e-6, pooled 8e-6, CAMs 1.7e-5, abnormality CAM 2e-5; refined maps 9e-4 and 1.7e-4). The
# refined maps pass CAM differences through the min-max and the slope-100 sigmoid, which
# multiplies a shift of a normalised value by up to 25, hence their wider bounds; the refined
# abnormality CAM measured 1.18e-3 on a later install (same jax, flax and torch; the float64
# case agrees to 1e-12), so both refined maps share one bound.
REL32 = {"logits": 2.5e-5, "abnormality_logit": 2.5e-5, "pooled": 4e-5, "cams": 1e-4,
         "abnormality_cam": 1e-4, "refined_cams": 5e-3, "refined_abnormality_cam": 5e-3}
# float64 flax vs torch: rounding only (measured: <= 3.5e-14, 1.3e-12 for the refined maps).
REL64 = 1e-10


@pytest.fixture(scope="module")
def reference():
  with open(test_ham.REFERENCE) as f:
    return json.load(f)


def config(backbone, dtype="float32"):
  return {"model": {"name": "ham", "backbone": backbone, "channels": 3, "dropout": 0.1},
          "loss": {}, "dtype": dtype}


def task(num_classes):
  return methods.Task(target="labels", class_names=tuple(f"c{i}" for i in range(num_classes)))


def flax_and_mirror(cfg, num_classes, variables_fn, images):
  """Flax outputs (numpy) and the eval-mode torch mirror loaded with the flax variables
  `variables_fn(model, images)`, converted by the registry's names."""
  model = ham.build(cfg, task(num_classes))
  variables = variables_fn(model, images)
  with jax.default_matmul_precision("highest"):
    outputs = jax.jit(lambda v: model.apply(v, images, train=False))(variables)
  names = registry.torch_names(cfg)
  mirror = registry.build_mirror(cfg, task(num_classes)).eval()
  state_dict = convert.to_state_dict(variables, names)
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return jax.tree.map(np.asarray, outputs), mirror


def small_variables(model, images):
  """Initialised, randomised variables held in the model's compute dtype (float64 runs need
  float64 weights: flax leaves part of the maths in the parameters' float32)."""
  variables = randomize(model.init(jax.random.key(0), images, train=False))
  return jax.tree.map(lambda a: np.asarray(a, model.dtype), variables)


def fixture_variables(reference):
  """The fixture's formula weights (case A), rounded once to float32, as flax variables."""
  def build(model, images):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), dict(abstract))
    return convert.from_state_dict(
        test_ham.formula_state_dict(reference, reference["weights"]["gamma_value"]), template,
        ham.torch_names(test_ham.CONFIG["model"]))
  return build


def run_mirror(mirror, images_nhwc):
  """The mirror's outputs (numpy) on NHWC images, in the images' dtype."""
  with torch.no_grad():
    out = mirror(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
  return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("case", ["small-random-48px", "small-random-48px-float64",
                                  "fixture-weights-64px"])
def test_mirror_matches_flax(reference, case):
  """Every output of the mirror loaded with converted flax weights: a one-block-per-stage ResNet
  with random weights (float32, and float64 where only rounding may differ), and the full
  ResNet-50 with the fixture's weights (float32)."""
  dtype = np.float64 if case.endswith("float64") else np.float32
  with jax.enable_x64(dtype == np.float64):
    if case.startswith("small"):
      images = np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype(dtype)
      flax_out, mirror = flax_and_mirror(config(SMALL, dtype=dtype.__name__), 5, small_variables,
                                         images)
    else:
      images = test_ham.formula_input(reference).astype(dtype)
      flax_out, mirror = flax_and_mirror(config({"name": "resnet50"}), 14,
                                         fixture_variables(reference), images)
  torch_out = run_mirror(mirror.to(getattr(torch, dtype.__name__)), images)
  assert torch_out.keys() == flax_out.keys()
  for name, want in flax_out.items():
    diff, scale = relative_error(torch_out[name], want)
    print(f"{case} {name}: max |diff| / max |flax| = {diff / scale:.2g}")
    bound = REL64 if dtype == np.float64 else REL32[name]
    assert_close_to_scale(torch_out[name], want, rel=bound, name=name)


def test_mirror_has_the_authors_keys_in_order(reference):
  mirror = registry.build_mirror(config({"name": "resnet50"}), task(14))
  expected = [(key, tuple(shape)) for key, shape, _, _ in reference["weights"]["state_dict_keys"]]
  assert [(k, tuple(v.shape)) for k, v in mirror.state_dict().items()] == expected


def test_mirror_reproduces_the_authors_float64_outputs(reference):
  """The mirror alone, loaded with the fixture's weights in float64, gives case A's stored
  outputs (the refined disease maps are stored as summaries)."""
  mirror = registry.build_mirror(config({"name": "resnet50"}), task(14)).double().eval()
  state_dict = test_ham.formula_state_dict(reference, reference["weights"]["gamma_value"])
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  out = run_mirror(mirror, test_ham.formula_input(reference))
  out = {k: v.transpose(0, 3, 1, 2) if v.ndim == 4 else v for k, v in out.items()}  # NCHW, as stored
  stored = dict(test_ham.expected_entries(reference))
  for name in out:
    test_ham.check_entry(out[name], stored[name], name, rel=test_ham.REL64, rel_sums=test_ham.REL64)


def loss_inputs(seed=0, b=4, h=6, size=24, k=5):
  """Outputs with the network's ranges (CAMs straddling the 0.75 threshold) and labels, float32."""
  rng = np.random.default_rng(seed)
  cams = np.maximum(rng.normal(0.5, 0.6, (b, h, h, k)), 0).astype(np.float32)
  abnormality_cam = np.maximum(rng.normal(0.5, 0.6, (b, h, h, 1)), 0).astype(np.float32)
  outputs = dict(logits=rng.normal(0, 3, (b, k)).astype(np.float32),
                 abnormality_logit=rng.normal(0, 3, (b,)).astype(np.float32), cams=cams,
                 abnormality_cam=abnormality_cam,
                 refined_cams=rng.uniform(0, 1, (b, size, size, k)).astype(np.float32))
  labels = (rng.uniform(size=(b, k)) < 0.4).astype(np.float32)
  labels[-1] = 0  # a normal example
  return outputs, labels


def check_terms(actual, expected):
  (total, terms), (want_total, want_terms) = actual, expected
  assert terms.keys() == want_terms.keys()
  for name in want_terms:
    assert_close_to_scale(float(terms[name]), float(want_terms[name]), rel=1e-6, name=name)
  assert_close_to_scale(float(total), float(want_total), rel=1e-6, name="total")


def test_torch_ham_losses_equal_flax_with_box_supervision():
  """Every term, the box term included (helper images with boxes), with padding weights."""
  outputs, labels = loss_inputs()
  rng = np.random.default_rng(2)
  masks = (rng.uniform(size=outputs["refined_cams"].shape) < 0.2).astype(np.float32)
  helper = np.array([1, 0, 1, 1], np.float32)
  weight = np.array([1, 1, 1, 0], np.float32)
  args = (labels, masks, helper, labels, weight)
  expected = ham.ham_losses({k: jnp.asarray(v) for k, v in outputs.items()}, *map(jnp.asarray, args))
  assert float(expected[1]["ex_loss"]) > 0
  actual = torch_ham.ham_losses({k: torch.from_numpy(v) for k, v in outputs.items()},
                                *map(torch.from_numpy, args))
  check_terms(actual, expected)


def test_registry_loss_equals_flax_with_the_batch_adapter():
  """The torch `loss` on a pipeline batch equals flax's `ham.loss`: labels = target * mask, box
  masks drawn from the boxes of the marked records, padding left out."""
  outputs, targets = loss_inputs(seed=3)
  rng = np.random.default_rng(4)
  mask = (rng.uniform(size=targets.shape) < 0.8).astype(np.float32)
  corner = rng.uniform(0, 0.6, (4, 2, 2))
  batch = dict(labels=targets, label_mask=mask,
               boxes=np.concatenate([corner, corner + 0.35], axis=-1).astype(np.float32),
               box_labels=np.array([[1, 3], [0, -1], [2, 2], [4, -1]], np.int32),
               box_supervised=np.array([1, 0, 1, 1], np.float32))
  weight = np.array([1, 1, 0, 1], np.float32)
  cfg = config(SMALL)
  expected = ham.loss({k: jnp.asarray(v) for k, v in outputs.items()}, batch, task=task(5),
                      config=cfg, weight=weight)
  actual = registry.torch_loss(cfg)({k: torch.from_numpy(v) for k, v in outputs.items()},
                                    {k: torch.from_numpy(v) for k, v in batch.items()},
                                    task=task(5), config=cfg, weight=torch.from_numpy(weight))
  assert float(actual[1]["ex_loss"]) > 0
  check_terms(actual, expected)