"""Tests of data_prep.phantom: NIH formats and quirks, determinism, splits, labels and boxes."""

import csv
import gzip
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from cxr_jax.data import labels, tfrecord, writer
from data_prep import chexpert, mimic, phantom
from data_prep.phantom import layout

SIZE = 64


def read_text(path):
  with open(path, newline="") as f:
    return f.read()


def read_csv_rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def data_entry(out):
  """Data_Entry rows as dicts keyed like pandas would name the 11 columns."""
  rows = read_csv_rows(os.path.join(out, phantom.DATA_ENTRY))
  return [dict(zip(rows[0], r)) for r in rows[1:]]


def fine_rows(out):
  rows = read_csv_rows(os.path.join(out, phantom.EXTRAS, phantom.FINE_LABELS))
  return [dict(zip(rows[0], r)) for r in rows[1:]]


def split_list(out, name):
  return read_text(os.path.join(out, name)).split("\n")


def all_files(out):
  found = {}
  for root, _, files in os.walk(out):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, out)] = f.read()
  return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("phantom") / "nih")
  phantom.generate(out, num_patients=8, image_size=SIZE, seed=0, workers=1)
  return out


def test_same_seed_is_byte_identical_for_any_worker_count_and_other_seed_differs(dataset, tmp_path):
  again = tmp_path / "again"
  phantom.generate(again, num_patients=8, image_size=SIZE, seed=0, workers=2)
  first, second = all_files(dataset), all_files(str(again))
  assert sorted(first) == sorted(second)
  assert [k for k in first if first[k] != second[k]] == []

  other = tmp_path / "other"
  phantom.generate(other, num_patients=8, image_size=SIZE, seed=1, workers=1)
  third = all_files(str(other))
  assert third[phantom.DATA_ENTRY] != first[phantom.DATA_ENTRY]
  common = [k for k in sorted(set(first) & set(third)) if k.startswith("images/")]
  assert common and all(first[k] != third[k] for k in common)


def test_data_entry_has_the_nih_header_and_row_format(dataset):
  text = read_text(os.path.join(dataset, phantom.DATA_ENTRY))
  lines = text.rstrip("\n").split("\n")
  assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                      "Patient Gender,View Position,OriginalImage[Width,Height],"
                      "OriginalImagePixelSpacing[x,y]")
  assert len(lines[0].split(",")) == 11
  names = set(labels.NIH_LABELS)
  for line in lines[1:]:
    fields = line.split(",")
    assert len(fields) == 11, line
    image, found, follow_up, patient, age, sex, view, width, height, sx, sy = fields
    assert re.fullmatch(r"\d{8}_\d{3}\.png", image)
    assert image == f"{int(patient):08d}_{int(follow_up):03d}.png"
    assert found == labels.NO_FINDING or set(found.split("|")) <= names, found
    assert labels.NO_FINDING not in found.split("|") or found == labels.NO_FINDING
    assert found == labels.NO_FINDING or found.split("|") == sorted(found.split("|"))
    assert 0 < int(age) < 120 and sex in ("M", "F") and view in ("PA", "AP")
    assert (int(width), int(height)) == (SIZE, SIZE) and float(sx) == float(sy) > 0
    with Image.open(os.path.join(dataset, "images", image)) as im:
      assert (im.mode, im.size) == ("L", (SIZE, SIZE))
  images = sorted(os.listdir(os.path.join(dataset, "images")))
  assert images == [line.split(",")[0] for line in lines[1:]]
  per_patient = {}
  for line in lines[1:]:
    per_patient.setdefault(line.split(",")[3], []).append(int(line.split(",")[2]))
  assert len(per_patient) == 8
  assert all(v == list(range(len(v))) and 1 <= len(v) <= 5 for v in per_patient.values())


def test_bbox_list_keeps_the_nih_quirks(dataset):
  lines = read_text(os.path.join(dataset, phantom.BBOX_LIST)).rstrip("\n").split("\n")
  assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
  rows = read_csv_rows(os.path.join(dataset, phantom.BBOX_LIST))
  assert len(rows[0]) == 9 and rows[0][:6] == ["Image Index", "Finding Label", "Bbox [x", "y",
                                                "w", "h]"]
  assert rows[1:], "the fixture should hold at least one boxed test image"
  test = set(split_list(dataset, phantom.TEST_LIST))
  largest = {}
  for r in fine_rows(dataset):
    box = tuple(int(r[k]) for k in "xywh")
    key = (r["Image Index"], r["Finding Label"])
    if box[2] * box[3] > largest.get(key, (0, 0, 0, 0))[2] * largest.get(key, (0, 0, 0, 0))[3]:
      largest[key] = box
  seen = set()
  nih_names = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule",
               "Pneumonia", "Pneumothorax"}
  for row in rows[1:]:
    assert len(row) == 6, row
    image, label = row[0], row[1]
    x, y, w, h = map(float, row[2:])
    assert label in nih_names
    assert image in test
    assert (image, label) not in seen
    seen.add((image, label))
    assert (x, y, w, h) == largest[(image, labels.canonical(label))]
  # Every boxable instance of a test image made it into the list.
  boxable = {(i, f) for (i, f) in largest if i in test and f in phantom.BBOX_NAMES}
  assert {(i, labels.canonical(f)) for i, f in seen} == boxable


def test_split_lists_are_patient_disjoint_and_cover_every_image_once(dataset):
  for name in (phantom.TRAIN_VAL_LIST, phantom.TEST_LIST):
    assert not read_text(os.path.join(dataset, name)).endswith("\n")
  train, test = split_list(dataset, phantom.TRAIN_VAL_LIST), split_list(dataset, phantom.TEST_LIST)
  assert train and test
  images = [r["Image Index"] for r in data_entry(dataset)]
  assert sorted(train + test) == sorted(images) and len(set(train + test)) == len(images)
  assert not {n[:8] for n in train} & {n[:8] for n in test}


def test_every_instance_has_a_box_inside_the_image_and_on_its_side(dataset):
  rows = fine_rows(dataset)
  assert rows
  vocabulary = set(labels.fine_vocabulary())
  for r in rows:
    x, y, w, h = (int(r[k]) for k in "xywh")
    assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
    assert labels.fine_label(r["Finding Label"], r["Side"], r["Zone"]) in vocabulary
    with Image.open(os.path.join(dataset, phantom.EXTRAS, "anatomy", r["Image Index"])) as im:
      anatomy = np.asarray(im)
    cx, cy = int(x + w / 2), int(y + h / 2)
    assert anatomy[cy, cx] != phantom.BACKGROUND, r
    midline = np.nonzero(anatomy == phantom.MEDIASTINUM)[1].mean()
    assert (cx < midline) == (r["Side"] == "right"), (r, midline)


def test_anatomy_maps_have_valid_ids_and_the_right_lung_on_the_viewers_left(dataset):
  for name in os.listdir(os.path.join(dataset, "images")):
    with Image.open(os.path.join(dataset, phantom.EXTRAS, "anatomy", name)) as im:
      assert (im.mode, im.size) == ("L", (SIZE, SIZE))
      anatomy = np.asarray(im)
    assert set(np.unique(anatomy)) <= set(range(len(phantom.ANATOMY_NAMES)))
    for part in (phantom.BODY, phantom.RIGHT_LUNG, phantom.LEFT_LUNG, phantom.HEART,
                 phantom.MEDIASTINUM, phantom.ABDOMEN):
      assert (anatomy == part).any(), (name, phantom.ANATOMY_NAMES[part])
    right = np.nonzero(anatomy == phantom.RIGHT_LUNG)[1].mean()
    left = np.nonzero(anatomy == phantom.LEFT_LUNG)[1].mean()
    assert right < SIZE / 2 < left
    rows = np.nonzero(anatomy == phantom.ABDOMEN)[0], np.nonzero(anatomy == phantom.HEART)[0]
    assert rows[0].mean() > rows[1].mean()
  info = json.loads(read_text(os.path.join(dataset, phantom.EXTRAS, phantom.INFO)))
  assert info["anatomy_names"] == ["background", "body", "right_lung", "left_lung", "heart",
                                   "mediastinum", "abdomen"]
  assert info["label_names"] == list(labels.NIH_LABELS) and info["seed"] == 0


def test_fine_labels_agree_with_data_entry_without_label_noise(dataset):
  found = {}
  for r in fine_rows(dataset):
    found.setdefault(r["Image Index"], set()).add(r["Finding Label"])
  for row in data_entry(dataset):
    reported = row["Finding Labels"]
    expected = set() if reported == labels.NO_FINDING else set(reported.split("|"))
    assert found.get(row["Image Index"], set()) == expected


def test_label_noise_flips_labels_at_the_requested_rate_and_keeps_the_truth(tmp_path):
  clean, noisy = tmp_path / "clean", tmp_path / "noisy"
  phantom.generate(clean, num_patients=60, image_size=32, seed=3, workers=1)
  phantom.generate(noisy, num_patients=60, image_size=32, seed=3, workers=1, label_noise=0.1)
  a, b = all_files(str(clean)), all_files(str(noisy))
  for name in a:
    if name.startswith(("images/", "phantom_extras/anatomy/")) or name.endswith("fine_labels.csv"):
      assert a[name] == b[name], name
  flips = total = 0
  for before, after in zip(data_entry(str(clean)), data_entry(str(noisy))):
    was, now = before["Finding Labels"].split("|"), after["Finding Labels"].split("|")
    flips += sum((name in was) != (name in now) for name in labels.NIH_LABELS)
    total += len(labels.NIH_LABELS)
    found = after["Finding Labels"]
    assert found == labels.NO_FINDING or labels.NO_FINDING not in found
  assert 0.07 < flips / total < 0.13, flips / total


def test_prevalence_flag_changes_prevalence(tmp_path):
  out = tmp_path / "hernia"
  assert phantom.main(["--out", str(out), "--num-patients", "40", "--image-size", "32",
                       "--seed", "5", "--workers", "1", "--prevalence", "Hernia=0.4"]) == 0
  rows = data_entry(str(out))
  rate = np.mean(["Hernia" in r["Finding Labels"].split("|") for r in rows])
  assert 0.25 < rate < 0.55, rate
  info = json.loads(read_text(os.path.join(out, phantom.EXTRAS, phantom.INFO)))
  assert info["prevalences"]["Hernia"] == 0.4 and info["arguments"]["prevalence"] == {"Hernia": 0.4}


def test_abnormal_rates_reproduce_every_prevalence_and_the_no_finding_rate():
  prevalence = phantom.resolve_prevalence({"Hernia": 0.05})
  rates = phantom.abnormal_rates(prevalence, 0.5)
  rng = np.random.default_rng(0)
  draws = [phantom.sample_findings(rng, rates, 0.5) for _ in range(20000)]
  assert abs(np.mean([not d for d in draws]) - 0.5) < 0.015
  for name, p in prevalence.items():
    assert abs(np.mean([name in d for d in draws]) - p) < 0.01 + 0.1 * p, name
  with pytest.raises(ValueError, match="unknown labels"):
    phantom.resolve_prevalence({"Nodules": 0.1})
  with pytest.raises(ValueError, match="every abnormal image needs a finding"):
    phantom.abnormal_rates(prevalence, 0.05)


def test_generate_refuses_a_non_empty_folder_and_leaves_nothing_when_interrupted(tmp_path,
                                                                                monkeypatch):
  out = tmp_path / "busy"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError):
    phantom.generate(out, num_patients=2, image_size=32, workers=1)
  assert os.listdir(out) == ["keep.txt"]

  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(layout, "_write_tables", fail)
  with pytest.raises(KeyboardInterrupt):
    phantom.generate(tmp_path / "fresh", num_patients=2, image_size=32, workers=1)
  assert sorted(os.listdir(tmp_path)) == ["busy"]
  monkeypatch.undo()
  phantom.generate(out, num_patients=2, image_size=32, workers=1, overwrite=True)
  assert "keep.txt" not in os.listdir(out) and phantom.DATA_ENTRY in os.listdir(out)


def test_render_example_renders_each_finding_where_its_label_says():
  for name in labels.NIH_LABELS:
    r = phantom.render_example(7, 96, [name])
    assert r.image.dtype == r.anatomy.dtype == np.uint8
    assert r.image.shape == r.anatomy.shape == (96, 96)
    assert {i.finding for i in r.instances} == {name}
    places = sorted((i.side, i.zone) for i in r.instances)
    if name in ("Cardiomegaly", "Hernia"):
      assert places == [("left", "lower")]
    if name in ("Edema", "Emphysema"):
      assert [s for s, _ in places] == ["left", "right"]
  normal = phantom.render_example(7, 96)
  assert normal.instances == []
  assert not np.array_equal(normal.image, phantom.render_example(7, 96, ["Mass"]).image)


def cardiothoracic_ratio(anatomy):
  heart = np.nonzero((anatomy == phantom.HEART).any(0))[0]
  thorax = np.nonzero(np.isin(anatomy, (phantom.RIGHT_LUNG, phantom.LEFT_LUNG, phantom.HEART,
                                        phantom.MEDIASTINUM)).any(0))[0]
  return (heart[-1] - heart[0] + 1) / (thorax[-1] - thorax[0] + 1)


def test_cardiomegaly_means_a_cardiothoracic_ratio_above_one_half():
  for seed in range(4):
    assert cardiothoracic_ratio(phantom.render_example(seed, 128, view="PA").anatomy) < 0.5
    assert cardiothoracic_ratio(
        phantom.render_example(seed, 128, ["Cardiomegaly"], view="PA").anatomy) > 0.5


def test_command_line_tiny_run_preview_and_benchmark(tmp_path, capsys):
  out = tmp_path / "cli"
  argv = ["--out", str(out), "--num-patients", "8", "--image-size", "64", "--workers", "1"]
  assert phantom.main(argv) == 0
  assert "wrote" in capsys.readouterr().out
  assert phantom.main(argv) == 2  # refuses the non-empty folder
  assert "--overwrite" in capsys.readouterr().err
  assert phantom.main(argv + ["--overwrite", "--test-fraction", "0.5"]) == 0
  assert len(set(split_list(out, phantom.TEST_LIST))) > 0
  preview = tmp_path / "grid.png"
  assert phantom.main(["--preview", str(preview), "--image-size", "64"]) == 0
  with Image.open(preview) as im:
    assert im.size == (5 * 64, 3 * (64 + phantom.PREVIEW_CAPTION))
  assert phantom.main(["--benchmark", "3", "--image-size", "32"]) == 0
  assert "images/s" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    phantom.main(["--out", str(out), "--prevalence", "Hernia"])


# Other layouts: the phantom as CheXpert and MIMIC-CXR-JPG release it, through their converters.

LAYOUT_PATIENTS, LAYOUT_SIZE, CONVERTED_SIZE = 6, 32, 16
# The mapping of NIH findings to CheXpert observations (project spelling), written out here
# independently of release_layouts; Emphysema, Fibrosis and Hernia have none.
EXPECTED_OBSERVATION = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion",
    "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
    "Edema": "Edema", "Pleural_Thickening": "Pleural Other",
}
MIMIC_ID = re.compile(r"files/p(1\d)/p(\1\d{6})/s(\d{8})/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.jpg")


@pytest.fixture(scope="module", params=["chexpert", "mimic"])
def release(request, tmp_path_factory):
  """(layout, phantom folder, converted folder, manifest) of a tiny phantom in that layout."""
  root = tmp_path_factory.mktemp(request.param)
  src, out = str(root / "src"), str(root / "out")
  phantom.generate(src, num_patients=LAYOUT_PATIENTS, image_size=LAYOUT_SIZE, seed=2, workers=1,
                   layout=request.param)
  convert = chexpert.convert if request.param == "chexpert" else mimic.convert
  manifest = convert(src, out, image_size=CONVERTED_SIZE, workers=1)
  return request.param, src, out, manifest


def read_records(out):
  """Every record of a prepared dataset by split, in file order."""
  manifest = writer.load_manifest(out)
  return {split: [tfrecord.parse(payload) for shard in info["shards"]
                  for _, payload in tfrecord.iter_records(os.path.join(out, shard["file"]))]
          for split, info in manifest["splits"].items()}


def release_ids(src):
  """Each phantom image's record id (its release path without the top folder) by its name."""
  rows = read_csv_rows(os.path.join(src, phantom.EXTRAS, layout.IMAGE_PATHS))
  assert rows[0] == ["Image Index", "Path"]
  return {name: path.split("/", 1)[1] for name, path in rows[1:]}


def expected_labels(findings):
  """The record labels (CHEXPERT_LABELS order) of an image with these NIH findings."""
  vector = np.zeros(len(labels.CHEXPERT_LABELS), np.float32)
  vector[labels.CHEXPERT_LABELS.index(labels.NO_FINDING)] = np.nan if findings else 1.0
  for finding in findings:
    if finding in EXPECTED_OBSERVATION:
      vector[labels.CHEXPERT_LABELS.index(EXPECTED_OBSERVATION[finding])] = 1.0
  return vector


def test_release_layouts_convert_with_every_image_in_its_split(release):
  name, src, out, manifest = release
  info = json.loads(read_text(os.path.join(src, phantom.EXTRAS, phantom.INFO)))
  assert info["layout"] == info["arguments"]["layout"] == name
  assert not os.path.exists(os.path.join(src, "images"))
  records = read_records(out)
  counts = {split: len(exs) for split, exs in records.items()}
  assert counts == {s: v["num_records"] for s, v in manifest["splits"].items()}
  assert sum(counts.values()) == info["num_images"]
  # The phantom's test patients are the release's evaluation split, "test" once converted.
  assert counts["test"] == info["num_test_images"] > 0
  assert counts["train"] > 0 and counts["val"] > 0
  if name == "mimic":
    assert info["layout_splits"] == {"train": counts["train"], "validate": counts["val"],
                                     "test": counts["test"]}
  else:
    assert info["layout_splits"] == {"train.csv": counts["train"] + counts["val"],
                                     "valid.csv": counts["test"]}
  patients = {split: {ex.patient_id for ex in exs} for split, exs in records.items()}
  assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
              or patients["val"] & patients["test"])
  assert {ex.view for exs in records.values() for ex in exs} <= {"AP", "PA"}


def test_release_layouts_labels_are_the_mapped_findings(release):
  _, src, out, _ = release
  findings = {}
  for r in fine_rows(src):
    findings.setdefault(r["Image Index"], set()).add(r["Finding Label"])
  by_id = {ex.image_id: ex for exs in read_records(out).values() for ex in exs}
  ids = release_ids(src)
  assert sorted(by_id) == sorted(ids.values())
  for image, image_id in ids.items():
    np.testing.assert_array_equal(by_id[image_id].labels, expected_labels(findings.get(image, ())),
                                  err_msg=image)
  # Normal images and abnormal ones are both there, so both halves of the rule were checked.
  assert {bool(findings.get(image)) for image in ids} == {False, True}


def test_chexpert_layout_has_the_release_paths_and_patient_data(tmp_path):
  src = tmp_path / "chexpert"
  phantom.generate(src, num_patients=3, image_size=LAYOUT_SIZE, seed=4, workers=1,
                   layout="chexpert")
  folder = chexpert.LAYOUTS["small"]
  for csv_name in (chexpert.TRAIN_CSV, chexpert.VALID_CSV):
    rows = read_csv_rows(os.path.join(src, folder, csv_name))
    assert ",".join(rows[0]) == ",".join(chexpert.HEADER)
    for row in rows[1:]:
      assert re.fullmatch(folder + r"/(train|valid)/patient\d{5}/study[1-5]/view1_frontal\.jpg",
                          row[0]), row
      assert row[0].split("/")[1] == csv_name[:-4]
      assert row[1] in ("Male", "Female") and 18 <= int(row[2]) < 90 and row[3:5] in (
          ["Frontal", "AP"], ["Frontal", "PA"])
      assert row[5] in ("", "1.0") and set(row[6:]) <= {"1.0", "0.0"}
      assert not (row[5] == "1.0" and "1.0" in row[6:])
      with Image.open(os.path.join(src, row[0])) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (LAYOUT_SIZE, LAYOUT_SIZE))


def test_mimic_layout_ids_are_release_shaped_and_drawn_from_the_seed(tmp_path):
  first, again, other = (tmp_path / n for n in ("first", "again", "other"))
  for out, seed in ((first, 4), (again, 4), (other, 5)):
    phantom.generate(out, num_patients=4, image_size=LAYOUT_SIZE, seed=seed, workers=1,
                     layout="mimic")
  assert all_files(str(first)) == all_files(str(again))
  paths = [path for _, path in read_csv_rows(os.path.join(first, phantom.EXTRAS,
                                                          layout.IMAGE_PATHS))[1:]]
  other_paths = [path for _, path in read_csv_rows(os.path.join(other, phantom.EXTRAS,
                                                                layout.IMAGE_PATHS))[1:]]
  assert all(MIMIC_ID.fullmatch(p) for p in paths + other_paths), paths + other_paths
  assert not set(paths) & set(other_paths)
  parts = [MIMIC_ID.fullmatch(p).groups() for p in paths]
  assert len({study for _, _, study, _ in parts}) == len(parts)  # one image per study
  assert len({subject for _, subject, _, _ in parts}) == 4
  split = gzip_lines(os.path.join(first, mimic.SPLIT_FILE + ".gz"))
  assert split[0] == ",".join(mimic.SPLIT_HEADER)
  assert sorted(line.split(",")[0] for line in split[1:]) == sorted(d for *_, d in parts)
  chexpert_labels = os.path.join(first, mimic.LABEL_FILES["chexpert"] + ".gz")
  negbio_labels = os.path.join(first, mimic.LABEL_FILES["negbio"] + ".gz")
  assert gzip_lines(chexpert_labels) == gzip_lines(negbio_labels)


def gzip_lines(path):
  with gzip.open(path, "rt", newline="") as f:
    return f.read().rstrip("\n").split("\n")


def test_layout_nih_is_the_default_byte_for_byte(dataset, tmp_path):
  out = tmp_path / "nih"
  assert phantom.main(["--out", str(out), "--num-patients", "8", "--image-size", str(SIZE),
                       "--seed", "0", "--workers", "1", "--layout", "nih"]) == 0
  assert all_files(str(out)) == all_files(dataset)
  info = json.loads(read_text(os.path.join(out, phantom.EXTRAS, phantom.INFO)))
  assert "layout" not in info and "layout" not in info["arguments"]
  with pytest.raises(ValueError, match="layout must be one of"):
    phantom.generate(tmp_path / "bad", num_patients=2, image_size=32, layout="padchest")
