"""A full disk (ENOSPC) while writing shards, checkpoints, metrics or exports: a clear error that
names the path, nothing half-written left in place of the output, earlier outputs intact, and a
rerun after space is freed completes.

The fault is injected, not made by filling a disk: `FullDisk` wraps the files that
`builtins.open` returns for writing under one folder, or at one file (the writer, the export, the
metric log, tensorboardX and orbax's JSON files through etils.epath all open files that way), so
that they write what fits in `free` bytes and then raise ENOSPC as the kernel does: without a
file name.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os

import pytest

import datasets
import nih_fixtures
from cxr_jax import checkpoint, experiment, export, run_log, train
from cxr_jax.data import tfrecord
from data_prep import nih

WRITE_MODES = frozenset("wax+")


class FullDisk:
  """A disk holding `root` (a folder or one file) with `free` bytes left (None: unlimited)."""

  def __init__(self, monkeypatch: pytest.MonkeyPatch, root, free: int | None):
    self.root = os.path.abspath(root)
    self.free = free
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
      f = real_open(file, mode, *args, **kwargs)
      if (isinstance(file, (str, os.PathLike)) and WRITE_MODES & set(mode)
          and self.holds(os.path.abspath(file))):
        return _FileOnDisk(f, self)
      return f

    monkeypatch.setattr(builtins, "open", open_)

  def holds(self, path: str) -> bool:
    """Whether `path` lies on this disk."""
    return path == self.root or path.startswith(self.root + os.sep)

  def take(self, size: int) -> int:
    """Reserves up to `size` bytes; returns how many fit."""
    if self.free is None:
      return size
    fit = min(size, self.free)
    self.free -= fit
    return fit


class _FileOnDisk:
  """A file whose writes stop with ENOSPC where its `FullDisk` runs out of space."""

  def __init__(self, file, disk: FullDisk):
    self._file, self._disk = file, disk

  def write(self, data):
    fit = self._disk.take(len(data))
    self._file.write(data[:fit])
    if fit < len(data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fit

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


def digest(folder) -> dict[str, str]:
  """sha256 of every file under `folder`, by relative path."""
  result = {}
  for parent, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return result


def test_shards_full_disk_names_the_shard_and_leaves_nothing(monkeypatch, tmp_path):
  src = nih_fixtures.write_nih(tmp_path / "src")
  before = digest(src)
  out = tmp_path / "prepared" / "nih"
  disk = FullDisk(monkeypatch, out.parent, free=2_000)
  with pytest.raises(OSError) as raised:
    nih.convert(str(src), str(out), image_size=16, workers=1)
  assert raised.value.errno == errno.ENOSPC
  assert f"{out}.partial-{os.getpid()}" in str(raised.value)  # the staged shard's path
  assert ".part0" in str(raised.value)
  assert os.listdir(out.parent) == []  # neither out nor its staging folder
  assert digest(src) == before

  disk.free = None  # space freed
  manifest = nih.convert(str(src), str(out), image_size=16, workers=1)
  assert sorted(os.listdir(out.parent)) == ["nih"]
  assert sum(s["num_records"] for s in manifest["splits"].values()) == len(nih_fixtures.IMAGES)
  assert digest(src) == before


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 16, "val": 8},
                        with_extras=False)


def test_checkpoint_full_disk_keeps_the_previous_checkpoint(data_dir, monkeypatch, tmp_path):
  """The disk fills once step 3 is saved, as the step-6 save starts (`Checkpointer.save` is
  wrapped only to time the fault). Orbax writes the arrays through tensorstore's own C++ I/O,
  which Python patching cannot reach; the fault hits the files it writes through Python (the
  data position and the checkpoint metadata, via etils.epath), in its background thread. The
  error surfaces when the run closes the checkpointer (in a longer run: at the next save)."""
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  config = datasets.tiny_config(data_dir, steps=6, eval_every=3)
  disk = FullDisk(monkeypatch, ckpt_dir, free=None)
  save = checkpoint.Checkpointer.save
  step_3 = {}

  def fill_at_step_6(self, step, *args, **kwargs):
    if step == 6:
      self.wait()  # step 3 is on disk, finalized
      step_3.update(digest(ckpt_dir / "3"))
      disk.free = 0
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", fill_at_step_6)
  with pytest.raises(OSError) as raised:
    train.train_and_evaluate(config, str(workdir))
  assert raised.value.errno == errno.ENOSPC
  assert str(ckpt_dir) in str(raised.value)
  assert step_3 and digest(ckpt_dir / "3") == step_3
  assert checkpoint.Checkpointer(str(ckpt_dir), read_only=True).latest_step() == 3
  _, _, step = experiment.restore_for_inference(str(workdir), "latest")
  assert step == 3

  disk.free = None  # space freed; the same command again
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  train.train_and_evaluate(config, str(workdir))
  assert train_steps(workdir) == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # resumed after step 3
  assert checkpoint.Checkpointer(str(ckpt_dir), read_only=True).latest_step() == 6


def train_steps(workdir) -> list[int]:
  """The steps of the train lines of the run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, run_log.METRICS_FILE)) as f:
    return [line["step"] for line in map(json.loads, f) if line["split"] == "train"]


def test_metrics_full_disk_names_the_file_and_keeps_earlier_lines(monkeypatch, tmp_path):
  """The fault hits metrics.jsonl."""
  disk = FullDisk(monkeypatch, tmp_path / run_log.METRICS_FILE, free=None)
  log = run_log.MetricWriter(str(tmp_path))
  for step in (1, 2):
    log.write(step, "train", {"loss": 0.5})
  disk.free = 10  # part of the next line fits
  with pytest.raises(OSError) as raised:
    log.write(3, "train", {"loss": 0.5})
  log.close()
  assert raised.value.errno == errno.ENOSPC
  assert str(tmp_path / run_log.METRICS_FILE) in str(raised.value)
  assert not (tmp_path / run_log.METRICS_FILE).read_text().endswith("\n")  # a torn line 3

  disk.free = None  # space freed; a resumed run appends
  log = run_log.MetricWriter(str(tmp_path))
  log.write(3, "train", {"loss": 0.5})
  log.close()
  assert train_steps(tmp_path) == [1, 2, 3]


def tensorboard_scalars(workdir) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in the run's TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in sorted(os.listdir(os.path.join(workdir, run_log.TB_DIR))):
    try:
      for _, payload in tfrecord.iter_records(os.path.join(workdir, run_log.TB_DIR, name)):
        event = event_pb2.Event.FromString(payload)
        out += [(event.step, v.tag, round(v.simple_value, 6)) for v in event.summary.value]
    except tfrecord.CorruptRecordError as e:
      assert "truncated" in str(e), e  # a torn last record, which TensorBoard skips too
  return out


def test_tensorboard_full_disk_names_the_file_and_does_not_hang(monkeypatch, tmp_path):
  """The fault hits the TensorBoard events: the write raises in the caller's thread, naming the
  event file (tensorboardX's own writer thread would die and block the next write forever)."""
  disk = FullDisk(monkeypatch, tmp_path / run_log.TB_DIR, free=None)
  log = run_log.MetricWriter(str(tmp_path))
  for step in (1, 2):
    log.write(step, "train", {"loss": 0.5})
  disk.free = 10
  with pytest.raises(OSError) as raised:
    log.write(3, "train", {"loss": 0.5})  # each write is flushed: it reaches the disk here
  log.close()
  assert raised.value.errno == errno.ENOSPC
  assert os.path.join(str(tmp_path), run_log.TB_DIR, "events.out.tfevents.") in str(raised.value)
  disk.free = None  # space freed; a resumed run writes a new event file
  log = run_log.MetricWriter(str(tmp_path))
  log.write(40, "train", {"loss": 0.25})
  log.close()
  scalars = tensorboard_scalars(tmp_path)
  assert scalars[:2] == [(1, "train/loss", 0.5), (2, "train/loss", 0.5)]
  assert scalars[-1] == (40, "train/loss", 0.25)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(datasets.tiny_config(data_dir, steps=2, eval_every=2), str(workdir))
  return workdir


def test_export_full_disk_names_the_file_and_leaves_nothing(trained, monkeypatch, tmp_path):
  checkpoints = digest(trained / "checkpoints")
  out = tmp_path / "exports" / "torch"
  disk = FullDisk(monkeypatch, out.parent, free=1_000)
  with pytest.raises(OSError) as raised:
    export.export(str(trained), str(out))
  assert raised.value.errno == errno.ENOSPC
  assert f"{out}.partial-{os.getpid()}" in str(raised.value)
  assert export.WEIGHTS in str(raised.value)
  assert os.listdir(out.parent) == []  # neither out nor its staging folder
  assert digest(trained / "checkpoints") == checkpoints

  disk.free = None  # space freed
  assert export.export(str(trained), str(out))["files"] == sorted(os.listdir(out))
  assert digest(trained / "checkpoints") == checkpoints
