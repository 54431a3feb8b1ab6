"""Tiny prepared datasets (written through the real writer) and configs for tests."""

import io
import os

import numpy as np
from PIL import Image

from configs import common
from cxr_jax.data import labels, tfrecord, writer

ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart")


def png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def example(i: int, size: int, num_labels: int = 14, with_extras: bool = True,
            box_supervised: bool = False) -> tfrecord.CxrExample:
  """Record i: its image encodes i, so a batch tells which records it holds."""
  rng = np.random.default_rng(i)
  image = rng.integers(0, 255, (size, size), dtype=np.uint8)
  image[0, 0] = i % 256
  image[0, 1] = i // 256
  anatomy = np.zeros((size, size), np.uint8)
  anatomy[:, : size // 2] = 2  # patient's right lung on the viewer's left
  anatomy[:, size // 2:] = 3
  vals = (rng.random(num_labels) < 0.3).astype(np.float32)
  vals[0] = -1.0 if i % 3 == 0 else vals[0]
  vals[1] = np.nan if i % 4 == 0 else vals[1]
  fine = np.zeros(len(labels.fine_vocabulary()), np.float32)
  fine[labels.fine_vocabulary().index("Nodule|left|lower")] = 1.0
  return tfrecord.CxrExample(
      image=png(image), image_id=f"{i:08d}_000.png", patient_id=str(i // 2), study_id=str(i),
      view="PA", labels=vals, boxes=np.array([[0.6, 0.6, 0.9, 0.8]], np.float32),
      box_labels=np.array([5]), fine_labels=fine if with_extras else None,
      anatomy=png(anatomy) if with_extras else None, box_supervised=box_supervised)


def write(out_dir, splits: dict[str, int], size: int = 32, with_extras: bool = True,
          max_shard_bytes: int = 20_000, box_supervised: frozenset[int] = frozenset(),
          label_names=labels.NIH_LABELS, first_id: int = 0) -> str:
  """Writes a dataset with `splits` = {name: number of records}; record ids are global (from
  `first_id`), and those in `box_supervised` are marked for box supervision."""
  start = first_id
  with writer.DatasetWriter(
      out_dir, "toy", label_names=label_names, image_size=size, converter="tests",
      converter_version="0", source="synthetic",
      fine_label_names=labels.fine_vocabulary() if with_extras else (),
      anatomy_names=ANATOMY_NAMES if with_extras else (), max_shard_bytes=max_shard_bytes) as w:
    for split, count in splits.items():
      for i in range(start, start + count):
        w.add(split, example(i, size, len(label_names), with_extras=with_extras,
                             box_supervised=i in box_supervised))
      start += count
  return str(out_dir)


def record_ids(batch) -> list[int]:
  """The record numbers encoded in a batch's images (see `example`)."""
  return [int(a) + 256 * int(b) for a, b in zip(batch["image"][:, 0, 0, 0], batch["image"][:, 0, 1, 0])]


def tiny_config(data_dir, **train_changes):
  """A config for a 17k-parameter DenseNet on 32 px images of `data_dir`."""
  c = common.get_config()
  c.data.dir = str(data_dir)
  c.data.image_size = 32
  c.data.augment.rotate_deg = 5.0
  c.model.backbone.update(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, bn_size=2)
  c.train.update(dict(steps=6, global_batch=8, log_every=1, eval_every=3), **train_changes)
  c.eval.global_batch = 8
  c.checkpoint.every = 3
  return c


def read_split(out, split):
  """The records of a prepared dataset's split, in file order."""
  manifest = writer.load_manifest(out)
  return [tfrecord.parse(payload)
          for shard in manifest["splits"][split]["shards"]
          for _, payload in tfrecord.iter_records(os.path.join(out, shard["file"]))]


def read_all(out):
  """The records of every split of a prepared dataset, by split."""
  return {split: read_split(out, split) for split in writer.load_manifest(out)["splits"]}
