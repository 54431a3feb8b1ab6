"""The method contract, end to end, with a method that uses every seam (tests/toy_method.py):
an auxiliary loss term, an extra input, two backbones and `cams`, through train, evaluate (both
localization protocols, heatmaps), export and parity; and the evaluation faults it guards."""

import csv
import json
import os

import chex
import jax
import numpy as np
import pytest
import torch

import datasets
import parity
import toy_method
from cxr_jax import benchmark, evaluate, experiment, export, methods, steps, train
from cxr_jax.data import writer
from cxr_jax.interop import convert, registry

TOY_EVALUATORS = "classification,ham_localization,wang_localization"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 32, "val": 8, "test": 8})


def toy_config(data_dir, name="toy", **train_changes):
  config = datasets.tiny_config(data_dir, **train_changes)
  config.model.name = name
  config.eval.evaluators = TOY_EVALUATORS
  return config


def assembled(config):
  manifest = writer.load_manifest(config.data.dir)
  run = experiment.assemble(config, manifest)
  example = experiment.example_batch(experiment.eval_dataset(
      config, manifest, run.method, "test", global_batch=4))
  variables = steps.init_variables(run.model, config, jax.random.PRNGKey(3), example, run.method)
  return run, example, variables


@pytest.mark.parametrize("name", ["baseline", "toy"])
def test_outputs_have_the_contract_shapes_and_dtypes(data_dir, name):
  run, example, variables = assembled(toy_config(data_dir, name))
  example = jax.tree.map(lambda x: np.repeat(x, 4, axis=0), example)
  outputs = steps.apply_model(run.model, run.method, run.config, variables, example)
  k = run.task.num_classes
  chex.assert_shape(outputs["logits"], (4, k))
  chex.assert_type(outputs["logits"], np.float32)
  chex.assert_rank(outputs["cams"], 4)
  chex.assert_axis_dimension(outputs["cams"], 0, 4)
  chex.assert_axis_dimension(outputs["cams"], 3, k)
  chex.assert_type(outputs["cams"], np.float32)
  chex.assert_tree_all_finite(outputs["logits"])


def test_toy_method_trains_evaluates_and_exports(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = toy_config(data_dir, steps=4, eval_every=2)
  config.checkpoint.every = 2
  train.train_and_evaluate(config, workdir)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [d for d in lines if d["split"] == "train"]
  val_lines = [d for d in lines if d["split"] == "val"]
  assert all({"cls_loss", "aux_loss", "loss"} <= set(d) for d in train_lines + val_lines)
  for d in train_lines + val_lines:  # loss = cls + 0.5 aux, both logged
    assert d["loss"] == pytest.approx(d["cls_loss"] + toy_method.AUX_WEIGHT * d["aux_loss"], rel=1e-5)

  result = evaluate.evaluate(workdir, "test", "best", n_boot=0, heatmaps=2)
  report = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert set(report["loss_terms"]) == {"cls_loss", "aux_loss"}
  located = json.load(open(os.path.join(workdir, "localization_test.json")))
  assert set(located) >= {"ham_localization", "wang_localization"}
  # Every test record has one Nodule box: 8 (image, class) pairs, whatever the scores.
  assert located["ham_localization"]["classes"]["Nodule"]["n_pairs"] == 8
  assert located["wang_localization"]["n_boxes"] == 8
  assert [os.path.basename(p) for p in result["heatmaps"]] == ["00000040_000.png", "00000041_000.png"]
  assert all(os.path.getsize(p) > 0 for p in result["heatmaps"])

  out = export.export(workdir, str(tmp_path / "torch"))
  model = torch.jit.load(os.path.join(out["out"], "model.pt"))
  spec = json.load(open(os.path.join(out["out"], "preprocessing.json")))
  assert spec["extra_inputs"] == ["anatomy"] and spec["scores"] == "sigmoid"
  manifest = writer.load_manifest(data_dir)
  batch = experiment.eval_dataset(config, manifest, methods.get("toy"), "test", global_batch=8)[0]
  with torch.no_grad():
    scores = model(torch.from_numpy(batch["image"].transpose(0, 3, 1, 2) / np.float32(255)),
                   torch.from_numpy(batch["anatomy"])).numpy()
  with open(os.path.join(workdir, "predictions_test.csv")) as f:
    rows = list(csv.reader(f))[1:]
  np.testing.assert_allclose(scores, np.array([[float(p) for p in r[1:]] for r in rows]), atol=2e-6)


def test_toy_mirror_and_torch_loss_match_flax_on_every_output(data_dir):
  config = toy_config(data_dir)
  run, example, variables = assembled(config)
  example = experiment.example_batch(experiment.eval_dataset(
      config, run.manifest, run.method, "test", global_batch=8))
  example = jax.tree.map(lambda x: np.concatenate([x] * 4), example)  # 4 copies of one example
  example["labels"][1:] = 1 - example["labels"][1:]  # targets vary across the batch
  outputs = jax.device_get(steps.apply_model(run.model, run.method, config, variables, example))
  mirror = registry.build_mirror(config, run.task).eval()
  state_dict = convert.to_state_dict(jax.device_get(variables), registry.torch_names(config))
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = steps.model_images(example, config)
  with torch.no_grad():
    torch_out = mirror(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
                       torch.from_numpy(example["anatomy"]))
  assert set(torch_out) == set(outputs)
  for name in outputs:  # measured: bit-equal on this tiny model (ratio 0 for all three)
    parity.assert_close_to_scale(torch_out[name].numpy(), outputs[name], rel=1e-6, name=name)
  weight = np.array([1, 1, 1, 0], np.float32)
  flax_loss, flax_terms = run.method.loss(outputs, example, task=run.task, config=config,
                                          weight=weight)
  batch = {k: torch.from_numpy(np.array(v)) for k, v in example.items()}
  torch_loss, torch_terms = registry.torch_loss(config)(
      {k: torch.from_numpy(np.array(v)) for k, v in outputs.items()}, batch, task=run.task,
      config=config, weight=torch.from_numpy(weight))
  assert float(torch_loss) == pytest.approx(float(flax_loss), rel=1e-5)
  for name, value in flax_terms.items():
    assert float(torch_terms[name]) == pytest.approx(float(value), rel=1e-5)


def test_each_backbone_loads_its_own_init_from_file(data_dir, tmp_path):
  config = toy_config(data_dir)
  run, example, _ = assembled(config)
  files = []
  for seed, scope in ((1, "backbone"), (2, "branch")):
    donor = steps.init_variables(run.model, config, jax.random.PRNGKey(seed), example, run.method)
    backbone_only = {c: {"backbone": donor[c][scope]} for c in ("params", "batch_stats")}
    path = tmp_path / f"{scope}.safetensors"
    convert.state_dict_to_safetensors(convert.to_state_dict(backbone_only, convert.TorchNames(
        (convert.backbone_scope(config.model.backbone, flax="backbone"),))), str(path))
    files.append((scope, str(path), donor))
  config.init_from = ",".join(f"{scope}={path}" for scope, path, _ in files)
  state = experiment.initial_state(run, example)
  for scope, _, donor in files:
    chex.assert_trees_all_equal(state.params[scope], donor["params"][scope])
  config.init_from = "trunk=x.safetensors"
  with pytest.raises(ValueError, match=r"\['trunk'\], which are not backbones of \['backbone', 'branch'\]"):
    experiment.initial_state(run, example)


def test_evaluation_loss_does_not_depend_on_padding(data_dir):
  """Every term is weighted per example, padding weighs 0: the same split in batches of 8 (no
  padding) and of 24 (16 padded copies) gives the same loss and terms."""
  run, _, variables = assembled(toy_config(data_dir))
  state = steps.create_state(run.model, run.tx, run.config, run.mesh,
                             experiment.example_batch(experiment.eval_dataset(
                                 run.config, run.manifest, run.method, "val", global_batch=1)),
                             run.method, variables)
  results = []
  for batch in (8, 24):
    run.config.eval.global_batch = batch
    results.append(experiment.evaluate_split(run, state, "val", {}))
  assert set(results[0]) == {"loss", "cls_loss", "aux_loss"}
  for name in results[0]:
    assert results[1][name] == pytest.approx(results[0][name], rel=1e-5)


def test_missing_input_is_refused_at_start(tmp_path):
  plain = datasets.write(tmp_path / "plain", {"train": 8, "val": 8, "test": 8}, with_extras=False)
  config = toy_config(plain)
  with pytest.raises(ValueError, match="reads anatomy maps but toy has none"):
    experiment.assemble(config, writer.load_manifest(plain))


def test_nan_first_seen_in_evaluation_names_the_last_good_checkpoint(data_dir, tmp_path):
  """Fault 6: NaN scores at an evaluation stop the run like a NaN loss does."""
  config = toy_config(data_dir, name="toy_nan_eval", steps=4, eval_every=4)
  config.checkpoint.every = 2
  with pytest.raises(FloatingPointError, match=r"scores on val are not finite at step 4.*last good "
                     r"checkpoint is step 2"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("uncertain, counted", [("mask", False), ("policy", True)])
def test_evaluation_masks_uncertain_labels_under_u_ones(data_dir, uncertain, counted):
  """Fault 5: under U-Ones (or U-Zeros) the -1 labels of the evaluated split are left out of AUC
  unless config.eval.uncertain says to score them as trained."""
  config = toy_config(data_dir, name="baseline")
  config.data.uncertainty = "ones"
  config.eval.uncertain = uncertain
  manifest = writer.load_manifest(data_dir)
  batch = experiment.eval_dataset(config, manifest, methods.get("baseline"), "val",
                                  global_batch=8)[0]
  # datasets.example: label 0 is -1 for every third record (records 32..39 of the val split).
  uncertain_rows = [i for i, index in enumerate(batch["index"]) if (32 + index) % 3 == 0]
  assert uncertain_rows
  assert (batch["label_mask"][uncertain_rows, 0] == float(counted)).all()
  train_batch = experiment.train_dataset(config, manifest, methods.get("baseline"))[0]
  assert train_batch["label_mask"][:, 0].all()  # training keeps the policy's targets


def test_task_counts_apply_the_uncertainty_policy(data_dir):
  config = toy_config(data_dir, name="baseline")
  manifest = writer.load_manifest(data_dir)
  counts = manifest["splits"]["train"]["label_counts"]
  for policy, extra_pos, extra_neg in (("ignore", 0, 0), ("ones", 1, 0), ("zeros", 0, 1),
                                       ("ones_lsr", 1, 0), ("zeros_lsr", 0, 1)):
    config.data.uncertainty = policy
    task = experiment.make_task(config, manifest)
    assert task.positives[0] == counts["positive"][0] + extra_pos * counts["uncertain"][0]
    assert task.negatives[0] == counts["negative"][0] + extra_neg * counts["uncertain"][0]
  assert counts["uncertain"][0] == len([i for i in range(32) if i % 3 == 0])
  config.data.target = "fine_labels"
  task = experiment.make_task(config, manifest)
  assert task.class_names[0] == "Atelectasis|right|upper" and task.mask_key == "fine_label_mask"
  assert task.positives[task.class_names.index("Nodule|left|lower")] == 32


def test_location_aware_task_streams_through_location_accuracy(data_dir):
  """A fine-label task: the baseline learns `Finding|side|zone`, evaluated by AUC and by side and
  zone accuracy; localization evaluators are refused for it (boxes name findings, not places)."""
  config = toy_config(data_dir, name="baseline")
  config.data.target = "fine_labels"
  config.eval.evaluators = "classification,location_accuracy"
  run, example, variables = assembled(config)
  assert run.task.num_classes == 84
  state = steps.create_state(run.model, run.tx, config, run.mesh, example, run.method, variables)
  evaluators = experiment.split_evaluators(run, "test")
  experiment.evaluate_split(run, state, "test", evaluators)
  located = evaluators["location_accuracy"].result()
  # datasets.example: every record's one fine label is Nodule|left|lower.
  assert located["findings"]["Nodule"]["n_pos"] == 8
  assert 0 <= located["findings"]["Nodule"]["side_acc"] <= 1
  assert evaluators["classification"].predictions()["scores"].shape == (8, 84)
  config.eval.evaluators = "ham_localization"
  with pytest.raises(ValueError, match="learns fine_labels"):
    experiment.split_evaluators(run, "test")


def test_benchmark_times_a_method_with_its_inputs_and_loss_in_both_frameworks(data_dir):
  """The benchmark's synthetic batch carries every field (the toy reads anatomy) and both
  frameworks step with the method's own two-term loss."""
  config = benchmark.apply_overrides(toy_config(data_dir), batch=8)
  record = benchmark.benchmark(config, steps_timed=1, warmup=1, with_torch=True)
  assert record["method"] == "toy" and record["num_classes"] == 14
  assert record["jax"]["params"] == record["torch"]["params"]
  for part in (record["jax"], record["torch"]):
    # BCE of random labels plus half of the auxiliary BCE: about 0.69 x 1.5 at initialisation.
    assert part["final_loss"] == pytest.approx(0.69 * 1.5, abs=0.35)
