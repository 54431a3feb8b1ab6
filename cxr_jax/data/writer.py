"""Atomic writing of a prepared dataset: TFRecord shards, the cxr_jax manifest and TFDS metadata.

Layout of a prepared dataset folder:

    <name>-<split>.tfrecord-00000-of-000NN   shards of at most `max_shard_bytes` each
    cxr_manifest.json                        label names, per-split and per-shard record counts,
                                             per-split label value counts, box counts and
                                             box-supervised record counts, sha256 per shard,
                                             converter and version, image size, skipped inputs
    dataset_info.json, features.json         TFDS metadata (TFDS owns these names), so that
                                             `tfds.builder_from_directory(DIR).info` works without TF

Everything is written to a temporary sibling folder and renamed to its final name only when the
`with` block ends without an exception, so an interrupted run leaves no half dataset behind.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from cxr_jax import fileutil
from cxr_jax.data import tfrecord

MANIFEST = "cxr_manifest.json"
# 2: per-split label value counts (`label_counts`, `fine_label_counts`) and box counts.
# 3: the box_supervised flag and per-split num_box_supervised.
FORMAT_VERSION = 3
DEFAULT_MAX_SHARD_BYTES = 256 << 20


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """The TFDS-style file name of one shard."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


class _Shard:
  """One open shard file with its running record count and checksum."""

  def __init__(self, path: str):
    self.path = path
    self.file = open(path, "wb")
    self.num_records = 0
    self.num_bytes = 0
    self.sha256 = hashlib.sha256()

  def write(self, record: bytes) -> None:
    with fileutil.naming(self.path):
      self.file.write(record)
    self.sha256.update(record)
    self.num_records += 1
    self.num_bytes += len(record)


def count_values(rows: Sequence[np.ndarray] | np.ndarray) -> dict[str, list[int]]:
  """Per-column counts of the schema's label values in (N, K) rows: 1, 0, -1 and NaN.

  Stored per split in the manifest, so class weights need no pass over the data; the uncertainty
  policy is applied later, by the reader (`cxr_jax.experiment.make_task`).
  """
  rows = np.asarray(rows, np.float32).reshape(len(rows), -1)
  return dict(positive=(rows == 1).sum(0).tolist(), negative=(rows == 0).sum(0).tolist(),
              uncertain=(rows == -1).sum(0).tolist(), unknown=np.isnan(rows).sum(0).tolist())


class DatasetWriter:
  """Writes the splits of one dataset; use as a context manager.

  Example:
    with DatasetWriter(out, "nih", label_names=NIH_LABELS, image_size=256,
                       converter="data_prep.nih", converter_version="1.0", source=src) as w:
      w.add("train", example)
      w.skip(file="Data_Entry_2017.csv", row=17, reason="unknown label 'Foo'")
  """

  def __init__(self, out_dir: str | os.PathLike, name: str, *, label_names: Sequence[str],
               image_size: int, converter: str, converter_version: str, source: str,
               fine_label_names: Sequence[str] = (), anatomy_names: Sequence[str] = (),
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
               extra: dict[str, Any] | None = None):
    self.out_dir = os.path.abspath(out_dir)
    if os.path.exists(self.out_dir) and os.listdir(self.out_dir) and not overwrite:
      raise FileExistsError(f"{self.out_dir} exists and is not empty; pass overwrite to replace it")
    self.name = name
    self.overwrite = overwrite
    self.max_shard_bytes = max_shard_bytes
    self.meta = dict(
        name=name, format_version=FORMAT_VERSION, converter=converter,
        converter_version=converter_version, source=source, image_size=image_size,
        label_names=list(label_names), fine_label_names=list(fine_label_names),
        anatomy_names=list(anatomy_names), **(extra or {}))
    self.tmp_dir = ""  # the staging folder, while the writer is open
    self._staging: contextlib.AbstractContextManager | None = None
    self._shards: dict[str, list[_Shard]] = {}
    self._labels: dict[str, list[np.ndarray]] = {}
    self._fine_labels: dict[str, list[np.ndarray]] = {}
    self._num_boxes: dict[str, int] = {}
    self._num_box_supervised: dict[str, int] = {}
    self._skipped: list[dict[str, Any]] = []

  def __enter__(self) -> "DatasetWriter":
    self._staging = self._staged()
    return self._staging.__enter__()

  def __exit__(self, exc_type, exc, tb) -> bool | None:
    return self._staging.__exit__(exc_type, exc, tb)

  @contextlib.contextmanager
  def _staged(self) -> Iterator["DatasetWriter"]:
    """Stages the dataset and moves it to `out_dir` when the `with` block succeeds.

    The shards are closed either way; the manifest and TFDS metadata are written only on success,
    and any exception, in the block or in writing them, removes the staging folder instead.
    """
    with fileutil.staged_dir(self.out_dir, replace=self.overwrite) as staging:
      self.tmp_dir = staging
      try:
        yield self
      finally:
        self._close_shards()
      splits = self._commit()
    logging.info("wrote %s: %s", self.out_dir,
                 ", ".join(f"{s}={v['num_records']}" for s, v in splits.items()))

  def _close_shards(self) -> None:
    for shards in self._shards.values():
      for shard in shards:
        with fileutil.naming(shard.path):
          shard.file.close()

  def record_fact(self, key: str, value: Any) -> None:
    """Adds a fact known only once the records are written (e.g. counts) to the manifest."""
    if key in self.meta or key in ("splits", "skipped", "created"):
      raise ValueError(f"manifest field {key!r} is taken")
    self.meta[key] = value

  def add(self, split: str, ex: tfrecord.CxrExample) -> None:
    """Appends one example to a split, after checking it against the dataset's label spaces."""
    self._check(ex)
    record = tfrecord.frame(tfrecord.serialize(ex))
    shards = self._shards.setdefault(split, [])
    if not shards or (shards[-1].num_bytes and shards[-1].num_bytes + len(record) > self.max_shard_bytes):
      shards.append(_Shard(os.path.join(self.tmp_dir, f"{self.name}-{split}.part{len(shards)}")))
    shards[-1].write(record)
    self._labels.setdefault(split, []).append(np.asarray(ex.labels, np.float32))
    self._num_boxes[split] = self._num_boxes.get(split, 0) + len(np.asarray(ex.boxes).reshape(-1, 4))
    self._num_box_supervised[split] = (self._num_box_supervised.get(split, 0)
                                       + int(ex.box_supervised))
    if ex.fine_labels is not None:
      self._fine_labels.setdefault(split, []).append(np.asarray(ex.fine_labels, np.float32))

  def skip(self, **item: Any) -> None:
    """Records a bad input that was skipped (e.g. file=..., row=..., reason=...) and logs it."""
    logging.warning("skipped: %s", ", ".join(f"{k}={v}" for k, v in item.items()))
    self._skipped.append(item)

  def _check(self, ex: tfrecord.CxrExample) -> None:
    where = f"example {ex.image_id!r}"
    if len(ex.labels) != len(self.meta["label_names"]):
      raise ValueError(f"{where}: {len(ex.labels)} labels, expected {len(self.meta['label_names'])}")
    num_fine = len(self.meta["fine_label_names"])
    if num_fine and (ex.fine_labels is None or len(ex.fine_labels) != num_fine):
      raise ValueError(f"{where}: fine_labels must have {num_fine} values")
    if not num_fine and ex.fine_labels is not None:
      raise ValueError(f"{where}: has fine_labels but the dataset declares no fine_label_names")
    if bool(self.meta["anatomy_names"]) != (ex.anatomy is not None):
      raise ValueError(f"{where}: anatomy maps must be present exactly when anatomy_names are given")
    boxes = np.asarray(ex.boxes).reshape(-1, 4)
    if len(boxes) and not (np.all(boxes >= 0) and np.all(boxes <= 1)
                           and np.all(boxes[:, 2:] >= boxes[:, :2])):
      raise ValueError(f"{where}: boxes must be normalised xmin<=xmax, ymin<=ymax in [0, 1]")
    if ex.box_supervised and not len(boxes):
      raise ValueError(f"{where}: marked box_supervised but has no boxes")

  def _commit(self) -> dict[str, Any]:
    """Names the shards and writes the manifest and TFDS metadata; returns the manifest's splits."""
    splits = {}
    for split, shards in self._shards.items():
      entries = []
      for index, shard in enumerate(shards):
        final = shard_name(self.name, split, index, len(shards))
        os.rename(shard.path, os.path.join(self.tmp_dir, final))
        entries.append(dict(file=final, num_records=shard.num_records,
                            num_bytes=shard.num_bytes, sha256=shard.sha256.hexdigest()))
      splits[split] = dict(num_records=sum(e["num_records"] for e in entries), shards=entries,
                           label_counts=count_values(self._labels[split]),
                           num_boxes=self._num_boxes[split],
                           num_box_supervised=self._num_box_supervised[split])
      if split in self._fine_labels:
        splits[split]["fine_label_counts"] = count_values(self._fine_labels[split])
    manifest = dict(self.meta, splits=splits,
                    skipped=dict(count=len(self._skipped), items=self._skipped),
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat())
    path = os.path.join(self.tmp_dir, MANIFEST)
    with fileutil.naming(path), open(path, "w") as f:
      json.dump(manifest, f, indent=1)
    with fileutil.naming(self.tmp_dir):  # TFDS writes two files through its own paths
      _write_tfds_metadata(self.tmp_dir, manifest)
    return splits


def tfds_features(num_labels: int, num_fine: int, has_anatomy: bool):
  """The TFDS `FeaturesDict` that describes this schema (nested `box` flattens to `box/...`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  F = tfds.features
  features = dict(
      image=F.Image(shape=(None, None, 1), encoding_format="png"),
      image_id=F.Text(), patient_id=F.Text(), study_id=F.Text(), view=F.Text(),
      labels=F.Tensor(shape=(num_labels,), dtype=np.float32),
      box=F.FeaturesDict(dict(
          label=F.Tensor(shape=(None,), dtype=np.int64),
          **{k.split("/")[1]: F.Tensor(shape=(None,), dtype=np.float32) for k in tfrecord.BOX_KEYS})),
      box_supervised=F.Scalar(dtype=np.int64),
  )
  if num_fine:
    features["fine_labels"] = F.Tensor(shape=(num_fine,), dtype=np.float32)
  if has_anatomy:
    features["anatomy"] = F.Image(shape=(None, None, 1), encoding_format="png")
  return F.FeaturesDict(features)


def _write_tfds_metadata(data_dir: str, manifest: dict[str, Any]) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split_infos = [
      tfds.core.SplitInfo(name=split, shard_lengths=[s["num_records"] for s in info["shards"]],
                          num_bytes=sum(s["num_bytes"] for s in info["shards"]))
      for split, info in manifest["splits"].items()]
  template = tfds.core.ShardedFileTemplate(
      data_dir=data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=manifest["name"], filetype_suffix="tfrecord")
  features = tfds_features(len(manifest["label_names"]), len(manifest["fine_label_names"]),
                           bool(manifest["anatomy_names"]))
  description = (f"{manifest['name']} prepared by {manifest['converter']} "
                 f"{manifest['converter_version']} from {manifest['source']}; labels: "
                 + ", ".join(manifest["label_names"]))
  # check_data=False: checking would read the shards through tf.data, i.e. need TensorFlow.
  tfds.folder_dataset.write_metadata(data_dir=data_dir, features=features,
                                     split_infos=split_infos, filename_template=template,
                                     description=description, check_data=False)




def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads a prepared dataset's manifest, with a clear error when the folder is not one."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {data_dir} a dataset prepared by data_prep?")
  with open(path) as f:
    return json.load(f)
