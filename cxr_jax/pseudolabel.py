"""Pseudo-labels anatomy: a trained segmenter writes its maps into a new copy of a prepared dataset.

  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/nih \
      --out $DATA/shards/nih-anatomy [--checkpoint best] [--threshold 0.9] [--keep all|confident]

Every record of every split of --data is copied into --out, a new, complete prepared dataset
(--data is never written), with its `anatomy` map replaced by the segmenter's: the argmax over
regions of the per-pixel softmax, computed at the segmenter's image size with bilinear upsampling
of the probabilities to the stored image size. Its `anatomy_names` are the segmenter's. An
image's confidence is the mean over its pixels of the winning probability; images below
--threshold are flagged, counted per split in the manifest (`pseudo_labels`, with the
confidence quantiles), and listed in `pseudo_labels.csv` (image id, split, confidence, flagged).
With `--keep confident` flagged images are left out: the confident pseudo-labels that a
self-training round adds to the labelled set (`config.data.mixture`). Every split is labelled,
test included: a classifier's test images get their maps from the segmenter, never from ground
truth. One process; the segmenter's devices on this host.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from PIL import Image

from cxr_jax import cli, experiment, parallel, steps
from cxr_jax.data import augment, pipeline, records, tfrecord, writer

VERSION = "1.0"
CSV_NAME = "pseudo_labels.csv"
KEEP = ("all", "confident")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclasses.dataclass(frozen=True)
class Labelled:
  """One record with its predicted map (stored size) and confidence."""
  payload: bytes
  anatomy: np.ndarray
  confidence: float


def predictor(run: experiment.Run, out_size: int):
  """`predict(state, batch) -> (maps uint8 (B, S, S), confidence (B,))` at the stored size S."""

  def predict(state, batch):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = steps.apply_model(run.model, run.method, run.config, variables, batch)["logits"]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if probs.shape[1:3] != (out_size, out_size):
      probs = jax.image.resize(probs, (probs.shape[0], out_size, out_size, probs.shape[-1]),
                               "bilinear")
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8), jnp.mean(jnp.max(probs, axis=-1), (1, 2))

  return jax.jit(predict)


def label_split(run: experiment.Run, state, predict, data: str, split: str,
                manifest: dict[str, Any]) -> Iterator[Labelled]:
  """The records of one split of `data`, in order, each with its predicted map."""
  source = records.split_source(data, split, verify_crc=run.config.data.verify_crc)
  data_config = dict(run.config.data.to_dict(), target="labels")
  spec = pipeline.make_spec(data_config, manifest, train=False)
  batches = pipeline.to_iterator(
      pipeline.eval_dataset(source, spec, global_batch=run.config.eval.global_batch),
      worker_count=run.config.data.worker_count, prefetch=run.config.data.prefetch)
  for batch in batches:
    device_batch, _ = pipeline.host_fields(batch)
    maps, confidence = jax.device_get(predict(state, parallel.to_global(device_batch, run.mesh)))
    for index, valid, m, c in zip(batch["index"], batch["valid"], maps, confidence):
      if valid:
        yield Labelled(source[int(index)], m, float(c))


def pseudolabel(workdir: str, data: str, out: str, *, which: str = "best", threshold: float = 0.9,
                keep: str = "all", overwrite: bool = False) -> dict[str, Any]:
  """Writes `out`: `data` with the segmenter of `workdir` as its anatomy maps (module docstring);
  returns the `pseudo_labels` facts of its manifest."""
  if keep not in KEEP:
    raise ValueError(f"--keep {keep!r}: choose from {KEEP}")
  if os.path.abspath(out) == os.path.abspath(data):
    raise ValueError(f"--out {out} is --data: pseudo-labels go into a new dataset, never over "
                     "the input")
  if jax.process_count() > 1:
    raise ValueError("cxr_jax.pseudolabel runs in one process")
  run, state, step = experiment.restore_for_inference(workdir, which)
  if run.task.target != "anatomy":
    raise ValueError(f"{workdir} trained {run.config.model.name} on {run.task.target}, not a "
                     "segmenter (config.data.target=anatomy)")
  manifest = writer.load_manifest(data)
  size = manifest["image_size"]
  predict = predictor(run, size)
  facts: dict[str, Any] = dict(segmenter=os.path.abspath(workdir), checkpoint_step=step,
                               threshold=threshold, keep=keep, source=os.path.abspath(data),
                               splits={})
  rows = []
  with writer.DatasetWriter(
      out, manifest["name"], label_names=manifest["label_names"], image_size=size,
      converter="cxr_jax.pseudolabel", converter_version=VERSION, source=os.path.abspath(data),
      fine_label_names=manifest.get("fine_label_names") or (),
      anatomy_names=run.task.class_names, overwrite=overwrite) as w:
    for split in manifest["splits"]:
      confidences = []
      for item in label_split(run, state, predict, data, split, manifest):
        ex = tfrecord.parse(item.payload)
        flagged = item.confidence < threshold
        confidences.append(item.confidence)
        rows.append((ex.image_id, split, f"{item.confidence:.4f}", int(flagged)))
        if keep == "all" or not flagged:
          w.add(split, dataclasses.replace(ex, anatomy=augment.encode_png(Image.fromarray(item.anatomy))))
      facts["splits"][split] = split_facts(np.asarray(confidences), threshold)
    w.record_fact("pseudo_labels", facts)
    with open(os.path.join(w.tmp_dir, CSV_NAME), "w", newline="") as f:
      csv.writer(f).writerows([("image_id", "split", "confidence", "flagged"), *rows])
  return facts


def split_facts(confidences: np.ndarray, threshold: float) -> dict[str, Any]:
  """A split's image count, flagged count and confidence quantiles."""
  quantiles = (np.quantile(confidences, QUANTILES).round(4).tolist() if len(confidences)
               else [None] * len(QUANTILES))
  return dict(images=int(len(confidences)), flagged=int(np.sum(confidences < threshold)),
              confidence_quantiles=dict(zip([f"q{int(q * 100)}" for q in QUANTILES], quantiles)))


def main(argv):
  cli.check_no_arguments(argv)
  args = flags.FLAGS
  facts = pseudolabel(args.workdir, args.data, args.out, which=args.checkpoint,
                      threshold=args.threshold, keep=args.keep, overwrite=args.overwrite)
  for split, split_info in facts["splits"].items():
    q = split_info["confidence_quantiles"]
    print(f"{split}: {split_info['images']} images, {split_info['flagged']} below {args.threshold}"
          f" (confidence median {q['q50']}, 5% {q['q5']}, min {q['q0']})")
  logging.info("wrote %s", args.out)


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  flags.DEFINE_string("workdir", None, "Workdir of a trained segmenter run.", required=True)
  flags.DEFINE_string("data", None, "Prepared dataset to pseudo-label.", required=True)
  flags.DEFINE_string("out", None, "Folder for the pseudo-labelled copy.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_float("threshold", 0.9, "Images whose mean winning probability is below are flagged.")
  flags.DEFINE_enum("keep", "all", list(KEEP), "all, or confident (leave flagged images out).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  cli.run(main)
