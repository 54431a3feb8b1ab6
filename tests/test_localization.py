"""Tests for cxr_jax.metrics.localization and .location_aware on hand-made maps, boxes and labels
whose answers are worked out by hand in each test."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_jax.data.labels import fine_vocabulary
from cxr_jax.metrics import localization, location_aware, streaming

CLASSES = ("Mass", "Nodule", "Effusion")


def _batch(maps, boxes, labels, valid=None):
  """One-image-per-entry batch arrays from lists of (h, w, K) maps, (M, 4) boxes and (M,) labels."""
  valid = np.ones(len(maps)) if valid is None else np.asarray(valid, np.float32)
  return (np.asarray(maps, np.float32), np.asarray(boxes, np.float64),
          np.asarray(labels, np.int64), valid)


def _map(size, hot, n_classes=3, k=0):
  """A (size, size, n_classes) zero map with class k set to `hot` {(row, col): value}."""
  maps = np.zeros((size, size, n_classes), np.float32)
  for (row, col), value in hot.items():
    maps[row, col, k] = value
  return maps


def _torch_resize(maps, size):
  """torch's align-corners bilinear resize of (h, w, C) maps, as (size, size, C)."""
  nchw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(maps, -1, 0)))[None]
  out = F.interpolate(nchw, size=(size, size), mode="bilinear", align_corners=True)
  return np.moveaxis(out[0].numpy(), 0, -1)


@pytest.mark.parametrize("shape,size", [((8, 8, 3), 64), ((5, 7, 2), 13), ((9, 6, 1), 4),
                                        ((3, 3, 1), 1)])
def test_resize_align_corners_matches_torch(shape, size):
  # Upsampling, non-square inputs, downsampling and a single output pixel.
  maps = np.random.default_rng(size).normal(size=shape).astype(np.float32)
  resized = localization.resize_align_corners(maps, size)
  assert resized.shape == (size, size, shape[2]) and resized.dtype == np.float32
  np.testing.assert_allclose(resized, _torch_resize(maps, size), rtol=1e-5, atol=1e-5)


def test_resize_align_corners_hand_values():
  # 2x2 -> 3x3: corners stay, edges midway, the centre is the mean of all four.
  resized = localization.resize_align_corners(np.array([[0.0, 1.0], [2.0, 3.0]]), 3)
  np.testing.assert_allclose(resized, [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-6)
  # Half-pixel-centre resizing (jax.image.resize) would give 0.25 at the first output pixel.
  assert localization.resize_align_corners(np.array([[0.0, 1.0]] * 2), 4)[0, 0] == 0


def test_minmax_normalize_follows_ham():
  maps = np.stack([[[1.0, 3.0], [2.0, 5.0]], np.full((2, 2), 7.0)], axis=-1)
  normalised = localization.minmax_normalize(maps)
  np.testing.assert_allclose(normalised[..., 0], [[0, 0.5], [0.25, 1]])
  # A constant map: HAM replaces the zero range by 1e-5, so it becomes zeros, not NaN.
  np.testing.assert_array_equal(normalised[..., 1], 0)


def test_box_mask_covers_every_overlapped_pixel():
  # size 4: x in [0.3, 0.6] * 4 = [1.2, 2.4] overlaps columns 1 and 2; y in [0, 0.4] -> rows 0, 1.
  expected = np.zeros((4, 4), bool)
  expected[0:2, 1:3] = True
  np.testing.assert_array_equal(localization.box_mask([[0.3, 0.0, 0.6, 0.4]], 4), expected)
  # Edges on pixel boundaries add nothing, even stored as float32 (0.3 * 10 = 3.0000001).
  box = np.array([[0.1, 0.2, 0.3, 0.7]], np.float32)
  expected = np.zeros((10, 10), bool)
  expected[2:7, 1:3] = True
  np.testing.assert_array_equal(localization.box_mask(box, 10), expected)
  # Two boxes, rows 0-1 x columns 0-1 and row 1 x columns 1-3: their union.
  union = localization.box_mask([[0, 0, 0.5, 0.5], [0.25, 0.25, 1, 0.5]], 4)
  np.testing.assert_array_equal(union, [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


def _ham_hand_case():
  """A HAM evaluator fed one hand-made 4x4 image.

  Mass: hot 2x2 square at rows 0-1, columns 0-1 (4 px). Box: rows 0-1, columns 1-2 (4 px).
  Intersection 2 (column 1), union 6: IoU 1/3; IoR 2/4 = 0.5 exactly.
  Nodule: constant map, so it normalises to zeros and predicts nothing: IoU = IoR = 0.
  Effusion: no box anywhere, so no pair.
  """
  maps = _map(4, {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1})
  maps[..., 1] = 0.3
  ham = localization.HamLocalization(CLASSES, image_size=4)
  ham.update(*_batch([maps], [[[0.25, 0, 0.75, 0.5], [0, 0, 1, 1]]], [[0, 1]]))
  return ham


def test_ham_iou_and_ior_by_hand():
  ham = _ham_hand_case()
  report = ham.result()
  json.dumps(report, allow_nan=False)
  mass = report["classes"]["Mass"]
  assert mass["n_pairs"] == 1
  assert mass["iou_acc"] == {"0.1": 1, "0.2": 1, "0.3": 1, "0.4": 0, "0.5": 0, "0.6": 0, "0.7": 0}
  # IoR >= T (HAM's rule): 0.5 counts at T = 0.5.
  assert mass["ior_acc"] == {"0.1": 1, "0.25": 1, "0.5": 1, "0.75": 0, "0.9": 0}
  assert mass["mean_tiou"] == pytest.approx(3 / 7)
  nodule = report["classes"]["Nodule"]
  assert nodule["n_pairs"] == 1 and nodule["mean_tiou"] == 0
  assert set(nodule["ior_acc"].values()) == {0}
  effusion = report["classes"]["Effusion"]
  assert effusion["n_pairs"] == 0 and effusion["mean_tiou"] is None
  assert set(effusion["iou_acc"].values()) == {None}
  assert report["n_pairs"] == 2
  assert report["mean_tiou"] == pytest.approx(3 / 14)
  assert report["mean_ior_acc"]["0.5"] == 0.5
  assert ham.scalars() == pytest.approx({"loc/ham/mean_tiou": 3 / 14, "loc/ham/iou@0.1": 0.5,
                                         "loc/ham/iou@0.3": 0.5, "loc/ham/iou@0.5": 0.0,
                                         "loc/ham/ior@0.5": 0.5})


def test_ham_upsamples_with_align_corners_before_thresholding():
  # 2x2 CAM [[0, 0], [0, 1]] -> 3x3 [[0, 0, 0], [0, .25, .5], [0, .5, 1]]: three pixels reach
  # 0.469. Box: the bottom-right pixel. IoU = IoR = 1/3.
  ham = localization.HamLocalization(CLASSES, image_size=3)
  ham.update(*_batch([_map(2, {(1, 1): 1.0})], [[[2 / 3, 2 / 3, 1, 1]]], [[0]]))
  mass = ham.result()["classes"]["Mass"]
  assert mass["iou_acc"]["0.3"] == 1 and mass["iou_acc"]["0.4"] == 0
  assert mass["ior_acc"]["0.25"] == 1 and mass["ior_acc"]["0.5"] == 0


def _wang_two_blobs():
  """A Wang evaluator fed one hand-made 8x8 image with two blobs.

  Mass map: blob A (value 1) at rows 1-2, columns 1-2; blob B (value 0.5, 127.5 of 255) at rows
  5-6, columns 5-6. Box: rows 1-2, columns 1-3 (6 px).
  Level 60 predicts A and B; level 180 only A. IoU(A) = 4/6, IoBB(A) = 1; B overlaps nothing.
  """
  blobs = {(r, c): 1.0 for r in (1, 2) for c in (1, 2)}
  blobs.update({(r, c): 0.5 for r in (5, 6) for c in (5, 6)})
  wang = localization.WangLocalization(CLASSES, image_size=8)
  wang.update(*_batch([_map(8, blobs)], [[[1 / 8, 1 / 8, 4 / 8, 3 / 8]]], [[0]]))
  return wang


def test_wang_two_blobs_give_a_true_and_a_false_positive():
  wang = _wang_two_blobs()
  report = wang.result()
  json.dumps(report, allow_nan=False)
  assert report["n_pairs"] == 1 and report["n_boxes"] == 1
  low, high = report["levels"]["60"]["classes"]["Mass"], report["levels"]["180"]["classes"]["Mass"]
  for mass in (low, high):
    assert mass["n_images"] == 1 and mass["n_boxes"] == 1
    # Localised while 4/6 > T: up to T = 0.6.
    assert list(mass["iou_acc"].values()) == [1, 1, 1, 1, 1, 1, 0]
    assert set(mass["iobb_acc"].values()) == {1}
  # B is a false positive at every threshold; A too once it localises nothing (T = 0.7).
  assert list(low["iou_afp"].values()) == [1, 1, 1, 1, 1, 1, 2]
  assert list(high["iou_afp"].values()) == [0, 0, 0, 0, 0, 0, 1]
  assert set(low["iobb_afp"].values()) == {1} and set(high["iobb_afp"].values()) == {0}
  assert low["mean_tiou"] == pytest.approx(6 / 7)
  assert report["levels"]["60"]["classes"]["Nodule"]["iou_acc"]["0.1"] is None
  assert report["levels"]["60"]["mean_iou_afp"]["0.7"] == 2
  scalars = wang.scalars()
  assert scalars["loc/wang60/afp_iobb@0.5"] == 1 and scalars["loc/wang180/afp_iobb@0.5"] == 0
  assert scalars["loc/wang60/iou@0.5"] == 1 and scalars["loc/wang180/mean_tiou"] == 6 / 7


def test_wang_is_strict_and_joins_diagonal_neighbours():
  # Pixels (0, 0) and (1, 1) touch diagonally: one 8-connected region, box rows/columns 0-1
  # (4 px). Truth: rows 0-1, columns 0-3 (8 px). IoU = 0.5 exactly, IoBB = 1.
  wang = localization.WangLocalization(CLASSES, image_size=8, levels=(60,))
  wang.update(*_batch([_map(8, {(0, 0): 1, (1, 1): 1})], [[[0, 0, 0.5, 0.25]]], [[0]]))
  mass = wang.result()["levels"]["60"]["classes"]["Mass"]
  # 0.5 is not > 0.5. Two 4-connected 1-pixel boxes would have IoU 1/8 and fail at 0.2.
  assert mass["iou_acc"]["0.4"] == 1 and mass["iou_acc"]["0.5"] == 0
  assert mass["iobb_acc"]["0.9"] == 1
  assert mass["iobb_afp"]["0.9"] == 0


def test_format_table_shows_every_evaluated_class_at_every_threshold():
  ham = localization.format_table(_ham_hand_case().result()).splitlines()
  assert ham[0] == "accuracy at T(IoU)" and "accuracy at T(IoR)" in ham
  header = ham[1].split()
  assert header == ["class", "pairs", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "mean"]
  assert ham[3].split() == ["Mass", "1"] + ["1.000"] * 3 + ["0.000"] * 4 + [f"{3 / 7:.3f}"]
  assert not any(line.startswith("Effusion") for line in ham)  # no boxes: not evaluated
  assert ham[6].split() == ["mean"] + ["0.500"] * 3 + ["0.000"] * 4 + [f"{3 / 14:.3f}"]
  wang = localization.format_table(_wang_two_blobs().result())
  titles = [line for line in wang.splitlines() if line.startswith("level")]
  assert titles == [f"level {level}: {what}" for level in (60, 180)
                    for what in ("accuracy at T(IoU)", "accuracy at T(IoBB)", "AFP at T(IoBB)")]
  afp_60 = wang.split("level 60: AFP at T(IoBB)\n")[1].splitlines()
  assert afp_60[2].split() == ["Mass", "1"] + ["1.000"] * 5


def _random_batch(rng, n, size=6, n_boxes=3):
  maps = rng.random((n, size, size, 3)).astype(np.float32)
  corners = rng.random((n, n_boxes, 2)) * 0.6
  boxes = np.concatenate([corners, corners + 0.2 + 0.2 * rng.random((n, n_boxes, 2))], -1)
  labels = rng.integers(-1, 3, (n, n_boxes))
  return maps, boxes, labels, np.ones(n, np.float32)


@pytest.mark.parametrize("make", [lambda: localization.HamLocalization(CLASSES, 16),
                                  lambda: localization.WangLocalization(CLASSES, 16)])
def test_streaming_in_two_batches_equals_one(make):
  batch = _random_batch(np.random.default_rng(0), 10)
  whole, parts = make(), make()
  whole.update(*batch)
  parts.update(*(array[:4] for array in batch))
  parts.update(*(array[4:] for array in batch))
  assert parts.result() == whole.result()
  assert parts.result()["n_pairs"] > 5


@pytest.mark.parametrize("make", [lambda: localization.HamLocalization(CLASSES, 16),
                                  lambda: localization.WangLocalization(CLASSES, 16)])
def test_padding_examples_and_padded_boxes_are_ignored(make):
  rng = np.random.default_rng(1)
  maps, boxes, labels, valid = _random_batch(rng, 6)
  plain = make()
  plain.update(maps, boxes, labels, valid)
  # Padded boxes (label -1) with arbitrary coordinates, and padding examples with real boxes.
  extra_boxes = np.concatenate([boxes, rng.random((6, 2, 4))], axis=1)
  extra_labels = np.concatenate([labels, np.full((6, 2), -1)], axis=1)
  padded = make()
  padded.update(np.concatenate([maps, rng.random((2, 6, 6, 3))]),
                np.concatenate([extra_boxes, rng.random((2, 5, 4))]),
                np.concatenate([extra_labels, np.zeros((2, 5), np.int64)]),
                np.concatenate([valid, np.zeros(2)]))
  assert padded.result() == plain.result()


def test_localization_rejects_bad_batches():
  ham = localization.HamLocalization(CLASSES, 8)
  maps, boxes, labels, valid = _random_batch(np.random.default_rng(2), 2)
  with pytest.raises(ValueError, match="box labels"):
    ham.update(maps, boxes, np.full_like(labels, 3), valid)
  with pytest.raises(ValueError, match="expected cams"):
    ham.update(maps[..., :2], boxes, labels, valid)
  with pytest.raises(ValueError, match="distinct"):
    localization.WangLocalization(("Mass", "Mass"), 8)


def test_location_accuracy_by_hand():
  names = fine_vocabulary(("Nodule", "Mass", "Effusion"))
  column = {name: i for i, name in enumerate(names)}
  scores, targets = np.zeros((4, len(names))), np.zeros((4, len(names)))
  mask = np.ones_like(targets)

  def example(row, positives, top):
    for name in positives:
      targets[row, column[name]] = 1
    scores[row, column[top]] = 1.0

  # Nodule. 0: positive left lower, top left upper -> side right, zone wrong.
  # 1: positive right middle, top left middle -> side wrong, zone right (middle on either side).
  # 2: positive right upper and left lower, top left upper -> side right (left), zone right
  #    (upper, on the right).
  example(0, ["Nodule|left|lower"], "Nodule|left|upper")
  example(1, ["Nodule|right|middle"], "Nodule|left|middle")
  example(2, ["Nodule|right|upper", "Nodule|left|lower"], "Nodule|left|upper")
  # Mass. 0: positive right lower, top left lower -> side wrong, zone right.
  # 2: a positive whose label is unknown (mask 0): Mass is not counted for example 2.
  example(0, ["Mass|right|lower"], "Mass|left|lower")
  example(2, ["Mass|left|upper"], "Mass|right|upper")
  mask[2, column["Mass|left|upper"]] = 0
  # 3: padding, positive everywhere with wrong tops: must change nothing.
  example(3, ["Nodule|right|lower", "Mass|right|lower"], "Nodule|left|upper")
  valid = np.array([1, 1, 1, 0])

  accuracy = location_aware.LocationAccuracy(names)
  accuracy.update(scores, targets, mask, valid)
  report = accuracy.result()
  json.dumps(report, allow_nan=False)
  nodule, mass = report["findings"]["Nodule"], report["findings"]["Mass"]
  assert nodule == pytest.approx({"n_pos": 3, "side_acc": 2 / 3, "zone_acc": 2 / 3})
  assert mass == {"n_pos": 1, "side_acc": 0.0, "zone_acc": 1.0}
  assert report["findings"]["Effusion"] == {"n_pos": 0, "side_acc": None, "zone_acc": None}
  assert report["mean_side_acc"] == pytest.approx(1 / 3)
  assert report["mean_zone_acc"] == pytest.approx(5 / 6)
  assert accuracy.scalars() == pytest.approx({"loc_aware/mean_side_acc": 1 / 3,
                                              "loc_aware/mean_zone_acc": 5 / 6})
  # The same examples one at a time give the same sums.
  streamed = location_aware.LocationAccuracy(names)
  for row in range(4):
    streamed.update(scores[row:row + 1], targets[row:row + 1], mask[row:row + 1],
                    valid[row:row + 1])
  assert streamed.result() == report


def test_location_accuracy_rejects_names_without_a_location():
  with pytest.raises(ValueError, match="Finding|side|zone"):
    location_aware.LocationAccuracy(["Nodule|left|lower", "Nodule"])


def test_all_evaluators_follow_the_protocol():
  evaluators = [localization.HamLocalization(CLASSES, 8),
                localization.WangLocalization(CLASSES, 8),
                location_aware.LocationAccuracy(fine_vocabulary(("Nodule",)))]
  for evaluator in evaluators:
    assert isinstance(evaluator, streaming.Evaluator)
    # Before any update every scalar is undefined, and the report is still strict JSON.
    assert all(np.isnan(value) for value in evaluator.scalars().values())
    json.dumps(evaluator.result(), allow_nan=False)
