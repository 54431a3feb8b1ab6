"""Tests of data_prep.jsrt on small JSRT + SCR folders (tests/jsrt_fixtures.py)."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import jsrt_fixtures as fx
from nih_fixtures import OUTSIDE, link_outside
from cxr_jax.data import labels, writer
from datasets import read_all
from data_prep import jsrt
from data_prep.common import BadInputError
from data_prep.phantom import anatomy

SIZE = 32
NAMES = sorted(j.name for j in fx.IMAGES)
BY_NAME = {j.name: j for j in fx.IMAGES}
NODULE_BOXES = {  # CLINICAL_ROWS: centre x, y and side (mm / 0.175) in pixels of the 2048 grid
    "JPCLN001": (1634, 692, 14 / 0.175),
    "JPCLN002": (512, 1024, 28 / 0.175),
    "JPCLN003": (20, 2040, 7 / 0.175),
}


def convert(src, out, **kwargs):
  return jsrt.convert(str(src), str(out), image_size=SIZE, workers=1, **kwargs)


def examples_by_name(out):
  return {ex.image_id: ex for exs in read_all(out).values() for ex in exs}


def pixels(png):
  image = Image.open(io.BytesIO(png))
  assert (image.mode, image.size) == ("L", (SIZE, SIZE))
  return np.asarray(image)


def counts(manifest):
  return {split: v["num_records"] for split, v in manifest["splits"].items()}


@pytest.fixture
def src(tmp_path):
  return fx.write_jsrt(tmp_path / "src")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The default conversion of the fixture, shared by the tests that only read it."""
  root = tmp_path_factory.mktemp("converted")
  src = fx.write_jsrt(root / "src")
  return src, root / "out", convert(src, root / "out")


def test_anatomy_names_are_in_the_vocabulary():
  assert jsrt.ANATOMY_NAMES == ("background", "right_lung", "left_lung", "heart",
                                "right_clavicle", "left_clavicle")
  for names in (jsrt.ANATOMY_NAMES, anatomy.ANATOMY_NAMES):
    assert names[0] == "background" and set(names) <= set(labels.ANATOMY_VOCABULARY), names
  assert [jsrt.ANATOMY_NAMES.index(jsrt.ORGANS[o]) for o in fx.ORGAN_DIRS] == [
      fx.ORGAN_IDS[o] for o in fx.ORGAN_DIRS]
  assert jsrt.PAINT_ORDER == fx.PRIORITY


def test_converts_and_round_trips(converted):
  src, out, manifest = converted
  assert counts(manifest) == dict(train=3, val=1, test=2)
  assert manifest["label_names"] == ["Nodule"]
  assert manifest["anatomy_names"] == list(jsrt.ANATOMY_NAMES)
  assert manifest["folds"] == dict(fold1="train", fold2="test")
  assert (manifest["val_fraction"], manifest["seed"], manifest["val_patients"]) == (0.1, 0, 1)
  assert (manifest["clinical_file"], manifest["nodule_images_without_box"]) == (
      "CLNDAT_EN.txt", 0)
  assert manifest["masks"] == str(src / "scratch")
  assert manifest["skipped"] == dict(count=0, items=[])
  records = read_all(out)
  written = {ex.image_id: (split, ex) for split, exs in records.items() for ex in exs}
  assert sorted(written) == NAMES
  for name, (split, ex) in written.items():
    fold = BY_NAME[name].fold
    assert split in (("train", "val") if fold == "fold1" else ("test",)), name
    assert (ex.patient_id, ex.study_id, ex.view) == (name, name, "PA")
    assert ex.labels.tolist() == [1.0 if name.startswith("JPCLN") else 0.0]
  for split, examples in records.items():
    assert manifest["splits"][split]["label_counts"]["positive"] == [
        sum(ex.image_id.startswith("JPCLN") for ex in examples)]


def test_images_are_clipped_inverted_and_area_resized(converted):
  _, out, _ = converted
  for name, ex in examples_by_name(out).items():
    image = pixels(ex.image)
    background = fx.gray_of(BY_NAME[name].density)
    assert image[31, 0] == background, name  # a 64 x 64 block of background
    assert image[15, 8] == image[15, 23] == fx.gray_of(fx.LUNG_DENSITY) < background  # lungs dark
    assert image[0, 0] == 0  # above 4095: clipped to 4095, the darkest


def test_label_maps_place_each_organ(converted):
  _, out, _ = converted
  expected = fx.expected_label_map(SIZE)
  ids = {name: i for i, name in enumerate(jsrt.ANATOMY_NAMES)}
  for name, ex in examples_by_name(out).items():
    label_map = pixels(ex.anatomy)
    np.testing.assert_array_equal(label_map, expected, err_msg=name)
    # The patient's left lung lies on the image's right.
    assert label_map[15, 8] == ids["right_lung"] and label_map[15, 23] == ids["left_lung"]
    assert label_map[20, 16] == ids["heart"]
    assert label_map[20, 13] == ids["right_lung"]  # lung over heart
    assert label_map[7, 8] == ids["right_clavicle"]  # clavicle over lung
    assert label_map[7, 23] == ids["left_clavicle"]
    assert label_map[0, 0] == label_map[31, 31] == ids["background"]
    assert set(np.unique(label_map)) == set(range(len(jsrt.ANATOMY_NAMES)))


def test_nodules_become_boxes(converted):
  _, out, manifest = converted
  examples = examples_by_name(out)
  for name, ex in examples.items():
    if name not in NODULE_BOXES:
      assert len(ex.boxes) == 0, name
      continue
    x, y, side = NODULE_BOXES[name]
    box = np.clip(np.array([x - side / 2, y - side / 2, x + side / 2, y + side / 2]) / 2048, 0, 1)
    np.testing.assert_allclose(ex.boxes, [box], atol=1e-6, err_msg=name)
    assert ex.box_labels.tolist() == [0]
  assert sum(v["num_boxes"] for v in manifest["splits"].values()) == 3


def test_without_clinical_files_nodule_images_have_no_boxes(tmp_path):
  src = fx.write_jsrt(tmp_path / "src", clinical=False)
  manifest = convert(src, tmp_path / "out")
  assert (manifest["clinical_file"], manifest["nodule_images_without_box"]) == (None, None)
  assert sum(v["num_boxes"] for v in manifest["splits"].values()) == 0
  assert counts(manifest) == dict(train=3, val=1, test=2)


def test_other_layouts_give_the_same_records(converted, tmp_path):
  """Images in --src itself, organ folders spelt with `_`, masks elsewhere (--masks)."""
  src, _, manifest = converted
  other = tmp_path / "other"
  shutil.copytree(src / fx.IMAGE_DIR, other)
  shutil.copytree(src / "Clinical_Information", other / "Clinical_Information")
  masks = tmp_path / "scr" / "scratch"
  shutil.copytree(src / "scratch", masks)
  for fold in ("fold1", "fold2"):
    for organ in fx.ORGAN_DIRS:
      os.rename(masks / fold / "masks" / organ, masks / fold / "masks" / organ.replace(" ", "_"))
  other_manifest = convert(other, tmp_path / "out", masks=str(masks))
  for split, info in manifest["splits"].items():
    assert [s["sha256"] for s in other_manifest["splits"][split]["shards"]] == [
        s["sha256"] for s in info["shards"]]


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)
  return path


def _write_mask(path, values):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(fx.gif_bytes(values))
  return path


def _grey_mask(path):
  values = np.zeros((1024, 1024), np.uint8)
  values[100:200, 100:200] = 255
  values[300:310, 300:310] = 128
  return _write_mask(path, values)


def _copy_masks(src, name, fold):
  fx.write_masks(src, fold, name)
  return fx.mask_path(src, fold, "right lung", name)


def _add_image(path):
  return fx.write_raw(path, fx.density_of(fx.IMAGES[0]))


def _garbage(path):
  path.write_bytes(b"GIF89a not really")
  return path


def _add_clinical_row(src, row):
  fx.edit_clinical(src, fx.CLINICAL_ROWS[-1], fx.CLINICAL_ROWS[-1] + "\r" + row)
  return fx.clinical_file(src)


# name: (breaks the fixture and returns the file the error names, its row text in CLNDAT (or
# None), message part, the images left out)
BAD_INPUTS = {
    "image of the wrong byte size": (
        lambda s: _truncate(fx.image_path(s, "JPCNN003"), 1000), None,
        "1,000 bytes, expected 8,388,608 (raw 2048 x 2048 big-endian uint16)", {"JPCNN003"}),
    "image without masks": (
        lambda s: _add_image(fx.image_path(s, "JPCNN005")), None,
        "no SCR masks of JPCNN005 in", {"JPCNN005"}),
    "missing organ mask": (
        lambda s: (fx.mask_path(s, "fold1", "heart", "JPCNN001").unlink(),
                   fx.mask_path(s, "fold1", "heart", "JPCNN001"))[1], None,
        "mask not found (the other masks of JPCNN001 are in fold1)", {"JPCNN001"}),
    "non-binary mask": (
        lambda s: _grey_mask(fx.mask_path(s, "fold1", "left lung", "JPCLN003")), None,
        "bad mask: not binary: 100 pixels are neither 0 nor 255 (e.g. 128)", {"JPCLN003"}),
    "mask of the wrong size": (
        lambda s: _write_mask(fx.mask_path(s, "fold2", "heart", "JPCLN002"),
                              np.zeros((512, 512), np.uint8)), None,
        "bad mask: size 512 x 512, expected 1024 x 1024", {"JPCLN002"}),
    "unreadable mask": (
        lambda s: _garbage(fx.mask_path(s, "fold2", "left clavicle", "JPCNN002")), None,
        "bad mask: cannot identify image file", {"JPCNN002"}),
    "masks in both folds": (
        lambda s: _copy_masks(s, "JPCNN003", "fold2"), None,
        "JPCNN003 has masks in both fold1 and fold2", {"JPCNN003"}),
    "image linked from outside src": (
        lambda s: link_outside(s, fx.image_path(s, "JPCLN002")), None,
        "JPCLN002.IMG is a link to", {"JPCLN002"}),
    "unknown image name": (
        lambda s: _add_image(s / fx.IMAGE_DIR / "JPCXX001.IMG"), None,
        "unknown image name 'JPCXX001'", set()),
    "unknown mask name": (
        lambda s: _write_mask(fx.mask_path(s, "fold1", "heart", "JPCLN01"),
                              np.zeros((1024, 1024), np.uint8)), None,
        "unknown mask name 'JPCLN01'", set()),
    "masks of no image": (
        lambda s: _copy_masks(s, "JPCNN009", "fold2"), None, "no image JPCNN009.IMG in", set()),
    "image in two folders": (
        lambda s: _add_image(s / "JPCNN002.IMG"), None,
        "another image of this name is at", {"JPCNN002"}),
    "clinical row with a bad number": (
        lambda s: (fx.edit_clinical(s, "\t1634\t", "\tleft\t"), fx.clinical_file(s))[1],
        "JPCLN001", "size, x and y must be numbers, got '14', 'left', '692'", set()),
    "clinical row of a non-nodule image": (
        lambda s: _add_clinical_row(s, "JPCNN001.IMG\t3\t10\t40\tmale\t100\t100\tbenign\tx\ty"),
        "JPCNN001", "'JPCNN001.IMG' is not a nodule image", set()),
    "clinical row of no image": (
        lambda s: _add_clinical_row(s, "JPCLN099.IMG\t3\t10\t40\tmale\t100\t100\tbenign\tx\ty"),
        "JPCLN099", "no image JPCLN099.IMG", set()),
    "clinical row cut short": (
        lambda s: _add_clinical_row(s, "JPCLN002.IMG\t3\t10"),
        "JPCLN002.IMG\t3", "malformed row: 3 tab-separated fields", set()),
    "nodule outside the image": (
        lambda s: (fx.edit_clinical(s, "\t20\t2040\t", "\t20\t2048\t"), fx.clinical_file(s))[1],
        "JPCLN003", "inside the 2048 x 2048 image", set()),
}


def _row_of(src, row_text):
  return None if row_text is None else fx.clinical_line(src, row_text)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_file(src, tmp_path, case):
  breaks, row_text, reason, _ = BAD_INPUTS[case]
  path = breaks(src)
  row = _row_of(src, row_text)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out")
  assert (error.value.file, error.value.row) == (str(path), row)
  where = f"{path}, row {row}" if row else str(path)
  assert str(error.value).startswith(f"{where}: ") and reason in str(error.value), str(
      error.value)
  # Neither the dataset nor a partial folder (OUTSIDE holds what a case links to).
  assert set(os.listdir(tmp_path)) - {OUTSIDE} == {"src"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_skip_bad_skips_and_records(src, tmp_path, case):
  breaks, row_text, reason, left_out = BAD_INPUTS[case]
  path = breaks(src)
  row = _row_of(src, row_text)
  manifest = convert(src, tmp_path / "out", skip_bad=True)
  (item,) = manifest["skipped"]["items"]
  assert (item["file"], item["row"], item.get("image")) == (
      str(path), row, next(iter(left_out), None))
  assert reason in item["reason"]
  written = sorted(examples_by_name(tmp_path / "out"))
  assert written == sorted(set(NAMES) - left_out)
  assert sum(counts(manifest).values()) == len(written)


def test_a_missing_organ_folder_is_an_error(src, tmp_path):
  shutil.rmtree(src / "scratch" / "fold2" / "masks" / "heart")
  with pytest.raises(FileNotFoundError, match="fold2/masks/heart"):
    convert(src, tmp_path / "out", skip_bad=True)


def test_both_spellings_of_an_organ_folder_are_an_error(src, tmp_path):
  shutil.copytree(src / "scratch" / "fold1" / "masks" / "heart",
                  src / "scratch" / "fold1" / "masks" / "left_lung")
  with pytest.raises(BadInputError, match="left_lung: .*left lung holds the same organ"):
    convert(src, tmp_path / "out", skip_bad=True)


def test_no_images_is_an_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no JSRT .IMG files"):
    convert(tmp_path / "empty", tmp_path / "out")


def test_command_line(src, tmp_path, capsys):
  out = tmp_path / "out"
  args = ["--src", str(src), "--out", str(out), "--image-size", str(SIZE), "--workers", "2",
          "--seed", "3"]
  jsrt.main(args)
  manifest = writer.load_manifest(out)
  assert manifest["seed"] == 3 and counts(manifest)["test"] == 2
  assert capsys.readouterr().out.strip() == (
      f"wrote {out}: {', '.join(f'{s} {n}' for s, n in counts(manifest).items())}; "
      "skipped 0 bad inputs")
  _truncate(fx.image_path(src, "JPCLN001"), 10)
  with pytest.raises(SystemExit) as done:
    jsrt.main(args + ["--overwrite"])
  assert str(done.value.code).startswith(f"error: {fx.image_path(src, 'JPCLN001')}: 10 bytes")
  assert writer.load_manifest(out) == manifest
  jsrt.main(args + ["--overwrite", "--skip-bad"])
  assert capsys.readouterr().out.strip().endswith("skipped 1 bad inputs")
