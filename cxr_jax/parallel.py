"""Devices, processes and shardings: one mesh over every device of every process, axis `data`.

Params and optimizer state are replicated; batches are sharded along their leading axis. Under
`jax.jit` XLA inserts the collectives, so gradients are averaged and BatchNorm statistics are
computed over the *global* batch (synchronised BN; PyTorch DDP without SyncBatchNorm differs).

Multi-host: `initialize_distributed(config.parallel)` must run before anything touches devices.
  distributed = "none"      single process (one host, all its devices)
              = "auto"      `jax.distributed.initialize()` with cluster auto-detection
                            (Cloud TPU VM; SLURM with one task per GPU)
              = "explicit"  coordinator_address, num_processes, process_id from the config
Each process feeds its own slice of every global batch (`to_global`). Process 0 alone writes
logs, metrics and reports; the others log warnings and errors only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MODES = ("none", "auto", "explicit")


def initialize_distributed(parallel_config: Mapping[str, Any]) -> None:
  """Starts `jax.distributed` as `config.parallel.distributed` asks (no-op for "none")."""
  mode = parallel_config["distributed"]
  if mode not in MODES:
    raise ValueError(f"config.parallel.distributed={mode!r}; choose from {MODES}")
  if mode == "none" or jax.distributed.is_initialized():
    return
  timeouts = dict(heartbeat_timeout_seconds=parallel_config["heartbeat_timeout_s"],
                  shutdown_timeout_seconds=parallel_config["shutdown_timeout_s"])
  if mode == "auto":
    jax.distributed.initialize(**timeouts)
  else:
    missing = [k for k in ("coordinator_address", "num_processes", "process_id")
               if parallel_config[k] in ("", None, -1)]
    if missing:
      raise ValueError(f"config.parallel.distributed='explicit' needs config.parallel.{missing}")
    jax.distributed.initialize(coordinator_address=parallel_config["coordinator_address"],
                               num_processes=parallel_config["num_processes"],
                               process_id=parallel_config["process_id"], **timeouts)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if not is_main_process():
    # The other processes would repeat process 0's progress lines; their warnings still show.
    logging.set_verbosity(logging.WARNING)


def check_same_on_every_process(what: str, values: Mapping[str, Any]) -> None:
  """Refuses to go on unless every process holds the same `values` (name -> JSON-able value);
  the error, the same on every process, names each field that differs from process 0's."""
  if jax.process_count() == 1:
    return
  text = np.frombuffer(json.dumps(values, sort_keys=True, default=repr).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray(len(text), np.int64))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(text)] = text
  rows = multihost_utils.process_allgather(padded)
  first, *others = [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
  differences = [f"{key}: process 0 has {first.get(key)!r}, process {p} has {other.get(key)!r}"
                 for p, other in enumerate(others, 1)
                 for key in sorted(set(first) | set(other)) if first.get(key) != other.get(key)]
  if differences:
    raise ValueError(f"the processes of this run have different {what}: "
                     + "; ".join(differences))


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over `devices` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of params and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of batch arrays: split along the leading (example) axis."""
  return NamedSharding(mesh, P("data"))


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh, what: str = "global batch") -> int:
  """Returns this process's share of the global batch, checking it splits evenly."""
  if global_batch % mesh.size:
    raise ValueError(f"{what} {global_batch} must be divisible by the {mesh.size} devices")
  return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def gather(tree: Any) -> Any:
  """Brings (global, sharded) arrays whole to every host as numpy, in global example order."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def is_main_process() -> bool:
  """True on the one process that writes logs, metrics and reports."""
  return jax.process_index() == 0


def usable_cpus() -> int:
  """The cores this process may run on (taskset and cpusets count; `os.cpu_count()` ignores them)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1
