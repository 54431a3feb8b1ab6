"""Tests of data_prep.nih (and the data_prep.common pieces it uses) on small NIH-format folders."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nih_fixtures as fx
from cxr_jax.data import labels, writer
from datasets import read_all, read_split
from data_prep import common, nih
from data_prep.common import BadInputError

SIZE = 16
DATA_ENTRY = "Data_Entry_2017_v2020.csv"
IMAGE_IDS = sorted(x.image_id for x in fx.IMAGES)
BY_ID = {x.image_id: x for x in fx.IMAGES}


def convert(src, out, **kwargs):
  return nih.convert(str(src), str(out), image_size=SIZE, workers=1, **kwargs)


def decode(png):
  return Image.open(io.BytesIO(png))


def label_vector(findings):
  names = [] if findings == "No Finding" else findings.split("|")
  return np.array([float(n in names) for n in labels.NIH_LABELS], np.float32)


def count_lines(path):
  with open(path) as f:
    return sum(1 for line in f if line.strip())


@pytest.fixture
def src(tmp_path):
  return fx.write_nih(tmp_path / "src")


def test_converts_release_and_round_trips(src, tmp_path):
  out = tmp_path / "out"
  manifest = convert(src, out, val_fraction=0.25, seed=0)
  counts = {s: v["num_records"] for s, v in manifest["splits"].items()}
  assert counts["train"] + counts["val"] == count_lines(src / "train_val_list.txt") == 8
  assert counts["test"] == count_lines(src / "test_list.txt") == 3
  assert sum(counts.values()) == count_lines(src / DATA_ENTRY) - 1
  assert manifest["skipped"]["count"] == 0
  assert (manifest["seed"], manifest["val_fraction"], manifest["val_patients"]) == (0, 0.25, 1)
  assert manifest["boxes_from"] == "BBox_List_2017.csv"
  assert manifest["fine_label_names"] == manifest["anatomy_names"] == []
  assert manifest["fine_labels_from"] is manifest["fine_labels_unlabelled"] is None

  records = read_all(out)
  for split, examples in records.items():
    ids = [ex.image_id for ex in examples]
    assert ids == sorted(ids), split
  assert sorted(ex.image_id for exs in records.values() for ex in exs) == IMAGE_IDS
  assert {ex.image_id for ex in records["test"]} == {x.image_id for x in fx.IMAGES
                                                     if x.side == "test"}
  val_patients = {ex.patient_id for ex in records["val"]}
  assert val_patients == common.carve_by_patient(["1", "2", "3", "4"], 0.25, 0)
  assert not val_patients & {ex.patient_id for ex in records["train"]}

  for ex in (ex for exs in records.values() for ex in exs):
    xray = BY_ID[ex.image_id]
    np.testing.assert_array_equal(ex.labels, label_vector(xray.findings))
    assert (ex.patient_id, ex.study_id, ex.view) == (str(xray.patient), ex.image_id[:-4], xray.view)
    image = decode(ex.image)
    assert (image.mode, image.size) == ("L", (SIZE, SIZE))
    # Flat sources stay flat through 8-bit conversion (RGBA, 16-bit included) and area resizing.
    np.testing.assert_array_equal(np.asarray(image), xray.value)
    assert ex.fine_labels is None and ex.anatomy is None

  boxed = {ex.image_id: ex for ex in records["test"]}
  ex = boxed["00000005_000.png"]  # 40 x 24 pixels; the Mass box runs past the corner
  np.testing.assert_allclose(ex.boxes, [[0.1, 0.25, 0.3, 0.75], [0.75, 0.5, 1.0, 1.0]])
  assert [labels.NIH_LABELS[i] for i in ex.box_labels] == ["Infiltration", "Mass"]
  np.testing.assert_allclose(boxed["00000006_000.png"].boxes, [[0.0, 0.0, 0.5, 0.25]])
  assert len(boxed["00000005_001.png"].boxes) == 0


def test_tfds_reads_the_split_counts(src, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = tmp_path / "out"
  manifest = convert(src, out, val_fraction=0.25, max_shard_bytes=1000)
  assert len(manifest["splits"]["train"]["shards"]) > 1
  splits = tfds.builder_from_directory(str(out)).info.splits
  assert {name: splits[name].num_examples for name in splits} == {
      s: v["num_records"] for s, v in manifest["splits"].items()}


def test_original_2017_file_and_sharded_image_folders(src, tmp_path):
  old = fx.write_nih(tmp_path / "old", variant="2017", gender_column="Patient Sex",
                     layout="sharded")
  data_entry = (old / "Data_Entry_2017.csv").read_text().splitlines()
  assert all(line.endswith(",") for line in data_entry) and "041Y" in data_entry[1]
  assert (old / "images_002" / "images" / "00000001_001.png").exists()
  convert(src, tmp_path / "new_out")
  convert(old, tmp_path / "old_out")
  for split, examples in read_all(tmp_path / "new_out").items():
    old_examples = read_split(tmp_path / "old_out", split)
    assert [ex.image_id for ex in old_examples] == [ex.image_id for ex in examples]
    for a, b in zip(examples, old_examples):
      assert a.image == b.image and a.patient_id == b.patient_id
      np.testing.assert_array_equal(a.labels, b.labels)
      np.testing.assert_array_equal(a.boxes, b.boxes)


def test_prefers_the_v2020_file(src, tmp_path):
  (src / "Data_Entry_2017.csv").write_text("not, the file, to read\n")
  assert convert(src, tmp_path / "out")["data_entry"] == DATA_ENTRY


def test_val_carve_is_seeded_and_by_patient(src, tmp_path):
  patients = ["1", "2", "3", "4"]
  seed = next(s for s in range(1, 50) if common.carve_by_patient(patients, 0.25, s)
              != common.carve_by_patient(patients, 0.25, 0))
  val = {}
  for name, s in (("a", 0), ("b", 0), ("c", seed)):
    convert(src, tmp_path / name, val_fraction=0.25, seed=s)
    val[name] = [ex.image_id for ex in read_split(tmp_path / name, "val")]
  assert val["a"] == val["b"] and val["a"] != val["c"]


def test_carve_by_patient():
  patients = [str(p) for p in range(50)]
  val = common.carve_by_patient(patients, 0.1, seed=7)
  assert len(val) == 5 and val <= set(patients)
  assert common.carve_by_patient(reversed(patients * 2), 0.1, seed=7) == val
  assert common.carve_by_patient(patients, 0.1, seed=8) != val
  assert common.carve_by_patient(patients, 0.0, seed=7) == frozenset()
  assert len(common.carve_by_patient(["1", "2"], 0.01, seed=0)) == 1  # never an empty val ...
  assert len(common.carve_by_patient(["1", "2"], 0.9, seed=0)) == 1  # ... nor an empty train
  with pytest.raises(ValueError, match="fraction"):
    common.carve_by_patient(patients, 1.0, seed=0)


def _remove(path):
  os.remove(path)


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)


def _move_to_test(src, image_id):
  fx.edit(src / "train_val_list.txt", image_id + "\n", "")
  fx.append_line(src / "test_list.txt", image_id)


# name: (breaks the source, file and row expected in the error, message part, images left out)
BAD_INPUTS = {
    "missing image": (
        lambda s: _remove(s / "images" / "00000002_001.png"),
        DATA_ENTRY, "00000002_001.png", "not found", {"00000002_001.png"}),
    "corrupt image": (
        lambda s: _write_bytes(s / "images" / "00000004_000.png", b"\x89PNG\r\n\x1a\nbroken"),
        DATA_ENTRY, "00000004_000.png", "cannot read image", {"00000004_000.png"}),
    "empty image": (
        lambda s: _write_bytes(s / "images" / "00000005_001.png", b""),
        DATA_ENTRY, "00000005_001.png", "cannot read image", {"00000005_001.png"}),
    "image linked from outside src": (
        lambda s: fx.link_outside(s, s / "images" / "00000002_001.png"),
        DATA_ENTRY, "00000002_001.png", "images/00000002_001.png is a link to",
        {"00000002_001.png"}),
    "malformed row": (
        lambda s: fx.edit(s / DATA_ENTRY, "00000003_000.png,Mass|Nodule|Pleural_Thickening,0,3,",
                          "00000003_000.png,Mass|Nodule|Pleural_Thickening,0,"),
        DATA_ENTRY, "00000003_000.png", "malformed row", {"00000003_000.png"}),
    "unknown label": (
        lambda s: fx.edit(s / DATA_ENTRY, "Hernia", "Herniation"),
        DATA_ENTRY, "00000004_000.png", "unknown label 'Herniation'", {"00000004_000.png"}),
    "No Finding with a finding": (
        lambda s: fx.edit(s / DATA_ENTRY, "00000004_001.png,No Finding",
                          "00000004_001.png,No Finding|Mass"),
        DATA_ENTRY, "00000004_001.png", "'No Finding' together with findings",
        {"00000004_001.png"}),
    "image in no split": (
        lambda s: fx.edit(s / "train_val_list.txt", "00000001_002.png\n", ""),
        DATA_ENTRY, "00000001_002.png", "is in none of", {"00000001_002.png"}),
    "image in both splits": (
        lambda s: fx.append_line(s / "test_list.txt", "00000004_001.png"),
        "test_list.txt", "00000004_001.png", "also listed in", {"00000004_001.png"}),
    "list entry not in Data_Entry": (
        lambda s: fx.append_line(s / "test_list.txt", "00000099_000.png"),
        "test_list.txt", "00000099_000.png", "is not in", set()),
    "patient in train_val and test": (
        lambda s: _move_to_test(s, "00000002_001.png"),
        "train_val_list.txt", "00000002_000.png", "patient 2 has images in both",
        {"00000002_000.png", "00000002_001.png"}),
    "box for an unknown image": (
        lambda s: fx.append_line(s / "BBox_List_2017.csv", "00000099_000.png,Mass,1,2,3,4"),
        "BBox_List_2017.csv", "00000099_000.png", "not in", set()),
    "box with an unknown label": (
        lambda s: fx.append_line(s / "BBox_List_2017.csv", "00000006_000.png,Tumor,1,2,3,4"),
        "BBox_List_2017.csv", "Tumor", "unknown label", set()),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_with_file_and_row(src, tmp_path, case):
  breaks, file, row_text, reason, _ = BAD_INPUTS[case]
  breaks(src)
  row = fx.line_of(src / file, row_text)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out")
  assert (os.path.basename(error.value.file), error.value.row) == (file, row)
  assert f"{src / file}, row {row}: " in str(error.value) and reason in str(error.value)
  # Neither the dataset nor a partial folder (OUTSIDE holds what a case links to).
  assert set(os.listdir(tmp_path)) - {fx.OUTSIDE} == {"src"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_skip_bad_skips_and_counts(src, tmp_path, case):
  breaks, file, row_text, reason, left_out = BAD_INPUTS[case]
  breaks(src)
  row = fx.line_of(src / file, row_text)
  manifest = convert(src, tmp_path / "out", skip_bad=True)
  skipped = manifest["skipped"]
  assert skipped["count"] == len(skipped["items"]) == max(len(left_out), 1)
  first = skipped["items"][0]
  assert (os.path.basename(first["file"]), first["row"]) == (file, row)
  assert reason in first["reason"]
  assert {item.get("image") for item in skipped["items"]} - {None} == left_out
  written = sorted(ex.image_id for exs in read_all(tmp_path / "out").values() for ex in exs)
  assert written == sorted(set(IMAGE_IDS) - left_out)
  assert sum(v["num_records"] for v in manifest["splits"].values()) == len(written)


def test_phantom_extras_give_fine_labels_anatomy_and_instance_boxes(tmp_path):
  src = fx.write_nih(tmp_path / "src", extras=True)
  manifest = convert(src, tmp_path / "out")
  vocabulary = labels.fine_vocabulary()
  assert manifest["fine_label_names"] == list(vocabulary)
  assert manifest["anatomy_names"] == list(fx.ANATOMY_NAMES)
  assert manifest["boxes_from"] == "phantom_extras/fine_labels.csv"
  # The phantom lists every finding instance: an image without one has none, which is known.
  assert (manifest["fine_labels_from"], manifest["fine_labels_unlabelled"]) == (
      "phantom_extras/fine_labels.csv", 0)
  examples = {ex.image_id: ex for exs in read_all(tmp_path / "out").values() for ex in exs}
  ex = examples["00000001_001.png"]  # a training image: boxes come with the extras only
  assert sorted(vocabulary[i] for i in np.flatnonzero(ex.fine_labels)) == [
      "Effusion|left|lower", "Effusion|right|lower", "Infiltration|left|upper"]
  assert [labels.NIH_LABELS[i] for i in ex.box_labels] == ["Effusion", "Infiltration", "Effusion"]
  np.testing.assert_allclose(ex.boxes[0], [2 / 32, 20 / 32, 12 / 32, 28 / 32])
  # The extras replace BBox_List's boxes (00000005_000 has two there, one instance here).
  assert [labels.NIH_LABELS[i] for i in examples["00000005_000.png"].box_labels] == ["Mass"]
  assert not examples["00000004_000.png"].fine_labels.any()
  for ex in examples.values():
    anatomy = np.asarray(decode(ex.anatomy))
    assert anatomy.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(anatomy, fx.anatomy_map((SIZE, SIZE)))


def test_bad_extras_name_file_and_row(tmp_path):
  src = fx.write_nih(tmp_path / "src", extras=True)
  fine_labels = src / "phantom_extras" / "fine_labels.csv"
  fx.edit(fine_labels, "Mass,left,middle", "Mass,center,middle")
  with pytest.raises(BadInputError, match=f"{fine_labels}, row 5: bad location"):
    convert(src, tmp_path / "bad_row")
  fx.edit(fine_labels, "Mass,center,middle", "Mass,left,middle")
  os.remove(src / "phantom_extras" / "anatomy" / "00000004_001.png")
  row = fx.line_of(src / DATA_ENTRY, "00000004_001.png")
  with pytest.raises(BadInputError, match=f"{DATA_ENTRY}, row {row}: cannot read label map"):
    convert(src, tmp_path / "no_map")
  assert os.listdir(tmp_path) == ["src"]


VOCABULARY = labels.fine_vocabulary()
ALL_UNKNOWN = np.full(len(VOCABULARY), np.nan, np.float32)


def fine_vector(positives, unknown_findings=()):
  """1 at the `positives`, NaN at every location of the `unknown_findings`, 0 elsewhere."""
  return np.array([1.0 if name in positives else np.nan if name.split("|")[0] in unknown_findings
                   else 0.0 for name in VOCABULARY], np.float32)


# The fine labels of fx.USER_FINE_LABELS by image; an image absent from it has ALL_UNKNOWN.
USER_FINE = {
    "00000001_000.png": fine_vector([]),
    "00000001_001.png": fine_vector(["Effusion|right|lower", "Infiltration|left|upper"]),
    "00000003_000.png": fine_vector(
        ["Nodule|left|lower", "Mass|right|upper", "Nodule|right|middle"],
        unknown_findings=["Pleural_Thickening"]),
    "00000005_000.png": fine_vector(["Infiltration|right|middle", "Mass|left|middle"]),
}
UNLABELLED = len(IMAGE_IDS) - len(USER_FINE)


def examples_by_id(out):
  return {ex.image_id: ex for exs in read_all(out).values() for ex in exs}


def test_user_fine_labels_csv(src, tmp_path):
  csv = fx.write_fine_labels(tmp_path / "labels" / "imagenome_fine.csv")
  manifest = convert(src, tmp_path / "out", fine_labels=str(csv))
  assert manifest["fine_label_names"] == list(VOCABULARY) and manifest["anatomy_names"] == []
  assert (manifest["fine_labels_from"], manifest["fine_labels_unlabelled"]) == (
      "imagenome_fine.csv", UNLABELLED)
  assert manifest["boxes_from"] == "BBox_List_2017.csv" and manifest["skipped"]["count"] == 0
  examples = examples_by_id(tmp_path / "out")
  assert sorted(examples) == IMAGE_IDS
  for image_id, ex in examples.items():
    np.testing.assert_array_equal(ex.fine_labels, USER_FINE.get(image_id, ALL_UNKNOWN),
                                  err_msg=image_id)
    assert ex.anatomy is None
  assert len(examples["00000005_000.png"].boxes) == 2  # boxes still come from BBox_List

  counts = {kind: np.sum([v["fine_label_counts"][kind] for v in manifest["splits"].values()], 0)
            for kind in ("positive", "negative", "uncertain", "unknown")}
  column = {name: VOCABULARY.index(name) for name in (
      "Mass|left|middle", "Effusion|right|lower", "Pleural_Thickening|left|upper")}
  assert [counts["positive"][column[n]] for n in column] == [1, 1, 0]
  # Of the labelled images, 00000003_000 has Pleural_Thickening but does not locate it.
  assert [counts["negative"][column[n]] for n in column] == [3, 3, 3]
  assert [counts["unknown"][column[n]] for n in column] == [
      UNLABELLED, UNLABELLED, UNLABELLED + 1]
  assert not counts["uncertain"].any()


# name: (breaks the CSV, text of the row named, message part, the image the skipped row leaves
# with unknown fine labels)
FINE_BAD_INPUTS = {
    "unknown fine label": (
        lambda p: fx.edit(p, "Nodule|left|lower", "Tumor|left|lower"), "00000003_000.png",
        "unknown fine label 'Tumor|left|lower'", "00000003_000.png"),
    "bad location": (
        lambda p: fx.edit(p, "Mass|left|middle", "Mass|centre|middle"), "00000005_000.png",
        "bad location 'centre'", "00000005_000.png"),
    "not a fine label": (
        lambda p: fx.edit(p, "Effusion|right|lower", "Effusion|right"), "00000001_001.png",
        "'Effusion|right' is not a fine label", "00000001_001.png"),
    "malformed row": (
        lambda p: fx.edit(p, "Infiltration|left|upper", "Infiltration|left|upper,oops"),
        "00000001_001.png", "malformed row: 4 fields, expected 3", "00000001_001.png"),
    "image not in Data_Entry": (
        lambda p: fx.append_line(p, "imagenome,00000099_000.png,Mass|left|middle"),
        "00000099_000.png",
        f"fine labels for 00000099_000.png, which is not in {{src}}/{DATA_ENTRY}", None),
    "duplicate row": (
        lambda p: fx.append_line(p, "chexpert,00000001_001.png,Effusion|right|lower"), "chexpert,",
        "00000001_001.png is also at row 3", "00000001_001.png"),
    "finding not in the image's Finding Labels": (  # 00000005_000 is row 10 of Data_Entry
        lambda p: fx.edit(p, "Infiltrate|right|middle", "Effusion|right|middle"),
        "00000005_000.png", "Effusion|right|middle contradicts the Finding Labels "
        f"'Infiltration|Mass' of 00000005_000.png ({{src}}/{DATA_ENTRY} row 10)",
        "00000005_000.png"),
}


def _broken_fine_labels(src, tmp_path, case):
  breaks, row_text, reason, unknown = FINE_BAD_INPUTS[case]
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  breaks(csv)
  return csv, fx.line_of(csv, row_text), reason.format(src=src), unknown


@pytest.mark.parametrize("case", list(FINE_BAD_INPUTS))
def test_bad_fine_labels_raise_with_file_and_row(src, tmp_path, case):
  csv, row, reason, _ = _broken_fine_labels(src, tmp_path, case)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", fine_labels=str(csv))
  assert (error.value.file, error.value.row) == (str(csv), row)
  assert f"{csv}, row {row}: " in str(error.value) and reason in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["labels", "src"]


@pytest.mark.parametrize("case", list(FINE_BAD_INPUTS))
def test_skip_bad_fine_labels_row_leaves_them_unknown(src, tmp_path, case):
  """A bad row is skipped and recorded; its image is written, with unknown fine labels (of a
  duplicate, neither row is trusted)."""
  csv, row, reason, unknown = _broken_fine_labels(src, tmp_path, case)
  manifest = convert(src, tmp_path / "out", fine_labels=str(csv), skip_bad=True)
  [item] = manifest["skipped"]["items"]
  assert (item["file"], item["row"]) == (str(csv), row) and reason in item["reason"]
  assert "image" not in item
  examples = examples_by_id(tmp_path / "out")
  assert sorted(examples) == IMAGE_IDS
  for image_id, ex in examples.items():
    expected = ALL_UNKNOWN if image_id == unknown else USER_FINE.get(image_id, ALL_UNKNOWN)
    np.testing.assert_array_equal(ex.fine_labels, expected, err_msg=image_id)
  assert manifest["fine_labels_unlabelled"] == UNLABELLED + (unknown is not None)


def test_fine_labels_header_names_both_columns(src, tmp_path):
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  fx.edit(csv, "Fine Labels", "Labels")
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", fine_labels=str(csv), skip_bad=True)
  assert (error.value.file, error.value.row) == (str(csv), 1)
  assert "header lacks columns ['Fine Labels']" in str(error.value)


def test_fine_labels_and_phantom_extras_exclude_each_other(tmp_path):
  src = fx.write_nih(tmp_path / "src", extras=True)
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  for skip_bad in (False, True):
    with pytest.raises(BadInputError) as error:
      convert(src, tmp_path / "out", fine_labels=str(csv), skip_bad=skip_bad)
    assert (error.value.file, error.value.row) == (str(csv), None)
    assert f"cannot be combined with {src / 'phantom_extras'}" in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["labels", "src"]


def test_command_line_fine_labels(src, tmp_path):
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  args = ["--out", str(tmp_path / "out"), "--image-size", str(SIZE), "--workers", "1",
          "--fine-labels", str(csv)]
  nih.main(args + ["--src", str(src)])
  manifest = writer.load_manifest(tmp_path / "out")
  assert (manifest["fine_labels_from"], manifest["fine_labels_unlabelled"]) == (
      "fine.csv", UNLABELLED)
  phantom = fx.write_nih(tmp_path / "phantom", extras=True)
  with pytest.raises(SystemExit) as done:
    nih.main(args + ["--src", str(phantom), "--overwrite"])
  assert str(done.value.code).startswith(f"error: {csv}: --fine-labels cannot be combined")
  assert writer.load_manifest(tmp_path / "out") == manifest


def test_image_conversion_to_8_bit_gray():
  sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16))
  np.testing.assert_array_equal(np.asarray(common.to_gray8(sixteen)), [[0, 100], [255, 7]])
  rgba = Image.fromarray(np.full((2, 2, 4), 90, np.uint8), "RGBA")
  np.testing.assert_array_equal(np.asarray(common.to_gray8(rgba)), 90)
  blocks = Image.fromarray(np.kron([[0, 100], [200, 40]], np.ones((3, 3))).astype(np.uint8), "L")
  np.testing.assert_array_equal(np.asarray(common.resize_area(blocks, 2)), [[0, 100], [200, 40]])


def test_prepare_image_reports_unreadable_files(tmp_path):
  result = common.prepare_image(common.ImageJob(str(tmp_path / "absent.png"), SIZE))
  assert result.png == b"" and "absent.png" in result.error


def test_refuses_a_non_empty_out_unless_overwrite(src, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    convert(src, out)
  assert (out / "keep.txt").exists()
  convert(src, out, overwrite=True)
  assert sorted(os.listdir(out))[:2] == ["cxr_manifest.json", "dataset_info.json"]


def test_command_line(src, tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, "-m", "data_prep.nih", "--src", str(src), "--out", str(out),
             "--image-size", str(SIZE), "--val-fraction", "0.25", "--seed", "3", "--workers", "2"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  manifest = json.loads((out / "cxr_manifest.json").read_text())
  assert manifest["seed"] == 3 and sum(v["num_records"] for v in manifest["splits"].values()) == 11
  assert [ex.image_id for ex in read_split(out, "test")] == [
      "00000005_000.png", "00000005_001.png", "00000006_000.png"]
  # A bad image stops the workers; the previous dataset stays, and no partial folder is left.
  _write_bytes(src / "images" / "00000004_000.png", b"")
  done = subprocess.run(command + ["--overwrite"], cwd=root, capture_output=True, text=True,
                        check=False)
  assert done.returncode != 0
  row = fx.line_of(src / DATA_ENTRY, "00000004_000.png")
  assert f"{src / DATA_ENTRY}, row {row}: cannot read image" in done.stderr
  assert json.loads((out / "cxr_manifest.json").read_text()) == manifest
  assert sorted(os.listdir(tmp_path)) == ["out", "src"]


# Custom split lists in HAM's format: image-level (patients 2 and 5 have images in train and
# test), two images listed nowhere, and the two images with boxes in BBox_List marked.
CUSTOM_LISTS = dict(
    train=["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png",
           "00000004_000.png", "00000005_000.png", "00000006_000.png"],
    test=["00000002_001.png", "00000005_001.png"],
    box=["00000005_000.png", "00000006_000.png"],
)
UNLISTED = {"00000001_002.png", "00000004_001.png"}


def write_lists(folder, lists):
  """Writes each list as `<folder>/<name>.txt` (no newline after the last line); returns the
  paths by name."""
  folder.mkdir(exist_ok=True)
  paths = {}
  for name, image_ids in lists.items():
    paths[name] = folder / f"{name}.txt"
    paths[name].write_text("\n".join(image_ids))
  return paths


def convert_with_lists(src, out, paths, **kwargs):
  return convert(src, out, **{f"{name}_list": str(path) for name, path in paths.items()}, **kwargs)


def seed_carving_one_of(patients, protected, fraction):
  """A seed whose carve of all `patients` would take one of `protected` into validation."""
  return next(s for s in range(100)
              if common.carve_by_patient(patients, fraction, s) & set(protected))


def test_custom_lists_define_the_splits_and_mark_box_images(src, tmp_path):
  paths = write_lists(tmp_path / "lists", CUSTOM_LISTS)
  # Without the protection of box patients, this seed would carve patient 5 or 6 into val.
  seed = seed_carving_one_of(["1", "2", "3", "4", "5", "6"], ["5", "6"], 0.25)
  manifest = convert_with_lists(src, tmp_path / "out", paths, val_fraction=0.25, seed=seed)
  records = read_all(tmp_path / "out")
  ids = {split: {ex.image_id for ex in examples} for split, examples in records.items()}
  assert ids["test"] == set(CUSTOM_LISTS["test"])
  assert ids["train"] | ids["val"] == set(CUSTOM_LISTS["train"])
  assert not UNLISTED & set().union(*ids.values())
  val_patients = {ex.patient_id for ex in records["val"]}
  assert val_patients == common.carve_by_patient(["1", "2", "3", "4"], 0.25, seed)
  assert val_patients.isdisjoint({ex.patient_id for ex in records["train"]})

  marked = {ex.image_id for examples in records.values() for ex in examples if ex.box_supervised}
  assert marked == set(CUSTOM_LISTS["box"]) and marked <= ids["train"]
  assert {s: v["num_box_supervised"] for s, v in manifest["splits"].items()} == {
      "train": 2, "val": 0, "test": 0}
  shared = {ex.patient_id for ex in records["train"]} & {ex.patient_id for ex in records["test"]}
  assert "5" in shared
  assert manifest["patients_in_train_and_test"] == len(shared)
  assert manifest["unlisted"] == len(UNLISTED)
  assert manifest["split_lists"] == {"train": "train.txt", "test": "test.txt"}
  assert manifest["box_list"] == "box.txt"
  assert (manifest["val_fraction"], manifest["seed"], manifest["val_patients"]) == (
      0.25, seed, len(val_patients))
  assert manifest["skipped"]["count"] == 0


def test_val_list_replaces_the_carve(src, tmp_path):
  lists = dict(CUSTOM_LISTS, val=["00000001_002.png", "00000004_001.png"])
  manifest = convert_with_lists(src, tmp_path / "out", write_lists(tmp_path / "lists", lists),
                                val_fraction=0.5)
  records = read_all(tmp_path / "out")
  for split in ("train", "val", "test"):
    assert [ex.image_id for ex in records[split]] == sorted(lists[split]), split
  assert manifest["split_lists"] == {"train": "train.txt", "test": "test.txt", "val": "val.txt"}
  assert (manifest["val_fraction"], manifest["val_patients"], manifest["unlisted"]) == (None, 2, 0)


def test_official_lists_without_a_box_list_mark_nothing(src, tmp_path):
  manifest = convert(src, tmp_path / "out")
  assert not any(ex.box_supervised for exs in read_all(tmp_path / "out").values() for ex in exs)
  assert all(v["num_box_supervised"] == 0 for v in manifest["splits"].values())
  assert manifest["split_lists"] == {"train_val": "train_val_list.txt", "test": "test_list.txt"}
  assert (manifest["box_list"], manifest["unlisted"], manifest["patients_in_train_and_test"]) == (
      None, 0, 0)


def test_box_list_with_the_official_split_keeps_box_patients_in_train(tmp_path):
  src = fx.write_nih(tmp_path / "src", extras=True)  # fine_labels.csv boxes 00000001_001
  paths = write_lists(tmp_path / "lists", dict(box=["00000001_001.png"]))
  seed = seed_carving_one_of(["1", "2", "3", "4"], ["1"], 0.25)
  manifest = convert(src, tmp_path / "out", box_list=str(paths["box"]), val_fraction=0.25,
                     seed=seed)
  records = read_all(tmp_path / "out")
  assert [ex.image_id for ex in records["train"] if ex.box_supervised] == ["00000001_001.png"]
  assert not any(ex.box_supervised for split in ("val", "test") for ex in records[split])
  assert {ex.patient_id for ex in records["val"]} == common.carve_by_patient(
      ["2", "3", "4"], 0.25, seed)
  assert manifest["splits"]["train"]["num_box_supervised"] == 1
  assert manifest["box_list"] == "box.txt"


# name: (list and image id appended to it, the error's reason with {list} paths, images left out)
CUSTOM_BAD_INPUTS = {
    "image in two lists": (
        ("test", "00000003_000.png"), "also listed in {train} row 4", {"00000003_000.png"}),
    "list entry not in Data_Entry": (
        ("train", "00000099_000.png"), f"00000099_000.png is not in {{src}}/{DATA_ENTRY}", set()),
    "box-list image in the test list": (
        ("box", "00000005_001.png"), "is listed in {test} row 2, not in the training split", set()),
    "box-list image in no list": (
        ("box", "00000001_002.png"), "is in no split list, not in the training split", set()),
    "box-list image without a box": (
        ("box", "00000001_000.png"), "has no box in BBox_List_2017.csv", set()),
}


def _broken_lists(src, tmp_path, case):
  (name, image_id), reason, left_out = CUSTOM_BAD_INPUTS[case]
  lists = {key: list(ids) for key, ids in CUSTOM_LISTS.items()}
  lists[name].append(image_id)
  paths = write_lists(tmp_path / "lists", lists)
  reason = reason.format(src=src, **paths)
  return paths, paths[name], fx.line_of(paths[name], image_id), reason, left_out


@pytest.mark.parametrize("case", list(CUSTOM_BAD_INPUTS))
def test_bad_custom_list_raises_with_file_and_row(src, tmp_path, case):
  paths, file, row, reason, _ = _broken_lists(src, tmp_path, case)
  with pytest.raises(BadInputError) as error:
    convert_with_lists(src, tmp_path / "out", paths)
  assert (error.value.file, error.value.row) == (str(file), row)
  assert f"{file}, row {row}: " in str(error.value) and reason in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["lists", "src"]


@pytest.mark.parametrize("case", list(CUSTOM_BAD_INPUTS))
def test_skip_bad_custom_list_entry(src, tmp_path, case):
  """A bad list entry is skipped and recorded; a bad box-list entry leaves its image unmarked."""
  paths, file, row, reason, left_out = _broken_lists(src, tmp_path, case)
  manifest = convert_with_lists(src, tmp_path / "out", paths, skip_bad=True)
  [item] = manifest["skipped"]["items"]
  assert (item["file"], item["row"]) == (str(file), row) and reason in item["reason"]
  examples = [ex for exs in read_all(tmp_path / "out").values() for ex in exs]
  listed = set(CUSTOM_LISTS["train"] + CUSTOM_LISTS["test"]) - left_out
  assert sorted(ex.image_id for ex in examples) == sorted(listed)
  assert {ex.image_id for ex in examples if ex.box_supervised} == set(CUSTOM_LISTS["box"])


def test_train_and_test_lists_go_together(src, tmp_path):
  paths = write_lists(tmp_path / "lists", CUSTOM_LISTS)
  for given in (dict(train_list=str(paths["train"])), dict(test_list=str(paths["test"])),
                dict(val_list=str(paths["train"]))):
    with pytest.raises(nih.ListOptionsError, match="--(train|val)-list"):
      convert(src, tmp_path / "out", **given)
  assert sorted(os.listdir(tmp_path)) == ["lists", "src"]


def test_command_line_split_lists(src, tmp_path, capsys):
  paths = write_lists(tmp_path / "lists", CUSTOM_LISTS)
  args = ["--src", str(src), "--out", str(tmp_path / "out"), "--image-size", str(SIZE),
          "--workers", "1"]
  with pytest.raises(SystemExit) as done:
    nih.main(args + ["--train-list", str(paths["train"])])
  assert done.value.code == 2
  assert "--train-list and --test-list go together" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["lists", "src"]
  nih.main(args + ["--train-list", str(paths["train"]), "--test-list", str(paths["test"]),
                   "--box-list", str(paths["box"])])
  manifest = writer.load_manifest(tmp_path / "out")
  assert (manifest["split_lists"]["train"], manifest["box_list"]) == ("train.txt", "box.txt")
  assert manifest["splits"]["train"]["num_box_supervised"] == 2
