"""Trains a method on a prepared dataset, on every device of every process.

  python -m cxr_jax.train --config configs/phantom.py --workdir runs/phantom
  python -m cxr_jax.train --config configs/nih/densenet121.py --workdir runs/chexnet \
      --config.data.dir=$DATA/shards/nih --config.train.steps=20000

Order of operations: check the config, start jax.distributed if asked, prepare the data if the
config knows how and it is absent, build the mesh, model, optimizer and sharded state, resume from
the latest checkpoint in the workdir (state and data stream), then train with periodic logging,
evaluation and checkpoints. A NaN/Inf loss stops the run (the last good checkpoint stays);
Ctrl-C or SIGTERM saves a checkpoint first. Where each output lands: README "Where things are".
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from cxr_jax import checkpoint, config_utils, experiment, parallel, steps, run_log
from cxr_jax.data import pipeline


class StopRequest:
  """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; a second SIGINT aborts.

  With several processes, the signal may reach one process only, or each at a different step;
  all must still stop at the same step, or their collectives mismatch and the run hangs. So
  SIGTERM is left to JAX's preemption service (started by `jax.distributed.initialize`), which
  agrees on a step with the other processes, and SIGINT is handed to it as a SIGTERM.
  """

  def __init__(self):
    self.requested = False
    self._multi_process = jax.process_count() > 1
    signums = (signal.SIGINT,) if self._multi_process else (signal.SIGINT, signal.SIGTERM)
    self._previous = {s: signal.signal(s, self._handle) for s in signums}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint, then stopping", signal.Signals(signum).name)
    self.requested = True
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process. Call it at every step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self) -> None:
    """Puts the previous handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def check_finite(loss: float, step: int, ckpt: checkpoint.Checkpointer) -> None:
  """Stops the run on a NaN/Inf loss, naming the last good checkpoint."""
  if not np.isfinite(loss):
    ckpt.wait()
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping. The last good checkpoint is step "
        f"{ckpt.latest_step()} in {ckpt.directory} (lower config.optim.lr, or set "
        "config.optim.clip_norm, and resume)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the last train and validation metrics."""
  config_utils.validate(config)
  parallel.initialize_distributed(config.parallel)
  os.makedirs(workdir, exist_ok=True)
  if parallel.is_main_process():
    config_utils.save(config, workdir)
  manifest = experiment.prepare_data(config)
  run = experiment.assemble(config, manifest)
  train_ds = experiment.train_dataset(config, manifest)
  state = experiment.initial_state(run, experiment.example_batch(train_ds))
  train_step = steps.make_train_step(run.model, run.tx, run.method, config, run.mesh)
  eval_step = steps.make_eval_step(run.model, run.method, config, run.mesh)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 keep_best=config.checkpoint.keep_best)
  start = ckpt.latest_step() or 0
  if start:
    state, position = ckpt.restore_training(start, checkpoint.abstract(state))
    check_stream(position, config)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  data_iter = pipeline.to_iterator(train_ds[start:], worker_count=config.data.worker_count,
                                   prefetch=config.data.prefetch)

  log = run_log.MetricWriter(workdir, enabled=parallel.is_main_process())
  progress = run_log.Progress(config.train.steps, config.train.global_batch, start)
  stop = StopRequest()
  last: dict[str, Any] = {}
  try:
    for step in range(start + 1, config.train.steps + 1):
      device_batch, _ = pipeline.host_fields(next(data_iter))
      state, train_metrics = train_step(state, parallel.to_global(device_batch, run.mesh))
      final = step == config.train.steps or stop.reached(step)  # one snapshot: signals are async
      if step % config.train.log_every == 0 or final:
        last["train"] = log_train(log, progress, step, train_metrics, run.schedule, ckpt)
      val = None
      if (config.train.eval_every and step % config.train.eval_every == 0) or final:
        report, _ = experiment.evaluate_split(run, eval_step, state, config.data.val_split)
        val = last["val"] = val_scalars(report)
        log.write(step, "val", val)
        logging.info("step %d: val loss %.4f, val mean AUC %.4f", step, val["val_loss"],
                     val["val_mean_auc"])
      if step % config.checkpoint.every == 0 or final:
        check_finite(float(jax.device_get(train_metrics["loss"])), step, ckpt)
        ranked = val is not None and np.isfinite(val["val_mean_auc"])
        ckpt.save(step, state, stream_position(step, config),
                  metrics={checkpoint.BEST_METRIC: val["val_mean_auc"]} if ranked else None)
      if val is not None:
        progress.restart(step)  # throughput counts training time only
      if final and step < config.train.steps:
        logging.warning("stopped at step %d; the same command resumes the run", step)
        break
  finally:
    stop.restore()
    ckpt.close()
    log.close()
    data_iter.close()
  return last


def stream_position(step: int, config) -> dict[str, Any]:
  """The data iterator's state after `step` steps: the next global batch of the seeded stream."""
  return dict(next_batch=step, seed=config.seed, global_batch=config.train.global_batch,
              train_split=config.data.train_split, data_dir=os.path.abspath(config.data.dir))


def check_stream(position: dict[str, Any], config) -> None:
  """Refuses to resume a data stream that the config no longer describes."""
  current = stream_position(position["next_batch"], config)
  changed = {k: (position[k], current[k]) for k in ("seed", "global_batch", "train_split")
             if position[k] != current[k]}
  if changed:
    raise ValueError(f"cannot resume: the checkpoint's data stream differs in {changed} "
                     "(saved, now); use a new workdir or restore these settings")


def val_scalars(report: dict[str, Any]) -> dict[str, float]:
  """The validation numbers worth a time series: loss, mean AUC and each class's AUC."""
  nan = float("nan")
  scalars = {"val_loss": report["loss"],
             "val_mean_auc": nan if report["mean_auc"] is None else report["mean_auc"]}
  for name, c in report["classes"].items():
    scalars[f"val_auc/{name}"] = nan if c["auc"] is None else c["auc"]
  return scalars


def log_train(log, progress, step, train_metrics, schedule, ckpt) -> dict[str, float]:
  """Fetches the step's metrics, stops on a bad loss, and writes the log and progress line."""
  scalars = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
  check_finite(scalars["loss"], step, ckpt)
  scalars.update(progress.update(step), lr=float(schedule(step)))
  log.write(step, "train", scalars)
  logging.info(progress.line(step, scalars["loss"], scalars["lr"], scalars))
  return scalars


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_log.quiet_library_logs()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=config_utils.parse_flags)
