"""Export round trip of a trained run: JAX checkpoint -> PyTorch files -> JAX train state.

  python benchmarks/export_roundtrip.py --workdir runs/localization/ham-seed0 --out /tmp/ham_torch

Times `cxr_jax.export` (restore, state_dict, TorchScript trace and its check against the eager
mirror) into `--out` (which must not exist), then `config.init_from=model=<out>/model.safetensors`
into a fresh train state, and checks that the variables came back bit-equal. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import numpy as np
from absl import app, flags

from cxr_jax import experiment, export

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run.", required=True)
_OUT = flags.DEFINE_string("out", None, "A new folder for the export.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step.")


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  start = time.perf_counter()
  export.export(_WORKDIR.value, _OUT.value, _CHECKPOINT.value)
  export_s = time.perf_counter() - start
  run, trained, step = experiment.restore_for_inference(_WORKDIR.value, _CHECKPOINT.value)
  run.config.init_from = f"model={os.path.join(_OUT.value, export.WEIGHTS)}"
  example = experiment.example_batch(experiment.local_examples(
      run.config, run.manifest, run.method, run.config.data.val_split))
  start = time.perf_counter()
  state = experiment.initial_state(run, example)
  jax.block_until_ready(state.params)
  import_s = time.perf_counter() - start
  print(json.dumps(dict(
      workdir=_WORKDIR.value, step=step, method=run.config.model.name, export_s=round(export_s, 2),
      import_s=round(import_s, 2),
      params_equal=_equal(state.params, trained.params),
      batch_stats_equal=_equal(state.batch_stats, trained.batch_stats))))


if __name__ == "__main__":
  app.run(main)
