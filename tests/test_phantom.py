"""Tests of data_prep.phantom: NIH formats and quirks, determinism, splits, labels and boxes."""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from cxr_jax.data import labels
from data_prep import phantom
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
