"""Bad records at train and evaluation time: by default a clear error naming the shard, the record
and the image id; with `data.on_bad_record=skip`, skipped, replaced, counted and reported."""

import dataclasses
import json
import os

import numpy as np
import pytest

import datasets
from cxr_jax import config_utils, evaluate, train
from cxr_jax.data import pipeline, records, tfrecord, writer

BAD_PNG, SMALL_IMAGE = 3, 6  # records made bad below


def bad_dataset(root) -> str:
  """A 16-record training split (plus 8 val, 8 test) where record 3 holds bytes that are no PNG
  (with a correct CRC), record 6 a 16 px image in a 32 px dataset, and a 17th record with 5 labels
  is appended to the last training shard."""
  data = datasets.write(root, {"train": 16, "val": 8, "test": 8}, max_shard_bytes=10 ** 9)
  manifest = writer.load_manifest(data)
  shard = os.path.join(data, manifest["splits"]["train"]["shards"][-1]["file"])
  good = [tfrecord.parse(p) for _, p in tfrecord.iter_records(shard)]
  good[BAD_PNG] = dataclasses.replace(good[BAD_PNG], image=b"no png here")
  good[SMALL_IMAGE] = datasets.example(SMALL_IMAGE, 16)
  short = dataclasses.replace(datasets.example(99, 32), labels=np.zeros(5, np.float32),
                              image_id="short_labels.png")
  with open(shard, "wb") as f:
    for ex in good + [short]:
      f.write(tfrecord.frame(tfrecord.serialize(ex)))
  return data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return bad_dataset(tmp_path_factory.mktemp("bad") / "ds")


def spec(data, **changes):
  config = datasets.tiny_config(data).data.to_dict()
  config.update(changes)
  return pipeline.make_spec(config, writer.load_manifest(data), train=False)


@pytest.mark.parametrize("index,message", [
    (BAD_PNG, r"record 3: cannot decode image of record '00000003_000.png'"),
    (SMALL_IMAGE, r"record 6: image of record '00000006_000.png' is 16 x 16; the dataset's are 32 x 32"),
    (16, r"record 16: record 'short_labels.png' has 5 labels; its dataset has 14"),
])
def test_a_bad_record_is_an_error_naming_shard_record_and_image(data, index, message):
  source = records.split_source(data, "train")
  with pytest.raises(pipeline.BadRecordError, match=r"toy-train\.tfrecord-00000-of-00001 " + message):
    pipeline.load_example(source, index, spec(data))


def test_a_shard_truncated_under_a_reader_is_a_bad_record(tmp_path):
  data = datasets.write(tmp_path / "ds", {"train": 8}, max_shard_bytes=10 ** 9)
  source = records.split_source(data, "train")
  shard = source.shards[0]
  os.truncate(shard, os.path.getsize(shard) - 100)
  with pytest.raises(pipeline.BadRecordError, match=r"record 7 at byte \d+: truncated payload"):
    pipeline.load_example(source, 7, spec(data))


def test_skip_replaces_bad_training_records_and_counts_them(data):
  source = records.split_source(data, "train")
  skip = dataclasses.replace(spec(data, on_bad_record="skip"), augment=None)
  ds = pipeline.train_dataset(source, skip, global_batch=8, seed=0)
  batches = [ds[g] for g in range(2)]  # one epoch: 17 records, 2 batches of 8
  ids = [i for batch in batches for i in datasets.record_ids(batch)]
  assert len(ids) == 16 and BAD_PNG not in ids and SMALL_IMAGE not in ids and 99 not in ids
  assert sum(int(b["bad_records"].sum()) for b in batches) >= 2


def test_skip_flags_bad_evaluation_records_invalid_and_counts_them(data):
  source = records.split_source(data, "train")
  skip = spec(data, on_bad_record="skip")
  ds = pipeline.eval_dataset(source, skip, global_batch=8)
  batches = [ds[i] for i in range(len(ds))]
  valid = np.concatenate([b["valid"] for b in batches])
  bad = np.concatenate([b["bad_records"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert set(index[(valid == 0) & (index >= 0)]) == {BAD_PNG, SMALL_IMAGE, 16}
  assert bad.sum() == 3 and valid.sum() == 14


def test_a_run_with_skip_reports_the_bad_records_and_evaluates(data, tmp_path):
  config = datasets.tiny_config(data, steps=4, eval_every=4)
  config.data.on_bad_record = "skip"
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(config, workdir)
  assert last["train"]["bad_records"] >= 1
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any(line.get("bad_records") for line in lines if line["split"] == "train")
  report = evaluate.evaluate(workdir, "val", "best", n_boot=0)["classification"]
  assert report["bad_records"] == 0 and report["n_examples"] == 8


def test_on_bad_record_is_checked_at_start(data):
  config = datasets.tiny_config(data)
  config.data.on_bad_record = "sometimes"
  with pytest.raises(ValueError, match=r"config.data.on_bad_record='sometimes': choose from"):
    config_utils.validate(config)
