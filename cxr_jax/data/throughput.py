"""Input pipeline throughput: decode + augment + batch, in images/s per worker.

  python -m cxr_jax.data.throughput --data_dir out/shards512 --image_size 224 --workers 0,1,2

`--workers 0` decodes in the measuring process with one thread (one core's worth of work);
N > 0 uses N grain worker processes. Prints one JSON line per setting.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from cxr_jax.data import augment, pipeline, records, writer

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset folder.", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output image size.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Batches timed per setting (after 2 warm-up).")
_WORKERS = flags.DEFINE_list("workers", ["0"], "Worker counts to measure.")
_AUGMENT = flags.DEFINE_bool("augment", True, "Use the training transform (else resize only).")


def measure(ds, *, workers: int, batches: int) -> float:
  """Images per second over `batches` batches after two warm-up batches."""
  it = pipeline.to_iterator(ds, worker_count=workers, prefetch=2 if workers else 1)
  for _ in range(2):
    batch = next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  rate = batches * len(batch["image"]) / (time.perf_counter() - start)
  it.close()
  return rate


def main(argv):
  del argv
  manifest = writer.load_manifest(_DATA_DIR.value)
  data_config = dict(image_size=_IMAGE_SIZE.value, uncertainty="ignore", uncertainty_per_label="",
                     max_boxes=64,
                     augment=dataclasses.asdict(augment.AugmentParams()))
  spec = pipeline.make_spec(data_config, manifest, train=_AUGMENT.value)
  source = records.split_source(_DATA_DIR.value, _SPLIT.value)
  ds = pipeline.train_dataset(source, spec, global_batch=_BATCH.value, seed=0)
  for workers in map(int, _WORKERS.value):
    rate = measure(ds, workers=workers, batches=_BATCHES.value)
    print(json.dumps(dict(
        benchmark="input_pipeline", source_size=manifest["image_size"],
        image_size=_IMAGE_SIZE.value, augment=_AUGMENT.value, batch=_BATCH.value,
        workers=workers, images_per_s=round(rate, 1),
        images_per_s_per_worker=round(rate / max(workers, 1), 1))), flush=True)


if __name__ == "__main__":
  app.run(main)
