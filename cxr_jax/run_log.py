"""Run logging on the main process: metrics as JSON lines, TensorBoard events (tensorboardX's
event files, no TensorFlow needed) and a live progress line with images/s and ETA."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

import numpy as np
from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2, summary_pb2

from cxr_jax import fileutil

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


class MetricWriter:
  """Appends `{"step": s, "split": ..., name: value, ...}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl_path = os.path.join(workdir, METRICS_FILE)
    _drop_torn_line(self._jsonl_path)
    self._jsonl = open(self._jsonl_path, "a")
    # Events are written here, in the caller's thread, not by tensorboardX's SummaryWriter, whose
    # writer thread dies on a full disk and then blocks the next add_scalar on its full queue,
    # hanging the run instead of stopping it with an error.
    os.makedirs(os.path.join(workdir, TB_DIR), exist_ok=True)
    # tensorboardX names the file by the second: the suffix keeps a resume in the same second
    # from truncating the previous file.
    self._events = event_file_writer.EventsWriter(os.path.join(workdir, TB_DIR, "events"),
                                                  filename_suffix=f".{time.time_ns()}")
    self._events_path = self._events._file_name  # pylint: disable=protected-access

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Logs scalars of one split (`train`, `val`, ...) at a step; a failed write (a full disk)
    raises an OSError naming metrics.jsonl or the event file."""
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in scalars.items()}
    with fileutil.naming(self._jsonl_path):
      self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
      self._jsonl.flush()
    scalars_pb = [summary_pb2.Summary.Value(tag=f"{split}/{name}", simple_value=value)
                  for name, value in values.items()
                  if isinstance(value, float) and math.isfinite(value)]
    event = event_pb2.Event(wall_time=time.time(), step=step,
                            summary=summary_pb2.Summary(value=scalars_pb))
    with fileutil.naming(self._events_path):
      self._events.write_event(event)
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes both outputs."""
    if self.enabled:
      try:
        with fileutil.naming(self._jsonl_path):
          self._jsonl.close()
      finally:
        with fileutil.naming(self._events_path):
          self._events.close()


def _drop_torn_line(path: str) -> None:
  """Cuts a last line that lacks its newline (its write failed, e.g. on a full disk), so that the
  lines a resumed run appends stay valid JSON lines."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    text = f.read()
    if text and not text.endswith(b"\n"):
      f.truncate(text.rfind(b"\n") + 1)


def _plain(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class Progress:
  """Throughput and ETA between calls; the first interval (compilation) is reported apart."""

  def __init__(self, total_steps: int, images_per_step: int, start_step: int):
    self.total, self.images_per_step = total_steps, images_per_step
    self._step, self._time = start_step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    """Images/s and seconds left since the previous update."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return dict(images_per_s=rate * self.images_per_step,
                eta_s=(self.total - step) / max(rate, 1e-9))

  def restart(self, step: int) -> None:
    """Restarts the clock (after evaluation or checkpointing, which are not training time)."""
    self._step, self._time = step, time.perf_counter()

  def line(self, step: int, loss: float, lr: float, speed: Mapping[str, float]) -> str:
    """The human-readable progress line."""
    eta = speed["eta_s"]
    return (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  "
            f"{speed['images_per_s']:.1f} img/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s")


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and errors from everywhere, and info lines from this project only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or any(
        part in record.pathname for part in ("/cxr_jax/", "/data_prep/"))


def quiet_library_logs() -> None:
  """Hides the info-level chatter of orbax, grain and jax from the console (a CLI's first call)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
