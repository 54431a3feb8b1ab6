"""HAM's training losses against the authors' own numbers (`shared/fixtures/ham_reference`).

The fixture stores the network's outputs, not its inputs to the loss in full: the raw CAMs and the
logits are stored in full, the refined disease maps only as summaries. The tests rebuild the refined
maps from the raw CAMs with HAM's `refine_cams` (checked against those summaries first) and feed
the losses the stored outputs. Case A's logits are in the hundreds, so its BCE terms saturate and
are compared in float64 only; case B (the head weights scaled down) makes every term non-trivial
and is compared in float64 and float32.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import test_ham
from cxr_jax import methods
from cxr_jax.interop import convert
from cxr_jax.methods import ham
from cxr_jax.metrics import localization
from parity import assert_close_to_scale

FIXTURE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ham_reference"
           / "reference.json")
# Our term names -> the fixture's (HAM's variable names).
TERMS = {"ano_loss": "anoLoss", "cls_loss": "clsLoss", "ex_loss": "exClsLoss",
         "bound_loss": "boundLoss", "union_loss": "unionLoss"}
# Case B's head-weight scales (fixture `losses.caseB.head_scales`).
DISEASE_SCALE, ABNORMALITY_SCALE = 0.005, 0.02


@pytest.fixture(scope="module")
def reference():
  return json.loads(FIXTURE.read_text())


def values(entry) -> np.ndarray:
  """A stored tensor in float64: a nested list, or a dict holding one under `values`."""
  return np.asarray(entry["values"] if isinstance(entry, dict) else entry, np.float64)


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def refine_cams(raw: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """HAM's `refine_cams` in float64 on NCHW maps: bilinear upsampling to `size` with
  align_corners=True, per-sample per-class min-max (a zero range becomes 1e-5), then
  sigmoid(100*(N - 0.4)). Returns (N, refined)."""
  src = (raw.shape[2] - 1) / (size - 1) * np.arange(size)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, raw.shape[2] - 1)
  frac = src - i0
  rows = raw[:, :, i0, :] * (1 - frac)[:, None] + raw[:, :, i1, :] * frac[:, None]
  up = rows[:, :, :, i0] * (1 - frac) + rows[:, :, :, i1] * frac
  low, high = up.min((2, 3), keepdims=True), up.max((2, 3), keepdims=True)
  normalised = (up - low) / np.where(high > low, high - low, 1e-5)
  return normalised, 1 / (1 + np.exp(-100 * (normalised - 0.4)))


def check_summary(actual: np.ndarray, summary, rtol: float, atol: float):
  """`actual` (NCHW) against a stored summary (README "Summaries")."""
  flat = actual.reshape(-1)
  assert list(actual.shape) == summary["shape"]
  np.testing.assert_allclose(flat.sum(), summary["sum"], rtol=rtol)
  np.testing.assert_allclose(np.square(flat).sum(), summary["sum_sq"], rtol=rtol)
  np.testing.assert_allclose(flat[summary["flat_indices"]], summary["values_at_indices"],
                             rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def loss_inputs(reference):
  """(labels, masks NHWC, helper, bbox_tags) of `losses.inputs`, float64."""
  given = reference["losses"]["inputs"]
  box = given["box"]
  masks = np.zeros(given["masks_shape"])
  masks[box["sample"], box["class_index"], slice(*box["rows_half_open"]),
        slice(*box["cols_half_open"])] = 1
  assert masks.sum() == box["mask_sum"]
  return (values(given["labels_y"]), nhwc(masks), values(given["helper_flags"])[:, 0],
          values(given["bbox_tags"]))


def network_outputs(forward) -> dict[str, np.ndarray]:
  """The loss's `outputs` (NHWC, float64) from a stored forward: logits and raw CAMs as stored,
  refined disease maps rebuilt from the raw CAMs."""
  raw = values(forward["disease_cams_raw"])
  return dict(logits=values(forward["disease_logits"]),
              abnormality_logit=values(forward["abnormality_logit"])[:, 0],
              cams=nhwc(raw), abnormality_cam=nhwc(values(forward["abnormality_cam_raw"])),
              refined_cams=nhwc(refine_cams(raw, 64)[1]))


def losses(outputs, loss_inputs, dtype, weight=None):
  """ham_losses on the given arrays cast to `dtype` (float64 runs with x64 enabled)."""
  with jax.enable_x64(dtype == np.float64):
    cast = lambda x: jnp.asarray(x, dtype)
    total, terms = ham.ham_losses(
        {k: cast(v) for k, v in outputs.items()}, *map(cast, loss_inputs),
        weight=None if weight is None else cast(weight))
    return float(total), {k: float(v) for k, v in terms.items()}


def check_losses(actual, stored, rtol, atol):
  total, terms = actual
  for name, key in TERMS.items():
    np.testing.assert_allclose(terms[name], stored[key], rtol=rtol, atol=atol, err_msg=name)
  np.testing.assert_allclose(total, stored["total"], rtol=rtol, atol=atol, err_msg="total")


def test_clamped_bce_is_torch_bce_loss_on_the_sigmoid():
  logits = np.array([-1000.0, -120.0, -50.0, -3.0, 0.0, 2.5, 25.3, 40.0, 1000.0])
  for target in (0.0, 1.0):
    targets = np.full_like(logits, target)
    want = torch.nn.BCELoss(reduction="none")(torch.sigmoid(torch.from_numpy(logits)),
                                              torch.from_numpy(targets)).numpy()
    with jax.enable_x64(True):
      np.testing.assert_allclose(ham.clamped_bce(jnp.asarray(logits), jnp.asarray(targets)),
                                 want, rtol=1e-12)
      # Saturated logits (p exactly 0 or 1) give a finite gradient, 0 at the clamp.
      grad = np.asarray(jax.grad(lambda x: ham.clamped_bce(x, jnp.asarray(targets)).sum())(
          jnp.asarray(logits)))
    assert np.all(np.isfinite(grad))
    assert grad[0 if target else -1] == 0


def test_refined_maps_rebuilt_from_the_raw_cams_match_the_fixture(reference):
  case_a = reference["forward_caseA"]["float64"]
  normalised, refined = refine_cams(values(case_a["disease_cams_raw"]), 64)
  check_summary(refined, case_a["disease_cams_refined"], rtol=1e-12, atol=1e-12)
  check_summary(normalised, case_a["disease_cams_normalized_before_sigmoid"], rtol=1e-12,
                atol=1e-12)
  normalised, refined = refine_cams(values(case_a["abnormality_cam_raw"]), 64)
  np.testing.assert_allclose(refined, values(case_a["abnormality_cam_refined"]), atol=1e-12)
  np.testing.assert_allclose(
      normalised, values(case_a["abnormality_cam_normalized_before_sigmoid"]), atol=1e-12)
  case_b = reference["losses"]["caseB"]["float64"]
  check_summary(refine_cams(values(case_b["disease_cams_raw"]), 64)[1],
                case_b["disease_cams_refined"], rtol=1e-12, atol=1e-12)


def test_case_b_outputs_are_case_a_outputs_times_the_head_scales(reference):
  """Raw CAMs and logits are linear in the head weights (ReLU commutes with a positive scale), so
  case B is case A scaled and its refined maps are case A's."""
  case_a = network_outputs(reference["forward_caseA"]["float64"])
  case_b = network_outputs(reference["losses"]["caseB"]["float64"])
  for key, scale in (("logits", DISEASE_SCALE), ("cams", DISEASE_SCALE),
                     ("abnormality_logit", ABNORMALITY_SCALE),
                     ("abnormality_cam", ABNORMALITY_SCALE), ("refined_cams", 1.0)):
    np.testing.assert_allclose(case_b[key], scale * case_a[key], rtol=1e-12,
                               atol=1e-12 * np.abs(case_b[key]).max(), err_msg=key)


def test_case_a_losses_float64(reference, loss_inputs):
  """Case A saturates the BCE (anoLoss is the clamp value 100): HAM's clamped BCE, float64."""
  outputs = network_outputs(reference["forward_caseA"]["float64"])
  stored = reference["losses"]["caseA_float64"]
  check_losses(losses(outputs, loss_inputs, np.float64), stored, rtol=1e-6, atol=0)
  # The map terms do not saturate: they hold in float32 too (README: rtol 1e-4, atol 1e-5).
  _, terms = losses(outputs, loss_inputs, np.float32)
  for name in ("ex_loss", "bound_loss", "union_loss"):
    np.testing.assert_allclose(terms[name], stored[TERMS[name]], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", ["caseA_float64", "caseB"])
def test_per_class_and_per_example_detail_float64(reference, loss_inputs, case):
  stored = reference["losses"][case]
  forward = reference["forward_caseA"]["float64"] if case == "caseA_float64" else stored["float64"]
  detail = stored["detail"] if case == "caseA_float64" else stored["float64"]["losses"]["detail"]
  out = network_outputs(forward)
  labels, masks, helper, tags = loss_inputs
  with jax.enable_x64(True):
    weight = jnp.ones(2, jnp.float64)
    np.testing.assert_allclose(
        ham.box_loss_per_class(out["refined_cams"], masks, tags * helper[:, None]),
        detail["ex_per_class"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        ham.bound_loss_per_class(out["cams"], out["abnormality_cam"], labels, weight),
        detail["bound_per_class"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        ham.union_loss_per_example(out["cams"], out["abnormality_cam"], labels),
        detail["union_per_sample_unmasked"], rtol=1e-9, atol=1e-12)


def test_case_b_losses_float64(reference, loss_inputs):
  """Case B: every term non-trivial; float64 agrees to rounding (1e-9 relative)."""
  stored = reference["losses"]["caseB"]["float64"]
  check_losses(losses(network_outputs(stored), loss_inputs, np.float64), stored["losses"],
               rtol=1e-9, atol=1e-12)


def test_case_b_losses_float32(reference, loss_inputs):
  """float32 losses on torch's float32 logits and the float64 maps rounded to float32, against
  both the float64 reference and torch's float32 losses, with the README's case-B tolerances
  (rtol 1e-4, atol 1e-5; torch's own float32 run is within 1.8e-5 of float64 for anoLoss = 16.1,
  2.7e-6 for the rest)."""
  case_b = reference["losses"]["caseB"]
  outputs = network_outputs(case_b["float64"])
  outputs["logits"] = values(case_b["float32_torch"]["disease_logits"])
  outputs["abnormality_logit"] = values(case_b["float32_torch"]["abnormality_logit"])[:, 0]
  actual = losses(outputs, loss_inputs, np.float32)
  check_losses(actual, case_b["float64"]["losses"], rtol=1e-4, atol=1e-5)
  check_losses(actual, case_b["float32_torch"]["losses"], rtol=1e-4, atol=1e-5)


def test_box_term_only_counts_marked_images():
  """Zero without helper images; for a marked image, ~1 when its map misses its box (a soft Dice
  of 0) and 0 when the map is its box."""
  box = np.zeros((1, 8, 8, 2))
  box[0, 2:5, 3:6, 1] = 1
  tags = np.array([[0.0, 1.0]])
  miss = 1 - box
  args = dict(masks=box, bbox_tags=tags, weight=np.ones(1))
  assert float(ham.box_loss(miss, helper=np.zeros(1), **args)) == 0
  np.testing.assert_allclose(ham.box_loss(miss, helper=np.ones(1), **args), 1.0, rtol=1e-6)
  assert float(ham.box_loss(box, helper=np.ones(1), **args)) == 0


def pipeline_batch(box_supervised, size=16):
  """A batch as the pipeline makes it: image 0 has two class-1 boxes and a padded slot, image 1
  a class-0 box with edges off the pixel grid; every label known."""
  boxes = np.array([[[0.25, 0.25, 0.5, 0.5], [0.6, 0.55, 0.9, 0.8], [0, 0, 0, 0]],
                    [[0.13, 0.31, 0.47, 0.72], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  return dict(boxes=boxes, box_labels=np.array([[1, 1, -1], [0, -1, -1]], np.int32),
              box_supervised=np.asarray(box_supervised, np.float32),
              labels=np.array([[0, 1, 0], [1, 0, 1]], np.float32), label_mask=np.ones((2, 3), np.float32))


def test_box_masks_are_the_evaluators_box_masks():
  """Training masks cover exactly the pixels `localization.box_mask` gives each class's boxes."""
  batch = pipeline_batch([1, 1])
  masks = np.asarray(ham.box_masks(batch["boxes"], batch["box_labels"], 3, 16))
  for b in range(2):
    for k in range(3):
      want = localization.box_mask(batch["boxes"][b][batch["box_labels"][b] == k], 16)
      np.testing.assert_array_equal(masks[b, :, :, k], want, err_msg=f"image {b} class {k}")
  # Two boxes: 4 x 4 pixels, and 6 x 5 as its off-grid edges take every pixel they touch.
  assert masks[0, :, :, 1].sum() == 4 * 4 + 6 * 5


def test_method_loss_box_term_reads_the_marked_records():
  """Through `ham.loss` on a pipeline batch: the box term is 0 when no record is marked, and a
  marked image whose map misses its boxes gives ~1 (a soft Dice of 0); hitting them gives 0."""
  task = methods.Task(target="labels", class_names=("a", "b", "c"))
  batch = pipeline_batch([0, 0])
  masks = np.asarray(ham.box_masks(batch["boxes"], batch["box_labels"], 3, 16))
  rng = np.random.default_rng(0)
  outputs = dict(logits=rng.normal(size=(2, 3)), abnormality_logit=rng.normal(size=(2,)),
                 cams=rng.uniform(size=(2, 4, 4, 3)), abnormality_cam=rng.uniform(size=(2, 4, 4, 1)))
  config = {"loss": {}}

  def ex_loss(refined, marked):
    _, terms = ham.loss({**outputs, "refined_cams": refined}, {**batch, "box_supervised": marked},
                        task=task, config=config, weight=np.ones(2))
    return float(terms["ex_loss"])

  assert ex_loss(1 - masks, np.zeros(2)) == 0
  np.testing.assert_allclose(ex_loss(1 - masks, np.array([1.0, 0.0])), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ex_loss(1 - masks, np.array([0.0, 1.0])), 1.0, rtol=1e-6)
  assert ex_loss(masks, np.ones(2)) == 0
  # Padding (weight 0) removes a marked image from the term.
  _, terms = ham.loss({**outputs, "refined_cams": 1 - masks}, {**batch, "box_supervised": np.ones(2)},
                      task=task, config=config, weight=np.array([1.0, 0.0]))
  np.testing.assert_allclose(float(terms["ex_loss"]), 1.0, rtol=1e-6)


def test_method_loss_weights_come_from_the_config(reference, loss_inputs):
  """`config.loss.ham_weights` sets each term's weight (the ablations zero bound and union)."""
  task = methods.Task(target="labels", class_names=tuple("abcde"))
  batch = pipeline_batch([1, 1])
  rng = np.random.default_rng(1)
  outputs = dict(logits=rng.normal(size=(2, 5)), abnormality_logit=rng.normal(size=(2,)),
                 cams=rng.uniform(size=(2, 4, 4, 5)), abnormality_cam=rng.uniform(size=(2, 4, 4, 1)),
                 refined_cams=rng.uniform(size=(2, 16, 16, 5)))
  batch.update(labels=np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], np.float32),
               label_mask=np.ones((2, 5), np.float32))
  weights = dict(ham.LOSS_WEIGHTS, bound_loss=0.0, union_loss=0.0, ex_loss=2.0)
  total, terms = ham.loss(outputs, batch, task=task, config={"loss": {"ham_weights": weights}},
                          weight=np.ones(2))
  assert all(float(terms[name]) > 0 for name in ("ex_loss", "bound_loss", "union_loss"))
  want = sum(weights[name] * float(value) for name, value in terms.items())
  np.testing.assert_allclose(float(total), want, rtol=1e-6)


def test_padded_examples_count_in_no_term(reference, loss_inputs):
  """Examples of weight 0, however their outputs and labels look, change no term; all-ones weights
  give HAM's values."""
  stored = reference["losses"]["caseB"]["float64"]
  outputs = network_outputs(stored)
  check_losses(losses(outputs, loss_inputs, np.float64, weight=np.ones(2)), stored["losses"],
               rtol=1e-9, atol=1e-12)
  rng = np.random.default_rng(0)
  padded_outputs = {k: np.concatenate([v, 3 * np.abs(rng.normal(size=v.shape))])
                    for k, v in outputs.items()}
  labels, masks, helper, tags = loss_inputs
  padded_inputs = (np.concatenate([labels, np.ones_like(labels)]),
                   np.concatenate([masks, np.ones_like(masks)]), np.concatenate([helper, [1, 1]]),
                   np.concatenate([tags, np.ones_like(tags)]))
  check_losses(losses(padded_outputs, padded_inputs, np.float64, weight=np.array([1, 1, 0, 0.0])),
               stored["losses"], rtol=1e-9, atol=1e-12)


def test_losses_are_jit_compatible(reference, loss_inputs):
  stored = reference["losses"]["caseB"]["float64"]
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in network_outputs(stored).items()}
  args = tuple(jnp.asarray(x, jnp.float32) for x in loss_inputs)
  total, _ = jax.jit(ham.ham_losses)(outputs, *args, jnp.ones(2))
  np.testing.assert_allclose(total, stored["losses"]["total"], rtol=1e-4, atol=1e-5)


def test_case_b_gradients_through_the_network_float64(reference, loss_inputs):
  """Gradients of HAM's weighted total through the eval-mode network (case B, float64) equal the
  authors' code's. The head weights' gradients come only from the BCE terms (the CAMs read them
  through stop_gradient): without it the `cls_fc.weight` gradient would move by up to 90.5."""
  case_b = reference["losses"]["caseB"]
  stored = case_b["float64"]["grads_of_total"]
  with jax.enable_x64(True):
    task = methods.Task(target="labels", class_names=tuple(reference["config"]["classes"]))
    model = ham.build({**test_ham.CONFIG, "dtype": jnp.float64}, task)
    images = jnp.asarray(test_ham.formula_input(reference))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    state_dict = test_ham.formula_state_dict(reference, reference["weights"]["gamma_value"])
    for key, scale in case_b["head_scales"].items():
      state_dict[key] = state_dict[key] * scale
    names = ham.torch_names(test_ham.CONFIG["model"])
    variables = convert.from_state_dict(
        state_dict, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64), dict(abstract)),
        names)
    labels, masks, helper, tags = map(jnp.asarray, loss_inputs)

    def total(params):
      outputs = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                            train=False)
      return ham.ham_losses(outputs, labels, masks, helper, tags)[0]

    grads = convert.to_state_dict({"params": jax.jit(jax.grad(total))(variables["params"])}, names)
  for key, entry in stored.items():  # measured: at most 7.7e-13 of scale (conv4.weight)
    if "values" in entry:
      assert_close_to_scale(grads[key], values(entry), rel=1e-10, name=key)
    else:
      check_summary(grads[key], entry, rtol=1e-10, atol=1e-10 * np.abs(entry["max"]))
