"""Evaluates a trained run on a split: per-class AUC with patient-level bootstrap CIs, AUPRC.

  python -m cxr_jax.evaluate --workdir runs/phantom [--split test] [--checkpoint best|latest|STEP]

Writes `<workdir>/eval_<split>.json` (the report) and `<workdir>/predictions_<split>.csv`
(`Image Index,prob_<label>,...`), and prints the per-class table. A workdir without the requested
checkpoint is an error, never an evaluation of an untrained model.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from cxr_jax import experiment, metrics, parallel, steps, run_log

def evaluate(workdir: str, split: str = "test", which: str = "best",
             n_boot: int | None = None) -> dict[str, Any]:
  """Evaluates the chosen checkpoint of a run on `split`; writes and returns the report."""
  run, state, step = experiment.restore_for_inference(workdir, which)
  eval_step = steps.make_eval_step(run.model, run.method, run.config, run.mesh)
  image_ids, patient_ids = experiment.record_ids(experiment.split_source(run.config, split))
  n_boot = run.config.eval.bootstrap if n_boot is None else n_boot
  report, predictions = experiment.evaluate_split(run, eval_step, state, split, n_boot=n_boot,
                                                  patient_ids=patient_ids)
  report.update(workdir=os.path.abspath(workdir), split=split, checkpoint_step=step,
                data_dir=run.config.data.dir)
  if parallel.is_main_process():
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(report, f, indent=1)
    write_predictions(os.path.join(workdir, f"predictions_{split}.csv"),
                      [image_ids[i] for i in predictions["index"]], predictions["probs"],
                      run.manifest["label_names"])
  return report


def write_predictions(path: str, image_ids: list[str], probs: np.ndarray, label_names) -> None:
  """The prediction CSV peers emit: `Image Index,prob_<label>,...`, one row per image."""
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["Image Index"] + [f"prob_{name}" for name in label_names])
    for image_id, row in zip(image_ids, probs):
      out.writerow([image_id] + [f"{p:.6f}" for p in row])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_log.quiet_library_logs()
  args = flags.FLAGS
  report = evaluate(args.workdir, args.split, args.checkpoint, args.bootstrap)
  if parallel.is_main_process():
    print(f"{args.split} split, checkpoint step {report['checkpoint_step']}, "
          f"{report['n_examples']} images, {report['n_patients']} patients")
    print(metrics.format_table(report))
    logging.info("wrote %s", os.path.join(args.workdir, f"eval_{args.split}.json"))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("split", "test", "Split of the run's dataset to evaluate.")
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_integer("bootstrap", None,
                       "Bootstrap resamples (default: config.eval.bootstrap; 0: none).")
  app.run(main)
