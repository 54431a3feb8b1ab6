"""The grain input pipeline: records -> decoded, augmented examples -> per-process batches.

Training: one global seeded shuffle per epoch (all processes share it), per-example augmentation
seeded by the example's position in that order, the epoch cut to a whole number of global
batches, then `[process_index::process_count]` and per-process batches. A global batch therefore
holds the same examples whatever the number of processes or workers. Decoding runs in worker
processes (`worker_count`), whole batches at a time, and the iterator state can be saved and
restored (orbax + `grain.checkpoint`).

Evaluation: no shuffle; each process reads `[process_index::process_count]`, padded to the same
whole number of batches with copies flagged `valid = 0`, so every example counts exactly once.

Batches are dicts of numpy arrays as documented in docs/architecture.md; images stay uint8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import grain
from absl import flags
import numpy as np

from cxr_jax.data import augment, labels as labels_lib, records, tfrecord


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything the per-example transform needs; small and picklable for worker processes."""

  image_size: int
  policy_codes: tuple[int, ...]
  max_boxes: int
  num_fine: int = 0
  fine_mirror: tuple[int, ...] = ()
  anatomy_mirror: tuple[int, ...] = ()  # id -> mirrored id; empty when anatomy is not loaded
  augment: augment.AugmentParams | None = None  # None: evaluation (resize only)


def make_spec(data_config: Mapping[str, Any], manifest: Mapping[str, Any], *, train: bool) -> ExampleSpec:
  """Builds the example spec from `config.data` and a dataset manifest."""
  label_names = manifest["label_names"]
  policies = labels_lib.resolve_policies(
      label_names, data_config["uncertainty"],
      labels_lib.parse_policy_overrides(data_config["uncertainty_per_label"]))
  fine = manifest.get("fine_label_names") or []
  anatomy = manifest.get("anatomy_names") or []
  if data_config["load_anatomy"] and not anatomy:
    raise ValueError("config.data.load_anatomy is set but the dataset has no anatomy maps")
  params = augment.AugmentParams(**data_config["augment"]) if train else None
  return ExampleSpec(
      image_size=data_config["image_size"],
      policy_codes=tuple(int(c) for c in policies),
      max_boxes=data_config["max_boxes"],
      num_fine=len(fine),
      fine_mirror=tuple(int(i) for i in labels_lib.mirror_permutation(fine)) if fine else (),
      anatomy_mirror=(tuple(int(i) for i in labels_lib.mirror_permutation(anatomy))
                      if data_config["load_anatomy"] else ()),
      augment=params,
  )


def make_example(payload: bytes, spec: ExampleSpec, rng: np.random.Generator | None = None) -> dict[str, Any]:
  """Parses one record and returns its model-ready example (augmented when `rng` is given)."""
  ex = tfrecord.parse(payload)
  what = f"image of record {ex.image_id!r}"
  image = augment.decode_png(ex.image, what=what)
  anatomy = (augment.decode_png(ex.anatomy, what=f"anatomy of {ex.image_id!r}")
             if spec.anatomy_mirror else None)
  boxes, box_labels = ex.boxes, ex.box_labels
  fine = ex.fine_labels
  if spec.augment is not None and rng is not None:
    a, t, flipped = augment.sample_transform(rng, spec.augment)
    image = augment.adjust_intensity(augment.warp(image, a, t, spec.image_size), rng, spec.augment)
    if anatomy is not None:
      anatomy = augment.warp(anatomy, a, t, spec.image_size, nearest=True)
      if flipped:
        anatomy = np.asarray(spec.anatomy_mirror, np.uint8)[anatomy]
    boxes, keep = augment.warp_boxes(boxes, a, t)
    boxes, box_labels = boxes[keep], box_labels[keep]
    if flipped and fine is not None:
      fine = fine[list(spec.fine_mirror)]
  else:
    image = augment.resize(image, spec.image_size)
    if anatomy is not None:
      anatomy = augment.resize(anatomy, spec.image_size, nearest=True)
  targets, mask = labels_lib.apply_policy(ex.labels, np.asarray(spec.policy_codes))
  out = dict(image=image[..., None], labels=targets, label_mask=mask,
             **_pad_boxes(boxes, box_labels, spec.max_boxes, ex.image_id),
             image_id=ex.image_id, patient_id=ex.patient_id)
  if spec.num_fine:
    out["fine_labels"] = np.asarray(fine, np.float32)
  if anatomy is not None:
    out["anatomy"] = anatomy
  return out


def _pad_boxes(boxes, box_labels, max_boxes, image_id) -> dict[str, np.ndarray]:
  if len(boxes) > max_boxes:
    raise ValueError(f"record {image_id!r} has {len(boxes)} boxes; raise config.data.max_boxes "
                     f"(now {max_boxes}) so none is dropped")
  padded = np.zeros((max_boxes, 4), np.float32)
  padded[:len(boxes)] = boxes
  padded_labels = np.full((max_boxes,), -1, np.int32)
  padded_labels[:len(boxes)] = box_labels
  return dict(boxes=padded, box_labels=padded_labels)


class _Augmented(grain.transforms.RandomMap):
  """Decode + augment, seeded per example by grain."""

  def __init__(self, spec: ExampleSpec):
    self.spec = spec

  def random_map(self, element: bytes, rng: np.random.Generator) -> dict[str, Any]:
    return make_example(element, self.spec, rng)


class _PaddedEval(grain.transforms.Map):
  """Maps a record index to its example; index -1 is padding (a copy flagged invalid)."""

  def __init__(self, source: records.RecordSource, spec: ExampleSpec):
    self.source, self.spec = source, spec

  def map(self, element: int) -> dict[str, Any]:
    example = make_example(self.source[max(element, 0)], self.spec)
    example["valid"] = np.float32(element >= 0)
    example["index"] = np.int32(element)
    return example


def _check_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  return global_batch // process_count


def train_dataset(source: records.RecordSource, spec: ExampleSpec, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """An endless dataset of this process's training batches (see module docstring)."""
  local_batch = _check_batch(global_batch, process_count)
  usable = len(source) - len(source) % global_batch
  if usable == 0:
    raise ValueError(f"{len(source)} training records are fewer than one global batch ({global_batch})")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().random_map(_Augmented(spec))
  ds = ds[:usable][process_index::process_count]
  return ds.batch(local_batch, drop_remainder=True).repeat()


def eval_dataset(source: records.RecordSource, spec: ExampleSpec, *, global_batch: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process's padded evaluation batches; every process yields the same number."""
  local_batch = _check_batch(global_batch, process_count)
  per_process = math.ceil(len(source) / process_count)
  padded = math.ceil(per_process / local_batch) * local_batch
  indices = list(range(process_index, len(source), process_count))
  indices += [-1] * (padded - len(indices))
  return grain.MapDataset.source(indices).map(_PaddedEval(source, spec)).batch(local_batch)


def to_iterator(ds: grain.MapDataset, *, worker_count: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """Iterates a batched dataset, decoding in `worker_count` processes (0: in this process)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch))
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside an absl app (notebooks, tests) none were parsed.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch))
  return iter(it)


def host_fields(batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Splits a batch into (device fields, host-only fields such as ids)."""
  device = {k: v for k, v in batch.items() if v.dtype.kind not in "USO"}
  host = {k: v for k, v in batch.items() if v.dtype.kind in "USO"}
  return device, host
