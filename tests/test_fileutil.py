"""Folders written all at once, and datasets prepared once when several runs start together."""

import json
import os
import threading
import time

import ml_collections
import pytest

from cxr_jax import experiment, fileutil
from cxr_jax.data import writer

PREPARED = []  # (data_dir, start, end) of every call of `slow_prepare`


def slow_prepare(data_dir: str, *, tag: str) -> None:
  """A `config.data.prepare` hook that takes a while and records when it ran."""
  start = time.monotonic()
  time.sleep(0.3)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, writer.MANIFEST), "w") as f:
    json.dump({"name": tag}, f)
  PREPARED.append((data_dir, start, time.monotonic()))


def test_runs_started_together_prepare_the_dataset_once(tmp_path):
  PREPARED.clear()
  config = ml_collections.ConfigDict(dict(data=dict(
      dir=str(tmp_path / "data"), mixture="", prepare=f"{__name__}:slow_prepare",
      prepare_args=dict(tag="x"))))
  manifests = []
  threads = [threading.Thread(target=lambda: manifests.append(experiment.prepare_data(config)))
             for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(PREPARED) == 1
  assert manifests == [{"name": "x"}] * 3


def test_exclusive_serialises_holders(tmp_path):
  spans = []

  def hold():
    with fileutil.exclusive(tmp_path / "folder"):
      start = time.monotonic()
      time.sleep(0.2)
      spans.append((start, time.monotonic()))

  threads = [threading.Thread(target=hold) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  spans.sort()
  assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_staged_dir_leaves_nothing_when_the_block_fails(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with fileutil.staged_dir(out) as staging:
      open(os.path.join(staging, "half"), "w").close()
      raise RuntimeError("writer failed")
  assert os.listdir(tmp_path) == []
