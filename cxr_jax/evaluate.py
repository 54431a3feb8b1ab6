"""Evaluates a trained run on a split with the config's evaluators.

  python -m cxr_jax.evaluate --workdir runs/phantom [--split test] [--checkpoint best|latest|STEP]
      [--heatmaps 8]

Writes into the workdir:
  eval_<split>.json          the classification report (per-class AUC with patient-level bootstrap
                             CIs, AUPRC), the loss and its terms, and location accuracy when
                             configured
  predictions_<split>.csv    `Image Index,prob_<class>,...` (scores of the method's score function)
  localization_<split>.json  when the method returns `cams` and the split has boxes: each
                             configured localization protocol (HAM's, Wang et al.'s)
  heatmaps_<split>/          with --heatmaps N: N overlay PNGs named by image id
and prints the tables. A workdir without the requested checkpoint is an error, never an evaluation
of an untrained model.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from absl import flags, logging

from cxr_jax import cli, experiment, heatmaps as heatmaps_lib, parallel
from cxr_jax.metrics import classification, evaluators as evaluators_lib, localization


def evaluate(workdir: str, split: str = "test", which: str = "best", n_boot: int | None = None,
             heatmaps: int = 0) -> dict[str, Any]:
  """Evaluates the chosen checkpoint of a run on `split`; writes and returns the reports.

  Returns:
    {"classification": report, "localization": {protocol: report} (maybe empty),
     "location_accuracy": report or None, "losses": {name: mean}, "checkpoint_step": step,
     "heatmaps": [paths]}.
  """
  run, state, step = experiment.restore_for_inference(workdir, which)
  ids = experiment.record_ids(experiment.split_source(run.config, split))
  image_ids = ids.image
  n_boot = run.config.eval.bootstrap if n_boot is None else n_boot
  evaluators = experiment.split_evaluators(run, split, n_boot=n_boot, patient_ids=ids.patient,
                                           study_ids=ids.study, required=("classification",))
  losses = experiment.evaluate_split(run, state, split, evaluators)
  reports = {name: evaluator.result() for name, evaluator in evaluators.items()}
  report = dict(reports["classification"], loss=losses.pop("loss"), loss_terms=losses,
                workdir=os.path.abspath(workdir), split=split, checkpoint_step=step,
                data_dir=run.config.data.dir,
                location_accuracy=reports.get("location_accuracy"))
  located = {name: reports[name] for name in evaluators_lib.LOCALIZATION if name in reports}
  result = dict(classification=report, localization=located,
                location_accuracy=reports.get("location_accuracy"), losses=losses,
                checkpoint_step=step, heatmaps=[])
  if parallel.is_main_process():
    _write_json(os.path.join(workdir, f"eval_{split}.json"), report)
    if located:
      _write_json(os.path.join(workdir, f"localization_{split}.json"),
                  dict(located, split=split, checkpoint_step=step))
    predictions = evaluators["classification"].predictions()
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"),
                      [image_ids[i] for i in predictions["index"].astype(int)],
                      predictions["scores"], run.task.class_names)
  if heatmaps:
    result["heatmaps"] = heatmaps_lib.write_overlays(
        run, state, split, heatmaps, os.path.join(workdir, f"heatmaps_{split}"), image_ids)
  return result


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1)


def write_predictions(path: str, image_ids: list[str], probs: np.ndarray, label_names) -> None:
  """The prediction CSV peers emit: `Image Index,prob_<label>,...`, one row per image."""
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["Image Index"] + [f"prob_{name}" for name in label_names])
    for image_id, row in zip(image_ids, probs):
      out.writerow([image_id] + [f"{p:.6f}" for p in row])


def main(argv):
  cli.check_no_arguments(argv)
  args = flags.FLAGS
  result = evaluate(args.workdir, args.split, args.checkpoint, args.bootstrap, args.heatmaps)
  if not parallel.is_main_process():
    return
  report = result["classification"]
  print(f"{args.split} split, checkpoint step {result['checkpoint_step']}, "
        f"{report['n_examples']} images, {report['n_patients']} patients")
  print(classification.format_table(report))
  for name, located in result["localization"].items():
    print(f"\n{name}:")
    print(localization.format_table(located))
  logging.info("wrote %s", os.path.join(args.workdir, f"eval_{args.split}.json"))
  if result["heatmaps"]:
    print(f"\nwrote {len(result['heatmaps'])} heatmaps into {os.path.dirname(result['heatmaps'][0])}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("split", "test", "Split of the run's dataset to evaluate.")
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_integer("bootstrap", None,
                       "Bootstrap resamples (default: config.eval.bootstrap; 0: none).")
  flags.DEFINE_integer("heatmaps", 0, "Write this many overlay PNGs into <workdir>/heatmaps_<split>.")
  cli.run(main)
