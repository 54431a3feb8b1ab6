"""Evaluates a trained run on a split with the config's evaluators.

  python -m cxr_jax.evaluate --workdir runs/phantom [--split test] [--checkpoint best|latest|STEP]
      [--heatmaps 8]

Writes into the workdir:
  eval_<split>.json          the classification report (per-class AUC with patient-level bootstrap
                             CIs, AUPRC), the loss and its terms, location accuracy when
                             configured, and `bad_records` (with data.on_bad_record=skip); for a
                             segmenter (data.target=anatomy) the segmentation report instead:
                             Dice and IoU per region
  predictions_<split>.csv    `Image Index,prob_<class>,...` (scores of the method's score
                             function; classifiers only)
  localization_<split>.json  when the method returns `cams` and the split has boxes: each
                             configured localization protocol (HAM's, Wang et al.'s)
  heatmaps_<split>/          with --heatmaps N: N overlay PNGs named by image id
and prints the tables. A run on a mixture of datasets (`config.data.mixture`) is evaluated per
member, on the member's own labels: `eval_<split>_<member>.json`, `predictions_<split>_<member>.csv`
and `localization_<split>_<member>.json`, and `eval_<split>.json` holds each member's mean AUC and
their mean. A workdir without the requested checkpoint is an error, never an evaluation
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
from cxr_jax.metrics import (classification, evaluators as evaluators_lib, localization,
                             segmentation)


def evaluate(workdir: str, split: str = "test", which: str = "best", n_boot: int | None = None,
             heatmaps: int = 0) -> dict[str, Any]:
  """Evaluates the chosen checkpoint of a run on `split`; writes and returns the reports.

  Returns:
    {"classification": report (a segmenter's: "segmentation"), "primary": which of the two,
     "localization": {protocol: report} (maybe empty), "location_accuracy": report or None,
     "losses": {name: mean}, "checkpoint_step": step, "heatmaps": [paths]}; for a mixture
    {"members": {member: that dict}, "mean_auc" (or "mean_dice"): their mean, "primary",
    "split", "checkpoint_step", "workdir"}.
  """
  run, state, step = experiment.restore_for_inference(workdir, which)
  n_boot = run.config.eval.bootstrap if n_boot is None else n_boot
  ids = {member: experiment.record_ids(experiment.split_source(run.config, split, member))
         for member in experiment.member_names(run.config)}
  results = {member: _evaluate_member(run, state, step, workdir, split, n_boot, member, member_ids)
             for member, member_ids in ids.items()}
  if heatmaps:
    # The split's records are the members' one after the other.
    image_ids = [image for member_ids in ids.values() for image in member_ids.image]
    paths = heatmaps_lib.write_overlays(run, state, split, heatmaps,
                                        os.path.join(workdir, f"heatmaps_{split}"), image_ids)
    for result in results.values():
      result["heatmaps"] = paths
  if list(results) == [None]:
    return results[None]
  primary = evaluators_lib.primary(run.task)
  headline = evaluators_lib.HEADLINE[primary]
  summary = {"members": {name: {headline: r[primary][headline],
                                "n_examples": r[primary]["n_examples"]}
                         for name, r in results.items()},
             headline: float(np.nanmean([r[primary][headline] for r in results.values()])),
             "split": split, "checkpoint_step": step, "workdir": os.path.abspath(workdir)}
  if parallel.is_main_process():
    _write_json(os.path.join(workdir, f"eval_{split}.json"), summary)
  return dict(summary, members=results, primary=primary)


def _evaluate_member(run, state, step: int, workdir: str, split: str, n_boot: int,
                     member: str | None, ids: experiment.RecordIds) -> dict[str, Any]:
  """Evaluates one dataset of the run (the run's only one when `member` is None), whose records
  have `ids`; writes its reports, suffixed `_<member>` for a mixture member."""
  primary = evaluators_lib.primary(run.task)
  evaluators = experiment.split_evaluators(run, split, n_boot=n_boot, patient_ids=ids.patient,
                                           study_ids=ids.study, required=(primary,),
                                           member=member)
  losses = experiment.evaluate_split(run, state, split, evaluators, member)
  reports = {name: evaluator.result() for name, evaluator in evaluators.items()}
  bad_records = losses.pop("bad_records", None)
  report = dict(reports[primary], loss=losses.pop("loss"), loss_terms=losses,
                bad_records=bad_records,
                workdir=os.path.abspath(workdir), split=split, checkpoint_step=step,
                data_dir=experiment.data_description(run.config), member=member,
                location_accuracy=reports.get("location_accuracy"))
  located = {name: reports[name] for name in evaluators_lib.LOCALIZATION if name in reports}
  result = {primary: report, "primary": primary, "localization": located,
            "location_accuracy": reports.get("location_accuracy"), "losses": losses,
            "checkpoint_step": step, "heatmaps": []}
  if parallel.is_main_process():
    suffix = f"{split}_{member}" if member else split
    _write_json(os.path.join(workdir, f"eval_{suffix}.json"), report)
    if located:
      _write_json(os.path.join(workdir, f"localization_{suffix}.json"),
                  dict(located, split=split, checkpoint_step=step))
    if primary == "classification":
      predictions = evaluators["classification"].predictions()
      write_predictions(os.path.join(workdir, f"predictions_{suffix}.csv"),
                        [ids.image[i] for i in predictions["index"].astype(int)],
                        predictions["scores"], run.task.class_names)
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
  members = result.get("members") or {None: result}
  for member, member_result in members.items():
    print_result(member_result, args.split, member)
  if "members" in result:
    headline = evaluators_lib.HEADLINE[result["primary"]]
    print(f"\n{headline} over the {len(members)} datasets: {result[headline]:.4f}")
  logging.info("wrote %s", os.path.join(args.workdir, f"eval_{args.split}.json"))
  heatmap_paths = next(iter(members.values()))["heatmaps"]
  if heatmap_paths:
    print(f"\nwrote {len(heatmap_paths)} heatmaps into {os.path.dirname(heatmap_paths[0])}")


def print_result(result: dict[str, Any], split: str, member: str | None) -> None:
  """Prints one dataset's classification and localization tables."""
  report = result[result["primary"]]
  patients = f", {report['n_patients']} patients" if "n_patients" in report else ""
  print(f"{split} split{f' of {member}' if member else ''}, checkpoint step "
        f"{result['checkpoint_step']}, {report['n_examples']} images{patients}")
  table = (segmentation.format_table if result["primary"] == "segmentation"
           else classification.format_table)
  print(table(report))
  for name, located in result["localization"].items():
    print(f"\n{name}:")
    print(localization.format_table(located))


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a training run.", required=True)
  flags.DEFINE_string("split", "test", "Split of the run's dataset to evaluate.")
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_integer("bootstrap", None,
                       "Bootstrap resamples (default: config.eval.bootstrap; 0: none).")
  flags.DEFINE_integer("heatmaps", 0, "Write this many overlay PNGs into <workdir>/heatmaps_<split>.")
  cli.run(main)
