"""`python -m cxr_jax.train` with two test hooks, for tests/test_multihost.py.

  python tests/multihost_worker.py --config F --workdir D [trainer flags] \
      [--record_dir R] [--sigterm_after N --sigterm_process P]

The trainer's own `main` runs with the trainer's flags; besides, each process
  - writes R/process_<i>.json, record numbers by batch: under "taken", its part of every training
    batch the trainer took, in order (the evaluation batches are told apart by their `valid`
    field); under "stream", its part of every batch of the whole run (`config.train.steps`), read
    once the trainer has stopped from the training dataset the trainer built, so that whole epochs
    can be checked although the trainer stops early;
  - if it is process P, sends itself SIGTERM once the trainer has taken N training batches: a
    preemption notice that reaches one process only. JAX takes a few seconds to agree on a step
    with the other processes, so from then on every process slows down to 1 step per second,
    for the agreed step to come before the last.
"""

import json
import os
import signal
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from cxr_jax import experiment, train
from cxr_jax.data import pipeline

_RECORD_DIR = flags.DEFINE_string("record_dir", None, "Folder for each process's record numbers.")
_SIGTERM_AFTER = flags.DEFINE_integer("sigterm_after", 0, "Batches before the SIGTERM; 0: none.")
_SIGTERM_PROCESS = flags.DEFINE_integer("sigterm_process", 1, "The process that gets SIGTERM.")

_batches: list[list[int]] = []
_train_datasets: list = []  # what experiment.train_dataset returned to the trainer


def record_numbers(batch) -> list[int]:
  """The record numbers of a batch, from its image ids (`tests/datasets.py`: `00000017_000.png`)."""
  return [int(str(image_id).split("_")[0]) for image_id in batch["image_id"]]


class _Recorded:
  """A batch iterator that notes the training batches the trainer takes from it."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    if "valid" not in batch:
      _batches.append(record_numbers(batch))
      if _SIGTERM_AFTER.value and len(_batches) > _SIGTERM_AFTER.value:
        time.sleep(1.0)
      if len(_batches) == _SIGTERM_AFTER.value and jax.process_index() == _SIGTERM_PROCESS.value:
        os.kill(os.getpid(), signal.SIGTERM)
    return batch

  def close(self):
    self._iterator.close()


def _kept(train_dataset):
  """`experiment.train_dataset` that also keeps the dataset it makes."""

  def make(*args, **kwargs):
    _train_datasets.append(train_dataset(*args, **kwargs))
    return _train_datasets[-1]

  return make


def main(argv):
  to_iterator = pipeline.to_iterator
  pipeline.to_iterator = lambda ds, **kwargs: _Recorded(to_iterator(ds, **kwargs))
  experiment.train_dataset = _kept(experiment.train_dataset)
  train.main(argv)
  if _RECORD_DIR.value:
    (stream,) = _train_datasets
    whole_run = [record_numbers(stream[g]) for g in range(flags.FLAGS.config.train.steps)]
    os.makedirs(_RECORD_DIR.value, exist_ok=True)
    with open(os.path.join(_RECORD_DIR.value, f"process_{jax.process_index()}.json"), "w") as f:
      json.dump(dict(taken=_batches, stream=whole_run), f)


if __name__ == "__main__":
  # The trainer's flags, as `python -m cxr_jax.train` defines them.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
