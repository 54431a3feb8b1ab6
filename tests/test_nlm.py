"""Tests of data_prep.nlm on small Montgomery and Shenzhen folders (tests/nlm_fixtures.py)."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import nlm_fixtures as fx
from nih_fixtures import OUTSIDE, link_outside
from cxr_jax.data import labels, writer
from datasets import read_all
from data_prep import common, nlm
from data_prep.common import BadInputError

SIZE = 32
RIGHT, LEFT = 1, 2  # ANATOMY_NAMES ids
SETS = {"montgomery": (fx.write_montgomery, fx.MONTGOMERY_IMAGES),
        "shenzhen": (fx.write_shenzhen, fx.SHENZHEN_IMAGES)}
WRITTEN = {"montgomery": sorted(x.name for x in fx.MONTGOMERY_IMAGES),
           "shenzhen": sorted(x.name for x in fx.SHENZHEN_IMAGES if x.has_mask)}


def convert(src, out, **kwargs):
  return nlm.convert(str(src), str(out), image_size=SIZE, workers=1, **kwargs)


def examples_by_name(out):
  return {ex.image_id: ex for exs in read_all(out).values() for ex in exs}


def splits_by_name(out):
  return {ex.image_id: split for split, exs in read_all(out).items() for ex in exs}


def pixels(png):
  image = Image.open(io.BytesIO(png))
  assert (image.mode, image.size) == ("L", (SIZE, SIZE))
  return np.asarray(image)


def counts(manifest):
  return {split: v["num_records"] for split, v in manifest["splits"].items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The default conversion of each fixture, shared by the tests that only read it."""
  done = {}
  for name, (write, _) in SETS.items():
    root = tmp_path_factory.mktemp(name)
    src = write(root / "src")
    done[name] = (src, root / "out", convert(src, root / "out"))
  return done


def test_anatomy_names_are_in_the_vocabulary():
  assert nlm.ANATOMY_NAMES == ("background", "right_lung", "left_lung")
  assert set(nlm.ANATOMY_NAMES) <= set(labels.ANATOMY_VOCABULARY)
  assert (nlm.RIGHT, nlm.LEFT) == (RIGHT, LEFT)


@pytest.mark.parametrize("name", list(SETS))
def test_converts_and_round_trips(converted, name):
  src, out, manifest = converted[name]
  assert manifest["name"] == manifest["set"] == name
  assert counts(manifest) == dict(train=3, val=1, test=1)
  assert manifest["label_names"] == ["Nodule"]
  assert manifest["anatomy_names"] == list(nlm.ANATOMY_NAMES)
  assert manifest["skipped"] == dict(count=0, items=[])  # Thumbs.db is not an input
  assert (manifest["val_fraction"], manifest["test_fraction"], manifest["seed"]) == (0.1, 0.1, 0)
  set_dir = fx.MONTGOMERY if name == "montgomery" else fx.SHENZHEN
  assert manifest["images"] == str(src / set_dir / fx.IMAGE_DIR)
  assert manifest["masks"] == str(src / set_dir / "ManualMask" if name == "montgomery"
                                  else src / "mask")
  examples = examples_by_name(out)
  assert sorted(examples) == WRITTEN[name]
  for image_id, ex in examples.items():
    assert (ex.patient_id, ex.study_id, ex.view) == (image_id[:-2], image_id, "PA")
    assert np.isnan(ex.labels).all() and ex.labels.shape == (1,)
    assert len(ex.boxes) == 0
  for split in manifest["splits"].values():
    assert split["label_counts"]["unknown"] == [split["num_records"]]


@pytest.mark.parametrize("name", list(SETS))
def test_images_are_gray_with_dark_lungs(converted, name):
  _, out, _ = converted[name]
  xrays = {x.name: x for x in SETS[name][1]}
  for image_id, ex in examples_by_name(out).items():
    image = pixels(ex.image)
    # 8-bit, 16-bit and RGB sources all give the same 8-bit values.
    assert image[0, 0] == xrays[image_id].gray, image_id
    assert image[16, 8] == image[16, 23] == fx.LUNG_GRAY, image_id


@pytest.mark.parametrize("name", list(SETS))
def test_label_maps_put_the_right_lung_on_the_images_left(converted, name):
  _, out, _ = converted[name]
  xrays = {x.name: x for x in SETS[name][1]}
  for image_id, ex in examples_by_name(out).items():
    label_map = pixels(ex.anatomy)
    np.testing.assert_array_equal(
        label_map, fx.expected_label_map(xrays[image_id], SIZE, RIGHT, LEFT), err_msg=image_id)
    ys, xs = np.nonzero(label_map == RIGHT)
    assert len(xs) and xs.max() < SIZE // 2, image_id
    ys, xs = np.nonzero(label_map == LEFT)
    assert len(xs) and xs.min() >= SIZE // 2, image_id
    assert set(np.unique(label_map)) == {0, RIGHT, LEFT}


def test_montgomery_left_mask_becomes_left_lung(converted):
  """The fixture's leftMask holds the lung on the image's right, as on a PA film."""
  _, _, manifest = converted["montgomery"]
  assert manifest["montgomery_mask_sides"] == dict(left_mask_on_image_right=5,
                                                   left_mask_on_image_left=0)
  xray = fx.MONTGOMERY_IMAGES[0]
  on_left, on_right = fx.lung_masks(xray.size)
  ids, left_on_right = nlm.montgomery_map(on_right, on_left)  # (leftMask, rightMask)
  assert left_on_right and (ids[on_right] == LEFT).all() and (ids[on_left] == RIGHT).all()
  # Swapped masks (leftMask on the image's left) still give the image-left lung right_lung.
  ids, left_on_right = nlm.montgomery_map(on_left, on_right)
  assert not left_on_right and (ids[on_left] == RIGHT).all() and (ids[on_right] == LEFT).all()


def test_shenzhen_mask_is_split_into_two_lungs(converted):
  xray = next(x for x in fx.SHENZHEN_IMAGES if x.speck)
  on_left, on_right = fx.lung_masks(xray.size)
  speck = fx.speck_mask(xray.size)
  ids = nlm.split_lungs(on_left | on_right | speck)
  assert (ids[on_left] == RIGHT).all() and (ids[on_right] == LEFT).all()
  assert (ids[speck] == LEFT).all()  # the speck goes to the nearer lung, not dropped
  assert (ids[~(on_left | on_right | speck)] == 0).all()
  _, _, manifest = converted["shenzhen"]
  assert manifest["small_regions"] == "given to the nearer lung"


def test_shenzhen_images_without_a_mask_are_counted_and_left_out(converted):
  _, out, manifest = converted["shenzhen"]
  assert manifest["images_without_mask"] == 1
  assert "CHNCXR_0006_1" not in examples_by_name(out)
  assert converted["montgomery"][2]["images_without_mask"] == 0


def test_split_is_deterministic_and_by_seeded_hash(converted, tmp_path):
  src, _, manifest = converted["shenzhen"]
  again = convert(src, tmp_path / "again")
  for split, info in manifest["splits"].items():
    assert [s["sha256"] for s in again["splits"][split]["shards"]] == [
        s["sha256"] for s in info["shards"]]
  patients = sorted(name[:-2] for name in WRITTEN["shenzhen"])
  assert nlm.assign_splits(patients, 0.1, 0.1, 0) == {
      name[:-2]: split for name, split in splits_by_name(tmp_path / "again").items()}
  test = common.carve_by_patient(patients, 0.1, 0)
  assert {p for p, s in nlm.assign_splits(patients, 0.1, 0.1, 0).items() if s == "test"} == test
  # Another seed moves some patients; the file order never matters.
  assert len({tuple(sorted(nlm.assign_splits(patients, 0.2, 0.2, seed).items()))
              for seed in range(6)}) > 1
  assert nlm.assign_splits(patients[::-1], 0.1, 0.1, 3) == nlm.assign_splits(patients, 0.1, 0.1, 3)
  shifted = convert(src, tmp_path / "seeded", seed=7, val_fraction=0.0, test_fraction=0.4)
  assert counts(shifted) == dict(train=3, test=2)


def test_fractions_must_leave_training(tmp_path):
  with pytest.raises(common.OptionsError, match="sum below 1"):
    nlm.assign_splits(["a", "b"], 0.5, 0.5, 0)


def test_other_layouts_give_the_same_records(converted, tmp_path):
  """--src as the set's own folder, --set named, masks elsewhere (--masks)."""
  for name, set_dir, masks_dir in (("montgomery", fx.MONTGOMERY, "ManualMask"),
                                   ("shenzhen", fx.SHENZHEN, None)):
    src, _, manifest = converted[name]
    other = tmp_path / name / set_dir
    shutil.copytree(src / set_dir / fx.IMAGE_DIR, other / fx.IMAGE_DIR)
    masks = tmp_path / name / "elsewhere"
    shutil.copytree(src / set_dir / masks_dir if masks_dir else src / "mask", masks)
    other_manifest = convert(other, tmp_path / name / "out", which=name, masks=str(masks))
    assert other_manifest["masks"] == str(masks)
    for split, info in manifest["splits"].items():
      assert [s["sha256"] for s in other_manifest["splits"][split]["shards"]] == [
          s["sha256"] for s in info["shards"]], name


def test_auto_refuses_both_sets_and_finds_none(converted, tmp_path):
  both = tmp_path / "both"
  for name in SETS:
    shutil.copytree(converted[name][0], both, dirs_exist_ok=True)
  with pytest.raises(common.OptionsError, match="both the Montgomery and the Shenzhen set"):
    convert(both, tmp_path / "out")
  assert convert(both, tmp_path / "out", which="montgomery")["set"] == "montgomery"
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither MontgomerySet/CXR_png"):
    convert(tmp_path / "empty", tmp_path / "out2")


def _write_bytes(path, data):
  path.write_bytes(data)
  return path


def _mask_values(path, values):
  return fx.write_mask_array(path, values)


def _one_lung(src):
  xray = fx.SHENZHEN_IMAGES[3]
  on_left, _ = fx.lung_masks(xray.size)
  return _mask_values(fx.shenzhen_mask(src, xray.name), on_left * 255)


def _unlink(path):
  path.unlink()
  return path


M0, M2 = fx.MONTGOMERY_IMAGES[0].name, fx.MONTGOMERY_IMAGES[2].name
S1, S4 = fx.SHENZHEN_IMAGES[1].name, fx.SHENZHEN_IMAGES[4].name

# name: (set, breaks the fixture and returns the file the error names, message part, the image
# left out)
BAD_INPUTS = {
    "montgomery zero-byte image": (
        "montgomery", lambda s: _write_bytes(fx.montgomery_image(s, M0), b""),
        "cannot read image", M0),
    "montgomery unreadable image": (
        "montgomery", lambda s: _write_bytes(fx.montgomery_image(s, M2), b"\x89PNG broken"),
        "cannot read image", M2),
    "montgomery mask of another size": (
        "montgomery", lambda s: _mask_values(fx.montgomery_mask(s, "leftMask", M0),
                                             np.full((10, 12), 255)),
        "bad mask: size 12 x 10 differs from its image's 96 x 112", M0),
    "montgomery empty mask": (
        "montgomery", lambda s: _mask_values(fx.montgomery_mask(s, "rightMask", M2),
                                             np.full((64, 64), 127)),
        "bad mask: empty: no pixel above 127", M2),
    "montgomery image lacking a mask": (
        "montgomery", lambda s: _unlink(fx.montgomery_mask(s, "rightMask", M0)),
        "mask not found (MCUCXR_0001_0 needs both leftMask and rightMask)", M0),
    "montgomery image linked from outside src": (
        "montgomery", lambda s: link_outside(s, fx.montgomery_image(s, M2)),
        "MCUCXR_0003_0.png is a link to", M2),
    "montgomery mask linked from outside its folder": (
        "montgomery", lambda s: link_outside(s, fx.montgomery_mask(s, "leftMask", M0)),
        "outside the mask folder", M0),
    "montgomery unknown image name": (
        "montgomery", lambda s: _write_bytes(s / fx.MONTGOMERY / fx.IMAGE_DIR / "MCUCXR_01_0.png",
                                             b"x"),
        "unknown image name 'MCUCXR_01_0'", None),
    "montgomery mask of no image": (
        "montgomery", lambda s: _write_bytes(fx.montgomery_mask(s, "leftMask", "MCUCXR_0099_1"),
                                             b"x"),
        "no image MCUCXR_0099_1.png in", None),
    "shenzhen zero-byte image": (
        "shenzhen", lambda s: _write_bytes(fx.shenzhen_image(s, S1), b""),
        "cannot read image", S1),
    "shenzhen mask of another size": (
        "shenzhen", lambda s: _mask_values(fx.shenzhen_mask(s, S4), np.full((72, 80), 255)),
        "bad mask: size 80 x 72 differs from its image's 72 x 80", S4),
    "shenzhen empty mask": (
        "shenzhen", lambda s: _mask_values(fx.shenzhen_mask(s, S1), np.zeros((104, 120))),
        "bad mask: empty", S1),
    "shenzhen mask with one lung": (
        "shenzhen", _one_lung, "bad mask: one connected region: expected two lungs",
        fx.SHENZHEN_IMAGES[3].name),
    "shenzhen unreadable mask": (
        "shenzhen", lambda s: _write_bytes(fx.shenzhen_mask(s, S4), b"\x89PNG broken"),
        "bad mask: cannot identify image file", S4),
    "shenzhen image linked from outside src": (
        "shenzhen", lambda s: link_outside(s, fx.shenzhen_image(s, S4)),
        "CHNCXR_0005_0.png is a link to", S4),
    "shenzhen unknown mask name": (
        "shenzhen", lambda s: _write_bytes(s / "mask" / "CHNCXR_0001_0.png", b"x"),
        "unknown mask name 'CHNCXR_0001_0.png'; expected <image name>_mask.png", None),
}


@pytest.fixture
def src_of(tmp_path):
  return lambda name: SETS[name][0](tmp_path / "src")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_file(src_of, tmp_path, case):
  name, breaks, reason, _ = BAD_INPUTS[case]
  src = src_of(name)
  path = breaks(src)
  with pytest.raises(BadInputError) as error:
    convert(src, tmp_path / "out")
  assert (error.value.file, error.value.row) == (str(path), None)
  assert str(error.value).startswith(f"{path}: ") and reason in str(error.value), str(
      error.value)
  # Neither the dataset nor a partial folder (OUTSIDE holds what a case links to).
  assert set(os.listdir(tmp_path)) - {OUTSIDE} == {"src"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_skip_bad_skips_and_records(src_of, tmp_path, case):
  name, breaks, reason, left_out = BAD_INPUTS[case]
  src = src_of(name)
  path = breaks(src)
  manifest = convert(src, tmp_path / "out", skip_bad=True)
  (item,) = manifest["skipped"]["items"]
  assert (item["file"], item["row"], item.get("image")) == (str(path), None, left_out)
  assert reason in item["reason"]
  written = sorted(examples_by_name(tmp_path / "out"))
  assert written == sorted(set(WRITTEN[name]) - {left_out})
  assert sum(counts(manifest).values()) == len(written)


def test_a_missing_mask_folder_is_an_error(tmp_path):
  src = fx.write_montgomery(tmp_path / "m")
  shutil.rmtree(src / fx.MONTGOMERY / "ManualMask" / "rightMask")
  with pytest.raises(FileNotFoundError, match="ManualMask/rightMask not found"):
    convert(src, tmp_path / "out", skip_bad=True)
  src = fx.write_shenzhen(tmp_path / "s")
  shutil.rmtree(src / "mask")
  with pytest.raises(FileNotFoundError, match="no Shenzhen mask folder"):
    convert(src, tmp_path / "out", skip_bad=True)


def test_command_line(tmp_path, capsys):
  src = fx.write_shenzhen(tmp_path / "src")
  out = tmp_path / "out"
  args = ["--src", str(src), "--out", str(out), "--image-size", str(SIZE), "--workers", "2",
          "--seed", "3", "--set", "shenzhen"]
  nlm.main(args)
  manifest = writer.load_manifest(out)
  assert manifest["seed"] == 3 and sum(counts(manifest).values()) == 5
  assert capsys.readouterr().out.strip() == (
      f"wrote {out} (shenzhen): {', '.join(f'{s} {n}' for s, n in counts(manifest).items())}; "
      "skipped 0 bad inputs; left out 1 images without a mask")
  broken = _write_bytes(fx.shenzhen_image(src, S1), b"")
  with pytest.raises(SystemExit) as done:
    nlm.main(args + ["--overwrite"])
  assert str(done.value.code).startswith(f"error: {broken}: cannot read image")
  assert writer.load_manifest(out) == manifest
  nlm.main(args + ["--overwrite", "--skip-bad"])
  assert capsys.readouterr().out.strip().endswith(
      "skipped 1 bad inputs; left out 1 images without a mask")
