"""Localization on the phantom: a method's CAMs against the baseline's, with seeds and ablations.

  python benchmarks/localization.py --methods baseline,ham --seeds 3 --workdir runs/localization
  python benchmarks/localization.py --methods ham-no-fa,ham-no-ordinal,ham-avg-pool,ham-os32,\
baseline-resnet-os8 --seeds 3 --workdir runs/localization

Each variant of VARIANTS trains with `configs/phantom.py` (the README demo's data, optimizer and
budget) once per seed (`--config.seed`), then `cxr_jax.evaluate` scores its best-by-validation
checkpoint on the test split: per-class AUC, and localization of NIH's 8 box classes by HAM's
protocol (normalised map >= 0.469 as a pixel mask against the box mask) and by Wang et al.'s
(boxes around thresholded blobs). A run whose `eval_test.json` exists is read, not retrained, so
the command resumes. It prints markdown tables of mean and sample standard deviation over the
seeds, for every variant whose runs are all in the workdir (so a second invocation with other
variants prints them side by side), and writes them to `<workdir>/table.md`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags, logging

from cxr_jax.data import labels

# Variant -> (configs/phantom.py argument, command-line overrides).
VARIANTS = {
    "baseline": ("method=baseline", ()),
    "ham": ("method=ham", ()),
    "ham-no-fa": ("method=ham", ("--config.model.ham.fa=False",)),
    "ham-no-ordinal": ("method=ham", ("--config.loss.ham_weights.bound_loss=0.0",
                                      "--config.loss.ham_weights.union_loss=0.0")),
    "ham-avg-pool": ("method=ham", ("--config.model.ham.pooling=avg",)),
    "ham-os32": ("method=ham", ("--config.model.backbone.output_stride=32",)),
    # The baseline (GAP + linear, CAM from C5) on HAM's phantom backbone at output stride 8.
    "baseline-resnet-os8": ("method=baseline,backbone=resnet", ()),
}

_METHODS = flags.DEFINE_list("methods", ["baseline", "ham"], f"Variants to run: {list(VARIANTS)}.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per variant (0, 1, ...).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/localization", "One subfolder per variant and seed.")

IOU_AT = "0.3"  # the claim's threshold: T(IoU=0.3)


def run_dir(workdir: str, variant: str, seed: int) -> str:
  """Where a variant's run of one seed lives."""
  return os.path.join(workdir, f"{variant}-seed{seed}")


def train_and_evaluate(variant: str, seed: int, directory: str) -> None:
  """Trains and evaluates one run in a fresh process each, as a user would."""
  arg, overrides = VARIANTS[variant]
  python = [sys.executable, "-m"]
  subprocess.run(python + ["cxr_jax.train", "--config", f"configs/phantom.py:{arg}",
                           "--workdir", directory, f"--config.seed={seed}", *overrides], check=True)
  subprocess.run(python + ["cxr_jax.evaluate", "--workdir", directory, "--split", "test"],
                 check=True)


def read_run(directory: str) -> dict[str, Any]:
  """The reports `cxr_jax.evaluate` wrote for the test split."""
  with open(os.path.join(directory, "eval_test.json"), encoding="utf-8") as f:
    classification = json.load(f)
  with open(os.path.join(directory, "localization_test.json"), encoding="utf-8") as f:
    located = json.load(f)
  return dict(classification=classification, ham=located["ham_localization"],
              wang=located["wang_localization"])


# Summary columns: name -> value of one run's reports.
SUMMARY: dict[str, Callable[[dict[str, Any]], float]] = {
    "mean AUC": lambda r: r["classification"]["mean_auc"],
    "HAM T(IoU=0.3)": lambda r: r["ham"]["mean_iou_acc"][IOU_AT],
    "HAM T(IoU=0.1)": lambda r: r["ham"]["mean_iou_acc"]["0.1"],
    "HAM mean T(IoU)": lambda r: r["ham"]["mean_tiou"],
    "HAM T(IoR=0.5)": lambda r: r["ham"]["mean_ior_acc"]["0.5"],
    "Wang L180 IoU>0.3": lambda r: r["wang"]["levels"]["180"]["mean_iou_acc"][IOU_AT],
    "Wang L60 IoU>0.3": lambda r: r["wang"]["levels"]["60"]["mean_iou_acc"][IOU_AT],
}


def mean_spread(values: Sequence[float]) -> str:
  """`mean ± sample std` over seeds (`mean` alone for one seed), 3 decimals."""
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tables(results: dict[str, list[dict[str, Any]]]) -> str:
  """The summary table and the per-class HAM-protocol T(IoU=0.3) table, mean ± std over seeds."""
  summary = markdown(
      ["variant", "seeds", *SUMMARY],
      [[variant, str(len(runs)), *(mean_spread([column(r) for r in runs])
                                   for column in SUMMARY.values())]
       for variant, runs in results.items()])
  per_class = markdown(
      ["variant", *labels.NIH_BOX_LABELS],
      [[variant, *(mean_spread([r["ham"]["classes"][name]["iou_acc"][IOU_AT] for r in runs])
                   for name in labels.NIH_BOX_LABELS)]
       for variant, runs in results.items()])
  return (f"Test split, mean ± sample std over seeds.\n\n{summary}\n\n"
          f"HAM protocol, T(IoU={IOU_AT}) per box class:\n\n{per_class}\n")


def collect(workdir: str, seeds: int) -> dict[str, list[dict[str, Any]]]:
  """Every variant whose `seeds` runs are all evaluated in `workdir`, in VARIANTS order."""
  results = {}
  for variant in VARIANTS:
    directories = [run_dir(workdir, variant, seed) for seed in range(seeds)]
    if all(os.path.exists(os.path.join(d, "eval_test.json")) for d in directories):
      results[variant] = [read_run(d) for d in directories]
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  unknown = sorted(set(_METHODS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
  for variant in _METHODS.value:
    for seed in range(_SEEDS.value):
      directory = run_dir(_WORKDIR.value, variant, seed)
      if os.path.exists(os.path.join(directory, "eval_test.json")):
        logging.info("%s: evaluated already", directory)
        continue
      train_and_evaluate(variant, seed, directory)
  text = tables(collect(_WORKDIR.value, _SEEDS.value))
  with open(os.path.join(_WORKDIR.value, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
