"""The anatomy segmenter, its Dice/IoU evaluator, and pseudo-labels written by it."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import datasets
from cxr_jax import evaluate, experiment, methods, pseudolabel, train
from cxr_jax.data import augment, writer
from cxr_jax.methods import segmenter
from cxr_jax.metrics import evaluators, segmentation


def test_dice_and_iou_by_hand():
  acc = segmentation.SegmentationAccumulator(["background", "a", "b", "c"])
  true = np.array([[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
  predicted = np.array([[[0, 1], [2, 2]], [[0, 0], [0, 1]]])
  acc.update(np.eye(4)[predicted], true)
  report = acc.result()
  a, b, c = (report["classes"][k] for k in "abc")
  # a: overlap 1, predicted 2 (one in the empty image), true 2; b: overlap 1, predicted 2, true 1.
  assert a["dice"] == pytest.approx(2 / 4) and a["iou"] == pytest.approx(1 / 3)
  assert b["dice"] == pytest.approx(2 / 3) and b["iou"] == pytest.approx(1 / 2)
  assert a["image_dice"] == pytest.approx(2 / 3) and a["n_images"] == 1  # image 2 lacks a
  assert c["dice"] is None and c["n_images"] == 0  # absent everywhere: left out of the means
  assert report["mean_dice"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert report["n_examples"] == 2
  assert acc.scalars()["dice/b"] == pytest.approx(2 / 3)
  assert "mean" in segmentation.format_table(report)
  with pytest.raises(ValueError, match="ids outside 0..3"):
    acc.update(np.eye(4)[predicted], true + 4)


def test_loss_is_zero_for_a_perfect_map_and_ignores_padding():
  task = methods.Task(target="anatomy", class_names=("background", "a", "b"))
  config = dict(loss={})
  anatomy = jnp.array([[[0, 1], [2, 2]], [[1, 1], [0, 0]]], jnp.uint8)
  perfect = 50.0 * jax.nn.one_hot(anatomy, 3)
  loss, terms = segmenter.loss(dict(logits=perfect), dict(anatomy=anatomy), task=task,
                               config=config, weight=jnp.ones(2))
  assert float(loss) == pytest.approx(0.0, abs=1e-4) and set(terms) == {"seg_ce", "seg_dice"}
  uniform = jnp.zeros((2, 2, 2, 3))
  _, terms = segmenter.loss(dict(logits=uniform), dict(anatomy=anatomy), task=task, config=config,
                            weight=jnp.ones(2))
  assert float(terms["seg_ce"]) == pytest.approx(np.log(3), rel=1e-5)
  # A padding example (weight 0) with a wrong map changes nothing.
  logits = perfect.at[1].set(-perfect[1])
  padded, _ = segmenter.loss(dict(logits=logits), dict(anatomy=anatomy), task=task, config=config,
                             weight=jnp.array([1.0, 0.0]))
  alone, _ = segmenter.loss(dict(logits=perfect[:1]), dict(anatomy=anatomy[:1]), task=task,
                            config=config, weight=jnp.ones(1))
  assert float(padded) == pytest.approx(float(alone), abs=1e-6)


def test_tasks_and_evaluators_must_fit():
  anatomy = methods.Task(target="anatomy", class_names=("background", "lung"))
  labels = methods.Task(target="labels", class_names=("Effusion",))
  common = dict(image_size=32, has_cams=False, has_boxes=False)
  with pytest.raises(ValueError, match="evaluated by 'segmentation' only"):
    evaluators.build(["classification"], anatomy, {}, **common)
  with pytest.raises(ValueError, match="does not fit a task learning labels"):
    evaluators.build(["segmentation"], labels, {}, **common)
  with pytest.raises(ValueError, match="choose from"):
    methods.Method(build=None, loss=None, targets=("masks",))


def segmenter_config(data_dir, **train_changes):
  config = datasets.tiny_config(data_dir, **train_changes)
  config.model.name = "segmenter"
  config.model.segmenter = ml_collections.ConfigDict(dict(decoder_features=(8, 8, 8)))
  config.data.target = "anatomy"
  config.data.augment.hflip = True  # the maps' left and right lungs swap with the image
  config.eval.evaluators = "segmentation"
  config.checkpoint.best_metric = "val/mean_dice"
  return config


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("seg") / "toy", {"train": 16, "val": 8, "test": 8})


def test_a_classifier_does_not_learn_anatomy_and_a_segmenter_needs_maps(toy, tmp_path):
  config = segmenter_config(toy)
  config.model.name = "baseline"
  with pytest.raises(ValueError, match=r"learns \['labels', 'fine_labels'\], not config.data.target='anatomy'"):
    experiment.assemble(config, writer.load_manifest(toy))
  plain = datasets.write(tmp_path / "plain", {"train": 8, "val": 8}, with_extras=False)
  config = segmenter_config(plain)
  with pytest.raises(ValueError, match="has no anatomy"):
    experiment.make_task(config, writer.load_manifest(plain))


@pytest.fixture(scope="module")
def segmenter_run(toy, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("seg_run") / "run")
  last = train.train_and_evaluate(segmenter_config(toy), workdir)
  return workdir, last


def test_segmenter_trains_and_evaluates_dice(segmenter_run):
  workdir, last = segmenter_run
  assert {"seg_ce", "seg_dice", "loss"} <= set(last["train"])
  assert {"mean_dice", "mean_iou", "dice/right_lung", "dice/left_lung"} <= set(last["val"])
  result = evaluate.evaluate(workdir, "test", "best")
  assert result["primary"] == "segmentation"
  report = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert report["n_examples"] == 8 and set(report["classes"]) == set(datasets.ANATOMY_NAMES)
  assert 0 <= report["mean_dice"] <= 1 and report["classes"]["heart"]["n_images"] == 0
  assert not os.path.exists(os.path.join(workdir, "predictions_test.csv"))


def test_pseudolabels_copy_every_record_with_the_segmenters_maps(segmenter_run, toy, tmp_path):
  workdir, _ = segmenter_run
  out = str(tmp_path / "pseudo")
  facts = pseudolabel.pseudolabel(workdir, toy, out, threshold=0.5)
  manifest, source = writer.load_manifest(out), writer.load_manifest(toy)
  assert manifest["anatomy_names"] == list(datasets.ANATOMY_NAMES)
  assert manifest["pseudo_labels"]["splits"]["train"]["images"] == 16
  assert {s: v["num_records"] for s, v in manifest["splits"].items()} == {
      s: v["num_records"] for s, v in source["splits"].items()}
  before, after = datasets.read_all(toy), datasets.read_all(out)
  for split in before:
    for old, new in zip(before[split], after[split]):
      assert (new.image_id, new.image) == (old.image_id, old.image)
      np.testing.assert_array_equal(np.nan_to_num(new.labels, nan=9), np.nan_to_num(old.labels, nan=9))
      mask = augment.decode_png(new.anatomy)
      assert mask.shape == (32, 32) and mask.max() < len(datasets.ANATOMY_NAMES)
  with open(os.path.join(out, pseudolabel.CSV_NAME)) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 32
  flagged = sum(int(r["flagged"]) for r in rows)
  assert flagged == sum(v["flagged"] for v in facts["splits"].values())
  assert all((float(r["confidence"]) < 0.5) == bool(int(r["flagged"])) for r in rows)
  q = facts["splits"]["val"]["confidence_quantiles"]
  assert 0 < q["q0"] <= q["q50"] <= q["q100"] <= 1
  with pytest.raises(ValueError, match="never over the input"):
    pseudolabel.pseudolabel(workdir, toy, toy)


def test_confident_only_and_a_resume_on_rewritten_shards_is_refused(segmenter_run, toy, tmp_path):
  workdir, _ = segmenter_run
  out = str(tmp_path / "pseudo")
  pseudolabel.pseudolabel(workdir, toy, out, threshold=0.0)
  classifier = datasets.tiny_config(out, steps=3)
  run_dir = str(tmp_path / "classifier")
  train.train_and_evaluate(classifier, run_dir)
  # A second round keeps only the confident three quarters of the images, over the same folder.
  rows = list(csv.DictReader(open(os.path.join(out, pseudolabel.CSV_NAME))))
  quarter = float(np.quantile([float(r["confidence"]) for r in rows if r["split"] == "train"], 0.25))
  facts = pseudolabel.pseudolabel(workdir, toy, out, threshold=quarter, keep="confident",
                                  overwrite=True)
  kept = writer.load_manifest(out)["splits"]["train"]["num_records"]
  assert kept == 16 - facts["splits"]["train"]["flagged"] < 16
  classifier.train.steps = 6
  with pytest.raises(ValueError, match="data_fingerprint"):
    train.train_and_evaluate(classifier, run_dir)


TINY_DENSENET = {"name": "densenet121", "growth_rate": 4, "block_config": (1, 1, 1, 1),
                 "num_init_features": 8, "bn_size": 2}
# Output stride 8: C3, C4 and C5 share a size, so two decoder steps upsample nothing.
TINY_RESNET = {"name": "resnet18", "stage_sizes": (1, 1, 1, 1), "width": 8, "output_stride": 8}
# Relative to the logits' largest value: about 4x the largest measured flax-vs-torch float32
# difference over the three cases (7.4e-7; the DenseNet at 48 px upsamples its 1x1 C5 to 3x3).
PARITY_REL = 3e-6


def mirror_config(backbone):
  return {"model": {"name": "segmenter", "backbone": backbone, "channels": 1,
                    "segmenter": {"decoder_features": (8, 6, 4)}},
          "loss": {"segmenter": {"dice_weight": 0.5}}, "dtype": "float32"}


@pytest.mark.parametrize("backbone,size", [(TINY_DENSENET, 64), (TINY_DENSENET, 48),
                                           (TINY_RESNET, 40)])
def test_mirror_loads_the_exported_weights_strictly_and_matches_the_logits(backbone, size,
                                                                           tmp_path):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import convert, registry  # pylint: disable=g-import-not-at-top
  from parity import assert_close_to_scale, randomize  # pylint: disable=g-import-not-at-top
  cfg, task = mirror_config(backbone), methods.Task(target="anatomy", class_names=tuple("abcde"))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, size, size, 1)), jnp.float32)
  model = segmenter.build(cfg, task)
  variables = randomize(jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x))
  path = tmp_path / "model.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(variables, registry.torch_names(cfg)),
                                    path)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  mirror = registry.build_mirror(cfg, task).eval()
  mirror.load_state_dict(safetensors.torch.load_file(path), strict=True)
  with torch.no_grad():
    got = mirror(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))
  assert got["logits"].shape == (2, size, size, 5)
  assert_close_to_scale(got["logits"].numpy(), np.asarray(want["logits"]), rel=PARITY_REL,
                        name="logits")
  anatomy = np.random.default_rng(4).integers(0, 5, (2, size, size)).astype(np.uint8)
  weight = np.array([1.0, 0.0], np.float32)
  want_total, want_terms = segmenter.loss(want, {"anatomy": jnp.asarray(anatomy)}, task=task,
                                          config=cfg, weight=jnp.asarray(weight))
  total, terms = registry.torch_loss(cfg)(got, {"anatomy": torch.from_numpy(anatomy)}, task=task,
                                          config=cfg, weight=torch.from_numpy(weight))
  for name, value in dict(terms, total=total).items():
    assert_close_to_scale(value.numpy(), np.asarray(dict(want_terms, total=want_total)[name]),
                          rel=1e-5, name=name)


def test_export_writes_a_torchscript_segmenter(segmenter_run, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from cxr_jax import export  # pylint: disable=g-import-not-at-top
  workdir, _ = segmenter_run
  result = export.export(workdir, str(tmp_path / "export"))
  folder = result["out"]
  assert json.load(open(os.path.join(folder, "labels.json"))) == list(datasets.ANATOMY_NAMES)
  spec = json.load(open(os.path.join(folder, "preprocessing.json")))
  assert spec["scores"] == "softmax" and spec["extra_inputs"] == []
  model = torch.jit.load(os.path.join(folder, "model.pt"))
  with torch.no_grad():
    probs = model(torch.rand(3, 1, 32, 32))
  assert probs.shape == (3, 32, 32, len(datasets.ANATOMY_NAMES))
  np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, atol=1e-5)


def test_export_bundles_the_segmenter_before_an_anatomy_classifier(segmenter_run, toy, tmp_path):
  """pipeline.pt: image -> the segmenter's map -> Anatomy-XNet's scores, equal to model.pt fed
  the same map by hand."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from cxr_jax import export  # pylint: disable=g-import-not-at-top
  seg_dir, _ = segmenter_run
  classifier = datasets.tiny_config(toy, steps=2, eval_every=2)
  classifier.model.name = "anatomy_xnet"
  classifier.checkpoint.every = 2
  train.train_and_evaluate(classifier, str(tmp_path / "axnet"))
  with pytest.raises(ValueError, match="reads no anatomy maps"):
    export.export(seg_dir, str(tmp_path / "bad"), segmenter=seg_dir)
  folder = export.export(str(tmp_path / "axnet"), str(tmp_path / "export"), segmenter=seg_dir)["out"]
  spec = json.load(open(os.path.join(folder, "preprocessing.json")))
  assert spec["pipeline"]["file"] == "pipeline.pt" and spec["extra_inputs"] == ["anatomy"]
  pipeline_model = torch.jit.load(os.path.join(folder, "pipeline.pt"))
  classifier_model = torch.jit.load(os.path.join(folder, "model.pt"))
  segmenter_model = torch.jit.load(os.path.join(export.export(seg_dir, str(tmp_path / "seg"))["out"],
                                                "model.pt"))
  image = torch.rand(3, 1, 32, 32)
  with torch.no_grad():
    probs = segmenter_model(image).permute(0, 3, 1, 2)  # the segmenter's size is 32 too
    maps = F.interpolate(probs, size=(32, 32), mode="bilinear").argmax(1).to(torch.uint8)
    want = classifier_model(image, maps)
    got = pipeline_model(image)
  assert got.shape == want.shape == (3, 14)
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
