"""The pieces every CLI (train, evaluate, export, benchmark) assembles a run from: the prepared
data, the method's model and optimizer, the sharded state, and evaluation of a split."""

from __future__ import annotations

import dataclasses
import importlib
import os
from types import ModuleType
from typing import Any, Callable, Iterator

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from cxr_jax import checkpoint, config_utils, methods, metrics as metrics_lib, optim, parallel, steps
from cxr_jax.data import pipeline, records, tfrecord, writer as data_writer


def prepare_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Makes sure `config.data.dir` holds a prepared dataset (running the `data.prepare` hook on
  process 0 when it is absent) and returns its manifest."""
  manifest_path = os.path.join(config.data.dir, data_writer.MANIFEST)
  if (config.data.prepare and parallel.is_main_process()
      and not os.path.exists(manifest_path)):
    module, _, function = config.data.prepare.partition(":")
    logging.info("preparing %s with %s", config.data.dir, config.data.prepare)
    getattr(importlib.import_module(module), function)(config.data.dir, **config.data.prepare_args)
  if config.data.prepare and jax.process_count() > 1:
    # Every process waits here, whatever it sees on disk: a barrier skipped by some processes
    # (the data already there for them, not yet or never for others) would hang the run.
    multihost_utils.sync_global_devices("cxr_jax data prepared")
  return data_writer.load_manifest(config.data.dir)


def split_source(config: ml_collections.ConfigDict, split: str) -> records.RecordSource:
  """The records of one split of the configured dataset."""
  return records.split_source(config.data.dir, split, verify_crc=config.data.verify_crc)


def train_dataset(config, manifest) -> grain.MapDataset:
  """This process's endless stream of training batches."""
  spec = pipeline.make_spec(config.data.to_dict(), manifest, train=True)
  return pipeline.train_dataset(split_source(config, config.data.train_split), spec,
                                global_batch=config.train.global_batch, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())


def eval_batches(config, manifest, split: str) -> Iterator[dict[str, np.ndarray]]:
  """This process's padded evaluation batches of `split`."""
  spec = pipeline.make_spec(config.data.to_dict(), manifest, train=False)
  ds = pipeline.eval_dataset(split_source(config, split), spec,
                             global_batch=config.eval.global_batch,
                             process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.to_iterator(ds, worker_count=config.data.worker_count, prefetch=config.data.prefetch)


def example_batch(ds: grain.MapDataset) -> dict[str, np.ndarray]:
  """One example of a batched dataset, with the device fields only (for shapes at init)."""
  device_fields, _ = pipeline.host_fields(jax.tree.map(lambda x: x[:1], ds[0]))
  return device_fields


@dataclasses.dataclass
class Run:
  """What a CLI needs to train or run a method."""

  config: ml_collections.ConfigDict
  manifest: dict[str, Any]
  mesh: jax.sharding.Mesh
  method: ModuleType
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[int], Any]


def assemble(config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> Run:
  """Builds the mesh, the method's model and the optimizer, checking the batch sizes."""
  mesh = parallel.make_mesh()
  parallel.check_global_batch(config.train.global_batch, mesh)
  parallel.check_global_batch(config.eval.global_batch, mesh, "eval global batch")
  method = methods.get(config.model.name)
  model = method.build(config, len(manifest["label_names"]))
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  return Run(config, manifest, mesh, method, model, tx, schedule)


def initial_state(run: Run, example: dict[str, np.ndarray]) -> steps.TrainState:
  """A fresh sharded state; the backbone comes from `config.init_from` when set."""
  config, variables = run.config, None
  if config.init_from:
    from cxr_jax.interop import convert  # pylint: disable=g-import-not-at-top  (needs no torch for .safetensors)
    variables = steps.init_variables(run.model, config, jax.random.PRNGKey(config.seed), example,
                                     run.method)
    variables, report = convert.load_pretrained(config.init_from, variables, config)
    logging.info("init_from %s:\n%s", config.init_from, report)
  state = steps.create_state(run.model, run.tx, config, run.mesh, example, run.method, variables)
  logging.info("%s / %s: %d parameters", config.model.name, config.model.backbone.name,
               sum(x.size for x in jax.tree.leaves(state.params)))
  return state


def restore_for_inference(workdir: str, which: str = "best") -> tuple[Run, steps.TrainState, int]:
  """Loads a trained run from its workdir: (run, state, step). Never a silently untrained model."""
  config = config_utils.load(workdir)
  manifest = data_writer.load_manifest(config.data.dir)
  run = assemble(config, manifest)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpt.resolve(which)
  example = example_batch(pipeline.eval_dataset(
      split_source(config, config.data.val_split),
      pipeline.make_spec(config.data.to_dict(), manifest, train=False), global_batch=1))
  abstract = steps.abstract_state(run.model, run.tx, config, run.mesh, example, run.method)
  state = ckpt.restore_state(step, abstract)
  ckpt.close()
  logging.info("restored step %d from %s", step, ckpt.directory)
  return run, state, step


def record_ids(source: records.RecordSource) -> tuple[list[str], list[str]]:
  """(image ids, patient ids) of every record of a source, in order."""
  parsed = [tfrecord.parse(source[i]) for i in range(len(source))]
  return [p.image_id for p in parsed], [p.patient_id for p in parsed]


def evaluate_split(run: Run, eval_step, state, split: str, *, n_boot: int = 0,
                   patient_ids: list[str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Predicts every example of `split` exactly once; returns (metrics report, predictions)."""
  predictions = steps.predict(eval_step, state, eval_batches(run.config, run.manifest, split), run.mesh)
  report = metrics_lib.evaluate_predictions(
      predictions["probs"], predictions["labels"], predictions["label_mask"],
      run.manifest["label_names"], patient_ids=patient_ids, n_boot=n_boot, seed=run.config.seed)
  report["loss"] = predictions["loss"]
  return report, predictions
