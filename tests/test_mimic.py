"""Tests of data_prep.mimic on small MIMIC-CXR-JPG folders (tests/mimic_fixtures.py)."""

import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mimic_fixtures as fx
from nih_fixtures import OUTSIDE, link_outside
from cxr_jax.data import labels, writer
from datasets import read_all
from data_prep import mimic
from data_prep.common import BadInputError

SIZE = 16
SPLIT = fx.SPLIT_FILE + ".gz"
METADATA = fx.METADATA_FILE + ".gz"
CHEXPERT = fx.LABEL_FILES["chexpert"] + ".gz"
BY_NUMBER = {jpg.number: jpg for jpg in fx.IMAGES}
BY_ID = {jpg.image_id: jpg for jpg in fx.IMAGES}
OUTPUT_SPLIT = {"train": "train", "validate": "val", "test": "test"}
VALUES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0}


def image_id(number):
  return BY_NUMBER[number].image_id


def dicom_id(number):
  return BY_NUMBER[number].dicom_id


def ids(*numbers):
  return {image_id(n) for n in numbers}


# The default conversion: frontal (PA, AP) images of labelled studies.
FRONTAL = ids(0x20, 0x10, 0x41, 0x40, 0x50, 0x61, 0x70, 0x80)


def convert(src, out, **kwargs):
  return mimic.convert(str(src), str(out), image_size=SIZE, workers=1, **kwargs)


def examples_by_id(out):
  return {ex.image_id: ex for exs in read_all(out).values() for ex in exs}


def expected_labels(cells):
  """The label vector, in CHEXPERT_LABELS order, of a fixture label row."""
  vector = np.full(len(labels.CHEXPERT_LABELS), np.nan, np.float32)
  for name, text in cells.items():
    vector[labels.CHEXPERT_LABELS.index(labels.canonical(name))] = VALUES[text]
  return vector


@pytest.fixture
def src(tmp_path):
  return fx.write_mimic(tmp_path / "src")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The default conversion of the gzipped fixture, shared by the tests that only read it."""
  root = tmp_path_factory.mktemp("converted")
  src = fx.write_mimic(root / "src")
  manifest = convert(src, root / "out")
  return src, root / "out", manifest


def test_converts_release_and_round_trips(converted):
  _, out, manifest = converted
  assert manifest["label_names"] == list(labels.CHEXPERT_LABELS)
  assert {s: v["num_records"] for s, v in manifest["splits"].items()} == dict(
      train=6, val=1, test=1)
  assert (manifest["labeler"], manifest["label_file"], manifest["split_file"],
          manifest["metadata_file"]) == ("chexpert", CHEXPERT, SPLIT, METADATA)
  assert (manifest["views"], manifest["one_per_study"], manifest["keep_unlabelled"]) == (
      "frontal", False, False)
  assert (manifest["split_rows"], manifest["unlabelled"], manifest["not_frontal"],
          manifest["not_first_of_study"], manifest["metadata_only"]) == (12, 1, 3, 0, 1)
  assert manifest["view_counts"] == dict(AP=5, LATERAL=1, LL=1, PA=4, UNKNOWN=1)
  assert manifest["split_sizes"] == dict(test=dict(subjects=1, studies=1),
                                         train=dict(subjects=3, studies=4),
                                         val=dict(subjects=1, studies=1))
  assert manifest["skipped"] == dict(count=0, items=[])

  records = read_all(out)
  for split, examples in records.items():
    assert [ex.image_id for ex in examples] == sorted(ex.image_id for ex in examples), split
  written = {ex.image_id: (split, ex) for split, exs in records.items() for ex in exs}
  assert set(written) == FRONTAL
  for identifier, (split, ex) in written.items():
    jpg = BY_ID[identifier]
    assert split == OUTPUT_SPLIT[jpg.split]
    assert (ex.patient_id, ex.study_id, ex.view) == (jpg.subject, jpg.study, jpg.view)
    np.testing.assert_array_equal(ex.labels, expected_labels(fx.CHEXPERT[jpg.subject, jpg.study]))
    image = Image.open(io.BytesIO(ex.image))
    assert (image.mode, image.size) == ("L", (SIZE, SIZE))
    # A flat JPEG stays flat, give or take JPEG's rounding, through resizing.
    assert np.abs(np.asarray(image).astype(int) - jpg.value).max() <= 2, identifier
    assert len(ex.boxes) == 0 and ex.fine_labels is None and ex.anatomy is None

  for split, examples in records.items():  # the manifest's counts match the records
    vectors = np.stack([ex.labels for ex in examples])
    counts = manifest["splits"][split]["label_counts"]
    assert counts["positive"] == (vectors == 1).sum(0).tolist()
    assert counts["uncertain"] == (vectors == -1).sum(0).tolist()
    assert counts["unknown"] == np.isnan(vectors).sum(0).tolist()


def test_label_columns_are_mapped_by_name(converted):
  """The files' alphabetical columns land in CHEXPERT_LABELS order; blank is NaN."""
  _, out, _ = converted
  ex = examples_by_id(out)[image_id(0x20)]  # study 50000001
  by_name = dict(zip(labels.CHEXPERT_LABELS, ex.labels.tolist()))
  assert (by_name["Atelectasis"], by_name["Cardiomegaly"], by_name["Effusion"],
          by_name["Support Devices"]) == (1.0, 0.0, -1.0, 0.0)
  assert all(np.isnan(v) for name, v in by_name.items()
             if name not in ("Atelectasis", "Cardiomegaly", "Effusion", "Support Devices"))
  assert labels.CHEXPERT_LABELS.index("Effusion") == 10 and fx.LABEL_COLUMNS[9] == (
      "Pleural Effusion")
  ex = examples_by_id(out)[image_id(0x70)]  # study 50000005
  assert [labels.CHEXPERT_LABELS[i] for i in np.flatnonzero(~np.isnan(ex.labels))] == [
      "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other"]
  np.testing.assert_array_equal(ex.labels[[1, 4, 11]], [1.0, 0.0, -1.0])


def records_fingerprint(manifest):
  return {split: ([s["sha256"] for s in v["shards"]], v["label_counts"])
          for split, v in manifest["splits"].items()}


def gunzip(path):
  """Replaces a .gz file by its plain text."""
  plain = str(path)[:-len(".gz")]
  with gzip.open(path, "rt") as f, open(plain, "w") as g:
    g.write(f.read())
  os.remove(path)


def test_gz_plain_and_mixed_inputs_give_the_same_dataset(converted, tmp_path):
  _, _, gz_manifest = converted
  plain = fx.write_mimic(tmp_path / "plain", gz=False)
  plain_manifest = convert(plain, tmp_path / "plain_out")
  assert (plain_manifest["split_file"], plain_manifest["label_file"]) == (
      fx.SPLIT_FILE, fx.LABEL_FILES["chexpert"])
  mixed = fx.write_mimic(tmp_path / "mixed")
  gunzip(mixed / METADATA)
  mixed_manifest = convert(mixed, tmp_path / "mixed_out")
  assert (mixed_manifest["split_file"], mixed_manifest["metadata_file"]) == (
      SPLIT, fx.METADATA_FILE)
  assert (records_fingerprint(plain_manifest) == records_fingerprint(mixed_manifest)
          == records_fingerprint(gz_manifest))


def test_prefers_the_gz_file_when_both_are_there(src, tmp_path):
  (src / fx.SPLIT_FILE).write_text("not, the file, to read\n")
  manifest = convert(src, tmp_path / "out")
  assert manifest["split_file"] == SPLIT and manifest["skipped"]["count"] == 0


def test_all_views(src, tmp_path):
  manifest = convert(src, tmp_path / "out", views="all")
  examples = examples_by_id(tmp_path / "out")
  assert set(examples) == FRONTAL | ids(0x30, 0x51, 0x60)
  assert manifest["not_frontal"] == 0 and manifest["views"] == "all"
  assert [examples[image_id(n)].view for n in (0x30, 0x51, 0x60)] == ["LATERAL", "LL", "UNKNOWN"]
  # Labels are per study: the lateral has its study's.
  np.testing.assert_array_equal(examples[image_id(0x30)].labels,
                                examples[image_id(0x20)].labels)


def test_one_per_study_prefers_pa_then_the_smallest_dicom_id(src, tmp_path):
  manifest = convert(src, tmp_path / "out", one_per_study=True)
  # 50000001: the PA, though the AP's dicom_id is smaller; 50000002: two APs, the smaller id.
  assert dicom_id(0x10) < dicom_id(0x20)
  assert set(examples_by_id(tmp_path / "out")) == ids(0x20, 0x40, 0x50, 0x61, 0x70, 0x80)
  assert (manifest["not_frontal"], manifest["not_first_of_study"], manifest["one_per_study"]) == (
      3, 2, True)
  manifest = convert(src, tmp_path / "all", one_per_study=True, views="all")
  # 50000004 has an AP and a blank view: the AP; 50000003 a PA and an LL: the PA.
  assert set(examples_by_id(tmp_path / "all")) == ids(0x20, 0x40, 0x50, 0x61, 0x70, 0x80)
  assert (manifest["not_frontal"], manifest["not_first_of_study"]) == (0, 5)


def test_negbio_labels(src, tmp_path):
  manifest = convert(src, tmp_path / "out", labeler="negbio")
  assert (manifest["labeler"], manifest["label_file"]) == (
      "negbio", fx.LABEL_FILES["negbio"] + ".gz")
  examples = examples_by_id(tmp_path / "out")
  assert set(examples) == FRONTAL
  for identifier, ex in examples.items():
    jpg = BY_ID[identifier]
    np.testing.assert_array_equal(ex.labels, expected_labels(fx.NEGBIO[jpg.subject, jpg.study]))
  effusion = labels.CHEXPERT_LABELS.index("Effusion")
  assert examples[image_id(0x20)].labels[effusion] == 1.0  # -1.0 in the chexpert file


def test_unlabelled_studies_are_dropped_and_counted_or_kept(src, tmp_path):
  manifest = convert(src, tmp_path / "dropped")
  assert manifest["unlabelled"] == 1 and image_id(0x71) not in examples_by_id(
      tmp_path / "dropped")
  manifest = convert(src, tmp_path / "kept", keep_unlabelled=True)
  assert (manifest["unlabelled"], manifest["keep_unlabelled"]) == (1, True)
  examples = examples_by_id(tmp_path / "kept")
  assert set(examples) == FRONTAL | ids(0x71)
  assert examples[image_id(0x71)].study_id == fx.UNLABELLED_STUDY
  assert np.isnan(examples[image_id(0x71)].labels).all()
  assert manifest["splits"]["test"]["num_records"] == 2


def _remove(path):
  os.remove(path)


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)


def _split_row(number):
  jpg = BY_NUMBER[number]
  return f"{jpg.dicom_id},{jpg.study},{jpg.subject},{jpg.split}"


def _metadata_row(number):
  return fx._metadata_line(BY_NUMBER[number])  # pylint: disable=protected-access


# name: (breaks the source, file and row text (or (text, occurrence)) named by the error, message
# part, the images reported (left out, listed in the manifest), the default images not written)
BAD_INPUTS = {
    "missing image": (
        lambda s: _remove(s / "files" / image_id(0x50)),
        SPLIT, dicom_id(0x50), "not found", ids(0x50), ids(0x50)),
    "corrupt image": (
        lambda s: _write_bytes(s / "files" / image_id(0x70), b"\xff\xd8\xff\xe0broken"),
        SPLIT, dicom_id(0x70), "cannot read image", ids(0x70), ids(0x70)),
    "empty image": (
        lambda s: _write_bytes(s / "files" / image_id(0x61), b""),
        SPLIT, dicom_id(0x61), "cannot read image", ids(0x61), ids(0x61)),
    "image linked from outside src": (
        lambda s: link_outside(s, s / "files" / image_id(0x70)),
        SPLIT, dicom_id(0x70), f"{image_id(0x70)} is a link to", ids(0x70), ids(0x70)),
    "malformed split row": (
        lambda s: fx.edit(s / SPLIT, _split_row(0x80), _split_row(0x80)[:-len(",train")]),
        SPLIT, dicom_id(0x80), "malformed row: 3 fields, expected 4", set(), ids(0x80)),
    "unknown split": (
        lambda s: fx.edit(s / SPLIT, _split_row(0x80), _split_row(0x80) + "ing"),
        SPLIT, dicom_id(0x80), "unknown split 'training'", set(), ids(0x80)),
    "bad dicom_id": (
        lambda s: fx.edit(s / SPLIT, dicom_id(0x80), "../../" + dicom_id(0x80)),
        SPLIT, dicom_id(0x80), f"bad dicom_id '../../{dicom_id(0x80)}'", set(), ids(0x80)),
    "bad subject_id": (
        lambda s: fx.edit(s / SPLIT, "19000033,train", "p19000033,train"),
        SPLIT, dicom_id(0x80), "bad subject_id 'p19000033'", set(), ids(0x80)),
    "bad study_id": (
        lambda s: fx.edit(s / SPLIT, "50000007,19000033", "5000000/,19000033"),
        SPLIT, dicom_id(0x80), "bad study_id '5000000/'", set(), ids(0x80)),
    "dicom_id twice in split": (
        lambda s: fx.append_line(s / SPLIT, _split_row(0x80)),
        SPLIT, (dicom_id(0x80), 2), f"dicom_id {dicom_id(0x80)} is also at row 13", ids(0x80),
        ids(0x80)),
    "subject in two splits": (
        lambda s: fx.edit(s / SPLIT, _split_row(0x51), _split_row(0x51).replace("train", "test")),
        SPLIT, dicom_id(0x50), "subject 10000764 is in both train (row 7) and test (row 8)",
        ids(0x50, 0x51), ids(0x50)),
    "no metadata row": (
        lambda s: fx.edit(s / METADATA, _metadata_row(0x61), ""),
        SPLIT, dicom_id(0x61), f"has no row in {{src}}/{METADATA}", ids(0x61), ids(0x61)),
    "metadata row of another study": (
        lambda s: fx.edit(s / METADATA, "19000033,50000007", "19000033,50000008"),
        METADATA, dicom_id(0x80), "has subject_id 19000033 and study_id 50000008 here, but "
        f"19000033 and 50000007 in {{src}}/{SPLIT} row 13", ids(0x80), ids(0x80)),
    "dicom_id twice in metadata": (
        lambda s: fx.append_line(s / METADATA, _metadata_row(0x10).strip()),
        METADATA, (dicom_id(0x10), 2), f"dicom_id {dicom_id(0x10)} is also at row 3", ids(0x10),
        ids(0x10)),
    "malformed metadata row": (
        lambda s: fx.edit(s / METADATA, _metadata_row(0x40), _metadata_row(0x40).replace(
            ",Erect", "")),
        METADATA, dicom_id(0x40), "malformed row: 11 fields, expected 12", ids(0x40), ids(0x40)),
    "bad label value": (
        lambda s: fx.edit(s / CHEXPERT, "10000764,50000003,,,-1.0", "10000764,50000003,,,2"),
        CHEXPERT, "10000764,50000003", "column 'Consolidation': '2' is not 1.0, 0.0, -1.0 or blank",
        ids(0x50, 0x51), ids(0x50)),
    "label 1 instead of 1.0": (
        lambda s: fx.edit(s / CHEXPERT, "19000033,50000007,,,,,,,,,1.0",
                          "19000033,50000007,,,,,,,,,1"),
        CHEXPERT, "19000033,50000007", "column 'No Finding': '1' is not 1.0, 0.0, -1.0 or blank", ids(0x80),
        ids(0x80)),
    "second label row for a study": (
        lambda s: fx.append_line(s / CHEXPERT, "12000022,50000005" + ",0.0" * 14),
        CHEXPERT, ("12000022,50000005", 2), "study 50000005 of subject 12000022 is also at row 7",
        ids(0x70), ids(0x70)),
    "malformed label row": (
        lambda s: fx.edit(s / CHEXPERT, "10000032,50000002,,,,,,,,,1.0,,,,,",
                          "10000032,50000002,,,,,,,,,1.0"),
        CHEXPERT, "10000032,50000002", "malformed row: 11 fields, expected 16",
        ids(0x40, 0x41), ids(0x40, 0x41)),
    "bad study_id in the labels": (  # no image to name: the study becomes unlabelled
        lambda s: fx.edit(s / CHEXPERT, "19000033,50000007", "19000033,5000000x"),
        CHEXPERT, "19000033,5000000x", "bad study_id '5000000x'", set(), ids(0x80)),
}


def _row(src, file, row_text):
  text, occurrence = row_text if isinstance(row_text, tuple) else (row_text, 1)
  return fx.line_of(src / file, text, occurrence)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_with_file_and_row(src, tmp_path, case):
  breaks, file, row_text, reason, _, _ = BAD_INPUTS[case]
  breaks(src)
  row = _row(src, file, row_text)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out")
  assert (os.path.basename(error.value.file), error.value.row) == (file, row)
  assert f"{src / file}, row {row}: " in str(error.value)
  assert reason.format(src=src) in str(error.value)
  # Neither the dataset nor a partial folder (OUTSIDE holds what a case links to).
  assert set(os.listdir(tmp_path)) - {OUTSIDE} == {"src"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_skip_bad_skips_and_records(src, tmp_path, case):
  breaks, file, row_text, reason, reported, unwritten = BAD_INPUTS[case]
  breaks(src)
  row = _row(src, file, row_text)
  manifest = convert(src, tmp_path / "out", skip_bad=True)
  skipped = manifest["skipped"]
  assert skipped["count"] == len(skipped["items"]) == max(len(reported), 1)
  first = skipped["items"][0]
  assert (os.path.basename(first["file"]), first["row"]) == (file, row)
  assert reason.format(src=src) in first["reason"]
  assert {item.get("image") for item in skipped["items"]} - {None} == reported
  assert set(examples_by_id(tmp_path / "out")) == FRONTAL - unwritten
  assert sum(v["num_records"] for v in manifest["splits"].values()) == len(FRONTAL - unwritten)


@pytest.mark.parametrize("file, old, new", [
    (SPLIT, "subject_id,split", "subject_id,official_split"),
    (METADATA, "ViewPosition,Rows", "ViewPosition,Height"),
    (CHEXPERT, "Pleural Effusion", "Effusion"),
])
def test_wrong_header_always_stops(src, tmp_path, file, old, new):
  fx.edit(src / file, old, new)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", skip_bad=True)
  assert (error.value.file, error.value.row) == (str(src / file), 1)
  assert "expected exactly" in str(error.value)
  assert f"missing [{old.split(',')[-1]!r}], unexpected [{new.split(',')[-1]!r}]" in str(
      error.value)
  assert os.listdir(tmp_path) == ["src"]


def test_label_header_in_another_order_is_refused(src, tmp_path):
  fx.edit(src / CHEXPERT, "Atelectasis,Cardiomegaly", "Cardiomegaly,Atelectasis")
  with pytest.raises(BadInputError, match=r"row 1: header is .* expected exactly .*"
                     r"\(missing \[\], unexpected \[\]\)"):
    convert(src, tmp_path / "out")


def test_missing_and_corrupt_files(src, tmp_path):
  os.remove(src / (fx.LABEL_FILES["negbio"] + ".gz"))
  with pytest.raises(FileNotFoundError, match="neither mimic-cxr-2.0.0-negbio.csv.gz nor "
                     "mimic-cxr-2.0.0-negbio.csv in"):
    convert(src, tmp_path / "out", labeler="negbio")
  data = (src / METADATA).read_bytes()
  (src / METADATA).write_bytes(data[:len(data) // 2])  # a truncated download
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", skip_bad=True)
  assert error.value.file == str(src / METADATA) and "cannot read" in str(error.value)
  with pytest.raises(ValueError, match="unknown labeler 'chexbert'"):
    convert(src, tmp_path / "out", labeler="chexbert")
  assert os.listdir(tmp_path) == ["src"]


def test_main_prints_the_counts_and_refuses_a_carve(src, tmp_path, capsys):
  args = ["--src", str(src), "--out", str(tmp_path / "out"), "--image-size", str(SIZE),
          "--workers", "1"]
  mimic.main(args + ["--one-per-study", "--views", "all"])
  assert capsys.readouterr().out.strip() == (
      f"wrote {tmp_path / 'out'}: train 4, val 1, test 1; left out 1 unlabelled, 0 not_frontal, "
      "5 not_first_of_study; skipped 0 bad inputs")
  with pytest.raises(SystemExit) as exit_:
    mimic.main(args + ["--overwrite", "--val-fraction", "0.1"])
  assert exit_.value.code == 2 and "official validation split" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="exists and is not empty"):
    mimic.main(args)


def test_command_line(src, tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, "-m", "data_prep.mimic", "--src", str(src), "--out", str(out),
             "--image-size", str(SIZE), "--workers", "2", "--keep-unlabelled"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip().endswith(
      "train 6, val 1, test 2; left out 3 not_frontal, 0 not_first_of_study; "
      "skipped 0 bad inputs")
  manifest = json.loads((out / "cxr_manifest.json").read_text())
  assert manifest["keep_unlabelled"] and manifest["converter"] == "data_prep.mimic"
  # A bad image stops the workers; the previous dataset stays, and no partial folder is left.
  _write_bytes(src / "files" / image_id(0x80), b"")
  done = subprocess.run(command + ["--overwrite"], cwd=root, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 1 and "row 13: cannot read image" in done.stderr
  assert sorted(os.listdir(tmp_path)) == ["out", "src"]
  assert json.loads((out / "cxr_manifest.json").read_text())["created"] == manifest["created"]


FINE_VOCABULARY = labels.fine_vocabulary(mimic.FINE_FINDINGS)
ALL_UNKNOWN = np.full(len(FINE_VOCABULARY), np.nan, np.float32)


def fine_vector(positives, unknown_findings=()):
  """1 at the `positives`, NaN at every location of the `unknown_findings`, 0 elsewhere."""
  return np.array([1.0 if name in positives else np.nan if name.split("|")[0] in unknown_findings
                   else 0.0 for name in FINE_VOCABULARY], np.float32)


# The fine labels of fx.USER_FINE_LABELS by image, written with --keep-unlabelled; the other images
# have ALL_UNKNOWN.
USER_FINE = {
    image_id(0x20): fine_vector(["Atelectasis|left|lower", "Effusion|right|lower"]),
    image_id(0x10): fine_vector([], unknown_findings=["Atelectasis"]),
    image_id(0x50): fine_vector(
        ["Edema|right|lower", "Edema|left|lower", "Consolidation|right|lower"],
        unknown_findings=["Lung Opacity"]),
    image_id(0x61): fine_vector(["Pneumothorax|left|upper", "Lung Lesion|left|upper"]),
    image_id(0x71): fine_vector(["Edema|left|middle"]),
}
WRITTEN = FRONTAL | ids(0x71)  # with --keep-unlabelled
UNLABELLED_FINE = len(WRITTEN - set(USER_FINE))


def test_fine_findings_are_the_located_chexpert_labels():
  assert mimic.FINE_FINDINGS == tuple(
      name for name in labels.CHEXPERT_LABELS if name not in ("No Finding", "Support Devices"))
  assert len(FINE_VOCABULARY) == 12 * 2 * 3


def test_user_fine_labels_csv(src, tmp_path):
  csv = fx.write_fine_labels(tmp_path / "labels" / "imagenome_fine.csv")
  manifest = convert(src, tmp_path / "out", keep_unlabelled=True, fine_labels=str(csv))
  assert manifest["fine_label_names"] == list(FINE_VOCABULARY)
  assert (manifest["fine_labels_from"], manifest["fine_labels_unlabelled"]) == (
      "imagenome_fine.csv", UNLABELLED_FINE)
  assert manifest["skipped"]["count"] == 0
  examples = examples_by_id(tmp_path / "out")
  assert set(examples) == WRITTEN
  for identifier, ex in examples.items():
    np.testing.assert_array_equal(ex.fine_labels, USER_FINE.get(identifier, ALL_UNKNOWN),
                                  err_msg=identifier)
    jpg = BY_ID[identifier]  # the study labels are untouched
    np.testing.assert_array_equal(ex.labels, expected_labels(
        fx.CHEXPERT.get((jpg.subject, jpg.study), {})))

  counts = {kind: np.sum([v["fine_label_counts"][kind] for v in manifest["splits"].values()], 0)
            for kind in ("positive", "negative", "unknown")}
  column = FINE_VOCABULARY.index("Edema|left|lower")
  # 0x50 locates Edema there; 0x20, 0x10, 0x61 and 0x71 (Edema elsewhere) do not.
  assert (counts["positive"][column], counts["negative"][column],
          counts["unknown"][column]) == (1, 4, UNLABELLED_FINE)


def test_without_fine_labels_the_manifest_says_so(converted):
  _, _, manifest = converted
  assert manifest["fine_label_names"] == []
  assert manifest["fine_labels_from"] is manifest["fine_labels_unlabelled"] is None


# name: (breaks the CSV, text (or (text, occurrence)) of the row named, message part, the number
# of the image that --skip-bad leaves with unknown fine labels, or None)
FINE_BAD_INPUTS = {
    "finding negative in the study labels": (  # study 50000001 has Cardiomegaly 0.0
        lambda p: fx.edit(p, "Atelectasis|left|lower", "Cardiomegaly|left|lower"), dicom_id(0x20),
        "Cardiomegaly|left|lower contradicts the labels of its study 50000001 of subject "
        f"10000032 ({{src}}/{CHEXPERT} row 2), where Cardiomegaly is 0.0 (negative)", 0x20),
    "unknown fine label": (  # Support Devices has no location
        lambda p: fx.edit(p, "Lung Lesion|left|upper", "Support Devices|left|upper"),
        dicom_id(0x61), "unknown fine label 'Support Devices|left|upper'", 0x61),
    "bad location": (
        lambda p: fx.edit(p, "Edema|left|lower", "Edema|left|basal"), dicom_id(0x50),
        "bad location 'left'/'basal'", 0x50),
    "duplicated dicom_id": (
        lambda p: fx.append_line(p, f"Atelectasis|left|upper,chexpert,{dicom_id(0x10)}"),
        (dicom_id(0x10), 2), f"{dicom_id(0x10)} is also at row 3", 0x10),
    "malformed row": (
        lambda p: fx.edit(p, "Lung Lesion|left|upper", "Lung Lesion|left|upper,oops"),
        dicom_id(0x61), "malformed row: 4 fields, expected 3", 0x61),
    "dicom_id not in split.csv": (
        lambda p: fx.append_line(p, f"Edema|left|lower,x,{fx.METADATA_ONLY.dicom_id}"),
        fx.METADATA_ONLY.dicom_id,
        f"fine labels for {fx.METADATA_ONLY.dicom_id}, which is not in {{src}}/{SPLIT}", None),
}


def _broken_fine_labels(src, tmp_path, case):
  """The broken CSV, the row named, the message part and the image left unknown (or None)."""
  breaks, row_text, reason, unknown = FINE_BAD_INPUTS[case]
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  breaks(csv)
  text, occurrence = row_text if isinstance(row_text, tuple) else (row_text, 1)
  return (csv, fx.line_of(csv, text, occurrence), reason.format(src=src),
          None if unknown is None else image_id(unknown))


@pytest.mark.parametrize("case", list(FINE_BAD_INPUTS))
def test_bad_fine_labels_raise_with_file_and_row(src, tmp_path, case):
  csv, row, reason, _ = _broken_fine_labels(src, tmp_path, case)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", keep_unlabelled=True, fine_labels=str(csv))
  assert (error.value.file, error.value.row) == (str(csv), row)
  assert f"{csv}, row {row}: " in str(error.value) and reason in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["labels", "src"]


@pytest.mark.parametrize("case", list(FINE_BAD_INPUTS))
def test_skip_bad_fine_labels_row_leaves_them_unknown(src, tmp_path, case):
  """A bad row is skipped and recorded; its image is written, with unknown fine labels (of a
  duplicate, neither row is trusted)."""
  csv, row, reason, unknown = _broken_fine_labels(src, tmp_path, case)
  manifest = convert(src, tmp_path / "out", keep_unlabelled=True, fine_labels=str(csv),
                     skip_bad=True)
  [item] = manifest["skipped"]["items"]
  assert (item["file"], item["row"]) == (str(csv), row) and reason in item["reason"]
  assert "image" not in item
  examples = examples_by_id(tmp_path / "out")
  assert set(examples) == WRITTEN
  for identifier, ex in examples.items():
    expected = ALL_UNKNOWN if identifier == unknown else USER_FINE.get(identifier, ALL_UNKNOWN)
    np.testing.assert_array_equal(ex.fine_labels, expected, err_msg=identifier)
  assert manifest["fine_labels_unlabelled"] == UNLABELLED_FINE + (unknown is not None)


def test_fine_labels_of_an_image_left_out_by_bad_input_are_ignored(src, tmp_path):
  fx.append_line(src / SPLIT, _split_row(0x20))  # a dicom_id twice: 0x20 is left out
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  manifest = convert(src, tmp_path / "out", fine_labels=str(csv), skip_bad=True)
  assert [item["file"] for item in manifest["skipped"]["items"]] == [str(src / SPLIT)]
  examples = examples_by_id(tmp_path / "out")
  assert set(examples) == FRONTAL - ids(0x20)
  np.testing.assert_array_equal(examples[image_id(0x50)].fine_labels, USER_FINE[image_id(0x50)])


def test_fine_labels_header_needs_both_columns(src, tmp_path):
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  fx.edit(csv, "dicom_id", "Image Index")
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out", fine_labels=str(csv), skip_bad=True)
  assert (error.value.file, error.value.row) == (str(csv), 1)
  assert "header lacks columns ['dicom_id']" in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["labels", "src"]


def test_command_line_fine_labels(src, tmp_path, capsys):
  csv = fx.write_fine_labels(tmp_path / "labels" / "fine.csv")
  mimic.main(["--src", str(src), "--out", str(tmp_path / "out"), "--image-size", str(SIZE),
              "--workers", "1", "--fine-labels", str(csv)])
  assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'out'}: train 6, val 1, test 1")
  manifest = writer.load_manifest(tmp_path / "out")
  # Without --keep-unlabelled 0x71 is not written: of the rest, 4 have no row.
  assert (manifest["fine_labels_from"], manifest["fine_labels_unlabelled"]) == ("fine.csv", 4)
  assert manifest["fine_label_names"] == list(FINE_VOCABULARY)
