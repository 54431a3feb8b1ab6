"""The phantom studies (benchmarks/studies.py and its three scripts): every variant is a valid
config, the tables report mean and spread over seeds from the evaluation reports, and the runner
runs each run's commands in order, in parallel, and names a failing run."""

import ast
import os
import sys

import pytest

from cxr_jax import config_utils
from cxr_jax.data import labels
from test_end_to_end import REPO, load_config

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
# pylint: disable=g-import-not-at-top,wrong-import-position
import anatomy_xnet
import can_ablations
import localization
import msml_loss
import spf_location
import studies

STUDIES = {"localization": localization, "spf_location": spf_location, "msml_loss": msml_loss,
           "can_ablations": can_ablations, "anatomy_xnet": anatomy_xnet}


def parse(text):
  """A command-line value as config_flags reads it: a Python literal, else the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


@pytest.mark.parametrize("study,variant", [(name, variant) for name, module in STUDIES.items()
                                           for variant in module.VARIANTS])
def test_every_variant_is_a_valid_phantom_config(study, variant):
  arg, overrides = STUDIES[study].VARIANTS[variant]
  config = load_config(os.path.join(REPO, "configs", "phantom.py"), arg)
  for override in overrides:
    path, value = override.removeprefix("--config.").split("=")
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
      section = section[name]
    assert leaf in section, override
    section[leaf] = parse(value)
  config_utils.validate(config)
  assert config.model.name == arg.split(",")[0].removeprefix("method=")


def test_spf_claim_variants_differ_only_in_what_the_classifier_reads():
  configs = {v: load_config(os.path.join(REPO, "configs", "phantom.py"),
                            spf_location.VARIANTS[v][0]) for v in spf_location.CLAIM}
  heads = {v: c.model.spf.head for v, c in configs.items()}
  assert heads == {"spf": "spf", "spf-gap": "gap", "spf-flatten": "flatten", "spf-no-rec": "spf"}
  for c in configs.values():
    c.model.spf.head = "spf"
  assert len({c.to_json() for c in configs.values()}) == 1


def localization_run(auc, iou03):
  """The reports of one run, as cxr_jax.evaluate writes them, with two numbers set."""
  acc = {"0.1": 0.5, "0.3": iou03}
  classes = {name: {"iou_acc": acc} for name in labels.NIH_BOX_LABELS}
  wang = {"mean_iou_acc": {"0.3": 0.0}}
  return dict(classification={"mean_auc": auc},
              ham=dict(mean_iou_acc=acc, mean_tiou=0.1, mean_ior_acc={"0.5": 0.2}, classes=classes),
              wang={"levels": {"60": wang, "180": wang}})


def test_localization_tables_give_mean_and_sample_spread_per_variant():
  text = localization.tables({"baseline": [localization_run(0.9, 0.1), localization_run(0.8, 0.3)],
                              "ham": [localization_run(0.7, 0.2)]})
  summary, per_class = text.split("per box class")
  assert "| baseline | 2 | 0.850 ± 0.071 | 0.200 ± 0.141 |" in summary
  assert "| ham | 1 | 0.700 | 0.200 |" in summary
  assert per_class.count("0.200 ± 0.141") == len(labels.NIH_BOX_LABELS)


def fine_run(aucs_and_positives, side_acc):
  """An eval_test.json of a location-aware run: fine-label AUCs with their positives, and one
  finding's side accuracy."""
  classes = {f"Nodule|left|{zone}": {"auc": auc, "n_pos": n_pos}
             for zone, (auc, n_pos) in zip(labels.ZONES, aucs_and_positives)}
  findings = {"Nodule": {"n_pos": 12, "side_acc": side_acc, "zone_acc": 0.5}, "Mass": None}
  return dict(classes=classes, location_accuracy=dict(
      findings=findings, mean_side_acc=side_acc, mean_zone_acc=0.5))


def test_spf_tables_average_auc_over_fine_labels_with_enough_positives():
  enough = spf_location.MIN_TEST_POSITIVES
  rare = [(0.9, enough), (0.7, enough), (0.1, enough - 1)]  # the third label is left out
  text = spf_location.tables({"spf": [fine_run(rare, 0.9), fine_run(rare, 0.7)],
                              "spf-gap": [fine_run(rare, 0.5)]})
  summary, per_finding = text.split("Side accuracy per finding")
  assert "[2] fine labels" in summary
  assert "| spf | 2 | 0.800 ± 0.000 | 0.800 ± 0.141 | 0.500 ± 0.000 |" in summary
  assert "| spf-gap | 1 | 0.800 | 0.500 | 0.500 |" in summary
  assert "| Nodule | 12 | 0.800 ± 0.141 | 0.500 |" in per_finding
  assert "Mass" not in per_finding  # no test positives: no row


def test_auc_tables_give_each_finding():
  report = dict(mean_auc=0.8, classes={name: {"auc": 0.8} for name in labels.NIH_LABELS})
  other = dict(report, classes=dict(report["classes"], Hernia={"auc": 0.6}))
  text = studies.auc_tables({"bce": [report, other], "msml-bce": [report]})
  assert "| bce | 2 | 0.800 ± 0.000 |" in text
  assert "| Hernia | 0.700 ± 0.141 | 0.800 |" in text
  assert "| Atelectasis | 0.800 ± 0.000 | 0.800 |" in text


def fake_commands(log):
  """`studies.commands` with each run's two steps replaced by appends to `log`."""
  def commands(variants, variant, seed, directory):
    del variants
    step = lambda name: [sys.executable, "-c", f"open({str(log)!r}, 'a').write("
                         f"{f'{variant} {seed} {name}' + chr(10)!r})"]
    return [step("train"), step("evaluate")] if variant != "broken" else [
        [sys.executable, "-c", "raise SystemExit(3)"]]
  return commands


def test_runner_runs_every_run_train_before_evaluate(tmp_path, monkeypatch):
  log = tmp_path / "log.txt"
  monkeypatch.setattr(studies, "commands", fake_commands(log))
  todo = [(v, s, str(tmp_path / f"{v}{s}")) for v in ("a", "b") for s in (0, 1, 2)]
  studies.run_all({}, todo, parallel=2)
  lines = log.read_text().splitlines()
  assert sorted(lines) == sorted(f"{v} {s} {step}" for v in "ab" for s in range(3)
                                 for step in ("train", "evaluate"))
  for v, s, _ in todo:
    assert lines.index(f"{v} {s} train") < lines.index(f"{v} {s} evaluate")


def test_runner_names_the_failing_run(tmp_path, monkeypatch):
  monkeypatch.setattr(studies, "commands", fake_commands(tmp_path / "log.txt"))
  with pytest.raises(RuntimeError, match="broken0.*exited with 3"):
    studies.run_all({}, [("broken", 0, str(tmp_path / "broken0"))], parallel=1)


def test_collect_keeps_variants_with_every_seed_evaluated(tmp_path):
  for seed in (0, 1):
    os.makedirs(studies.run_dir(str(tmp_path), "bce", seed))
    with open(os.path.join(studies.run_dir(str(tmp_path), "bce", seed), "eval_test.json"),
              "w") as f:
      f.write('{"mean_auc": 0.5}')
  os.makedirs(studies.run_dir(str(tmp_path), "msml-bce", 0))
  assert list(studies.collect(msml_loss.STUDY, str(tmp_path), seeds=2)) == ["bce"]
  assert list(studies.collect(msml_loss.STUDY, str(tmp_path), seeds=3)) == []


def test_overrides_name_the_study_folder_and_prepare_runs_only_when_needed(tmp_path):
  directory = studies.run_dir(str(tmp_path), "anatomy_xnet-predicted", 1)
  train_command, _ = studies.commands(anatomy_xnet.VARIANTS, "anatomy_xnet-predicted", 1, directory)
  assert f"--config.data.dir={tmp_path}/{anatomy_xnet.PSEUDO}" in train_command
  assert anatomy_xnet.prepare(str(tmp_path), ["baseline", "anatomy_xnet-true"]) == ""
  assert not os.listdir(tmp_path)  # nothing trained for variants on true maps


def test_segmenter_tables_give_dice_per_region_and_confidence_per_split():
  report = dict(mean_dice=0.8, mean_iou=0.7, classes={
      "background": dict(dice=0.99, iou=0.98, n_images=10),
      "heart": dict(dice=0.8, iou=0.7, n_images=10), "abdomen": dict(dice=None, iou=None, n_images=0)})
  quantiles = dict(q0=0.5, q5=0.6, q25=0.7, q50=0.8, q75=0.9, q95=0.95, q100=0.99)
  pseudo = dict(threshold=0.9, splits={"train": dict(images=10, flagged=7,
                                                     confidence_quantiles=quantiles)})
  text = anatomy_xnet.segmenter_tables(report, pseudo)
  assert "mean Dice 0.800" in text and "| heart | 0.800 | 0.700 | 10 |" in text
  assert "| abdomen | n/a | n/a | 0 |" in text
  assert "| split | images | below 0.9 | q0 |" in text and "| train | 10 | 7 | 0.500 |" in text
