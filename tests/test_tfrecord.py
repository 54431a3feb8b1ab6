"""Record schema, TFRecord framing, the atomic dataset writer and the offset index."""

import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

import datasets
from cxr_jax.data import augment, records, tfrecord, writer

TF_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tf_written"


def test_every_feature_round_trips():
  ex = datasets.example(7, 16, box_supervised=True)
  ex.labels[2] = np.nan
  back = tfrecord.parse(tfrecord.serialize(ex))
  assert back.box_supervised is True
  assert back.image == ex.image and back.anatomy == ex.anatomy
  assert (back.image_id, back.patient_id, back.study_id, back.view) == (
      ex.image_id, ex.patient_id, ex.study_id, ex.view)
  np.testing.assert_array_equal(back.labels, ex.labels)  # NaN and -1 survive
  np.testing.assert_array_equal(back.boxes, ex.boxes)
  np.testing.assert_array_equal(back.box_labels, ex.box_labels)
  np.testing.assert_array_equal(back.fine_labels, ex.fine_labels)


def test_optional_features_stay_absent():
  back = tfrecord.parse(tfrecord.serialize(datasets.example(1, 8, with_extras=False)))
  assert back.fine_labels is None and back.anatomy is None


def test_box_supervised_is_always_written_and_absent_reads_false():
  proto = tf_example_pb2.Example()
  proto.ParseFromString(tfrecord.serialize(datasets.example(1, 8)))
  assert list(proto.features.feature["box_supervised"].int64_list.value) == [0]
  # A record of format version 2 or older: the same proto without the flag.
  proto.ParseFromString(tfrecord.serialize(datasets.example(1, 8, box_supervised=True)))
  del proto.features.feature["box_supervised"]
  assert tfrecord.parse(proto.SerializeToString()).box_supervised is False


def test_reads_records_written_by_tensorflow():
  expected = json.loads((TF_FIXTURES / "expected.json").read_text())
  path = TF_FIXTURES / "phantom-train.tfrecord-00000-of-00001"
  parsed = [tfrecord.parse(payload) for _, payload in tfrecord.iter_records(path)]
  assert len(parsed) == len(expected["records"])
  for ex, want in zip(parsed, expected["records"]):
    assert ex.box_supervised is False  # written before the flag existed
    assert (ex.image_id, ex.patient_id, ex.study_id, ex.view) == (
        want["image_id"], want["patient_id"], want["study_id"], want["view"])
    np.testing.assert_array_equal(
        ex.labels, np.array([np.nan if v is None else v for v in want["labels"]], np.float32))
    np.testing.assert_allclose(ex.boxes, np.stack(
        [want[k] for k in tfrecord.BOX_KEYS], -1).reshape(-1, 4), rtol=1e-6)
    np.testing.assert_array_equal(ex.box_labels, want["box/label"])
    np.testing.assert_array_equal(ex.fine_labels, want["fine_labels"])
    image = augment.decode_png(ex.image)
    assert list(image.shape) == want["image_shape"] and int(image.sum()) == want["image_sum"]
    h, w = image.shape
    step = int(re.search(r"\* (\d+)\)", want["image_formula"]).group(1))
    np.testing.assert_array_equal(image, (np.arange(h * w).reshape(h, w) * step) % 256)
    assert (ex.anatomy is not None) == want["has_anatomy"]
    if want["has_anatomy"]:
      assert int(augment.decode_png(ex.anatomy).sum()) == want["anatomy_sum"]


@pytest.mark.parametrize("name, good_records, reason", [
    ("corrupt-payload.tfrecord", 2, "payload checksum mismatch"),
    ("truncated.tfrecord", 4, "truncated payload"),
])
def test_corrupt_files_fail_where_tensorflow_fails(name, good_records, reason):
  path = TF_FIXTURES / name
  seen = 0
  with pytest.raises(tfrecord.CorruptRecordError, match=reason) as err:
    for _ in tfrecord.iter_records(path):
      seen += 1
  assert seen == good_records
  assert err.value.index == good_records and name in str(err.value)


def test_random_access_verifies_checksums(tmp_path):
  shutil.copy(TF_FIXTURES / "corrupt-payload.tfrecord", tmp_path / "bad.tfrecord")
  source = records.RecordSource([str(tmp_path / "bad.tfrecord")])
  assert len(source) == 5
  tfrecord.parse(source[1])
  with pytest.raises(tfrecord.CorruptRecordError, match="record 2 at byte 1106"):
    source[2]
  unchecked = records.RecordSource([str(tmp_path / "bad.tfrecord")], verify_crc=False)
  assert len(unchecked[2]) > 0  # the damage is inside the payload; framing is intact


def test_writer_shards_manifest_and_tfds_metadata(tmp_path):
  out = datasets.write(tmp_path / "ds", {"train": 12, "test": 3}, max_shard_bytes=6000)
  manifest = writer.load_manifest(out)
  shards = manifest["splits"]["train"]["shards"]
  assert len(shards) > 1 and manifest["splits"]["train"]["num_records"] == 12
  for i, shard in enumerate(shards):
    assert shard["file"] == f"toy-train.tfrecord-{i:05d}-of-{len(shards):05d}"
    assert shard["num_bytes"] <= 6000
    assert os.path.getsize(os.path.join(out, shard["file"])) == shard["num_bytes"]
  ids = [tfrecord.parse(p).image_id for s in shards
         for _, p in tfrecord.iter_records(os.path.join(out, s["file"]))]
  assert ids == [f"{i:08d}_000.png" for i in range(12)]
  import tensorflow_datasets as tfds
  info = tfds.builder_from_directory(out).info
  assert info.splits["train"].num_examples == 12 and info.splits["test"].num_examples == 3
  assert set(info.features.keys()) >= {"image", "labels", "box", "fine_labels", "anatomy",
                                       "box_supervised"}
  flag = info.features["box_supervised"]
  assert (flag.np_dtype, flag.shape) == (np.int64, ())


def test_writer_counts_box_supervised_records(tmp_path):
  out = datasets.write(tmp_path / "ds", {"train": 6, "test": 2}, box_supervised=frozenset({1, 4, 5}))
  manifest = writer.load_manifest(out)
  assert manifest["format_version"] == writer.FORMAT_VERSION == 3
  assert {s: v["num_box_supervised"] for s, v in manifest["splits"].items()} == {
      "train": 3, "test": 0}
  train = [tfrecord.parse(payload) for shard in manifest["splits"]["train"]["shards"]
           for _, payload in tfrecord.iter_records(os.path.join(out, shard["file"]))]
  marked = [ex.image_id for ex in train if ex.box_supervised]
  assert marked == ["00000001_000.png", "00000004_000.png", "00000005_000.png"]


def test_writer_refuses_box_supervised_without_boxes(tmp_path):
  ex = datasets.example(3, 8, with_extras=False, box_supervised=True)
  ex.boxes, ex.box_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
  with pytest.raises(ValueError, match="example '00000003_000.png': marked box_supervised but has "
                     "no boxes"):
    with writer.DatasetWriter(tmp_path / "ds", "toy", label_names=["a"] * 14, image_size=8,
                              converter="t", converter_version="0", source="s") as w:
      w.add("train", ex)
  assert os.listdir(tmp_path) == []


def test_writer_leaves_nothing_when_interrupted(tmp_path):
  with pytest.raises(RuntimeError):
    with writer.DatasetWriter(tmp_path / "ds", "toy", label_names=["a"] * 14, image_size=8,
                              converter="t", converter_version="0", source="s") as w:
      w.add("train", datasets.example(0, 8, with_extras=False))
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == []


def test_writer_rejects_inconsistent_examples(tmp_path):
  with pytest.raises(ValueError, match="fine_labels"):
    with writer.DatasetWriter(tmp_path / "ds", "toy", label_names=["a"] * 14, image_size=8,
                              converter="t", converter_version="0", source="s",
                              fine_label_names=["x|left|upper"]) as w:
      w.add("train", datasets.example(0, 8, with_extras=False))
  assert os.listdir(tmp_path) == []


def test_writer_refuses_to_overwrite(tmp_path):
  out = datasets.write(tmp_path / "ds", {"train": 2})
  with pytest.raises(FileExistsError):
    datasets.write(tmp_path / "ds", {"train": 2})
  assert writer.load_manifest(out)["splits"]["train"]["num_records"] == 2


def test_index_is_cached_and_rebuilt_when_stale(tmp_path):
  out = datasets.write(tmp_path / "ds", {"train": 5}, max_shard_bytes=10 ** 6)
  shard = os.path.join(out, writer.load_manifest(out)["splits"]["train"]["shards"][0]["file"])
  source = records.split_source(out, "train")
  assert os.path.exists(shard + records.INDEX_SUFFIX)
  first = source[3]
  with open(shard, "ab") as f:  # the shard grows: the cached index no longer fits
    f.write(tfrecord.frame(tfrecord.serialize(datasets.example(99, 32))))
  grown = records.split_source(out, "train")
  assert len(grown) == 6 and grown[3] == first
  assert tfrecord.parse(grown[5]).image_id == "00000099_000.png"
