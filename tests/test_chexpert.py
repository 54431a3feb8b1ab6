"""Tests of data_prep.chexpert on small folders in CheXpert v1.0's exact formats."""

import copy
import dataclasses
import io
import os

import numpy as np
import pytest
from PIL import Image

import chexpert_fixtures as fx
from cxr_jax import evaluate, train
from cxr_jax.data import labels, writer
from datasets import read_all, read_split
from data_prep import chexpert, common
from test_end_to_end import REPO, load_config
from data_prep.common import BadInputError
from nih_fixtures import OUTSIDE, append_line, edit, line_of, link_outside

SIZE = 16
SMALL = fx.LAYOUTS["small"]
TRAIN_CSV = f"{SMALL}/train.csv"
VALID_CSV = f"{SMALL}/valid.csv"
ALL = fx.TRAIN + fx.VALID
BY_ID = {x.image_id: x for x in ALL + fx.TEST}
FRONTAL_IDS = sorted(x.image_id for x in ALL if x.frontal_lateral == "Frontal")
TRAIN_PATIENTS = sorted({x.patient for x in fx.TRAIN})
EXPECTED_VIEW = {"PA": "PA", "AP": "AP", "LL": "LL", "RL": "RL", "": "FRONTAL"}


def convert(src, out, **kwargs):
  return chexpert.convert(str(src), str(out), image_size=SIZE, workers=1, **kwargs)


def ids_by_split(out):
  return {split: [ex.image_id for ex in exs] for split, exs in read_all(out).items()}


def examples_by_id(out):
  return {ex.image_id: ex for exs in read_all(out).values() for ex in exs}


def expected_view(xray):
  return "LATERAL" if xray.frontal_lateral == "Lateral" else EXPECTED_VIEW[xray.ap_pa]


@pytest.fixture
def src(tmp_path):
  return fx.write_chexpert(tmp_path / "src")


@pytest.fixture
def full_src(tmp_path):
  return fx.write_chexpert(tmp_path / "src", layout="full")


def test_header_spells_the_project_labels():
  assert tuple(labels.canonical(c) for c in chexpert.LABEL_COLUMNS) == labels.CHEXPERT_LABELS
  assert ",".join(chexpert.HEADER) == fx.HEADER


def test_converts_small_layout_and_round_trips(src, tmp_path):
  out = tmp_path / "out"
  manifest = convert(src, out, val_fraction=0.2, seed=0)
  counts = {s: v["num_records"] for s, v in manifest["splits"].items()}
  assert counts == {"train": 5, "val": 2, "test": 2}
  assert manifest["label_names"] == list(labels.CHEXPERT_LABELS)
  assert manifest["layout"] == SMALL
  assert manifest["csv_files"] == {"train": "train.csv", "test": "valid.csv"}
  assert (manifest["views"], manifest["views_filtered_out"]) == ("frontal", 3)
  assert manifest["view_counts"] == {"AP": 3, "FRONTAL": 1, "LL": 1, "PA": 3, "RL": 1}
  assert (manifest["val_fraction"], manifest["seed"], manifest["val_patients"]) == (0.2, 0, 1)
  assert manifest["patients_in_train_and_eval"] == 0 and manifest["boxes_from"] is None
  assert manifest["skipped"] == {"count": 0, "items": []}

  records = read_all(out)
  for split, examples in records.items():
    ids = [ex.image_id for ex in examples]
    assert ids == sorted(ids), split
  assert sorted(ex.image_id for exs in records.values() for ex in exs) == FRONTAL_IDS
  # valid.csv is the test split; validation is carved from train.csv by patient, over all of
  # its patients (patient 00001's lateral included).
  assert [ex.image_id for ex in records["test"]] == [
      "valid/patient64541/study1/view1_frontal.jpg", "valid/patient64542/study1/view1_frontal.jpg"]
  val_patients = {ex.patient_id for ex in records["val"]}
  assert val_patients == common.carve_by_patient(TRAIN_PATIENTS, 0.2, 0)
  assert val_patients.isdisjoint({ex.patient_id for ex in records["train"]})

  for ex in (ex for exs in records.values() for ex in exs):
    xray = BY_ID[ex.image_id]
    np.testing.assert_array_equal(ex.labels, fx.label_vector(xray))  # NaN where blank
    assert (ex.patient_id, ex.study_id, ex.view) == (xray.patient, xray.study,
                                                     expected_view(xray))
    image = Image.open(io.BytesIO(ex.image))
    assert (image.mode, image.size) == ("L", (SIZE, SIZE))
    assert np.abs(np.asarray(image, np.int16) - xray.value).max() <= 1  # flat JPEG, area resize
    assert len(ex.boxes) == 0

  by_id = examples_by_id(out)
  ex = by_id["train/patient00001/study1/view1_frontal.jpg"]
  np.testing.assert_array_equal(
      ex.labels, [np.nan, np.nan, 1, np.nan, np.nan, -1, np.nan, np.nan, np.nan, 0, 1, np.nan,
                  np.nan, np.nan])
  assert labels.CHEXPERT_LABELS[10] == "Effusion" and ex.labels[10] == 1
  assert by_id["train/patient00002/study2/view1_frontal.jpg"].study_id == "patient00002/study2"

  # The manifest's value counts are of the stored 1/0/-1/NaN, no policy applied.
  uncertain = sum(np.array(v["label_counts"]["uncertain"]) for v in manifest["splits"].values())
  unknown = sum(np.array(v["label_counts"]["unknown"]) for v in manifest["splits"].values())
  frontal = [BY_ID[i] for i in FRONTAL_IDS]
  assert uncertain.tolist() == [sum(x.labels[k] == "-1.0" for x in frontal) for k in range(14)]
  assert unknown.tolist() == [sum(x.labels[k] == "" for x in frontal) for k in range(14)]
  assert not manifest["splits"]["test"]["label_counts"]["uncertain"][2]


def test_views_all_keeps_laterals_and_the_same_val_patients(src, tmp_path):
  convert(src, tmp_path / "frontal", val_fraction=0.4, seed=3)
  manifest = convert(src, tmp_path / "all", val_fraction=0.4, seed=3, views="all")
  assert (manifest["views"], manifest["views_filtered_out"]) == ("all", 0)
  assert manifest["view_counts"]["LATERAL"] == 3
  examples = examples_by_id(tmp_path / "all")
  assert sorted(examples) == sorted(x.image_id for x in ALL)
  lateral = examples["train/patient00001/study1/view2_lateral.jpg"]
  assert (lateral.view, lateral.study_id) == ("LATERAL", "patient00001/study1")
  assert examples["valid/patient64541/study1/view2_lateral.jpg"].view == "LATERAL"

  def val_patients(out):
    return {ex.patient_id for ex in read_split(out, "val")}

  assert val_patients(tmp_path / "all") == val_patients(tmp_path / "frontal") == (
      common.carve_by_patient(TRAIN_PATIENTS, 0.4, 3))


def test_test_csv_is_the_test_split_and_valid_the_val_split(src, tmp_path):
  test_csv = fx.write_test_csv(src, tmp_path / "labels" / "test_labels.csv")
  manifest = convert(src, tmp_path / "out", test_csv=str(test_csv), val_fraction=0.5)
  ids = ids_by_split(tmp_path / "out")
  assert ids["test"] == [x.image_id for x in fx.TEST]
  assert ids["val"] == ["valid/patient64541/study1/view1_frontal.jpg",
                        "valid/patient64542/study1/view1_frontal.jpg"]
  assert ids["train"] == [i for i in FRONTAL_IDS if i.startswith("train/")]  # nothing carved
  assert manifest["csv_files"] == {"train": "train.csv", "val": "valid.csv",
                                   "test": "test_labels.csv"}
  assert (manifest["val_fraction"], manifest["val_patients"]) == (None, 2)
  for ex in read_split(tmp_path / "out", "test"):
    np.testing.assert_array_equal(ex.labels, fx.label_vector(BY_ID[ex.image_id]))


def test_boxes_from_ham_json_are_normalised_by_the_full_resolution_image(full_src, tmp_path):
  boxes = copy.deepcopy(fx.BOXES)
  # Half a pixel past the right edge: tolerated (whole-pixel rounding) and clipped.
  boxes["train/patient00002/study2/view1_frontal.jpg"]["Enlarged_Cardiomediastinum"] = [
      [8, 4, 40.5, 28]]
  # A key may carry the layout folder.
  boxes[f"CheXpert-v1.0/{fx.VALID[2].image_id}"] = {"Pneumothorax": [[20, 0, 40, 16]]}
  boxes_json = fx.write_boxes(tmp_path / "ham" / "BBoxes.json", boxes)
  manifest = convert(full_src, tmp_path / "out", boxes=str(boxes_json), val_fraction=0.0)
  assert manifest["layout"] == "CheXpert-v1.0"
  assert (manifest["boxes_from"], manifest["boxes_on_filtered_views"]) == ("BBoxes.json", 1)
  assert {s: v["num_boxes"] for s, v in manifest["splits"].items()} == {"train": 6, "test": 1}
  assert manifest["skipped"]["count"] == 0
  examples = examples_by_id(tmp_path / "out")

  def names(ex):
    return [labels.CHEXPERT_LABELS[i] for i in ex.box_labels]

  ex = examples["train/patient00001/study1/view1_frontal.jpg"]  # 40 x 32 pixels
  assert names(ex) == ["Effusion", "Edema", "Edema"]
  np.testing.assert_allclose(ex.boxes, [[0.1, 0.25, 0.5, 0.75], [0, 0, 1, 1],
                                        [0.25, 0.5, 0.75, 0.875]])
  ex = examples["train/patient00002/study1/view1_frontal.jpg"]  # 48 x 40 pixels
  assert names(ex) == ["Enlarged Cardiomediastinum", "Lung Opacity"]
  np.testing.assert_allclose(ex.boxes, [[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1, 1]])
  ex = examples["train/patient00002/study2/view1_frontal.jpg"]
  assert names(ex) == ["Enlarged Cardiomediastinum"]
  np.testing.assert_allclose(ex.boxes, [[0.2, 0.125, 1.0, 0.875]])
  ex = examples["valid/patient64542/study1/view1_frontal.jpg"]
  np.testing.assert_allclose(ex.boxes, [[0.5, 0, 1, 0.5]])
  assert len(examples["train/patient00003/study1/view1_frontal.jpg"].boxes) == 0

  # With the laterals converted, the lateral's box is used too.
  manifest = convert(full_src, tmp_path / "all", boxes=str(boxes_json), views="all",
                     val_fraction=0.0)
  assert manifest["boxes_on_filtered_views"] == 0
  lateral = examples_by_id(tmp_path / "all")["train/patient00001/study1/view2_lateral.jpg"]
  assert names(lateral) == ["Atelectasis"]
  np.testing.assert_allclose(lateral.boxes, [[0.05, 2 / 32, 0.25, 10 / 32]])


def test_box_class_names_are_normalised():
  index = labels.CHEXPERT_LABELS.index
  for name, label in (("edema", "Edema"), ("Pleural_Effusion", "Effusion"),
                      ("Enlarg_Cardiomediastinum", "Enlarged Cardiomediastinum"),
                      ("Lung_Opacity", "Lung Opacity"), ("Effusion", "Effusion"),
                      ("support_devices", "Support Devices")):
    assert chexpert.box_label_index(name) == index(label), name
  for name in ("Tumour", "No_Finding", "Pleural_Thickening"):
    with pytest.raises(ValueError, match="unknown box class"):
      chexpert.box_label_index(name)


def test_boxes_are_refused_with_the_small_layout(src, tmp_path):
  boxes_json = fx.write_boxes(tmp_path / "boxes.json")
  for skip_bad in (False, True):
    with pytest.raises(BadInputError) as error:
      convert(src, tmp_path / "out", boxes=str(boxes_json), skip_bad=skip_bad)
    assert (error.value.file, error.value.row) == (str(boxes_json), None)
    assert "full-resolution pixels" in str(error.value) and "CheXpert-v1.0 instead" in str(
        error.value)
  assert sorted(os.listdir(tmp_path)) == ["boxes.json", "src"]


def test_both_layouts_need_the_layout_option(src, tmp_path):
  fx.write_chexpert(src, layout="full")
  with pytest.raises(common.OptionsError, match="--layout small or --layout full"):
    convert(src, tmp_path / "out")
  assert convert(src, tmp_path / "out", layout="full")["layout"] == "CheXpert-v1.0"
  with pytest.raises(FileNotFoundError, match="neither CheXpert-v1.0-small nor CheXpert-v1.0"):
    convert(tmp_path / "out", tmp_path / "other")


@pytest.mark.parametrize("header", [
    fx.HEADER.replace("Pleural Effusion", "Effusion"),
    fx.HEADER.replace("Path,Sex,Age", "Path,Age,Sex"),
    fx.HEADER.rpartition(",")[0],
])
def test_a_wrong_header_is_an_error_even_with_skip_bad(src, tmp_path, header):
  edit(src / VALID_CSV, fx.HEADER, header)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", skip_bad=True)
  assert (error.value.file, error.value.row) == (str(src / VALID_CSV), 1)
  assert "expected exactly" in str(error.value)
  assert os.listdir(tmp_path) == ["src"]


def _replace_row(src, csv, image_id, **changes):
  """Rewrites the CSV row of an image with some of its cells changed."""
  xray = BY_ID[image_id]
  edit(src / csv, fx.row_text(xray), fx.row_text(dataclasses.replace(xray, **changes)))


def _set_label(src, image_id, column, value):
  cells = list(BY_ID[image_id].labels)
  cells[chexpert.LABEL_COLUMNS.index(column)] = value
  _replace_row(src, TRAIN_CSV, image_id, labels=tuple(cells))


def _drop_cells(xray, count):
  """The CSV row of an image without its last `count` cells."""
  return ",".join(fx.row_text(xray).split(",")[:-count])


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)


P4 = "train/patient00004/study1/view1_frontal.jpg"
P6 = "train/patient00006/study1/view1_frontal.jpg"
ESCAPING = f"{SMALL}/../../outside/patient00009/study1/view1_frontal.jpg"
ABSOLUTE = f"/data/{SMALL}/train/patient00009/study1/view1_frontal.jpg"
OTHER_LAYOUT = "CheXpert-v1.0/train/patient00009/study1/view1_frontal.jpg"
NO_STUDY = f"{SMALL}/train/patient00009/view1_frontal.jpg"


def _extra_row(path):
  return f"{path},Male,40,Frontal,PA" + ",1.0" * 14


# name: (breaks the source, CSV and text of the row expected in the error, message part,
# images left out)
BAD_INPUTS = {
    "missing image": (
        lambda s: os.remove(s / SMALL / P4),
        TRAIN_CSV, P4, "not found", {P4}),
    "corrupt image": (
        lambda s: _write_bytes(s / SMALL / P6, b"\xff\xd8\xff\xe0broken"),
        TRAIN_CSV, P6, "cannot read image", {P6}),
    "empty image": (
        lambda s: _write_bytes(s / SMALL / P6, b""),
        TRAIN_CSV, P6, "cannot read image", {P6}),
    "image linked from outside src": (
        lambda s: link_outside(s, s / SMALL / P4),
        TRAIN_CSV, P4, f"{P4} is a link to", {P4}),
    "image folder linked from outside src": (
        lambda s: link_outside(s, s / SMALL / "train" / "patient00006"),
        TRAIN_CSV, P6, "outside --src", {P6}),
    "bad label value": (
        lambda s: _set_label(s, P4, "Edema", "yes"),
        TRAIN_CSV, P4, "column 'Edema': 'yes' is not 1.0, 0.0, -1.0 or blank", {P4}),
    "label value 2.0": (
        lambda s: _set_label(s, P6, "Pleural Effusion", "2.0"),
        TRAIN_CSV, P6, "column 'Pleural Effusion': '2.0'", {P6}),
    "bad Frontal/Lateral": (
        lambda s: _replace_row(s, TRAIN_CSV, P4, frontal_lateral="Oblique"),
        TRAIN_CSV, P4, "column 'Frontal/Lateral': 'Oblique' is neither", {P4}),
    "bad AP/PA": (
        lambda s: _replace_row(s, TRAIN_CSV, P6, ap_pa="XX"),
        TRAIN_CSV, P6, "column 'AP/PA': 'XX' is none of", {P6}),
    "malformed row": (
        lambda s: edit(s / TRAIN_CSV, fx.row_text(BY_ID[P4]), _drop_cells(BY_ID[P4], 3)),
        TRAIN_CSV, P4, "malformed row", {P4}),
    "path escaping src": (
        lambda s: append_line(s / TRAIN_CSV, _extra_row(ESCAPING)),
        TRAIN_CSV, "outside", "escapes --src", {ESCAPING}),
    "absolute path": (
        lambda s: append_line(s / TRAIN_CSV, _extra_row(ABSOLUTE)),
        TRAIN_CSV, "/data/", "is absolute", {ABSOLUTE}),
    "path of the other layout": (
        lambda s: append_line(s / VALID_CSV, _extra_row(OTHER_LAYOUT)),
        VALID_CSV, OTHER_LAYOUT, f"does not start with {SMALL}/", {OTHER_LAYOUT}),
    "path without a study": (
        lambda s: append_line(s / TRAIN_CSV, _extra_row(NO_STUDY)),
        TRAIN_CSV, NO_STUDY, "is not CheXpert-v1.0-small/<folder>/patientNNNNN/studyN/<image>",
        {NO_STUDY}),
    "image in two rows": (
        lambda s: append_line(s / VALID_CSV, fx.row_text(BY_ID[P6])),
        VALID_CSV, P6, f"/{TRAIN_CSV} row 10", {P6}),
}


def _check_error(error, src, file, row_text, reason):
  row = line_of(src / file, row_text)
  assert (error.file, error.row) == (str(src / file), row)
  assert f"{src / file}, row {row}: " in str(error) and reason in str(error), str(error)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_with_file_and_row(src, tmp_path, case):
  breaks, file, row_text, reason, _ = BAD_INPUTS[case]
  breaks(src)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", views="all")
  _check_error(error.value, src, file, row_text, reason)
  # Neither the dataset nor a partial folder (OUTSIDE holds what a case links to).
  assert set(os.listdir(tmp_path)) - {OUTSIDE} == {"src"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_skip_bad_skips_and_records(src, tmp_path, case):
  breaks, file, row_text, reason, left_out = BAD_INPUTS[case]
  breaks(src)
  row = line_of(src / file, row_text)
  manifest = convert(src, tmp_path / "out", skip_bad=True)
  skipped = manifest["skipped"]
  assert skipped["count"] == len(skipped["items"]) == 1
  item = skipped["items"][0]
  assert (item["file"], item["row"], item["image"]) == (str(src / file), row, *left_out)
  assert reason in item["reason"]
  written = sorted(examples_by_id(tmp_path / "out"))
  assert written == sorted(set(FRONTAL_IDS) - left_out)
  assert sum(v["num_records"] for v in manifest["splits"].values()) == len(written)


def _add_box(boxes, key, name, box):
  boxes.setdefault(key, {}).setdefault(name, []).append(box)


FRONTAL_1 = "train/patient00001/study1/view1_frontal.jpg"
UNKNOWN_KEY = "train/patient00099/study1/view1_frontal.jpg"

# name: (changes the box dict, key in the error, message part)
BAD_BOXES = {
    "image not in the CSVs": (
        lambda b: _add_box(b, UNKNOWN_KEY, "Edema", [1, 2, 3, 4]),
        UNKNOWN_KEY, "no such image in the CSVs"),
    "box outside the image": (
        lambda b: _add_box(b, FRONTAL_1, "Atelectasis", [30, 20, 45, 30]),
        FRONTAL_1, "[30.0, 20.0, 45.0, 30.0] (Atelectasis) is outside the 40 x 32 image"),
    "negative corner": (
        lambda b: _add_box(b, FRONTAL_1, "Atelectasis", [-3, 0, 10, 10]),
        FRONTAL_1, "is outside the 40 x 32 image"),
    "unknown class": (
        lambda b: _add_box(b, FRONTAL_1, "Tumour", [1, 2, 3, 4]),
        FRONTAL_1, "unknown box class 'Tumour'"),
    "xmax <= xmin": (
        lambda b: _add_box(b, FRONTAL_1, "edema", [20, 8, 20, 24]),
        FRONTAL_1, "class 'edema': box [20, 8, 20, 24] needs xmax > xmin and ymax > ymin"),
    "three numbers": (
        lambda b: _add_box(b, FRONTAL_1, "Edema", [1, 2, 3]),
        FRONTAL_1, "box [1, 2, 3] is not [xmin, ymin, xmax, ymax]"),
}


def _bad_boxes_file(tmp_path, case):
  boxes = copy.deepcopy(fx.BOXES)
  BAD_BOXES[case][0](boxes)
  return fx.write_boxes(tmp_path / "boxes.json", boxes)


@pytest.mark.parametrize("case", list(BAD_BOXES))
def test_bad_box_raises_with_file_and_key(full_src, tmp_path, case):
  boxes_json = _bad_boxes_file(tmp_path, case)
  _, key, reason = BAD_BOXES[case]
  with pytest.raises(BadInputError) as error:
    convert(full_src, tmp_path / "out", boxes=str(boxes_json))
  assert (error.value.file, error.value.row) == (str(boxes_json), None)
  assert str(error.value).startswith(f"{boxes_json}: {key}: ") and reason in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["boxes.json", "src"]


@pytest.mark.parametrize("case", list(BAD_BOXES))
def test_skip_bad_leaves_out_a_bad_box(full_src, tmp_path, case):
  boxes_json = _bad_boxes_file(tmp_path, case)
  _, key, reason = BAD_BOXES[case]
  manifest = convert(full_src, tmp_path / "out", boxes=str(boxes_json), skip_bad=True)
  (item,) = manifest["skipped"]["items"]
  assert (item["file"], item["row"], "image" in item) == (str(boxes_json), None, False)
  assert item["reason"].startswith(f"{key}: ") and reason in item["reason"]
  examples = examples_by_id(tmp_path / "out")
  assert sorted(examples) == FRONTAL_IDS  # every image written, with its good boxes
  assert sum(v["num_boxes"] for v in manifest["splits"].values()) == 6
  assert len(examples[FRONTAL_1].boxes) == 3


def test_a_box_file_that_is_not_json(full_src, tmp_path):
  path = tmp_path / "boxes.json"
  path.write_text('{"train/patient00001/study1/view1_frontal.jpg": {"Edema": [[1, 2, 3, 4]]\n')
  with pytest.raises(BadInputError, match=f"{path}, row 2: not JSON"):
    convert(full_src, tmp_path / "out", boxes=str(path), skip_bad=True)
  path.write_text("[]")
  with pytest.raises(BadInputError, match=r"expected \{image path"):
    convert(full_src, tmp_path / "out", boxes=str(path))


def test_paths_are_parsed_strictly():
  image_id = "train/patient00011/study1/view1_frontal.jpg"
  assert chexpert.parse_path(f"{SMALL}/{image_id}", SMALL) == (
      image_id, "patient00011", "patient00011/study1")
  for path, reason in ((f"{SMALL}/train/../../patient00011/study1/v.jpg", "escapes --src"),
                       (f"{SMALL}\\..\\train/patient00011/study1/v.jpg", "escapes --src"),
                       (f"C:/{SMALL}/{image_id}", "is absolute"),
                       (f"/{SMALL}/{image_id}", "is absolute"),
                       (image_id, f"does not start with {SMALL}/"),
                       (f"{SMALL}/train/patient00011/study1/x/v.jpg", "is not")):
    with pytest.raises(ValueError, match=reason):
      chexpert.parse_path(path, SMALL)


def test_refuses_a_non_empty_out_unless_overwrite(src, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    convert(src, out)
  assert (out / "keep.txt").exists()
  convert(src, out, overwrite=True)
  assert not (out / "keep.txt").exists()


def test_command_line(src, tmp_path, capsys):
  out = tmp_path / "out"
  args = ["--src", str(src), "--out", str(out), "--image-size", str(SIZE), "--workers", "1",
          "--seed", "2"]
  chexpert.main(args)
  manifest = writer.load_manifest(out)
  assert manifest["seed"] == 2 and manifest["val_fraction"] == 0.1
  counts = {s: v["num_records"] for s, v in manifest["splits"].items()}
  assert counts["test"] == 2 and counts["train"] + counts["val"] == 7
  assert capsys.readouterr().out.strip() == (
      f"wrote {out}: train {counts['train']}, val {counts['val']}, test 2; "
      "3 lateral images left out; skipped 0 bad inputs")
  # A bad input: the error names the file and row, and the previous dataset stays.
  _set_label(src, P4, "Edema", "maybe")
  with pytest.raises(SystemExit) as done:
    chexpert.main(args + ["--overwrite"])
  row = line_of(src / TRAIN_CSV, P4)
  assert str(done.value.code).startswith(f"error: {src / TRAIN_CSV}, row {row}: column 'Edema'")
  assert writer.load_manifest(out) == manifest
  # Both layouts and no --layout: a usage error.
  fx.write_chexpert(src, layout="full")
  with pytest.raises(SystemExit) as done:
    chexpert.main(args + ["--overwrite"])
  assert done.value.code == 2 and "--layout" in capsys.readouterr().err


def test_label_values_are_the_release_spellings_only():
  np.testing.assert_array_equal(chexpert.parse_labels(["1.0", "0.0", "-1.0", ""] + ["0.0"] * 10),
                                [1, 0, -1, np.nan] + [0] * 10)
  for value in ("1", "0", "-1", "1.00", "yes", "nan"):
    with pytest.raises(ValueError, match=f"column 'No Finding': '{value}' is not 1.0"):
      chexpert.parse_labels([value] + [""] * 13)


def test_the_recipe_trains_on_converted_chexpert_and_reports_the_competition_labels(tmp_path):
  """The README's route: convert, then `configs/chexpert/densenet121.py:smoke` trains 14
  observations with per-label policies and reports the 5 competition ones, by study."""
  # Twice the fixture's patients, so that a global batch of 8 (one per test device) fits.
  more = tuple(dataclasses.replace(x, image_id=x.image_id.replace("patient0000", "patient0010"))
               for x in fx.TRAIN)
  fx.write_chexpert(tmp_path / "src", train=fx.TRAIN + more)
  chexpert.convert(str(tmp_path / "src"), str(tmp_path / "shards"), image_size=64, workers=1,
                   views="all")
  config = load_config(os.path.join(REPO, "configs", "chexpert", "densenet121.py"), "smoke")
  config.data.dir = str(tmp_path / "shards")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  report = evaluate.evaluate(str(tmp_path / "run"), "test", "best", n_boot=0)["classification"]
  assert list(report["classes"]) == list(labels.CHEXPERT_COMPETITION_LABELS)
  assert report["unit"] == "study (max)"
  with open(tmp_path / "run" / "predictions_test.csv") as f:
    assert f.readline().strip().split(",")[1:] == [f"prob_{n}" for n in labels.CHEXPERT_LABELS]
