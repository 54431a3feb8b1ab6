"""SPF (cxr_jax.methods.spf) and its torch side (cxr_jax.interop.torch_spf, registry entry "spf").

Shapes of every head and autoencoder, the design's two invariants (the classifier reads z alone;
the reconstruction target is held constant), the loss with its weights and padding, and the
mirror: every output from converted flax weights, the torch loss, the export round trip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util

from cxr_jax import methods
from cxr_jax.interop import convert, registry, torch_spf
from cxr_jax.methods import spf
from parity import assert_close_to_scale, randomize, relative_error
from test_ham_interop import run_mirror

SIZE = 64
K = 5
# C5 (8, 8, 64) at 64 px.
RESNET = {"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 8, "output_stride": 8}
# C5 (2, 2, 14) at 64 px.
DENSENET = {"name": "densenet121", "growth_rate": 4, "block_config": (1, 1, 1, 1),
            "num_init_features": 8, "bn_size": 2}
# Two encoder steps on RESNET's 8x8 C5: 8 -> 4 -> 2, channels 16 -> 8 -> 4, z of 16.
SMALL = dict(reduce_channels=16, grid=2, bottleneck_channels=4, hidden=8)


def config(backbone=RESNET, image_size=SIZE, loss=None, **fields):
  """An experiment config for SPF with `config.model.spf` = `fields`."""
  return {"model": {"name": "spf", "backbone": backbone, "channels": 3, "dropout": 0.0,
                    "spf": fields},
          "loss": {"name": "bce", "class_counts": "batch", **(loss or {})},
          "data": {"image_size": image_size}, "dtype": "float32"}


def task(target="labels"):
  names = tuple(f"c{i}" for i in range(K))
  return methods.Task(target=target, class_names=names, positives=(3, 1, 4, 1, 5),
                      negatives=(9, 2, 6, 5, 3))


def images(size=SIZE, batch=2, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def init(model, x):
  """Randomised variables (BatchNorm statistics and affines away from identity)."""
  return randomize(model.init(jax.random.key(0), x, train=False))


# ---------------------------------------------------------------- shapes and settings


def abstract_run(cfg, size):
  """(output shapes, parameter shapes by path) of the model for `cfg`, from shapes alone."""
  model = spf.build(cfg, task())
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  params = {"/".join(p): v.shape for p, v in traverse_util.flatten_dict(variables["params"]).items()
            if p[0] != "backbone"}
  return {k: (v.shape, v.dtype) for k, v in outputs.items()}, params


def test_defaults_at_a_16x16_c5_give_the_design_table():
  """The defaults on a 16x16 C5 (RESNET at 128 px): T 16x16x256, two steps to 4x4x64, z 1024."""
  outputs, params = abstract_run(config(image_size=128), 128)
  f32 = jnp.dtype(jnp.float32)
  assert outputs == {"logits": ((2, K), f32), "z": ((2, 1024), f32),
                     "reconstruction": ((2, 16, 16, 256), f32), "target": ((2, 16, 16, 256), f32)}
  assert params == {
      "reduce/conv/kernel": (1, 1, 64, 256), "reduce/bn/scale": (256,), "reduce/bn/bias": (256,),
      "autoencoder/encoder_0/conv/kernel": (3, 3, 256, 128),
      "autoencoder/encoder_0/bn/scale": (128,), "autoencoder/encoder_0/bn/bias": (128,),
      "autoencoder/encoder_1/conv/kernel": (3, 3, 128, 64),
      "autoencoder/encoder_1/bn/scale": (64,), "autoencoder/encoder_1/bn/bias": (64,),
      "autoencoder/decoder_0/conv/kernel": (4, 4, 64, 128),
      "autoencoder/decoder_0/bn/scale": (128,), "autoencoder/decoder_0/bn/bias": (128,),
      "autoencoder/decoder_1/kernel": (4, 4, 128, 256), "autoencoder/decoder_1/bias": (256,),
      "classifier/hidden/kernel": (1024, 512), "classifier/hidden/bias": (512,),
      "classifier/output/kernel": (512, K), "classifier/output/bias": (K,)}


@pytest.mark.parametrize("fields, outputs, classifier_in, autoencoder", [
    pytest.param(dict(SMALL), {"logits": (2, K), "z": (2, 16), "reconstruction": (2, 8, 8, 16),
                               "target": (2, 8, 8, 16)}, 16,
                 {"encoder_0/conv/kernel": (3, 3, 16, 8), "encoder_1/conv/kernel": (3, 3, 8, 4),
                  "decoder_0/conv/kernel": (4, 4, 4, 8), "decoder_1/kernel": (4, 4, 8, 16)},
                 id="conv-grid2"),
    pytest.param(dict(SMALL, grid=4, bottleneck_channels=2),
                 {"logits": (2, K), "z": (2, 32), "reconstruction": (2, 8, 8, 16),
                  "target": (2, 8, 8, 16)}, 32,
                 {"encoder_0/conv/kernel": (3, 3, 16, 2), "decoder_0/kernel": (4, 4, 2, 16)},
                 id="conv-grid4-one-step"),
    pytest.param(dict(SMALL, autoencoder="fc"),
                 {"logits": (2, K), "z": (2, 16), "reconstruction": (2, 8, 8, 16),
                  "target": (2, 8, 8, 16)}, 16,
                 {"encoder/kernel": (1024, 16), "decoder/kernel": (16, 1024)}, id="fc"),
    pytest.param(dict(SMALL, head="gap"), {"logits": (2, K)}, 16, None, id="gap"),
    pytest.param(dict(SMALL, head="flatten"), {"logits": (2, K)}, 8 * 8 * 16, None, id="flatten"),
])
def test_variant_shapes(fields, outputs, classifier_in, autoencoder):
  shapes, params = abstract_run(config(**fields), SIZE)
  assert {k: shape for k, (shape, _) in shapes.items()} == outputs
  assert all(dtype == jnp.float32 for _, dtype in shapes.values())
  assert params["classifier/hidden/kernel"] == (classifier_in, 8)
  kernels = {p.removeprefix("autoencoder/"): s for p, s in params.items()
             if p.startswith("autoencoder/") and p.endswith("kernel")}
  assert kernels == (autoencoder or {})


@pytest.mark.parametrize("grid, size", [(3, 8), (8, 8), (16, 8), (2, 6)])
def test_a_grid_that_does_not_fit_c5_is_refused(grid, size):
  with pytest.raises(ValueError, match=rf"config.model.spf.grid={grid} does not fit the backbone's "
                                       rf"{size}x{size} C5"):
    spf.encoder_steps((size, size), grid)


def test_a_grid_that_does_not_fit_is_refused_when_the_model_is_built():
  with pytest.raises(ValueError, match="config.model.spf.grid=3"):
    abstract_run(config(**dict(SMALL, grid=3)), SIZE)


def test_encoder_steps_and_widths():
  assert spf.encoder_steps((16, 16), 4) == 2 and spf.encoder_steps((32, 32), 4) == 3
  assert spf.encoder_widths(256, 64, 2) == [128, 64]
  assert spf.encoder_widths(256, 64, 3) == [128, 64, 64]
  assert spf.encoder_widths(256, 32, 1) == [32]


@pytest.mark.parametrize("cfg, message", [
    (config(grids=4), r"unknown config.model.spf fields \['grids'\]"),
    (config(head="pool"), r"config.model.spf.head must be one of \('spf', 'gap', 'flatten'\)"),
    (config(autoencoder="vae"), r"config.model.spf.autoencoder must be one of"),
    (config(loss={"spf": {"rec_wieght": 1.0}}), r"unknown config.loss.spf fields \['rec_wieght'\]"),
])
def test_bad_fields_are_refused_at_build(cfg, message):
  with pytest.raises(ValueError, match=message):
    spf.build(cfg, task())


# ---------------------------------------------------------------- the design's invariants


@pytest.fixture(scope="module")
def small_model():
  """The SMALL conv SPF (two encoder steps), its randomised variables and two images."""
  model = spf.build(config(**SMALL), task())
  x = images()
  return model, init(model, x), x


def test_the_classifier_reads_z_alone_and_z_is_the_bottleneck_map_row_major(small_model):
  """Swapping the two images' z at the classifier's input swaps their logits exactly: nothing but
  z reaches it. z is the last encoder step's (grid, grid, C) map flattened in (h, w, C) order."""
  model, variables, x = small_model
  outputs, state = model.apply(variables, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
  assert np.abs(np.diff(np.asarray(outputs["logits"]), axis=0)).max() > 1e-3
  bottleneck = state["intermediates"]["autoencoder"]["encoder_1"]["__call__"][0]
  assert bottleneck.shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(outputs["z"], bottleneck.reshape(2, -1))
  swapped = outputs["z"][::-1]

  def swap_z(next_fun, args, kwargs, context):
    if isinstance(context.module, spf.Classifier) and context.method_name == "__call__":
      args = (swapped,)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(swap_z):
    swapped_outputs = model.apply(variables, x, train=False)
  np.testing.assert_allclose(swapped_outputs["logits"], outputs["logits"][::-1], rtol=1e-6,
                             atol=1e-6)


def reconstruction_grads(model, variables, x, target=None):
  """Gradients of the reconstruction loss w.r.t. the parameters; against the model's own target,
  or against `target` held as a constant."""
  weight = jnp.ones(x.shape[0])

  def rec_loss(params):
    out = model.apply({**variables, "params": params}, x, train=False)
    return spf.reconstruction_loss(out["reconstruction"],
                                   out["target"] if target is None else target, weight)

  return traverse_util.flatten_dict(jax.jit(jax.grad(rec_loss))(variables["params"]))


def test_the_target_gives_no_gradient_unless_told_to(small_model):
  """With `stop_gradient_target` the gradients are those of a constant target; without, the
  reduce layer and the backbone get the target path's gradient too, and the autoencoder's own
  gradients are the same either way."""
  model, variables, x = small_model
  constant = np.asarray(model.apply(variables, x, train=False)["target"])
  held = reconstruction_grads(model, variables, x)
  want = reconstruction_grads(model, variables, x, constant)
  free = reconstruction_grads(model.clone(stop_gradient_target=False), variables, x)
  for path, value in held.items():
    np.testing.assert_allclose(value, want[path], rtol=1e-5, atol=1e-7, err_msg="/".join(path))
  reduce_kernel = ("reduce", "conv", "kernel")
  assert np.abs(free[reduce_kernel] - held[reduce_kernel]).max() > 1e-2 * np.abs(
      held[reduce_kernel]).max()
  backbone = [p for p in held if p[0] == "backbone"]
  assert max(np.abs(free[p] - held[p]).max() for p in backbone) > 0
  for path in (p for p in held if p[0] == "autoencoder"):
    np.testing.assert_allclose(free[path], held[path], rtol=1e-5, atol=1e-7,
                               err_msg="/".join(path))


# ---------------------------------------------------------------- the loss


def loss_case(seed=0, b=4, h=3, c=2, target="labels"):
  """Outputs (with a reconstruction), a batch with a partial mask, and weights with padding."""
  rng = np.random.default_rng(seed)
  outputs = dict(logits=rng.normal(0, 2, (b, K)).astype(np.float32),
                 reconstruction=rng.normal(size=(b, h, h, c)).astype(np.float32),
                 target=rng.normal(size=(b, h, h, c)).astype(np.float32))
  batch = {target: (rng.uniform(size=(b, K)) < 0.4).astype(np.float32),
           methods.TARGETS[target]: (rng.uniform(size=(b, K)) < 0.8).astype(np.float32)}
  return outputs, batch, np.array([1, 1, 1, 0], np.float32)


def flax_loss(outputs, batch, weight, cfg, target="labels"):
  as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)
  total, terms = spf.loss(as_jax(outputs), as_jax(batch), task=task(target), config=cfg,
                          weight=jnp.asarray(weight))
  return float(total), {k: float(v) for k, v in terms.items()}


def test_loss_is_cls_plus_weighted_reconstruction():
  outputs, batch, weight = loss_case()
  total, terms = flax_loss(outputs, batch, weight, config())
  assert terms.keys() == {"cls_loss", "rec_loss"} and terms["rec_loss"] > 0.1
  per_example = np.mean((outputs["reconstruction"] - outputs["target"]) ** 2, axis=(1, 2, 3))
  assert terms["rec_loss"] == pytest.approx(per_example[:3].mean(), rel=1e-6)
  assert total == pytest.approx(terms["cls_loss"] + terms["rec_loss"], rel=1e-6)
  total3, terms3 = flax_loss(outputs, batch, weight, config(loss={"spf": {"rec_weight": 3.0}}))
  assert terms3 == terms
  assert total3 == pytest.approx(terms["cls_loss"] + 3 * terms["rec_loss"], rel=1e-6)
  total0, terms0 = flax_loss(outputs, batch, weight, config(loss={"spf": {"rec_weight": 0.0}}))
  assert total0 == terms0["cls_loss"] == terms["cls_loss"] and terms0["rec_loss"] > 0


def test_padding_changes_nothing_in_any_term():
  outputs, batch, weight = loss_case()
  want = flax_loss(outputs, batch, weight, config())
  changed_outputs = {k: v.copy() for k, v in outputs.items()}
  changed_batch = {k: v.copy() for k, v in batch.items()}
  for tree in (changed_outputs, changed_batch):
    for value in tree.values():
      value[3] = 7.0 - value[3]
  assert flax_loss(changed_outputs, changed_batch, weight, config()) == want
  counted = flax_loss(changed_outputs, changed_batch, np.ones(4, np.float32), config())
  assert all(abs(counted[1][k] - want[1][k]) > 1e-3 for k in want[1])


def test_fine_labels_are_learned_like_labels():
  outputs, batch, weight = loss_case(target="fine_labels")
  fine = flax_loss(outputs, batch, weight, config(), target="fine_labels")
  renamed = {"labels": batch["fine_labels"], "label_mask": batch["fine_label_mask"]}
  assert fine == flax_loss(outputs, renamed, weight, config())


def test_heads_without_an_autoencoder_have_the_classification_term_only():
  outputs, batch, weight = loss_case()
  total, terms = flax_loss({"logits": outputs["logits"]}, batch, weight, config(head="gap"))
  assert terms == {"cls_loss": total} and total == flax_loss(outputs, batch, weight, config(
      loss={"spf": {"rec_weight": 0.0}}))[0]


@pytest.mark.parametrize("loss", [
    pytest.param({"spf": {"rec_weight": 0.5}}, id="bce-rec0.5"),
    pytest.param({"name": "wbce", "class_counts": "train"}, id="wbce-train"),
    pytest.param({"name": "focal", "focal_gamma": 2.0, "focal_alpha": 0.25}, id="focal"),
])
@pytest.mark.parametrize("reconstruct", [True, False], ids=["spf", "gap"])
def test_torch_loss_equals_flax_loss(loss, reconstruct):
  outputs, batch, weight = loss_case(seed=2, target="fine_labels")
  if not reconstruct:
    outputs = {"logits": outputs["logits"]}
  cfg = config(loss=loss)
  want_total, want_terms = flax_loss(outputs, batch, weight, cfg, target="fine_labels")
  as_torch = lambda tree: {k: torch.from_numpy(v) for k, v in tree.items()}
  total, terms = registry.torch_loss(cfg)(as_torch(outputs), as_torch(batch),
                                          task=task("fine_labels"), config=cfg,
                                          weight=torch.from_numpy(weight))
  assert terms.keys() == want_terms.keys()
  for name, value in dict(terms, total=total).items():
    # measured: 0 (bit-equal) in every case; the bound leaves room for float32 rounding
    assert_close_to_scale(float(value), dict(want_terms, total=want_total)[name], rel=1e-6,
                          name=name)


# ---------------------------------------------------------------- the torch mirror


# Largest |torch - flax| allowed per output, relative to its largest |flax| value: about 5x the
# worst measured over MIRROR_CASES (logits 1.6e-6, z 1.1e-6, reconstruction 7.8e-7, target
# 4.6e-6). The target divides by each channel's spread over a map as small as 2x2, which
# amplifies the rounding of a nearly constant channel.
MIRROR_REL = {"logits": 1e-5, "z": 5e-6, "reconstruction": 5e-6, "target": 2.5e-5}
# (backbone, config.model.spf); measured errors as test_mirror_matches_flax_on_every_output prints.
MIRROR_CASES = {
    "conv-two-steps-resnet": (RESNET, SMALL),
    "conv-one-step-densenet": (DENSENET, dict(SMALL, grid=1)),  # 2x2 C5 -> 1x1 grid
    "fc-resnet": (RESNET, dict(SMALL, autoencoder="fc")),
    "gap-resnet": (RESNET, dict(SMALL, head="gap")),
    "flatten-resnet": (RESNET, dict(SMALL, head="flatten")),
}
WITH_AUTOENCODER = {"logits", "z", "reconstruction", "target"}


@pytest.fixture(scope="module", params=sorted(MIRROR_CASES))
def mirrored(request):
  """(case, config, flax variables, flax outputs, torch state_dict, mirror loaded with it)."""
  backbone, fields = MIRROR_CASES[request.param]
  cfg = config(backbone, **fields)
  model = spf.build(cfg, task())
  x = images()
  variables = init(model, x)
  with jax.default_matmul_precision("highest"):
    outputs = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  state_dict = convert.to_state_dict(variables, registry.torch_names(cfg))
  mirror = registry.build_mirror(cfg, task()).eval()
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return request.param, cfg, variables, jax.tree.map(np.asarray, outputs), state_dict, mirror


def test_mirror_matches_flax_on_every_output(mirrored):
  case, _, _, flax_out, _, mirror = mirrored
  torch_out = run_mirror(mirror, images())
  with_autoencoder = MIRROR_CASES[case][1].get("head", "spf") == "spf"
  assert torch_out.keys() == flax_out.keys() == (WITH_AUTOENCODER if with_autoencoder
                                                 else {"logits"})
  for name, want in flax_out.items():
    diff, scale = relative_error(torch_out[name], want)
    print(f"{case} {name}: max |diff| / max |flax| = {diff / scale:.2g}")
    assert_close_to_scale(torch_out[name], want, rel=MIRROR_REL[name], name=name)


def test_export_round_trip(mirrored):
  """flax -> torch state_dict -> strict load -> the mirror's own state_dict -> flax is exact, and
  the decoder's transposed kernels are in torch's (in, out, kh, kw) layout."""
  case, cfg, variables, _, state_dict, mirror = mirrored
  back = {k: v.numpy() for k, v in mirror.state_dict().items()}
  assert sorted(back) == sorted(state_dict)
  restored = convert.from_state_dict(back, variables, registry.torch_names(cfg))
  flat, want = traverse_util.flatten_dict(restored), traverse_util.flatten_dict(variables)
  assert flat.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(flat[path], value, err_msg="/".join(path))
  if case.startswith("conv-two-steps"):
    assert state_dict["autoencoder.decoder.0.conv.weight"].shape == (4, 8, 4, 4)
    assert state_dict["autoencoder.decoder.1.weight"].shape == (8, 16, 4, 4)
    assert state_dict["autoencoder.encoder.1.conv.weight"].shape == (4, 8, 3, 3)


def test_mirror_sizes_its_layers_by_the_configured_image_size():
  """At 128 px RESNET's C5 is 16x16: with the same grid the encoder takes three steps."""
  mirror = torch_spf.mirror(config(image_size=128, **SMALL), task())
  assert len(mirror.autoencoder.encoder) == 3 and len(mirror.autoencoder.decoder) == 3
