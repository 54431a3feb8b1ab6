"""What the phantom experiments share: variants trained with seeds, evaluated, tabulated.

A study (`benchmarks/localization.py`, `spf_location.py`, `msml_loss.py`, `can_ablations.py`,
`anatomy_xnet.py`) names its variants, each a `configs/phantom.py` argument plus command-line
overrides (where "{workdir}" is the study's folder), a function that turns the runs' reports
into markdown tables, and optionally what to make once before the runs (`prepare`). `main` trains and evaluates every
(variant, seed) not evaluated yet, each in fresh processes as a user would (`cxr_jax.train`, then
`cxr_jax.evaluate --split test` on the best-by-validation checkpoint), up to `--parallel` at a
time, each pinned to its own CPU core where the OS allows (measured on 2 cores: two pinned
phantom runs take 129 s where two in sequence take 190 s; a small model's step does not use both
cores). A run whose `eval_test.json` exists is read, not retrained, so a command resumes and a
second invocation with other variants prints them side by side. The tables go to stdout and
`<workdir>/table.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from cxr_jax.data import labels

# Variant -> (configs/phantom.py argument, command-line overrides).
Variants = Mapping[str, tuple[str, tuple[str, ...]]]
Results = dict[str, list[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Study:
  """A phantom experiment: its variants, what a run's reports are read into, and its tables."""
  variants: Variants
  read_run: Callable[[str], dict[str, Any]]  # a run directory -> its reports
  tables: Callable[[Results], str]  # {variant: one report per seed} -> markdown
  default_variants: tuple[str, ...]
  default_workdir: str
  # Runs first, with the workdir and the chosen variants: what the variants need made once (e.g.
  # a dataset); returns markdown put before the tables ("" for none).
  prepare: Callable[[str, Sequence[str]], str] | None = None


def run(study: Study) -> None:
  """The command line every study shares; trains what is missing and prints the tables."""
  flags.DEFINE_list("methods", list(study.default_variants),
                    f"Variants to run: {list(study.variants)}.")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant (0, 1, ...).")
  flags.DEFINE_string("workdir", study.default_workdir, "One subfolder per variant and seed.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time, each pinned to one CPU core.")
  app.run(lambda argv: main(study, argv))


def run_dir(workdir: str, variant: str, seed: int) -> str:
  """Where a variant's run of one seed lives."""
  return os.path.join(workdir, f"{variant}-seed{seed}")


def is_evaluated(directory: str) -> bool:
  """Whether `cxr_jax.evaluate` has scored the run's test split."""
  return os.path.exists(os.path.join(directory, "eval_test.json"))


def read_json(directory: str, name: str) -> dict[str, Any]:
  """One of the JSON reports `cxr_jax.evaluate` wrote into a run directory."""
  with open(os.path.join(directory, name), encoding="utf-8") as f:
    return json.load(f)


def classification_report(directory: str) -> dict[str, Any]:
  """A run's classification report on the test split (`eval_test.json`)."""
  return read_json(directory, "eval_test.json")


def commands(variants: Variants, variant: str, seed: int, directory: str) -> list[list[str]]:
  """The train and evaluate command lines of one run."""
  arg, overrides = variants[variant]
  # "{workdir}" in an override is the study's folder (e.g. a dataset its `prepare` made there).
  overrides = [o.replace("{workdir}", os.path.dirname(directory)) for o in overrides]
  python = [sys.executable, "-m"]
  return [python + ["cxr_jax.train", "--config", f"configs/phantom.py:{arg}", "--workdir",
                    directory, f"--config.seed={seed}", *overrides],
          python + ["cxr_jax.evaluate", "--workdir", directory, "--split", "test"]]


def _pinned(core: int | None) -> Callable[[], None] | None:
  """A child-process hook that pins it to `core` (None, or an OS without affinity: no pinning)."""
  if core is None or not hasattr(os, "sched_setaffinity"):
    return None
  return lambda: os.sched_setaffinity(0, {core})


def run_all(variants: Variants, todo: Sequence[tuple[str, int, str]], parallel: int) -> None:
  """Runs each (variant, seed, directory) of `todo`, `parallel` at a time; stops at a failure."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  queue = list(todo)
  running = []  # [process, commands left, slot, directory]
  free = list(range(parallel))
  while queue or running:
    while queue and free:
      variant, seed, directory = queue.pop(0)
      running.append([None, commands(variants, variant, seed, directory), free.pop(0), directory])
    for run in running:
      process, steps, slot, directory = run
      if process is not None and process.poll() is None:
        continue
      if process is not None and process.returncode:
        raise RuntimeError(f"{directory}: {' '.join(process.args)} exited with "
                           f"{process.returncode}")
      if steps:
        core = cores[slot % len(cores)] if parallel > 1 and cores else None
        run[0] = _start(steps.pop(0), core)
      else:
        logging.info("%s: done", directory)
        free.append(slot)
    running = [run for run in running if run[2] not in free]
    time.sleep(1.0)


def _start(command: list[str], core: int | None) -> subprocess.Popen:
  logging.info("running %s", " ".join(command))
  return subprocess.Popen(command, preexec_fn=_pinned(core))


def collect(study: Study, workdir: str, seeds: int) -> Results:
  """Every variant whose `seeds` runs are all evaluated in `workdir`, in the study's order."""
  results = {}
  for variant in study.variants:
    directories = [run_dir(workdir, variant, seed) for seed in range(seeds)]
    if all(is_evaluated(d) for d in directories):
      results[variant] = [study.read_run(d) for d in directories]
  return results


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


def summary_table(results: Results,
                  columns: Mapping[str, Callable[[dict[str, Any]], float]]) -> str:
  """One row per variant: its seed count and each column's mean ± std over the seeds."""
  return markdown(["variant", "seeds", *columns],
                  [[variant, str(len(runs)),
                    *(mean_spread([column(r) for r in runs]) for column in columns.values())]
                   for variant, runs in results.items()])


def auc_tables(results: Results) -> str:
  """For studies of the 14 findings: mean AUC, then AUC per finding, mean ± std over seeds, from
  each run's `eval_test.json`."""
  summary = summary_table(results, {"mean AUC": lambda r: r["mean_auc"]})
  return (f"Test split, mean ± sample std over seeds.\n\n{summary}\n\n"
          f"AUC per finding:\n\n{finding_auc_table(results)}\n")


def finding_auc_table(results: Results) -> str:
  """AUC per finding (rows) and variant (columns) from classification reports, mean ± std."""
  return markdown(["finding", *results],
                  [[name, *(mean_spread([r["classes"][name]["auc"] for r in runs])
                            for runs in results.values())] for name in labels.NIH_LABELS])


def main(study: Study, argv: Sequence[str]) -> None:
  """Trains and evaluates what is missing, then prints and writes the tables."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  values = flags.FLAGS
  unknown = sorted(set(values.methods) - set(study.variants))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; valid: {list(study.variants)}")
  if values.parallel < 1:
    raise app.UsageError(f"--parallel must be >= 1, got {values.parallel}")
  todo = [(variant, seed, run_dir(values.workdir, variant, seed))
          for variant in values.methods for seed in range(values.seeds)]
  for _, _, directory in todo:
    if is_evaluated(directory):
      logging.info("%s: evaluated already", directory)
  prepared = study.prepare(values.workdir, values.methods) if study.prepare else ""
  run_all(study.variants, [t for t in todo if not is_evaluated(t[2])], values.parallel)
  text = prepared + study.tables(collect(study, values.workdir, values.seeds))
  with open(os.path.join(values.workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)
