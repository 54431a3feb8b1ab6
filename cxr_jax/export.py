"""Exports a trained run for PyTorch: weights, config, labels, preprocessing, TorchScript module.

  python -m cxr_jax.export --workdir runs/phantom --out phantom_torch [--checkpoint best|latest|STEP]

Writes into `--out` (a new or empty folder):
  model.safetensors   the weights as a state_dict with the torch mirror's names (torchvision's own
                      for the baseline); written with numpy, so torch is not needed
  config.json         the run's resolved config, plus `export` (step, checkpoint, workdir)
  labels.json         label names in the order of the model's outputs
  preprocessing.json  image size, channels, per-channel mean/std and the input recipe
  model.pt            when torch is installed: TorchScript taking (B, 1, H, W) pixel/255 and
                      returning sigmoid probabilities (B, K); `torch.jit.load` is all it needs
Everything is written into a staging folder that becomes `--out` only when complete, so a failed
export leaves nothing behind. Loading it in PyTorch: docs/pytorch.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from cxr_jax import experiment, fileutil, layers, run_log
from cxr_jax.interop import convert

WEIGHTS, CONFIG, LABELS, PREPROCESSING, TORCHSCRIPT = (
    "model.safetensors", "config.json", "labels.json", "preprocessing.json", "model.pt")
INPUT = ("8-bit grayscale PNG resized to image_size x image_size with area (PIL BOX) interpolation "
         "(unchanged when already that size), pixel/255 as float32 of shape (B, 1, H, W); then "
         "(x - mean[c]) / std[c] for each of `channels` copies of the gray channel")
OUTPUT = "sigmoid probabilities per label, in the order of labels.json"


def preprocessing(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the model expects as input, as `cxr_jax.steps.model_images` prepares it."""
  preset = layers.PRESETS[config.model.normalization]
  channels = config.model.channels

  def per_channel(value):
    return np.broadcast_to(np.asarray(value, np.float64), (channels,)).tolist()

  return dict(image_size=config.data.image_size, channels=channels,
              normalization=config.model.normalization, mean=per_channel(preset["mean"]),
              std=per_channel(preset["std"]), input=INPUT, output=OUTPUT)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def _write_torchscript(path: str, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                       num_classes: int, spec: Mapping[str, Any]) -> None:
  """Traces mirror + preprocessing + sigmoid into `path`; without torch, logs a note instead."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("torch is not installed: skipping %s (the other files are complete; "
                    "model.safetensors loads into the torch mirror later)", TORCHSCRIPT)
    return
  from cxr_jax.interop import torch_modules  # pylint: disable=g-import-not-at-top  (imports torch)

  mirror = torch_modules.build(config, num_classes)
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  model = torch_modules.Predictor(mirror, spec["mean"], spec["std"]).eval()
  size = spec["image_size"]
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    traced = torch.jit.trace(model, torch.rand(2, 1, size, size, generator=generator))
    # Another batch size than the trace's: the traced graph must not have frozen a shape.
    check = torch.rand(3, 1, size, size, generator=generator)
    difference = (traced(check) - model(check)).abs().max().item()
  if difference > 1e-6:
    raise RuntimeError(f"the traced model differs from the eager mirror by {difference}")
  traced.save(path)


def _write(folder: str, run: experiment.Run, state, step: int, meta: Mapping[str, Any]) -> list[str]:
  """Writes every export file into `folder`; returns their names."""
  config = run.config
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  state_dict = convert.to_state_dict(variables, convert.torch_names(config))
  convert.state_dict_to_safetensors(state_dict, os.path.join(folder, WEIGHTS))
  _write_json(os.path.join(folder, CONFIG), dict(config.to_dict(), export=dict(meta, step=step)))
  label_names = list(run.manifest["label_names"])
  _write_json(os.path.join(folder, LABELS), label_names)
  spec = preprocessing(config)
  _write_json(os.path.join(folder, PREPROCESSING), spec)
  _write_torchscript(os.path.join(folder, TORCHSCRIPT), config, state_dict, len(label_names), spec)
  return sorted(os.listdir(folder))


def export(workdir: str, out: str, which: str = "best") -> dict[str, Any]:
  """Exports checkpoint `which` (best, latest or a step) of the run in `workdir` into `out`.

  Returns:
    {"out": absolute path, "step": the exported step, "files": names written}.

  Raises:
    FileExistsError: `out` exists and is not an empty folder (checked before anything is read).
    FileNotFoundError: the run has no such checkpoint (nothing is written).
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f"{out} exists and is not an empty folder: export into a new folder")
  run, state, step = experiment.restore_for_inference(workdir, which)
  with fileutil.staged_dir(out) as staging:
    files = _write(staging, run, state, step,
                   dict(checkpoint=str(which), workdir=os.path.abspath(workdir)))
  logging.info("exported step %d of %s to %s: %s", step, workdir, out, ", ".join(files))
  return {"out": out, "step": step, "files": files}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_log.quiet_library_logs()
  result = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.checkpoint)
  print(f"exported step {result['step']} to {result['out']}: {', '.join(result['files'])}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("out", None, "Folder to create with the exported files.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  app.run(main)
