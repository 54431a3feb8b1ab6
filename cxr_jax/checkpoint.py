"""Orbax checkpoints of the train state together with the data stream's position.

`<workdir>/checkpoints/<step>/` holds `state/` (params, batch_stats, optimizer state, step, rng)
and `data/` (JSON: the index of the next global batch, the data seed and global batch size).
The training stream is a pure function of (seed, global batch index) whatever the number of
processes or workers (`cxr_jax.data.pipeline`), so that index is the whole iterator state, and
unlike grain's per-process iterator files it restores on any number of processes.
Kept: the latest `keep` checkpoints plus the `keep_best` best by a validation metric
(`config.checkpoint.best_metric`, e.g. `val/mean_auc`, ranked by `best_mode`). Restoring
takes an abstract state carrying the *current* mesh's shardings, so a checkpoint written by any
number of devices or processes restores on any other.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging
import orbax.checkpoint as ocp

from cxr_jax import fileutil

class Checkpointer:
  """Saves and restores {state, data iterator}; one per run directory."""

  def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1, read_only: bool = False,
               best_metric: str = "val/mean_auc", best_mode: str = "max"):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=lambda m: m[best_metric], best_mode=best_mode,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self.manager.latest_step()

  def resolve(self, which: str | int) -> int:
    """The step for `best`, `latest` or a step number; a clear error when there is none."""
    steps = list(self.manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: train first "
                              "(python -m cxr_jax.train ...) or point --workdir at a trained run")
    if which == "latest":
      return self.manager.latest_step()
    if which == "best":
      best = self.manager.best_step()
      if best is None:  # no checkpoint carries a finite value of the metric
        logging.warning("no checkpoint is ranked by %s; using the latest", self.best_metric)
        return self.manager.latest_step()
      return best
    step = int(which)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {sorted(steps)}")
    return step

  def save(self, step: int, state: Any, data_position: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Saves asynchronously; `metrics` (holding the best metric) rank the best checkpoints.

    A failed write (a full disk) of this or the previous save raises here, in `wait` or in
    `close`, naming the checkpoint directory; the checkpoints finished before it stay restorable.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_position))
    with fileutil.naming(self.directory):
      self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore_training(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores (state onto `abstract_state`'s shardings, data position) to continue training."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Restores the state alone (onto `abstract_state`'s shardings), for inference and export."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    with fileutil.naming(self.directory):
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    with fileutil.naming(self.directory):
      self.manager.close()


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins for a (possibly already donated) state, for restoring."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
