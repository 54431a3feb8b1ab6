"""The pieces every CLI (train, evaluate, export, benchmark) assembles a run from: the prepared
data, the method's model and optimizer, the sharded state, and evaluation of a split."""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from cxr_jax import checkpoint, config_utils, fileutil, methods, optim, parallel, steps
from cxr_jax.data import (labels as labels_lib, mixture, pipeline, records, tfrecord,
                          writer as data_writer)
from cxr_jax.metrics import evaluators as evaluators_lib


def members(config: ml_collections.ConfigDict) -> list[mixture.Member]:
  """The datasets of a `config.data.mixture` run; empty for a run on `config.data.dir` alone."""
  return mixture.parse(config.data.mixture, config.data.mixture_weights) if config.data.mixture else []


def member_names(config: ml_collections.ConfigDict) -> list[str | None]:
  """What a run evaluates one at a time: each mixture member's name, or None for its one dataset."""
  return [m.name for m in members(config)] or [None]


def load_manifest(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The manifest of the run's data: `config.data.dir`'s, or its mixture's (`mixture.combine`)."""
  if not config.data.mixture:
    return data_writer.load_manifest(config.data.dir)
  manifest = mixture.load(members(config))
  needed = {config.data.train_split, config.data.val_split}
  for member in manifest["members"]:
    missing = sorted(needed - set(member["splits"]))
    if missing:
      raise ValueError(f"mixture member {member['name']!r} ({member['dir']}) has no split "
                       f"{missing}; every member needs the run's training and validation splits")
  return manifest


def data_description(config: ml_collections.ConfigDict) -> str:
  """The run's data in one string: the dataset folder, or each mixture member's folder and weight."""
  if not config.data.mixture:
    return os.path.abspath(config.data.dir)
  return ",".join(f"{m.name}={os.path.abspath(m.dir)}" + ("" if m.weight is None else f"*{m.weight}")
                  for m in members(config))


def prepare_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Makes sure `config.data.dir` holds a prepared dataset (running the `data.prepare` hook on
  process 0 when it is absent) and returns its manifest (a mixture's members are read as they
  are)."""
  if config.data.mixture:
    return load_manifest(config)
  manifest_path = os.path.join(config.data.dir, data_writer.MANIFEST)
  if (config.data.prepare and parallel.is_main_process()
      and not os.path.exists(manifest_path)):
    # Runs started together on one machine (a study's --parallel) would otherwise each build the
    # folder and replace the other's while it is read; the second waits, then finds it built.
    with fileutil.exclusive(config.data.dir):
      if not os.path.exists(manifest_path):
        module, _, function = config.data.prepare.partition(":")
        logging.info("preparing %s with %s", config.data.dir, config.data.prepare)
        getattr(importlib.import_module(module), function)(config.data.dir,
                                                           **config.data.prepare_args)
  if config.data.prepare and jax.process_count() > 1:
    # Every process waits here, whatever it sees on disk: a barrier skipped by some processes
    # (the data already there for them, not yet or never for others) would hang the run.
    multihost_utils.sync_global_devices("cxr_jax data prepared")
  return load_manifest(config)


def make_task(config: ml_collections.ConfigDict, manifest: Mapping[str, Any]) -> methods.Task:
  """The task of a run: the learned field, its class names and training-split counts.

  Counts come from the manifest's raw value counts (1, 0, -1, NaN) with the training uncertainty
  policy applied: -1 counts as a positive under `ones` (and `ones_lsr`), a negative under `zeros`
  (and `zeros_lsr`), not at all under `ignore`. Fine labels have no policy (their -1 is ignored).
  """
  target = config.data.target
  vocabulary = {"labels": "label_names", "fine_labels": "fine_label_names",
                "anatomy": "anatomy_names"}[target]
  names = list(manifest.get(vocabulary) or [])
  if not names:
    how = ("anatomy maps: the phantom's, a data_prep.jsrt conversion or cxr_jax.pseudolabel"
           if target == "anatomy" else "location-aware labels")
    raise ValueError(f"config.data.target={target!r} but {data_description(config)} has no "
                     f"{target.replace('_', ' ')} (prepare it with {how})")
  split = manifest["splits"].get(config.data.train_split, {})
  counts = split.get({"labels": "label_counts", "fine_labels": "fine_label_counts"}.get(target, ""))
  positives = negatives = None
  if counts is not None:
    codes = np.zeros(len(names), np.int64)
    if target == "labels":
      codes = labels_lib.hard_codes(labels_lib.resolve_policies(
          names, config.data.uncertainty,
          labels_lib.parse_policy_overrides(config.data.uncertainty_per_label)))
    uncertain = np.asarray(counts["uncertain"])
    positives = np.asarray(counts["positive"]) + uncertain * (codes == labels_lib.POLICIES.index("ones"))
    negatives = np.asarray(counts["negative"]) + uncertain * (codes == labels_lib.POLICIES.index("zeros"))
    positives, negatives = tuple(positives.tolist()), tuple(negatives.tolist())
  return methods.Task(target=target, class_names=tuple(names), positives=positives,
                      negatives=negatives, label_names=tuple(manifest["label_names"]),
                      fine_label_names=tuple(manifest.get("fine_label_names") or ()),
                      anatomy_names=tuple(manifest.get("anatomy_names") or ()))


def split_source(config: ml_collections.ConfigDict, split: str, member: str | None = None
                 ) -> records.RecordSource | mixture.MixtureSource:
  """The records of one split of the configured dataset (of a mixture: of every member, or of the
  member named `member`)."""
  if config.data.mixture:
    return mixture.split_source(members(config), split, verify_crc=config.data.verify_crc,
                                member=member)
  if member is not None:
    raise ValueError(f"member {member!r} asked of a run on one dataset ({config.data.dir})")
  return records.split_source(config.data.dir, split, verify_crc=config.data.verify_crc)


def _spec(config, manifest, method: methods.Method, *, train: bool) -> pipeline.ExampleSpec:
  mask_uncertain = not train and config.eval.uncertain == "mask"
  return pipeline.make_spec(config.data.to_dict(), manifest, train=train, inputs=method.inputs,
                            mask_uncertain=mask_uncertain)


def train_dataset(config, manifest, method: methods.Method) -> grain.MapDataset:
  """This process's endless stream of training batches, with the method's inputs."""
  source = split_source(config, config.data.train_split)
  empty = [m.name for m, n in zip(members(config), getattr(source, "sizes", ())) if not n]
  if empty:
    raise ValueError(f"mixture members {empty} have no {config.data.train_split!r} records")
  return pipeline.train_dataset(source, _spec(config, manifest, method, train=True),
                                global_batch=config.train.global_batch, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                weights=[m.weight for m in members(config)] or None)


def eval_dataset(config, manifest, method: methods.Method, split: str, *,
                 global_batch: int | None = None, member: str | None = None) -> grain.MapDataset:
  """This process's padded evaluation batches of `split` (of `global_batch` or
  `config.eval.global_batch` across processes; of one mixture member when named), with the
  method's inputs."""
  return pipeline.eval_dataset(split_source(config, split, member),
                               _spec(config, manifest, method, train=False),
                               global_batch=global_batch or config.eval.global_batch,
                               process_index=jax.process_index(), process_count=jax.process_count())


def local_examples(config, manifest, method: methods.Method, split: str) -> grain.MapDataset:
  """Single examples of `split` read by this process alone (batches of 1, no process slicing):
  shapes for tracing and a few inputs for export, on any number of processes."""
  return pipeline.eval_dataset(split_source(config, split),
                               _spec(config, manifest, method, train=False), global_batch=1)


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
  method: methods.Method
  task: methods.Task
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[int], Any]
  _outputs: dict[str, Any] | None = None
  _eval_steps: dict[bool, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  def eval_step(self, with_cams: bool = False) -> Callable[..., Any]:
    """The jitted eval step (`steps.make_eval_step`), built once per run: a new one each
    validation would compile again."""
    if with_cams not in self._eval_steps:
      self._eval_steps[with_cams] = steps.make_eval_step(
          self.model, self.method, self.task, self.config, self.mesh, with_cams=with_cams)
    return self._eval_steps[with_cams]

  def output_shapes(self) -> dict[str, Any]:
    """The shapes of the model's outputs in inference mode (traced once, nothing computed)."""
    if self._outputs is None:
      example = example_batch(local_examples(self.config, self.manifest, self.method,
                                             self.config.data.val_split))

      def outputs():
        variables = steps.init_variables(self.model, self.config, jax.random.PRNGKey(0), example,
                                         self.method)
        return steps.apply_model(self.model, self.method, self.config, variables, example)
      self._outputs = jax.eval_shape(outputs)
    return self._outputs


def assemble(config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> Run:
  """Builds the mesh, the task, the method's model and the optimizer, checking the batch sizes
  and that the dataset has what the method reads."""
  mesh = parallel.make_mesh()
  parallel.check_global_batch(config.train.global_batch, mesh)
  parallel.check_global_batch(config.eval.global_batch, mesh, "eval global batch")
  method = methods.get(config.model.name)
  if config.data.target not in method.targets:
    raise ValueError(f"method {config.model.name!r} learns {list(method.targets)}, not "
                     f"config.data.target={config.data.target!r}")
  task = make_task(config, manifest)
  # Checked here, at start, rather than as a KeyError while tracing.
  pipeline.make_spec(config.data.to_dict(), manifest, train=False, inputs=method.inputs)
  model = method.build(config, task)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  return Run(config, manifest, mesh, method, task, model, tx, schedule)


WHOLE_MODEL = "model"  # `config.init_from=model=PATH`: every variable, not a backbone


def pretrained_files(init_from: str, backbones: Sequence[str]) -> dict[str, str]:
  """`config.init_from` as {backbone subtree or WHOLE_MODEL: weights file}.

  One path loads every backbone of the method; `name=path,name=path` loads each named one;
  `model=path` loads the whole model from a state_dict in the method's torch names.
  """
  if not init_from:
    return {}
  if "=" not in init_from:
    return {name: init_from for name in backbones}
  files = dict(item.split("=", 1) for item in init_from.split(",") if item)
  unknown = sorted(set(files) - set(backbones) - {WHOLE_MODEL})
  if unknown:
    raise ValueError(f"config.init_from names {unknown}, which are not backbones of "
                     f"{list(backbones)} (or {WHOLE_MODEL!r}, the whole model)")
  if WHOLE_MODEL in files and len(files) > 1:
    raise ValueError(f"config.init_from={init_from!r}: {WHOLE_MODEL}=PATH loads every variable, "
                     "so it takes no backbone files besides")
  return files


def initial_state(run: Run, example: dict[str, np.ndarray]) -> steps.TrainState:
  """A fresh sharded state; backbones, or the whole model, come from `config.init_from` when set."""
  config, variables = run.config, None
  backbone_configs = dict(run.method.backbones_of(config))
  files = pretrained_files(config.init_from, list(backbone_configs))
  if files:
    from cxr_jax.interop import convert, registry  # pylint: disable=g-import-not-at-top  (needs no torch for .safetensors)
    variables = steps.init_variables(run.model, config, jax.random.PRNGKey(config.seed), example,
                                     run.method)
    for scope, path in files.items():
      if scope == WHOLE_MODEL:
        variables = convert.load_model(path, variables, registry.torch_names(config))
        logging.info("init_from %s: every variable of the model", path)
        continue
      variables, report = convert.load_pretrained(
          path, variables, config_utils.get(config, backbone_configs[scope]), scope=scope)
      logging.info("init_from %s into %s:\n%s", path, scope, report)
  state = steps.create_state(run.model, run.tx, config, run.mesh, example, run.method, variables)
  logging.info("%s on %s: %d parameters", config.model.name, config.model.backbone.name,
               sum(x.size for x in jax.tree.leaves(state.params)))
  return state


def abstract_state(run: Run, example: dict[str, np.ndarray]) -> steps.TrainState:
  """The state's shapes and shardings without computing it or reading `init_from`: a restore
  target (a resumed run needs neither the pretrained file nor the time to load it)."""
  return steps.abstract_state(run.model, run.tx, run.config, run.mesh, example, run.method)


def restore_for_inference(workdir: str, which: str = "best") -> tuple[Run, steps.TrainState, int]:
  """Loads a trained run from its workdir: (run, state, step). Never a silently untrained model."""
  config = config_utils.load(workdir)
  manifest = load_manifest(config)
  run = assemble(config, manifest)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                 best_metric=config.checkpoint.best_metric,
                                 best_mode=config.checkpoint.best_mode)
  step = ckpt.resolve(which)
  example = example_batch(local_examples(config, manifest, run.method, config.data.val_split))
  state = ckpt.restore_state(step, abstract_state(run, example))
  ckpt.close()
  logging.info("restored step %d from %s", step, ckpt.directory)
  return run, state, step


class RecordIds(NamedTuple):
  """The ids of every record of a source, in order."""
  image: list[str]
  patient: list[str]
  study: list[str]


def record_ids(source: records.RecordSource) -> RecordIds:
  """The image, patient and study ids of every record of a source, in order."""
  parsed = [tfrecord.parse(source[i]) for i in range(len(source))]
  return RecordIds([p.image_id for p in parsed], [p.patient_id for p in parsed],
                   [p.study_id for p in parsed])


def member_scalars(per_member: Mapping[str | None, Mapping[str, float]]) -> dict[str, float]:
  """One dataset's scalars as they are; a mixture's as `<member>/<name>`, and each name the
  members share also as the mean over the members where it is finite."""
  if list(per_member) == [None]:
    return dict(per_member[None])
  out = {f"{member}/{name}": value for member, values in per_member.items()
         for name, value in values.items()}
  shared = set.intersection(*(set(values) for values in per_member.values()))
  for name in sorted(shared):
    finite = [v[name] for v in per_member.values() if np.isfinite(v[name])]
    out[name] = float(np.mean(finite)) if finite else float("nan")
  return out


class NonFiniteScores(FloatingPointError):
  """The model produced NaN or Inf scores while evaluating."""


def member_eval_config(run: Run, member: str | None) -> dict[str, Any]:
  """`config.eval` for one mixture member: its classes are those of `eval.classes` (all when
  empty) that the member labels, so a member is never scored on labels it does not have."""
  eval_config = run.config.eval.to_dict()
  if member is None or run.task.target != "labels":
    return eval_config
  own = next(m["label_names"] for m in run.manifest["members"] if m["name"] == member)
  chosen = evaluators_lib.class_indices(eval_config, "classes", run.task.class_names)
  names = [run.task.class_names[i] for i in chosen] if chosen else run.task.class_names
  eval_config["classes"] = ",".join(n for n in names if n in own)
  if not eval_config["classes"]:
    raise ValueError(f"mixture member {member!r} labels none of the evaluated classes {names}")
  return eval_config


def _num_boxes(run: Run, split: str, member: str | None) -> int | None:
  if member is None:
    return run.manifest["splits"].get(split, {}).get("num_boxes")
  return next(m["num_boxes"].get(split) for m in run.manifest["members"] if m["name"] == member)


def split_evaluators(run: Run, split: str, *, n_boot: int = 0,
                     patient_ids: Sequence[str] | None = None,
                     study_ids: Sequence[str] | None = None,
                     required: Sequence[str] = (), member: str | None = None) -> dict[str, Any]:
  """The configured evaluators (plus `required` ones) that can run on `split` (of one mixture
  member when named) for this method; with `config.eval.study_level`, the split's study ids are
  read when not given."""
  if run.config.eval.study_level and study_ids is None:
    study_ids = record_ids(split_source(run.config, split, member)).study
  boxes = _num_boxes(run, split, member)
  names = evaluators_lib.parse(run.config.eval.evaluators)
  names += tuple(name for name in required if name not in names)
  return evaluators_lib.build(
      names, run.task, member_eval_config(run, member),
      image_size=run.config.data.image_size, has_cams="cams" in run.output_shapes(),
      has_boxes=boxes is None or boxes > 0, patient_ids=patient_ids, study_ids=study_ids,
      n_boot=n_boot, seed=run.config.seed)


def evaluate_split(run: Run, state, split: str, evaluators: Mapping[str, Any],
                   member: str | None = None) -> dict[str, float]:
  """Streams every example of `split` (of one mixture member when named) exactly once through the
  evaluators (batch by batch; no split-sized array of maps is ever held) and returns the split's
  weighted mean loss terms (and, with `data.on_bad_record=skip`, `bad_records`: how many were
  skipped).

  Raises:
    NonFiniteScores: the model's scores hold NaN or Inf.
  """
  eval_step = run.eval_step(with_cams=evaluators_lib.needs_cams(evaluators))
  batches = pipeline.to_iterator(eval_dataset(run.config, run.manifest, run.method, split,
                                              member=member),
                                 worker_count=run.config.data.worker_count,
                                 prefetch=run.config.data.prefetch)
  totals: dict[str, float] = {}
  bad_records = 0
  for batch in batches:
    device_batch, _ = pipeline.host_fields(batch)
    per_example, batch_totals = eval_step(state, parallel.to_global(device_batch, run.mesh))
    per_example, batch_totals = parallel.gather((per_example, batch_totals))
    bad_records += int(per_example.pop("bad_records", np.zeros(0)).sum())
    keep = per_example["valid"] > 0
    per_example = {k: v[keep] for k, v in per_example.items()}
    if not np.isfinite(per_example["scores"]).all():
      raise NonFiniteScores(f"the model's scores on {split} are not finite")
    for evaluator in evaluators.values():
      evaluator.update(per_example)
    for name, value in batch_totals.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  weight = max(totals.pop("weight", 0.0), 1.0)
  means = {name: value / weight for name, value in totals.items()}
  if run.config.data.on_bad_record == "skip":
    means["bad_records"] = float(bad_records)
  return means
