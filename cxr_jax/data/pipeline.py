"""The grain input pipeline: records -> decoded, augmented examples -> per-process batches.

Training: a pure function of the seed and the global batch index g, computed with numpy so that
no grain version can change it. With n records and global batch B, an epoch holds
E = n // B global batches; batch g belongs to epoch e = g // E, whose order is
`np.random.default_rng([seed, 0, e]).permutation(n)`, and holds the records
`order[(g % E) * B : (g % E + 1) * B]` (the last n % B records of each order sit that epoch
out). The example at global position q = g * B + k is augmented with
`np.random.default_rng([seed, 1, q])`. Process p of P takes `[p::P]` of each global batch, so a
global batch holds the same examples, augmented alike, whatever the number of processes or
workers. The dataset is endless and indexed by g: a run resumed at batch g reads `ds[g:]`, and a
checkpoint stores g alone. Decoding runs in worker processes (`worker_count`), whole batches at a
time.

A mixture of datasets (`cxr_jax.data.mixture`) draws each epoch's records from its members by
their weights (`mixture.epoch_order`, stream 2 below); a single dataset's order is as above.

Evaluation: no shuffle; each process reads `[process_index::process_count]`, padded to the same
whole number of batches with copies flagged `valid = 0`, so every example counts exactly once.

Bad records (corrupt framing or checksum, an image that does not decode or is not the dataset's
size, labels of the wrong length) stop the run with a `BadRecordError` naming the shard, the
record and the image id. With `config.data.on_bad_record=skip`, a bad record is logged and
replaced by the next good record of the epoch's order (in evaluation, that copy is flagged
`valid = 0`, like padding), and every example carries `bad_records`, the number of bad records
skipped in its place, which the trainer and the evaluation count and report.

Batches are dicts of numpy arrays as documented in docs/architecture.md; images stay uint8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import grain
from absl import flags, logging
import numpy as np

from cxr_jax.data import augment, labels as labels_lib, mixture, records, tfrecord


ON_BAD_RECORD = ("raise", "skip")


class BadRecordError(ValueError):
  """A record that cannot become an example; names the shard, the record and the image id."""


# Batch fields a method may ask for besides the image (`cxr_jax.methods.Method.inputs`).
INPUTS = ("anatomy", "boxes", "box_labels", "box_supervised", "fine_labels", "fine_label_mask",
          "labels", "label_mask")


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Everything the per-example transform needs; small and picklable for worker processes."""

  image_size: int
  policy_codes: tuple[int, ...]
  max_boxes: int
  lsr: tuple[tuple[str, tuple[float, float]], ...] = ()  # smoothed policies' target intervals
  num_fine: int = 0
  fine_mirror: tuple[int, ...] = ()
  anatomy_mirror: tuple[int, ...] = ()  # id -> mirrored id; empty when anatomy is not loaded
  # A mixture's members: where each member's labels sit among the mixture's; empty: one dataset.
  label_positions: tuple[tuple[int, ...], ...] = ()
  stored_size: int | None = None  # the side of the dataset's images (None: not checked)
  on_bad_record: str = "raise"  # or "skip" (module docstring)
  augment: augment.AugmentParams | None = None  # None: evaluation (resize only)


def make_spec(data_config: Mapping[str, Any], manifest: Mapping[str, Any], *, train: bool,
              inputs: Sequence[str] = (), mask_uncertain: bool = False) -> ExampleSpec:
  """Builds the example spec from `config.data`, a dataset manifest and a method's inputs.

  `inputs` are the batch keys a method reads besides the image (e.g. "anatomy"): they are loaded
  because the method names them. With `mask_uncertain`, every uncertain (-1) label is masked out
  whatever the policy: evaluation counts only labels that are known to be 1 or 0.
  """
  unknown = sorted(set(inputs) - set(INPUTS))
  if unknown:
    raise ValueError(f"method inputs {unknown} are not fields the pipeline makes; it makes {INPUTS}")
  if data_config.get("target") == "anatomy":  # a segmenter learns the maps: load them
    inputs = (*inputs, "anatomy")
  label_names = manifest["label_names"]
  policies = labels_lib.resolve_policies(
      label_names, "ignore" if mask_uncertain else data_config["uncertainty"],
      {} if mask_uncertain else labels_lib.parse_policy_overrides(data_config["uncertainty_per_label"]))
  fine = manifest.get("fine_label_names") or []
  anatomy = manifest.get("anatomy_names") or []
  if "anatomy" in inputs and not anatomy:
    raise ValueError(f"the method reads anatomy maps but {manifest.get('name', 'the dataset')} has "
                     "none (no anatomy_names in its manifest)")
  params = augment.AugmentParams(**data_config["augment"]) if train else None
  return ExampleSpec(
      image_size=data_config["image_size"],
      policy_codes=tuple(int(c) for c in policies),
      max_boxes=data_config["max_boxes"],
      lsr=tuple((name, tuple(data_config.get(f"lsr_{hard}", labels_lib.DEFAULT_LSR[name])))
                for name, hard in labels_lib.LSR_POLICIES.items()),
      num_fine=len(fine),
      fine_mirror=tuple(int(i) for i in labels_lib.mirror_permutation(fine)) if fine else (),
      anatomy_mirror=(tuple(int(i) for i in labels_lib.mirror_permutation(anatomy))
                      if "anatomy" in inputs else ()),
      label_positions=tuple(tuple(mixture.positions(label_names, m["label_names"]))
                            for m in manifest.get("members", ())),
      stored_size=manifest.get("image_size"),
      on_bad_record=data_config.get("on_bad_record", "raise"),
      augment=params,
  )


def make_example(payload: bytes, spec: ExampleSpec, rng: np.random.Generator | None = None,
                 member: int = 0) -> dict[str, Any]:
  """Parses one record and returns its model-ready example (augmented when `rng` is given);
  `member`: the mixture member the record comes from (its labels are moved to the mixture's)."""
  ex = tfrecord.parse(payload)
  check_lengths(ex, spec, member)
  image = augment.decode_png(ex.image, what=f"image of record {ex.image_id!r}")
  if spec.stored_size and image.shape != (spec.stored_size, spec.stored_size):
    raise ValueError(f"image of record {ex.image_id!r} is {image.shape[1]} x {image.shape[0]}; "
                     f"the dataset's are {spec.stored_size} x {spec.stored_size}")
  anatomy = (augment.decode_png(ex.anatomy, what=f"anatomy of {ex.image_id!r}")
             if spec.anatomy_mirror else None)
  if anatomy is not None and anatomy.shape != image.shape:
    raise ValueError(f"anatomy map of record {ex.image_id!r} is {anatomy.shape}, its image "
                     f"{image.shape}")
  raw_labels, boxes, box_labels = ex.labels, ex.boxes, ex.box_labels
  if spec.label_positions:
    where = np.asarray(spec.label_positions[member], np.int64)
    raw_labels = np.full(len(spec.policy_codes), np.nan, np.float32)
    raw_labels[where] = ex.labels
    box_labels = where[box_labels]
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
  targets, mask = labels_lib.apply_policy(raw_labels, np.asarray(spec.policy_codes),
                                          dict(spec.lsr), rng)
  out = dict(image=image[..., None], labels=targets, label_mask=mask,
             **_pad_boxes(boxes, box_labels, spec.max_boxes, ex.image_id),
             box_supervised=np.float32(ex.box_supervised),
             image_id=ex.image_id, patient_id=ex.patient_id)
  if spec.num_fine:
    # Fine labels have no uncertainty policy: -1, like NaN, is masked out.
    out["fine_labels"], out["fine_label_mask"] = labels_lib.apply_policy(
        fine, np.zeros(spec.num_fine, np.int64))
  if anatomy is not None:
    out["anatomy"] = anatomy
  return out


def check_lengths(ex: tfrecord.CxrExample, spec: ExampleSpec, member: int) -> None:
  """Refuses a record whose label or fine-label vector is not as long as its dataset's."""
  expected = (len(spec.label_positions[member]) if spec.label_positions
              else len(spec.policy_codes))
  if len(ex.labels) != expected:
    raise ValueError(f"record {ex.image_id!r} has {len(ex.labels)} labels; its dataset has "
                     f"{expected}")
  if spec.num_fine and (ex.fine_labels is None or len(ex.fine_labels) != spec.num_fine):
    found = "none" if ex.fine_labels is None else len(ex.fine_labels)
    raise ValueError(f"record {ex.image_id!r} has {found} fine labels; its dataset has "
                     f"{spec.num_fine}")


def load_example(source, index: int, spec: ExampleSpec,
                 rng: np.random.Generator | None = None) -> dict[str, Any]:
  """The example of record `index` of `source` (`make_example`); any failure to read or decode it
  is a BadRecordError naming the shard, the record and (in the cause) the image id."""
  try:
    return make_example(source[index], spec, rng, member=_member_of(source, index))
  except (ValueError, OSError) as e:
    raise BadRecordError(f"{source.describe(index)}: {e}") from e


def first_good(source, spec: ExampleSpec, order: Sequence[int], position: int,
               rng: np.random.Generator | None = None) -> tuple[int, dict[str, Any], int]:
  """(record, example, bad records skipped) for `position` of `order`: the record there, or with
  `on_bad_record=skip` the next good one of the order, each bad one logged."""
  for skipped in range(len(order)):
    record = int(order[(position + skipped) % len(order)])
    try:
      return record, load_example(source, record, spec, rng), skipped
    except BadRecordError as e:
      if spec.on_bad_record != "skip":
        raise
      logging.warning("skipping a bad record: %s", e)
  raise BadRecordError(f"every record of {source!r} is bad")


def _pad_boxes(boxes, box_labels, max_boxes, image_id) -> dict[str, np.ndarray]:
  if len(boxes) > max_boxes:
    raise ValueError(f"record {image_id!r} has {len(boxes)} boxes; raise config.data.max_boxes "
                     f"(now {max_boxes}) so none is dropped")
  padded = np.zeros((max_boxes, 4), np.float32)
  padded[:len(boxes)] = boxes
  padded_labels = np.full((max_boxes,), -1, np.int32)
  padded_labels[:len(boxes)] = box_labels
  return dict(boxes=padded, box_labels=padded_labels)


class _PaddedEval(grain.transforms.Map):
  """Maps a record index to its example; index -1 is padding (a copy flagged invalid)."""

  def __init__(self, source: records.RecordSource, spec: ExampleSpec):
    self.source, self.spec = source, spec

  def map(self, element: int) -> dict[str, Any]:
    record, example, skipped = first_good(self.source, self.spec, range(len(self.source)),
                                          max(element, 0))
    example["valid"] = np.float32(element >= 0 and record == element)
    example["index"] = np.int32(element)
    if self.spec.on_bad_record == "skip":
      example["bad_records"] = np.int32(skipped if element >= 0 else 0)
    return example


def _check_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  return global_batch // process_count


def _member_of(source, index: int) -> int:
  return source.member_of(index) if isinstance(source, mixture.MixtureSource) else 0


# The numpy streams of one seed, as SeedSequence entropy [seed, stream, n]: the order of epoch n,
# the augmentation of the example at global position n, and (mixtures) each member's record
# stream. Distinct streams, so never correlated.
_ORDER, _AUGMENTATION, _MEMBER_ORDER = 0, 1, 2
_ENDLESS = np.iinfo(np.int64).max  # global batch indices: more than any run reads


class _ProcessShare(grain.transforms.Map):
  """Global batch index -> this process's examples of that batch, decoded, augmented and stacked.

  The order and the augmentation are computed here with numpy (module docstring), not left to
  grain's shuffle, slice, batch and repeat, whose epoch behaviour has changed between versions.
  """

  def __init__(self, source: records.RecordSource | mixture.MixtureSource, spec: ExampleSpec, *,
               seed: int, global_batch: int, process_index: int, process_count: int,
               member_counts: Sequence[int] | None = None):
    self.source, self.spec, self.seed, self.global_batch = source, spec, seed, global_batch
    self.member_counts = member_counts
    self.batches_per_epoch = len(source) // global_batch
    self.slots = range(process_index, global_batch, process_count)

  def order(self, epoch: int) -> np.ndarray:
    """The records of `epoch`, in the order the epoch reads them."""
    if self.member_counts is None:
      return np.random.default_rng([self.seed, _ORDER, epoch]).permutation(len(self.source))
    return mixture.epoch_order(self.source.sizes, self.member_counts, self.seed, epoch,
                               _ORDER, _MEMBER_ORDER)

  def map(self, element: int) -> dict[str, np.ndarray]:
    epoch, batch_in_epoch = divmod(element, self.batches_per_epoch)
    order = self.order(epoch)
    examples = []
    for slot in self.slots:
      rng = np.random.default_rng([self.seed, _AUGMENTATION, element * self.global_batch + slot])
      _, example, skipped = first_good(self.source, self.spec, order,
                                       batch_in_epoch * self.global_batch + slot, rng)
      if self.spec.on_bad_record == "skip":
        example["bad_records"] = np.int32(skipped)
      examples.append(example)
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def train_dataset(source: records.RecordSource | mixture.MixtureSource, spec: ExampleSpec, *,
                  global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                  weights: Sequence[float | None] | None = None) -> grain.MapDataset:
  """An endless dataset of this process's training batches, indexed by global batch index: `ds[g:]`
  starts at batch g (see module docstring). A mixture's members are drawn by `weights` (None
  each, or no weights: by their sizes)."""
  _check_batch(global_batch, process_count)
  if len(source) < global_batch:
    raise ValueError(f"{len(source)} training records are fewer than one global batch ({global_batch})")
  if seed < 0:
    raise ValueError(f"seed {seed} is negative; the training order is seeded by numpy, which needs >= 0")
  counts = None
  if isinstance(source, mixture.MixtureSource):
    counts = mixture.quotas(source.sizes, weights or [None] * len(source.sizes)).tolist()
  share = _ProcessShare(source, spec, seed=seed, global_batch=global_batch,
                        process_index=process_index, process_count=process_count,
                        member_counts=counts)
  return grain.MapDataset.range(_ENDLESS).map(share)


def eval_dataset(source: records.RecordSource | mixture.MixtureSource, spec: ExampleSpec, *, global_batch: int,
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
