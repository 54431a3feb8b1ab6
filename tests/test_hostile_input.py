"""Property-based tests (hypothesis) of the hostile-input guarantees.

TFRecord reading (`cxr_jax.data.tfrecord`, `cxr_jax.data.records`):
  * test_reader_on_random_bytes, test_reader_on_damaged_shards,
    test_reader_on_headers_with_any_length: on random bytes, on valid shards with flipped bits,
    truncations and appended bytes, and on a header whose length checksum is right but whose
    length is anything, `unframe`, `iter_records`, `record_offsets` and `RecordSource` raise no
    error but `tfrecord.CorruptRecordError`, and every payload they return is one that was
    written (never one whose CRC does not match).
  * test_parse_on_random_payloads, test_parse_on_random_examples: `tfrecord.parse` of any bytes,
    and of any `tf.train.Example` built of the schema's keys with any kinds and values, returns
    or raises a ValueError, never another type; test_parse_round_trips: what `serialize` writes,
    `parse` reads back.
CSV rows of the converters (`data_prep.nih`, `data_prep.chexpert`, `data_prep.mimic`):
  * test_nih_data_entry_rows, test_nih_bbox_rows, test_chexpert_rows, test_mimic_split_rows,
    test_mimic_metadata_rows, test_mimic_label_rows: a valid file whose last row has hostile
    cells (commas, quotes, newlines, empty cells, unicode, huge numbers, `..` paths; written
    quoted by csv or raw) either parses to sane values or raises `BadInputError` naming the file
    and the row; with --skip-bad (`BadInputs(skip_bad=True)`) the row is recorded, nothing raised.
Config overrides (`cxr_jax.config_utils`):
  * test_unknown_override_is_a_one_line_exit: `--config.<dotted key>` of a key the config lacks
    stops `parse_flags` with the one-line SystemExit.
  * test_any_value_fails_at_start: any value set on a field of configs/phantom.py:smoke is refused
    by ml_collections on assignment (TypeError: a wrong type, a failure at start too), accepted
    by `validate`, or refused by `validate` with a ValueError naming the field. Values are any
    a command line can give (numbers, text, tuples) and wrong types; not None (see CONFIG_VALUES).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import struct
import sys
import tempfile
from unittest import mock

import ml_collections
import numpy as np
from absl import flags
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags
from tensorflow_datasets.proto import tf_example_pb2

import chexpert_fixtures
import mimic_fixtures
from cxr_jax import config_utils
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import records, tfrecord
from data_prep import chexpert, common, mimic, nih
from test_end_to_end import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM_CONFIG = os.path.join(REPO, "configs", "phantom.py")
# Every property sets max_examples itself; no example database is written into the checkout.
FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# TFRecord reading
# ---------------------------------------------------------------------------------------------


def small_example(i: int) -> tfrecord.CxrExample:
  """A tiny record whose bytes differ with i."""
  return tfrecord.CxrExample(
      image=bytes([i]) * (3 + i), image_id=f"{i:08d}_000.png", patient_id=str(i), study_id=str(i),
      view="PA", labels=np.array([1.0, 0.0, -1.0, np.nan], np.float32),
      boxes=np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), box_labels=np.array([i % 4]))


PAYLOADS = tuple(tfrecord.serialize(small_example(i)) for i in range(3))


def read_everything(path: str) -> list[bytes]:
  """Every payload the readers return for the shard at `path`; CorruptRecordError ends a reader,
  any other exception escapes."""
  returned = []
  try:
    returned += [payload for _, payload in tfrecord.iter_records(path)]
  except tfrecord.CorruptRecordError:
    pass
  try:
    tfrecord.record_offsets(path)
  except tfrecord.CorruptRecordError:
    pass
  try:
    source = records.RecordSource([path])
  except tfrecord.CorruptRecordError:
    return returned
  for i in range(len(source)):
    try:
      returned.append(source[i])
    except tfrecord.CorruptRecordError:
      pass
  return returned


def check_reader(data: bytes, written: tuple[bytes, ...]) -> None:
  """The reader contract on a shard holding `data`: only CorruptRecordError, and every payload
  returned is one of `written`."""
  returned = []
  try:
    returned.append(tfrecord.unframe(data, path="shard"))
  except tfrecord.CorruptRecordError:
    pass
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "shard.tfrecord")
    with open(path, "wb") as f:
      f.write(data)
    returned += read_everything(path)
  stray = [p for p in returned if p not in written]
  assert not stray, f"returned payloads that were never written: {stray[:2]}"


@settings(FAST, max_examples=150)
@given(st.binary(max_size=200))
def test_reader_on_random_bytes(data):
  check_reader(data, written=())


@st.composite
def damaged_shards(draw) -> bytes:
  """1 to 3 valid records with flipped bits, then possibly cut short or with bytes appended."""
  data = bytearray(b"".join(tfrecord.frame(p) for p in draw(
      st.lists(st.sampled_from(PAYLOADS), min_size=1, max_size=3))))
  for bit in draw(st.lists(st.integers(0, len(data) * 8 - 1), max_size=3)):
    data[bit // 8] ^= 1 << (bit % 8)
  end = draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))
  return bytes(data[:end]) + draw(st.binary(max_size=20))


@settings(FAST, max_examples=200)
@given(damaged_shards())
def test_reader_on_damaged_shards(data):
  check_reader(data, written=PAYLOADS)


@settings(FAST, max_examples=100)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_reader_on_headers_with_any_length(length, rest):
  """A hostile header: its length checksum is right, its length anything."""
  length_bytes = struct.pack("<Q", length)
  check_reader(length_bytes + struct.pack("<I", tfrecord.masked_crc(length_bytes)) + rest,
               written=())


def check_parse(payload: bytes) -> None:
  """`parse` returns or raises a ValueError."""
  try:
    tfrecord.parse(payload)
  except ValueError:
    pass


@settings(FAST, max_examples=150)
@given(st.one_of(st.binary(max_size=100),
                 st.sampled_from(PAYLOADS).flatmap(lambda p: st.integers(0, len(p)).map(
                     lambda end: p[:end]))))
def test_parse_on_random_payloads(payload):
  check_parse(payload)


SCHEMA_KEYS = ("image", "image_id", "patient_id", "study_id", "view", "labels", "box/label",
               *tfrecord.BOX_KEYS, "box_supervised", "fine_labels", "anatomy")
FEATURE_VALUES = {
    "bytes_list": st.lists(st.binary(max_size=8), max_size=3),
    "float_list": st.lists(st.floats(width=32), max_size=3),
    "int64_list": st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
}


@st.composite
def random_examples(draw) -> bytes:
  """A serialized tf.train.Example of some schema keys, each of any kind with any values."""
  proto = tf_example_pb2.Example()
  for key in draw(st.lists(st.sampled_from(SCHEMA_KEYS), unique=True)):
    kind = draw(st.sampled_from(sorted(FEATURE_VALUES)))
    getattr(proto.features.feature[key], kind).value.extend(draw(FEATURE_VALUES[kind]))
  return proto.SerializeToString()


@settings(FAST, max_examples=200)
@given(random_examples())
def test_parse_on_random_examples(payload):
  check_parse(payload)


@settings(FAST, max_examples=20)
@given(st.integers(0, 255))
def test_parse_round_trips(i):
  ex = small_example(i)
  back = tfrecord.parse(tfrecord.serialize(ex))
  assert (back.image, back.image_id, back.box_labels.tolist()) == (
      ex.image, ex.image_id, ex.box_labels.tolist())
  np.testing.assert_array_equal(back.labels, ex.labels)


# ---------------------------------------------------------------------------------------------
# CSV rows of the converters
# ---------------------------------------------------------------------------------------------

HOSTILE_CELLS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["", " ", ",", '"', '""', "'", "\n", "\r\n", "\r", "\x00", "\ufeff", "..",
                     "../..", "/etc/passwd", "C:\\x", "a\\..\\b", "1e309", "-1e309", "nan",
                     "inf", "-0", "9" * 400, "1.0", "0.0", "-1.0", "No Finding", "Infiltrate",
                     "PA", "Frontal", "Lateral", "train", "validate", "patient٣", "١٢"]),
    st.integers().map(str), st.floats().map(str))


@st.composite
def hostile_rows(draw, template: tuple[str, ...]) -> str:
  """The text of a CSV row: `template` with 1 to 3 cells made hostile, maybe cut short or grown,
  written quoted by csv or joined raw (so quotes and newlines break the framing)."""
  cells = list(template)
  for i in draw(st.lists(st.integers(0, len(cells) - 1), min_size=1, max_size=3)):
    cells[i] = draw(HOSTILE_CELLS)
  cells = cells[:draw(st.integers(1, len(cells)))] if draw(st.booleans()) else cells
  cells += draw(st.lists(HOSTILE_CELLS, max_size=2))
  if draw(st.booleans()):
    return ",".join(cells)
  out = io.StringIO()
  csv.writer(out, lineterminator="").writerow(cells)
  return out.getvalue()


def write_table(folder: str, name: str, header: str, good_rows: list[str],
                row: str) -> tuple[str, range]:
  """Writes header, good rows and the hostile row (last); returns the path and the lines the
  hostile row may span."""
  path = os.path.join(folder, name)
  text = "\n".join([header, *good_rows, row]) + "\n"
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  first = len(good_rows) + 2
  return path, range(first, max(first, len(text.splitlines())) + 1)


class SkipLog(list):
  """Stands in for the DatasetWriter that `BadInputs.record_to` sends each skipped input to."""

  def skip(self, **item) -> None:
    self.append(item)


def check_rows(name: str, header: str, good_rows: list[str], row: str, parse, sane) -> None:
  """The row contract: `parse(path, bad)` returns a result that `sane(result)` accepts or raises
  a BadInputError naming `path` and a line of the hostile row; with skip_bad it raises nothing
  and records the hostile row's lines only."""
  with tempfile.TemporaryDirectory() as folder:
    path, lines = write_table(folder, name, header, good_rows, row)
    try:
      sane(parse(path, common.BadInputs(skip_bad=False)))
      strict_error = None
    except common.BadInputError as e:
      assert e.file == path and e.row in lines, (str(e), lines)
      assert f"{path}, row {e.row}: " in str(e)
      strict_error = e
    bad, skipped = common.BadInputs(skip_bad=True), SkipLog()
    bad.record_to(skipped)
    sane(parse(path, bad))
  assert all(item["file"] == path and item["row"] in lines for item in skipped), skipped
  assert (strict_error is None) == (not skipped), (strict_error, skipped)


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_GOOD = "00000001_000.png,Effusion|Mass,0,1,058Y,M,PA,32,32,0.14,0.14"
NIH_TEMPLATE = ("00000002_000.png", "No Finding", "0", "2", "60", "F", "AP", "40", "24", "0.1",
                "0.1")


def sane_nih_entries(entries: dict[str, nih.Entry]) -> None:
  """The good row is read; every entry has ids and a 0/1 label vector."""
  assert "00000001_000.png" in entries
  for image_id, entry in entries.items():
    assert image_id == entry.image_id and entry.image_id and entry.patient_id
    assert entry.labels.shape == (len(labels_lib.NIH_LABELS),)
    assert set(entry.labels.tolist()) <= {0.0, 1.0}


@settings(FAST, max_examples=150)
@given(hostile_rows(NIH_TEMPLATE))
def test_nih_data_entry_rows(row):
  check_rows("Data_Entry_2017_v2020.csv", NIH_HEADER, [NIH_GOOD], row, nih.read_data_entry,
             sane_nih_entries)


NIH_ENTRIES = {
    image_id: nih.Entry(image_id, "1", "PA", np.zeros(len(labels_lib.NIH_LABELS), np.float32), 2)
    for image_id in ("00000001_000.png", "00000002_000.png")}


def read_bbox(path: str, bad: common.BadInputs) -> dict[str, list[nih.Box]]:
  """`nih.read_bbox_list` against NIH_ENTRIES."""
  return nih.read_bbox_list(path, "Data_Entry_2017_v2020.csv", NIH_ENTRIES, bad)


def sane_boxes(boxes: dict[str, list[nih.Box]]) -> None:
  """The good box is read; every box is of a known image and label, finite, w, h >= 0."""
  assert len(boxes["00000001_000.png"]) >= 1
  for image_id, image_boxes in boxes.items():
    assert image_id in NIH_ENTRIES
    for box in image_boxes:
      _, _, w, h = box.xywh
      assert 0 <= box.label < len(labels_lib.NIH_LABELS)
      assert all(math.isfinite(v) for v in box.xywh) and w >= 0 and h >= 0


@settings(FAST, max_examples=150)
@given(hostile_rows(("00000002_000.png", "Infiltrate", "1.5", "2", "30", "40.25")))
def test_nih_bbox_rows(row):
  check_rows("BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,",
             ["00000001_000.png,Mass,1,2,3,4"], row, read_bbox, sane_boxes)


CHEXPERT_FOLDER = chexpert.LAYOUTS["small"]
CHEXPERT_LABELS = ("", "", "1.0", "", "", "-1.0", "", "", "", "0.0", "1.0", "", "", "")
CHEXPERT_GOOD = ",".join((f"{CHEXPERT_FOLDER}/train/patient00001/study1/view1_frontal.jpg",
                          "Male", "54", "Frontal", "PA") + CHEXPERT_LABELS)
CHEXPERT_TEMPLATE = (f"{CHEXPERT_FOLDER}/train/patient00002/study1/view2_lateral.jpg", "Female",
                     "60", "Lateral", "") + CHEXPERT_LABELS


def read_chexpert(path: str, bad: common.BadInputs) -> list[chexpert.Entry]:
  """`chexpert.read_csv_file` of the small layout."""
  return chexpert.read_csv_file(path, CHEXPERT_FOLDER, bad, {})


def sane_chexpert(entries: list[chexpert.Entry]) -> None:
  """The good row is read; no image id escapes, views and label values are known."""
  assert entries[0].image_id == "train/patient00001/study1/view1_frontal.jpg"
  for entry in entries:
    parts = entry.image_id.replace("\\", "/").split("/")
    assert ".." not in parts and not os.path.isabs(entry.image_id)
    assert entry.study_id.startswith(entry.patient_id + "/")
    assert entry.view in (*chexpert.FRONTAL_VIEWS, chexpert.FRONTAL, chexpert.LATERAL)
    assert entry.labels.shape == (len(chexpert.LABEL_COLUMNS),)
    assert all(v in (1.0, 0.0, -1.0) or math.isnan(v) for v in entry.labels.tolist())


@settings(FAST, max_examples=150)
@given(hostile_rows(CHEXPERT_TEMPLATE))
def test_chexpert_rows(row):
  check_rows("train.csv", chexpert_fixtures.HEADER, [CHEXPERT_GOOD], row, read_chexpert,
             sane_chexpert)


MIMIC_DICOMS = {
    dicom_id: mimic.Dicom(dicom_id, study, subject, "train", line)
    for dicom_id, study, subject, line in (("0a-1", "50000001", "10000001", 2),
                                           ("0b-2", "50000002", "10000002", 3))}


def sane_mimic_ids(dicoms) -> None:
  """Every id is well formed (no path can leave --src) and every split known."""
  for dicom in dicoms:
    assert mimic.DICOM_ID.fullmatch(dicom.dicom_id) and mimic.STUDY_ID.fullmatch(dicom.study_id)
    assert mimic.SUBJECT_ID.fullmatch(dicom.subject_id) and dicom.split in mimic.SPLITS
    assert ".." not in dicom.image_id.split("/")


def sane_split(dicoms: dict[str, mimic.Dicom]) -> None:
  """The good row is read and every row's ids are well formed."""
  assert "0a-1" in dicoms
  sane_mimic_ids(dicoms.values())


@settings(FAST, max_examples=150)
@given(hostile_rows(("0b-2", "50000002", "10000002", "validate")))
def test_mimic_split_rows(row):
  check_rows(mimic_fixtures.SPLIT_FILE, mimic_fixtures.SPLIT_HEADER,
             ["0a-1,50000001,10000001,train"], row, mimic.read_split, sane_split)


def read_metadata(path: str, bad: common.BadInputs) -> tuple[dict[str, str], int]:
  """`mimic.read_metadata` against MIMIC_DICOMS."""
  return mimic.read_metadata(path, MIMIC_DICOMS, mimic_fixtures.SPLIT_FILE, bad)


def sane_metadata(result: tuple[dict[str, str], int]) -> None:
  """The good row's view is read; views only of split.csv's images, never blank."""
  views, metadata_only = result
  assert views["0a-1"] == "PA" and set(views) <= set(MIMIC_DICOMS) and metadata_only in (0, 1)
  assert all(views.values())


METADATA_TEMPLATE = ("0b-2", "10000002", "50000002", "CHEST (PA AND LAT)", "LATERAL", "24", "24",
                     "21800506", "213001.531", "CHEST (PA AND LAT)", "lateral", "Erect")


@settings(FAST, max_examples=150)
@given(hostile_rows(METADATA_TEMPLATE))
def test_mimic_metadata_rows(row):
  good = ",".join(("0a-1", "10000001", "50000001") + METADATA_TEMPLATE[3:4] + ("PA",)
                  + METADATA_TEMPLATE[5:])
  check_rows(mimic_fixtures.METADATA_FILE, mimic_fixtures.METADATA_HEADER, [good], row,
             read_metadata, sane_metadata)


def read_labels(path: str, bad: common.BadInputs):
  """`mimic.read_labels` against MIMIC_DICOMS."""
  return mimic.read_labels(path, MIMIC_DICOMS, bad)


def sane_labels(result) -> None:
  """Every study read has well-formed ids and a 1/0/-1/NaN vector."""
  vectors, row_of = result
  assert set(vectors) <= set(row_of)
  for (subject, study), vector in vectors.items():
    assert mimic.SUBJECT_ID.fullmatch(subject) and mimic.STUDY_ID.fullmatch(study)
    assert vector.shape == (len(labels_lib.CHEXPERT_LABELS),)
    assert all(v in (1.0, 0.0, -1.0) or math.isnan(v) for v in vector.tolist())


@settings(FAST, max_examples=150)
@given(hostile_rows(("10000002", "50000002") + CHEXPERT_LABELS))
def test_mimic_label_rows(row):
  check_rows(mimic_fixtures.LABEL_FILES["chexpert"], mimic_fixtures.LABEL_HEADER,
             [",".join(("10000001", "50000001") + CHEXPERT_LABELS)], row, read_labels,
             sane_labels)


# ---------------------------------------------------------------------------------------------
# Config overrides
# ---------------------------------------------------------------------------------------------

BASE_CONFIG = load_config(PHANTOM_CONFIG, "smoke")


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The dotted paths of every non-ConfigDict field."""
  paths = []
  for key, value in sorted(config.items()):
    if isinstance(value, ml_collections.ConfigDict):
      paths += leaf_paths(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


LEAVES = tuple(leaf_paths(BASE_CONFIG))
SECTIONS = tuple(sorted({part for path in LEAVES for part in path.split(".")}))
NAMES = st.one_of(st.sampled_from(SECTIONS),
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))


def has_path(config, path: str) -> bool:
  """Whether the dotted `path` names a field or section of `config`."""
  try:
    config_utils.get(config, path)
  except (KeyError, AttributeError, TypeError):
    return False
  return True


def parse_overrides(argv: list[str]) -> None:
  """`config_utils.parse_flags` as a CLI runs it (with `--config` defined as cxr_jax.train does),
  on fresh flags: ml_collections reads the overrides from sys.argv."""
  fresh = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fresh, lock_config=True)
  argv = ["prog", "--config", f"{PHANTOM_CONFIG}:smoke", *argv]
  with mock.patch.object(flags, "FLAGS", fresh), mock.patch.object(sys, "argv", argv):
    config_utils.parse_flags(argv)


@settings(FAST, max_examples=100)
@given(st.lists(NAMES, min_size=1, max_size=4).map(".".join), st.text(max_size=10))
@example(key="as", value="")  # a Python keyword: ml_collections cannot parse it as a path
def test_unknown_override_is_a_one_line_exit(key, value):
  if has_path(BASE_CONFIG, key):
    return
  try:
    parse_overrides([f"--config.{key}={value}"])
  except SystemExit as e:
    message = str(e)
  else:
    raise AssertionError(f"--config.{key} was accepted")
  assert message.startswith("FATAL: a config override names no field of the config: ")
  assert "\n" not in message and f"--config.{key}" in message


# None is left out: no command-line override yields it, and validate's numeric and text checks
# compare or call it (TypeError, AttributeError) instead of listing it.
CONFIG_VALUES = st.one_of(
    st.booleans(), st.integers(-10**30, 10**30), st.floats(),
    st.text(max_size=12), st.sampled_from(["", "adamm", "val/", "float32", "Edema:ones"]),
    st.tuples(st.floats(), st.floats()), st.tuples(st.text(max_size=4), st.floats()),
    st.lists(st.text(max_size=4), max_size=3))


def set_field(config: ml_collections.ConfigDict, path: str, value) -> None:
  """Sets the field at the dotted `path` of `config` to `value`."""
  *sections, name = path.split(".")
  for section in sections:
    config = config[section]
  setattr(config, name, value)


@settings(FAST, max_examples=300)
@given(st.sampled_from(LEAVES), CONFIG_VALUES)
def test_any_value_fails_at_start(path, value):
  config = copy.deepcopy(BASE_CONFIG)
  try:
    set_field(config, path, value)
  except TypeError:
    return  # ml_collections refuses the type on assignment: the run stops at start
  try:
    config_utils.validate(config)
  except ValueError as e:
    assert f"config.{path}" in str(e), (path, value, str(e))
