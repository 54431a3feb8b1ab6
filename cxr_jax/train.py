"""Trains a method on a prepared dataset, on every device of every process.

  python -m cxr_jax.train --config configs/phantom.py --workdir runs/phantom
  python -m cxr_jax.train --config configs/nih/densenet121.py --workdir runs/chexnet \
      --config.data.dir=$DATA/shards/nih --config.train.steps=20000

Order of operations: check the config, start jax.distributed if asked, prepare the data if the
config knows how and it is absent, build the mesh, model, optimizer and sharded state, resume from
the latest checkpoint in the workdir (state and data stream), then train with periodic logging,
evaluation and checkpoints. A NaN/Inf loss, parameter or score stops the run (only finite states
are saved, so the last checkpoint is a good one);
Ctrl-C or SIGTERM saves a checkpoint first. Where each output lands: README "Where things are".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from cxr_jax import checkpoint, cli, config_utils, experiment, parallel, run_log, steps
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


def stop_not_finite(what: str, step: int, ckpt: checkpoint.Checkpointer) -> None:
  """Stops the run, naming the last checkpoint saved (only finite states are ever saved)."""
  ckpt.wait()
  latest = ckpt.latest_step()
  where = (f"The last good checkpoint is step {latest} in {ckpt.directory}" if latest else
           f"no checkpoint was saved in {ckpt.directory} yet")
  raise FloatingPointError(f"{what} at step {step}; stopping. {where} (lower config.optim.lr, or "
                           "set config.optim.clip_norm, and resume)")


def check_finite(scalars: dict[str, float], step: int, ckpt: checkpoint.Checkpointer) -> None:
  """Stops the run on a NaN/Inf loss, or on a finite loss whose update broke the state."""
  if not np.isfinite(scalars["loss"]):
    stop_not_finite(f"loss is {scalars['loss']}", step, ckpt)
  if scalars["state_finite"] != 1:
    stop_not_finite("the parameters or BatchNorm statistics are not finite", step, ckpt)


def learning_rate(schedule, step: int) -> float:
  """The learning rate step `step` (1-based) applied: optax counts updates from 0."""
  return float(schedule(step - 1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the last train and validation metrics."""
  config_utils.validate(config)
  parallel.initialize_distributed(config.parallel)
  # Processes started with different settings or data would train different things in lockstep.
  parallel.check_same_on_every_process("configs", {
      k: v for k, v in config_utils.flat(config).items() if k != "parallel.process_id"})
  os.makedirs(workdir, exist_ok=True)
  if parallel.is_main_process():
    config_utils.save(config, workdir)
  manifest = experiment.prepare_data(config)
  parallel.check_same_on_every_process("training data", {
      "shard checksums": data_fingerprint(manifest, config.data.train_split)})
  run = experiment.assemble(config, manifest)
  train_ds = experiment.train_dataset(config, manifest, run.method)
  example = experiment.example_batch(train_ds)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                 keep_best=config.checkpoint.keep_best,
                                 best_metric=config.checkpoint.best_metric,
                                 best_mode=config.checkpoint.best_mode)
  start = ckpt.latest_step() or 0
  if start:
    # Restored onto the abstract state: `init_from` is neither read nor needed again.
    state, position = ckpt.restore_training(start, experiment.abstract_state(run, example))
    check_stream(position, config, manifest)
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    state = experiment.initial_state(run, example)
  train_step = steps.make_train_step(run.model, run.tx, run.method, run.task, config, run.mesh)
  data_iter = pipeline.to_iterator(train_ds[start:], worker_count=config.data.worker_count,
                                   prefetch=config.data.prefetch)

  log = run_log.MetricWriter(workdir, enabled=parallel.is_main_process())
  progress = run_log.Progress(config.train.steps, config.train.global_batch, start)
  stop = StopRequest()
  last: dict[str, Any] = {}
  bad_records = 0  # skipped by this process since it started (data.on_bad_record=skip)
  try:
    for step in range(start + 1, config.train.steps + 1):
      device_batch, _ = pipeline.host_fields(next(data_iter))
      bad_records += int(device_batch.pop("bad_records", np.zeros(0)).sum())
      state, train_metrics = train_step(state, parallel.to_global(device_batch, run.mesh))
      final = step == config.train.steps or stop.reached(step)  # one snapshot: signals are async
      if step % config.train.log_every == 0 or final:
        extra = ({"bad_records": total_over_processes(bad_records)}
                 if config.data.on_bad_record == "skip" else {})
        last["train"] = log_train(log, progress, step, train_metrics, run.schedule, ckpt, extra)
      validate_now = (config.train.eval_every and step % config.train.eval_every == 0) or final
      save_now = step % config.checkpoint.every == 0 or final
      if validate_now or save_now:
        check_finite(fetch(train_metrics), step, ckpt)  # never validate or save a broken state
      val = None
      if validate_now:
        val = last["val"] = validate(run, state, step, log, ckpt)
      if save_now:
        ckpt.save(step, state, stream_position(step, config, manifest),
                  metrics=ranking(val, config.checkpoint.best_metric))
      if val is not None:
        progress.restart(step)  # throughput counts training time only
      if final and step < config.train.steps:
        logging.warning("stopped at step %d; the same command resumes the run", step)
        break
  finally:
    # Every one runs even when another fails (a full disk surfaces at ckpt.close()).
    with contextlib.ExitStack() as closing:
      for close in (data_iter.close, log.close, ckpt.close, stop.restore):
        closing.callback(close)
  if last.get("train", {}).get("bad_records"):
    logging.warning("skipped %d bad training records (data.on_bad_record=skip; each is logged "
                    "above)", last["train"]["bad_records"])
  return last


def total_over_processes(count: int) -> int:
  """A per-process count summed over every process (the same number on each)."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


def fetch(metrics) -> dict[str, float]:
  """A step's metrics as host floats."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def validate(run: experiment.Run, state, step: int, log, ckpt) -> dict[str, float]:
  """Evaluates the validation split with the configured evaluators; logs and returns the scalars
  (`loss`, each loss term, `mean_auc`, `auc/<class>`, `loc/...`; a mixture's per member as
  `<member>/<name>` besides their means), which rank checkpoints as `val/<name>`."""
  split = run.config.data.val_split
  per_member = {}
  for member in experiment.member_names(run.config):
    evaluators = experiment.split_evaluators(run, split, member=member)
    try:
      per_member[member] = experiment.evaluate_split(run, state, split, evaluators, member)
    except experiment.NonFiniteScores as e:
      stop_not_finite(str(e), step, ckpt)
    for evaluator in evaluators.values():
      per_member[member].update(evaluator.scalars(evaluator.result()))
  scalars = experiment.member_scalars(per_member)
  log.write(step, "val", scalars)
  shown = ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()
                    if "/" not in k or k.startswith("loc/") or k.endswith("/mean_auc"))
  logging.info("step %d: val %s", step, shown)
  return scalars


def ranking(val: dict[str, float] | None, best_metric: str) -> dict[str, float] | None:
  """The checkpoint's ranking metrics, or None when it was not validated or the value is NaN."""
  if val is None:
    return None
  name = best_metric.removeprefix("val/")
  if name not in val:
    raise ValueError(f"config.checkpoint.best_metric={best_metric!r} is not a validation metric "
                     f"of this run; it has {sorted('val/' + k for k in val)}")
  return {best_metric: val[name]} if np.isfinite(val[name]) else None


def data_fingerprint(manifest: dict[str, Any], split: str) -> str:
  """sha256 over the split's shard checksums: changes whenever its records do."""
  shards = manifest["splits"][split]["shards"]
  return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def stream_position(step: int, config, manifest: dict[str, Any]) -> dict[str, Any]:
  """The data iterator's state after `step` steps (the next global batch of the seeded stream)
  and what the stream depends on, so a resume can refuse a changed one."""
  split = config.data.train_split
  return dict(next_batch=step, seed=config.seed, global_batch=config.train.global_batch,
              train_split=split, data_dir=experiment.data_description(config),
              data_fingerprint=data_fingerprint(manifest, split),
              train_records=manifest["splits"][split]["num_records"],
              image_size=config.data.image_size)


def check_stream(position: dict[str, Any], config, manifest: dict[str, Any]) -> None:
  """Refuses to resume a data stream that the config or the data no longer describes."""
  current = stream_position(position["next_batch"], config, manifest)
  changed = {k: (position.get(k), v) for k, v in current.items()
             if k != "next_batch" and position.get(k) != v}
  if changed:
    details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
    raise ValueError(f"cannot resume: the checkpoint's data stream differs ({details}); use a "
                     "new workdir or restore these settings and data")


def log_train(log, progress, step, train_metrics, schedule, ckpt,
              extra: dict[str, float] | None = None) -> dict[str, float]:
  """Fetches the step's metrics (plus `extra`), writes the log, stops on a bad loss or state,
  prints progress."""
  scalars = fetch(train_metrics)
  scalars.update(progress.update(step), lr=learning_rate(schedule, step), **(extra or {}))
  log.write(step, "train", scalars)  # first: the log keeps the step that went wrong
  check_finite(scalars, step, ckpt)
  logging.info(progress.line(step, scalars["loss"], scalars["lr"], scalars))
  return scalars


def main(argv):
  cli.check_no_arguments(argv)
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it has checkpoints).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
