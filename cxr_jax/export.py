"""Exports a trained run for PyTorch: weights, config, labels, preprocessing, TorchScript module.

  python -m cxr_jax.export --workdir runs/phantom --out phantom_torch [--checkpoint best|latest|STEP]
  python -m cxr_jax.export --workdir runs/anatomy_xnet --segmenter runs/seg --out axnet_torch

Writes into `--out` (a new or empty folder):
  model.safetensors   the weights as a state_dict with the torch mirror's names (torchvision's own
                      for the baseline); written with numpy, so torch is not needed
  config.json         the run's resolved config, plus `export` (step, checkpoint, workdir)
  labels.json         class names in the order of the model's outputs
  preprocessing.json  image size, channels, per-channel mean/std, the input recipe, the method's
                      extra inputs and its score function
  model.pt            when torch is installed: TorchScript taking (B, 1, H, W) pixel/255 (then
                      the method's extra inputs, e.g. an anatomy map) and returning the method's
                      scores (B, K) (sigmoid probabilities unless the method says otherwise);
                      `torch.jit.load` is all it needs
  pipeline.pt         with --segmenter (a method that reads anatomy maps, and torch): TorchScript
                      taking the image alone: the segmenter run's best checkpoint makes the map,
                      then this model scores (`torch_modules.SegmentThenClassify`)
Everything is written into a staging folder that becomes `--out` only when complete, so a failed
export leaves nothing behind. Loading it in PyTorch: docs/pytorch.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from cxr_jax import cli, experiment, fileutil, layers, methods
from cxr_jax.interop import convert, registry

WEIGHTS, CONFIG, LABELS, PREPROCESSING, TORCHSCRIPT, PIPELINE = (
    "model.safetensors", "config.json", "labels.json", "preprocessing.json", "model.pt",
    "pipeline.pt")
INPUT = ("8-bit grayscale PNG resized to image_size x image_size with area (PIL BOX) interpolation "
         "(unchanged when already that size), pixel/255 as float32 of shape (B, 1, H, W); then "
         "(x - mean[c]) / std[c] for each of `channels` copies of the gray channel")
OUTPUT = "{scores} scores per class, in the order of labels.json"


def preprocessing(config: ml_collections.ConfigDict, method: methods.Method | None = None
                  ) -> dict[str, Any]:
  """What the model expects as input, as `cxr_jax.steps.model_images` prepares it."""
  preset = layers.PRESETS[config.model.normalization]
  channels = config.model.channels

  def per_channel(value):
    return np.broadcast_to(np.asarray(value, np.float64), (channels,)).tolist()

  method = method or methods.get(config.model.name)
  return dict(image_size=config.data.image_size, channels=channels,
              normalization=config.model.normalization, mean=per_channel(preset["mean"]),
              std=per_channel(preset["std"]), input=INPUT, extra_inputs=list(method.inputs),
              scores=method.scores, output=OUTPUT.format(scores=method.scores))


def _write_json(path: str, value: Any) -> None:
  with fileutil.naming(path), open(path, "w") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def _trace_inputs(run: experiment.Run, count: int) -> list[np.ndarray]:
  """`count` real examples of the validation split as the exported model's inputs, in order:
  the image as pixel/255 (B, 1, H, W), then the method's extra inputs as the pipeline makes them."""
  batch = experiment.local_examples(run.config, run.manifest, run.method,
                                    run.config.data.val_split)
  examples = [batch[i % len(batch)] for i in range(count)]
  image = np.concatenate([e["image"] for e in examples]).transpose(0, 3, 1, 2) / np.float32(255)
  return [image.astype(np.float32)] + [np.concatenate([e[k] for e in examples])
                                       for k in run.method.inputs]


def _has_torch() -> bool:
  """Whether torch is installed (the TorchScript files need it); logs what is skipped if not."""
  if importlib.util.find_spec("torch") is None:
    logging.warning("torch is not installed: skipping %s (the other files are complete; "
                    "model.safetensors loads into the torch mirror later)", TORCHSCRIPT)
    return False
  return True


def _predictor(run: experiment.Run, state_dict: Mapping[str, np.ndarray]):
  """The run's torch mirror with these weights, its preprocessing and its score function."""
  import torch  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import torch_modules  # pylint: disable=g-import-not-at-top  (imports torch)

  mirror = registry.build_mirror(run.config, run.task)
  mirror.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  spec = preprocessing(run.config, run.method)
  return torch_modules.Predictor(mirror, spec["mean"], spec["std"], scores=run.method.scores,
                                 inputs=run.method.inputs).eval()


def _trace(path: str, model, inputs: list[np.ndarray]) -> None:
  """Traces `model` on the first two examples of `inputs` and saves it, after checking the traced
  graph on all of them (another batch size: it must not have frozen a shape)."""
  import torch  # pylint: disable=g-import-not-at-top

  inputs = [torch.from_numpy(x) for x in inputs]
  with torch.no_grad():
    traced = torch.jit.trace(model, tuple(x[:2] for x in inputs))
    difference = (traced(*inputs) - model(*inputs)).abs().max().item()
  if difference > 1e-6:
    raise RuntimeError(f"the traced model differs from the eager mirror by {difference}")
  traced.save(path)


def _write_pipeline(path: str, run: experiment.Run, classifier, segmenter_workdir: str) -> int:
  """Traces the segmenter of `segmenter_workdir` (best checkpoint) before `classifier` into
  `path`; returns the segmenter's step."""
  from cxr_jax.interop import torch_modules  # pylint: disable=g-import-not-at-top  (imports torch)

  if "anatomy" not in run.method.inputs:
    raise ValueError(f"--segmenter: {run.config.model.name} reads no anatomy maps")
  seg_run, seg_state, seg_step = experiment.restore_for_inference(segmenter_workdir)
  if seg_run.task.target != "anatomy" or seg_run.task.class_names != run.task.anatomy_names:
    raise ValueError(f"--segmenter {segmenter_workdir} predicts {list(seg_run.task.class_names)} "
                     f"({seg_run.task.target}); the model reads {list(run.task.anatomy_names)}")
  seg_variables = jax.device_get({"params": seg_state.params,
                                  "batch_stats": seg_state.batch_stats})
  segmenter = _predictor(seg_run, convert.to_state_dict(seg_variables,
                                                        registry.torch_names(seg_run.config)))
  bundle = torch_modules.SegmentThenClassify(segmenter, classifier,
                                             seg_run.config.data.image_size).eval()
  _trace(path, bundle, _trace_inputs(run, 3)[:1])
  return seg_step


def _write(folder: str, run: experiment.Run, state, step: int, meta: Mapping[str, Any],
           segmenter: str | None = None) -> list[str]:
  """Writes every export file into `folder` (`pipeline.pt` too with a `segmenter` workdir);
  returns their names."""
  config = run.config
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  state_dict = convert.to_state_dict(variables, registry.torch_names(config))
  weights = os.path.join(folder, WEIGHTS)
  with fileutil.naming(weights):
    convert.state_dict_to_safetensors(state_dict, weights)
  _write_json(os.path.join(folder, CONFIG), dict(config.to_dict(), export=dict(meta, step=step)))
  _write_json(os.path.join(folder, LABELS), list(run.task.class_names))
  spec = preprocessing(config, run.method)
  if _has_torch():
    classifier = _predictor(run, state_dict)
    _trace(os.path.join(folder, TORCHSCRIPT), classifier, _trace_inputs(run, 3))
    if segmenter:
      seg_step = _write_pipeline(os.path.join(folder, PIPELINE), run, classifier, segmenter)
      spec = dict(spec, pipeline=dict(file=PIPELINE, segmenter=os.path.abspath(segmenter),
                                      segmenter_step=seg_step, input="the image alone"))
  elif segmenter:
    raise ValueError("--segmenter writes a TorchScript pipeline: install torch")
  _write_json(os.path.join(folder, PREPROCESSING), spec)
  return sorted(os.listdir(folder))


def export(workdir: str, out: str, which: str = "best", segmenter: str | None = None
           ) -> dict[str, Any]:
  """Exports checkpoint `which` (best, latest or a step) of the run in `workdir` into `out`; with
  `segmenter` (a segmenter run's workdir), also the image-only pipeline.

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
                   dict(checkpoint=str(which), workdir=os.path.abspath(workdir)), segmenter)
  logging.info("exported step %d of %s to %s: %s", step, workdir, out, ", ".join(files))
  return {"out": out, "step": step, "files": files}


def main(argv):
  cli.check_no_arguments(argv)
  result = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.checkpoint,
                  flags.FLAGS.segmenter)
  print(f"exported step {result['step']} to {result['out']}: {', '.join(result['files'])}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("out", None, "Folder to create with the exported files.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_string("segmenter", None,
                      "Workdir of a segmenter run: also write pipeline.pt (image -> maps -> scores).")
  cli.run(main)
