"""cxr_jax.export: a trained run exported for PyTorch gives the scores of its evaluation."""

import ast
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import datasets
from cxr_jax import checkpoint, config_utils, experiment, export, layers, methods, steps, train
from cxr_jax.data import labels, tfrecord, writer as data_writer
from cxr_jax.interop import registry, torch_modules
from parity import assert_close_to_scale

REPO = pathlib.Path(__file__).resolve().parents[1]
FILES = ["config.json", "labels.json", "model.pt", "model.safetensors", "preprocessing.json"]
# Records are 40 px and the model's input 32 px: the export's recipe must include the resize.
RECORD_SIZE = 40
# Largest |torch - flax| probability allowed, relative to the largest flax probability; measured
# 7.2e-8 to 1.4e-7 (float32 rounding) for model.pt, the docs snippets and the safetensors mirror.
PROBABILITY_REL = 1e-6
# Largest |torch mirror - flax| allowed for each output of the exported model, relative to that
# output's largest |flax| value; measured: logits 1.2e-7, cams 1.2e-7, pooled 1.3e-7, stage maps
# 4.1e-7 (C2, the worst; C3 2.8e-7, C4 3.7e-7, C5 1.3e-7).
OUTPUT_REL = {"logits": 1e-6, "cams": 1e-6, "pooled": 1e-6, "features": 2e-6}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 8, "val": 8, "test": 8},
                        size=RECORD_SIZE, with_extras=False)


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = datasets.tiny_config(data_dir, steps=2, eval_every=2)
  config.checkpoint.every = 2
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  return export.export(workdir, str(tmp_path_factory.mktemp("exports") / "phantom_torch"))


@pytest.fixture(scope="module")
def restored(workdir):
  """(run, state) of the best checkpoint, as evaluation restores it."""
  run, state, _ = experiment.restore_for_inference(workdir, "best")
  return run, state


@pytest.fixture(scope="module")
def test_images(restored):
  """{image id: (record PNG bytes, flax evaluation probabilities)} of the test split."""
  run, state = restored
  evaluators = experiment.split_evaluators(run, "test", required=("classification",))
  experiment.evaluate_split(run, state, "test", evaluators)
  predictions = evaluators["classification"].predictions()
  source = experiment.split_source(run.config, "test")
  assert sorted(predictions["index"].astype(int).tolist()) == list(range(len(source)))  # each once
  records = [tfrecord.parse(source[int(i)]) for i in predictions["index"]]
  return {r.image_id: (r.image, probs) for r, probs in zip(records, predictions["scores"])}


def resized(png: bytes, size: int) -> np.ndarray:
  """The 8-bit image area-resized as preprocessing.json says: uint8 (size, size)."""
  return np.asarray(Image.open(io.BytesIO(png)).resize((size, size), Image.BOX))


def pixels(png: bytes, size: int) -> np.ndarray:
  """preprocessing.json's recipe, written out independently of the pipeline: (1, size, size)."""
  return (resized(png, size).astype(np.float32) / 255)[None]


def flat_outputs(out, layout: str) -> dict[str, np.ndarray]:
  """A method's outputs by name, its stage maps (`layout` NCHW for the mirror, NHWC for flax) as
  `features/C2`... in NHWC; the mirrors return every other output (cams too) in flax's layout."""
  named = {k: np.asarray(v) for k, v in out.items() if k != "features"}
  named.update({f"features/{stage}": np.asarray(v).transpose(0, 2, 3, 1) if layout == "NCHW"
                else np.asarray(v) for stage, v in out["features"].items()})
  return named


def read_json(folder, name):
  with open(os.path.join(folder, name)) as f:
    return json.load(f)


def test_model_pt_gives_the_evaluation_probabilities(exported, test_images):
  model = torch.jit.load(os.path.join(exported["out"], "model.pt"))
  batch = np.stack([pixels(png, 32) for png, _ in test_images.values()])
  assert batch.shape == (8, 1, 32, 32)
  with torch.no_grad():
    probs = model(torch.from_numpy(batch)).numpy()
  expected = np.stack([p for _, p in test_images.values()])
  assert probs.shape == expected.shape == (8, len(labels.NIH_LABELS))
  assert np.ptp(expected, axis=0).max() > 1e-3  # the images get different answers
  assert_close_to_scale(probs, expected, rel=PROBABILITY_REL, name="model.pt probabilities")


def docs_snippets() -> list[str]:
  """The python code blocks of docs/pytorch.md, in order."""
  with open(REPO / "docs" / "pytorch.md") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_docs_snippet_prints_the_evaluation_probabilities(exported, test_images, tmp_path,
                                                               monkeypatch, capsys):
  snippet = docs_snippets()[0]
  png, expected = next(iter(test_images.values()))
  (tmp_path / "image.png").write_bytes(png)
  os.symlink(exported["out"], tmp_path / "phantom_torch")
  monkeypatch.chdir(tmp_path)
  exec(snippet, {})  # pylint: disable=exec-used
  printed = ast.literal_eval(capsys.readouterr().out)
  assert list(printed) == list(labels.NIH_LABELS)
  assert_close_to_scale(list(printed.values()), expected, rel=PROBABILITY_REL, name="printed probabilities")


def test_the_docs_mirror_snippet_loads_the_weights(exported, test_images, tmp_path, monkeypatch):
  snippets = docs_snippets()
  assert len(snippets) == 2
  os.symlink(exported["out"], tmp_path / "phantom_torch")
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(snippets[1], namespace)  # pylint: disable=exec-used
  mirror, spec = namespace["mirror"], read_json(exported["out"], "preprocessing.json")
  png, expected = next(iter(test_images.values()))
  x = (torch.from_numpy(pixels(png, 32)[None]) - torch.tensor(spec["mean"]).reshape(1, -1, 1, 1)) / (
      torch.tensor(spec["std"]).reshape(1, -1, 1, 1))
  with torch.no_grad():
    out = mirror(x)
  assert set(out) == {"logits", "cams", "pooled", "features"}
  assert tuple(out["cams"].shape) == (1, 1, 1, len(labels.NIH_LABELS))  # (B, h, w, K) channels last
  assert_close_to_scale(torch.sigmoid(out["logits"])[0].numpy(), expected, rel=PROBABILITY_REL,
                        name="docs mirror probabilities")


def test_safetensors_load_strictly_into_the_mirror(exported, test_images, restored):
  out = exported["out"]
  config = read_json(out, "config.json")
  task = methods.Task(target=config["data"]["target"], class_names=tuple(read_json(out, "labels.json")))
  mirror = registry.build_mirror(config, task)
  state_dict = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
  assert set(state_dict) == set(mirror.state_dict())
  mirror.load_state_dict(state_dict, strict=True)
  spec = read_json(out, "preprocessing.json")
  model = torch_modules.Predictor(mirror, spec["mean"], spec["std"], scores=spec["scores"],
                                  inputs=spec["extra_inputs"]).eval()
  png, expected = next(iter(test_images.values()))
  with torch.no_grad():
    probs = model(torch.from_numpy(pixels(png, 32)[None]))[0].numpy()
    mirror_out = flat_outputs(mirror((torch.from_numpy(pixels(png, 32)[None]) - model.mean) / model.std),
                              "NCHW")
  assert_close_to_scale(probs, expected, rel=PROBABILITY_REL, name="mirror probabilities")
  # Every output of the mirror (logits, cams, pooled, each stage map) is the trained flax model's.
  run, state = restored
  flax_out = flat_outputs(steps.apply_model(
      run.model, run.method, run.config, {"params": state.params, "batch_stats": state.batch_stats},
      {"image": resized(png, 32)[None, :, :, None]}), "NHWC")
  assert mirror_out.keys() == flax_out.keys() == {
      "logits", "cams", "pooled", "features/C2", "features/C3", "features/C4", "features/C5"}
  for name, want in flax_out.items():
    assert_close_to_scale(mirror_out[name], want, rel=OUTPUT_REL[name.split("/")[0]],
                          name=f"mirror {name}")


def test_files_and_their_contents(exported, workdir):
  out = exported["out"]
  assert sorted(os.listdir(out)) == exported["files"] == FILES
  assert not [p for p in os.listdir(os.path.dirname(out)) if p != "phantom_torch"]  # no staging left
  run_config = config_utils.load(workdir)
  best = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                 best_metric=run_config.checkpoint.best_metric,
                                 best_mode=run_config.checkpoint.best_mode).resolve("best")
  assert exported["step"] == best
  config = read_json(out, "config.json")
  assert config.pop("export") == {"step": best, "checkpoint": "best", "workdir": os.path.abspath(workdir)}
  assert config == run_config.to_dict()
  # The task's class names (the finding labels here), in the order of the model's outputs.
  task = experiment.make_task(run_config, data_writer.load_manifest(run_config.data.dir))
  assert read_json(out, "labels.json") == list(task.class_names) == list(labels.NIH_LABELS)
  spec = read_json(out, "preprocessing.json")
  imagenet = layers.PRESETS["imagenet"]
  assert {k: spec[k] for k in ("image_size", "channels", "normalization", "mean", "std",
                               "extra_inputs", "scores")} == dict(
      image_size=32, channels=3, normalization="imagenet", mean=list(imagenet["mean"]),
      std=list(imagenet["std"]), extra_inputs=[], scores="sigmoid")
  assert "PIL BOX" in spec["input"] and "pixel/255" in spec["input"]
  assert spec["output"].startswith("sigmoid scores per class")
  # One mode for all (the umask's): safetensors' own writer would make the weights owner-only.
  assert len({os.stat(os.path.join(out, name)).st_mode for name in FILES}) == 1


def test_preprocessing_gives_one_mean_and_std_per_channel(data_dir):
  config = datasets.tiny_config(data_dir)
  config.model.update(normalization="unit", channels=1)
  assert (export.preprocessing(config)["mean"], export.preprocessing(config)["std"]) == ([0.5], [0.5])
  config.model.channels = 3
  assert export.preprocessing(config)["mean"] == [0.5, 0.5, 0.5]


def test_missing_checkpoint_is_an_error_and_writes_nothing(data_dir, tmp_path):
  run_dir = tmp_path / "untrained"
  run_dir.mkdir()
  config_utils.save(datasets.tiny_config(data_dir), str(run_dir))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    export.export(str(run_dir), str(tmp_path / "out" / "model"))
  assert sorted(os.listdir(tmp_path)) == ["untrained"]


def test_existing_folder_is_refused_untouched(workdir, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not an empty folder"):
    export.export(workdir, str(tmp_path / "out"))
  assert os.listdir(tmp_path / "out") == ["notes.txt"]


def test_a_failed_trace_check_leaves_no_folder(workdir, tmp_path, monkeypatch):
  real_trace = torch.jit.trace

  def off_by_a_bit(module, example):
    traced = real_trace(module, example)
    return lambda *inputs: traced(*inputs) + 1e-4

  monkeypatch.setattr(torch.jit, "trace", off_by_a_bit)
  with pytest.raises(RuntimeError, match="differs from the eager mirror"):
    export.export(workdir, str(tmp_path / "out"))
  assert not os.listdir(tmp_path)


WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as when it is not installed
runpy.run_module("cxr_jax.export", run_name="__main__")
"""


def test_cli_without_torch_writes_everything_but_model_pt(exported, workdir, tmp_path):
  out = tmp_path / "no_torch"
  result = subprocess.run(
      [sys.executable, "-c", WITHOUT_TORCH, "--workdir", workdir, "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr
  assert "torch is not installed: skipping model.pt" in result.stderr
  assert f"exported step {exported['step']} to {out}" in result.stdout
  assert sorted(os.listdir(out)) == [f for f in FILES if f != "model.pt"]
  for name in os.listdir(out):  # the same files as the export with torch
    assert (out / name).read_bytes() == pathlib.Path(exported["out"], name).read_bytes(), name
