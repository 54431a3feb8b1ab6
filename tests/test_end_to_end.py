"""The main job at smoke size: the phantom is rendered and converted on first use, a model trains,
and the evaluation writes its report; every config in configs/ loads and validates."""

import csv
import glob
import importlib.util
import json
import os

import pytest

from cxr_jax import config_utils, evaluate, pseudolabel, train
from cxr_jax.data import labels
from cxr_jax.metrics import classification, localization
from data_prep.phantom import anatomy as phantom_anatomy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.endswith(("__init__.py", "common.py"))],
                         ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_config_loads_and_validates(path, arg):
  config = load_config(path, arg)
  config_utils.validate(config)
  assert config.train.steps > 0
  assert "python -m cxr_jax.train --config configs/" in open(path).read()  # launch command in docstring


def test_phantom_smoke_trains_and_evaluates(tmp_path, monkeypatch):
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path / "cache"))
  config = load_config(os.path.join(REPO, "configs", "phantom.py"), "smoke")
  assert config.data.dir.startswith(str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(config, workdir)
  assert last["train"]["loss"] > 0 and {"loss", "cls_loss", "mean_auc"} <= set(last["val"])
  result = evaluate.evaluate(workdir, "test", "best", n_boot=50, heatmaps=2)
  report = result["classification"]

  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "eval_test.json",
                                         "heatmaps_test", "localization_test.json",
                                         "metrics.jsonl", "predictions_test.csv", "tensorboard"]
  assert len(os.listdir(os.path.join(workdir, "heatmaps_test"))) == 2
  located = json.load(open(os.path.join(workdir, "localization_test.json")))
  assert located["ham_localization"]["n_pairs"] > 0 and located["wang_localization"]["n_boxes"] > 0
  table = localization.format_table(located["ham_localization"])
  for name, c in located["ham_localization"]["classes"].items():  # NIH's 8 box classes, if boxed
    assert (f"\n{name} " in table) == (c["n_pairs"] > 0), name
  boxed = {n for n, c in located["ham_localization"]["classes"].items() if c["n_pairs"]}
  assert boxed and boxed <= set(labels.NIH_BOX_LABELS)  # the phantom boxes all 14; NIH reports 8
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "config.json")))["data"]["dir"] == config.data.dir
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [d["step"] for d in lines if d["split"] == "train"] == [1, 2, 3, 4]
  saved = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert saved["checkpoint_step"] == 4 and saved["n_examples"] == report["n_examples"] > 0
  assert set(saved["classes"]) == set(report["classes"]) and len(saved["classes"]) == 14
  with open(os.path.join(workdir, "predictions_test.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0][0] == "Image Index" and len(rows) - 1 == saved["n_examples"]
  assert all(0 <= float(p) <= 1 for row in rows[1:] for p in row[1:])
  table = classification.format_table(report)
  assert "Hernia" in table and "mean" in table
  # The phantom's NIH-layout folder is kept beside the shards, with the original PNGs.
  assert os.path.exists(os.path.join(config.data.dir + "-nih", "Data_Entry_2017_v2020.csv"))


@pytest.mark.parametrize("path,arg", [("phantom.py", "method=ham"), ("phantom.py", "method=ham,smoke"),
                                      ("phantom.py", "method=baseline,backbone=resnet"),
                                      ("nih/ham.py", "setting=loc_fold"),
                                      ("phantom.py", "method=spf,head=flatten"),
                                      ("phantom.py", "method=msml,head=compact"),
                                      ("phantom.py", "method=can"),
                                      ("phantom.py", "method=anatomy_xnet"),
                                      ("phantom.py", "method=segmenter"),
                                      ("nih/anatomy_xnet.py", "epochs=1,smoke"),
                                      ("nih/can.py", ""), ("nih/can.py", "res=224,smoke"),
                                      ("nih/ham.py", "setting=loc_fold,smoke"),
                                      ("mimic/spf.py", ""), ("mimic/spf.py", "smoke"),
                                      ("chexpert/densenet121.py", ""),
                                      ("mimic/densenet121.py", "res=512,smoke")])
def test_config_variants_load_and_validate(path, arg):
  config = load_config(os.path.join(REPO, "configs", path), arg)
  config_utils.validate(config)
  if path.startswith(("nih/", "mimic/", "chexpert/")):
    method = os.path.splitext(os.path.basename(path))[0].replace("densenet121", "baseline")
  else:
    method = dict(a.split("=") for a in arg.split(",") if "=" in a)["method"]
  assert config.model.name == method


def test_phantom_alone_is_the_baseline_and_bad_arguments_are_named():
  path = os.path.join(REPO, "configs", "phantom.py")
  assert load_config(path).model.name == "baseline"
  assert load_config(path).model.backbone.name == "densenet121"
  with pytest.raises(ValueError, match=r"no recipe for method 'xnet'; valid: \('baseline', 'ham', "):
    load_config(path, "method=xnet")
  with pytest.raises(ValueError, match="head=gap is for method=spf or msml"):
    load_config(path, "method=ham,head=gap")
  with pytest.raises(ValueError, match="no backbone 'vit'"):
    load_config(path, "backbone=vit")
  with pytest.raises(ValueError, match="unknown HAM setting 'fold9'"):
    load_config(os.path.join(REPO, "configs", "nih", "ham.py"), "setting=fold9")


def test_phantom_ham_smoke_trains_with_every_term_and_localizes(tmp_path, monkeypatch):
  """`configs/phantom.py:method=ham,smoke`: HAM's five terms logged (the phantom has no image
  marked for box supervision: ex_loss is 0), its maps scored by both protocols on the test split."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path / "cache"))
  config = load_config(os.path.join(REPO, "configs", "phantom.py"), "method=ham,smoke")
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert {"ano_loss", "cls_loss", "ex_loss", "bound_loss", "union_loss"} <= set(last["train"])
  assert last["train"]["ex_loss"] == 0 and last["train"]["bound_loss"] > 0
  located = evaluate.evaluate(str(tmp_path / "run"), "test", "best", n_boot=0)["localization"]
  assert located["ham_localization"]["n_pairs"] > 0 and located["wang_localization"]["n_boxes"] > 0


@pytest.mark.parametrize("arg, terms", [("method=spf,smoke", {"cls_loss", "rec_loss"}),
                                        ("method=spf,head=gap,smoke", {"cls_loss"}),
                                        ("method=msml,smoke", {"bce_loss", "msml_loss"}),
                                        ("method=can,smoke", {"cls_loss", "att_loss"}),
                                        ("method=anatomy_xnet,smoke", {"cls_loss"})])
def test_phantom_method_smokes_train_and_evaluate(tmp_path, monkeypatch, arg, terms):
  """SPF on the location-aware task (side and zone accuracy reported), MSML and CAN on the
  findings."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path / "cache"))
  config = load_config(os.path.join(REPO, "configs", "phantom.py"), arg)
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert terms <= set(last["train"]) and terms <= set(last["val"])
  result = evaluate.evaluate(str(tmp_path / "run"), "test", "best", n_boot=0)
  classes = result["classification"]["classes"]
  if "spf" in arg:
    assert all("|" in name for name in classes)  # Finding|side|zone
    assert result["location_accuracy"] is not None
  else:
    assert set(classes) == set(labels.NIH_LABELS)


def test_phantom_anatomy_recipe_segments_pseudolabels_and_classifies(tmp_path, monkeypatch):
  """Anatomy-XNet's three commands at smoke size: the segmenter learns the phantom's maps (Dice on
  the test split), writes its own maps into a copy of the phantom, and Anatomy-XNet trains on
  those predicted maps."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path / "cache"))
  path = os.path.join(REPO, "configs", "phantom.py")
  seg = load_config(path, "method=segmenter,smoke")
  last = train.train_and_evaluate(seg, str(tmp_path / "seg"))
  assert {"seg_ce", "seg_dice"} <= set(last["train"]) and "mean_dice" in last["val"]
  result = evaluate.evaluate(str(tmp_path / "seg"), "test", "best")
  assert set(result["segmentation"]["classes"]) == set(phantom_anatomy.ANATOMY_NAMES)
  facts = pseudolabel.pseudolabel(str(tmp_path / "seg"), seg.data.dir, str(tmp_path / "pseudo"))
  assert facts["splits"]["test"]["images"] > 0
  classifier = load_config(path, "method=anatomy_xnet,smoke")
  classifier.data.update(dir=str(tmp_path / "pseudo"), prepare="")
  last = train.train_and_evaluate(classifier, str(tmp_path / "axnet"))
  assert last["train"]["cls_loss"] > 0 and "mean_auc" in last["val"]
