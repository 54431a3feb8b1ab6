"""Weakly-supervised localization from class activation maps: HAM's protocol and Wang et al.'s.

Two streaming evaluators share one input, one `update(cams, boxes, box_labels, valid)` per batch:
  cams: (B, h, w, K) float class activation maps, class k in the last axis;
  boxes: (B, M, 4) normalised [xmin, ymin, xmax, ymax] in [0, 1] (x across, y down);
  box_labels: (B, M) int class index of each box, -1 for padding;
  valid: (B,) 0 for padding examples, which are skipped.
Both evaluate every (valid image, class) pair where the image has at least one box of that class,
whatever the classifier predicted for it; other pairs are not evaluated.

Both start alike: the class's map is upsampled to image_size x image_size bilinearly with
align_corners=True (HAM's `refine_cams`, torch `F.interpolate`) and min-max normalised to [0, 1]
per image and class (`minmax_normalize`). Then:
- `HamLocalization` (HAM, Ouyang et al. TMI 2021; research/methods_ham_anatomyxnet.md A.6):
  the predicted pixel mask is normalised map >= threshold; the truth is the union of the class's
  boxes as a pixel mask; IoU = |P & G| / max(|P | G|, 1) and IoR = |P & G| / max(|P|, 1).
  Accuracy at T = fraction of the class's pairs with IoU >= T (IoR >= T).
- `WangLocalization` (Wang et al. CVPR 2017; research/peers_and_users.md 3.2): the normalised map
  scaled to 0..255 is thresholded at each level (>= level); every 8-connected component gives a
  predicted box, its bounding rectangle. A ground-truth box is localised at T when some predicted
  box has IoU > T (IoBB > T, IoBB = intersection / predicted box area), strictly as the paper
  writes. Accuracy = fraction of the class's ground-truth boxes localised; AFP = predicted boxes
  that localise no ground-truth box of the class, per evaluated image.

Pixel convention: pixel (row i, column j) covers [j, j+1) x [i, i+1) in units of 1/image_size,
and a box covers every pixel it overlaps: columns floor(xmin * size) to ceil(xmax * size) - 1,
rows likewise. Box edges within 1e-3 pixel of a pixel boundary are taken to lie on it, so that
boxes stored as float32 do not gain a spurious row or column. Wang's predicted and ground-truth
boxes are compared as such pixel rectangles, so their IoU is the IoU of their pixel masks.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage

from cxr_jax import layers
from cxr_jax.metrics import streaming
from cxr_jax.metrics.classification import format_value, json_float, text_table

IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# HAM's T(IoR) grid, also the T(IoBB) grid of Wang et al. (their Table 4).
IOR_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
# HAM's zero-range replacement in min-max normalisation (`refine_cams`).
_ZERO_RANGE = 1e-5
# Box edges this close to a pixel boundary (in pixels) are snapped onto it.
_SNAP = 1e-3
# Wang et al. box "isolated regions" without saying which neighbours join one. 8-connectivity
# (diagonal neighbours join) keeps a region touching itself only at a corner as one box.
_CONNECTIVITY = np.ones((3, 3), bool)
# Thresholds logged by `scalars` (the full grids are in `result`).
_LOGGED_IOU = (0.1, 0.3, 0.5)
_LOGGED_IOR = (0.5,)


def _resize_planes(planes: np.ndarray, size: int) -> np.ndarray:
  """(n, h, w) -> (n, size, size) float32 align-corners bilinear resize of each plane."""
  rows = layers.align_corners_matrix(size, planes.shape[1]).astype(np.float32)
  cols = layers.align_corners_matrix(size, planes.shape[2]).astype(np.float32)
  return rows @ np.asarray(planes, np.float32) @ cols.T


def resize_align_corners(maps, size: int) -> np.ndarray:
  """Bilinear resize of the first two axes to (size, size), as torch's align_corners=True.

  Equals `F.interpolate(x, (size, size), mode="bilinear", align_corners=True)` up to float32
  rounding, computed as two small interpolation-matrix products.

  Args:
    maps: (h, w, ...) float maps; trailing axes (e.g. classes) are resized alike.
    size: output height and width.

  Returns:
    (size, size, ...) float32.
  """
  maps = np.asarray(maps, np.float32)
  planes = np.moveaxis(maps.reshape(maps.shape[:2] + (-1,)), -1, 0)
  resized = np.moveaxis(_resize_planes(planes, size), 0, -1)
  return resized.reshape((size, size) + maps.shape[2:])


def _minmax(maps: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
  """HAM's min-max normalisation over `axes` (see `minmax_normalize`), float32."""
  maps = np.asarray(maps, np.float32)
  low, high = maps.min(axis=axes, keepdims=True), maps.max(axis=axes, keepdims=True)
  spread = high - low
  return (maps - low) / np.where(spread == 0, np.float32(_ZERO_RANGE), spread)


def minmax_normalize(maps) -> np.ndarray:
  """Per-map min-max normalisation over the first two axes, exactly as HAM's `refine_cams`.

  (x - min) / (max - min), where a zero range is replaced by 1e-5 so that a constant map becomes
  all zeros (research/methods_ham_anatomyxnet.md A.2 item 8 and A.6; official `refine_cams`:
  `norm[norm == 0] = 1e-5`).

  Args:
    maps: (H, W, ...) float maps; each trailing index is one map.

  Returns:
    float32 maps of the same shape in [0, 1].
  """
  return _minmax(maps, (0, 1))


def box_pixel_ranges(boxes, size: int, xp=np):
  """(..., 4) [col0, row0, col1, row1] floats: the half-open pixel ranges that normalised
  [xmin, ymin, xmax, ymax] boxes cover on a size x size grid (edges within _SNAP of a pixel
  border snap to it). `xp` is numpy or jax.numpy, so that training masks match evaluation's."""
  edges = xp.asarray(boxes) * size
  nearest = xp.round(edges)
  edges = xp.where(xp.abs(edges - nearest) < _SNAP, nearest, edges)
  corners = xp.concatenate([xp.floor(edges[..., :2]), xp.ceil(edges[..., 2:])], axis=-1)
  return xp.clip(corners, 0, size)


def _box_pixels(boxes, size: int) -> np.ndarray:
  """(n, 4) int64 [col0, row0, col1, row1]: the half-open pixel ranges the boxes cover."""
  return box_pixel_ranges(np.asarray(boxes, np.float64).reshape(-1, 4), size).astype(np.int64)


def box_mask(boxes, size: int) -> np.ndarray:
  """The union of normalised boxes as a (size, size) bool pixel mask.

  Args:
    boxes: (n, 4) normalised [xmin, ymin, xmax, ymax] in [0, 1].
    size: mask height and width.

  Returns:
    (size, size) bool, true on every pixel a box overlaps (the module's pixel convention).
  """
  mask = np.zeros((size, size), bool)
  for col0, row0, col1, row1 in _box_pixels(boxes, size):
    mask[row0:row1, col0:col1] = True
  return mask


def _check_batch(cams, boxes, box_labels, valid, n_classes: int):
  """The batch as numpy arrays, shapes and class indices checked."""
  cams, boxes = np.asarray(cams), np.asarray(boxes, np.float64)
  box_labels, valid = np.asarray(box_labels), np.asarray(valid).astype(bool)
  batch = cams.shape[0] if cams.ndim == 4 else -1
  if (cams.ndim != 4 or cams.shape[-1] != n_classes or valid.shape != (batch,)
      or boxes.shape != box_labels.shape + (4,) or box_labels.shape[:1] != (batch,)):
    raise ValueError(
        f"expected cams (B, h, w, {n_classes}), boxes (B, M, 4), box_labels (B, M), valid (B,); "
        f"got {cams.shape}, {boxes.shape}, {box_labels.shape}, {valid.shape}")
  if ((box_labels < -1) | (box_labels >= n_classes)).any():
    raise ValueError(f"box labels must be -1 (padding) or in [0, {n_classes}), "
                     f"found {np.unique(box_labels).tolist()}")
  return cams, boxes, box_labels, valid


def _boxed_maps(cams, boxes, box_labels, valid,
                size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(class, normalised (size, size) map, (m, 4) boxes of the class) for each evaluated pair."""
  for b in np.flatnonzero(valid):
    labels = box_labels[b]
    classes = np.unique(labels[labels >= 0])
    if not classes.size:
      continue
    # Only the classes with a box are upsampled: the others are never looked at. Maps are
    # handled as contiguous (class, row, column) planes, for fast per-map reductions.
    planes = _minmax(_resize_planes(np.moveaxis(cams[b][..., classes], -1, 0), size), (1, 2))
    for k, plane in zip(classes, planes):
      yield int(k), plane, boxes[b][labels == k]


def _settings(owner: str, class_names: Sequence[str], image_size: int) -> tuple[tuple, int]:
  """Checked class names and image size, the constructor arguments both protocols share."""
  class_names = tuple(class_names)
  if len(set(class_names)) != len(class_names) or not class_names:
    raise ValueError(f"{owner}: need distinct class names, got {class_names}")
  if image_size < 1:
    raise ValueError(f"{owner}: image_size must be positive, got {image_size}")
  return class_names, int(image_size)


class HamLocalization:
  """HAM's localization protocol: pixel mask of the normalised map against the box mask.

  Per evaluated (image, class) pair it keeps the class, the IoU and the IoR. Accuracy at T is
  the fraction of a class's pairs with IoU >= T (IoR >= T), as HAM's `test` counts.

  `threshold` 0.469 stands for HAM's refined-map threshold: sigmoid(100 (N - 0.4)) >= 0.999 is
  N >= 0.4 + ln(999) / 100 = 0.46907 (research/methods_ham_anatomyxnet.md A.6).

  HAM selects models by "mean T(IoU)" over all its 14 classes with 0 for the 6 without boxes;
  `mean_tiou` here averages only the classes that have pairs, so it reads as an accuracy.
  """

  def __init__(self, class_names: Sequence[str], image_size: int, threshold: float = 0.469):
    self.class_names, self.image_size = _settings("HamLocalization", class_names, image_size)
    self.threshold = float(threshold)
    self._classes: list[int] = []
    self._iou: list[float] = []
    self._ior: list[float] = []

  def update(self, cams, boxes, box_labels, valid) -> None:
    """Scores every (valid image, class with a box) pair of a batch (see the module docstring)."""
    batch = _check_batch(cams, boxes, box_labels, valid, len(self.class_names))
    for k, heat, class_boxes in _boxed_maps(*batch, self.image_size):
      predicted = heat >= self.threshold
      truth = box_mask(class_boxes, self.image_size)
      overlap = np.count_nonzero(predicted & truth)
      self._classes.append(k)
      self._iou.append(overlap / max(np.count_nonzero(predicted | truth), 1))
      self._ior.append(overlap / max(np.count_nonzero(predicted), 1))

  def _n_pairs(self) -> np.ndarray:
    return np.bincount(np.array(self._classes, np.int64), minlength=len(self.class_names))

  def _accuracy(self, values: list[float], thresholds: Sequence[float]) -> np.ndarray:
    """(K, T) fraction of each class's pairs with value >= threshold, NaN without pairs."""
    hits = np.zeros((len(self.class_names), len(thresholds)))
    np.add.at(hits, np.array(self._classes, np.int64),
              np.array(values).reshape(-1, 1) >= np.array(thresholds))
    return streaming.ratio(hits, self._n_pairs()[:, None])

  def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, 7) IoU and (K, 5) IoR accuracies and (K,) mean T(IoU); NaN for classes without pairs."""
    iou_acc = self._accuracy(self._iou, IOU_THRESHOLDS)
    return iou_acc, self._accuracy(self._ior, IOR_THRESHOLDS), iou_acc.mean(axis=1)

  def result(self) -> dict[str, Any]:
    """The JSON-ready report.

    Returns:
      protocol: {name "ham", image_size, threshold, iou_thresholds, ior_thresholds, rule};
      classes: {name: {n_pairs, iou_acc: {"0.1": acc, ...}, ior_acc: {...}, mean_tiou}} for
        every class (None without pairs), mean_tiou being the mean over the T(IoU) grid;
      n_pairs; mean_tiou, mean_iou_acc, mean_ior_acc: unweighted means over the classes with
        pairs (None if none).
    """
    iou_acc, ior_acc, tiou = self._tables()
    n_pairs = self._n_pairs()
    classes = {
        name: {"n_pairs": int(n_pairs[k]),
               "iou_acc": streaming.by_threshold(IOU_THRESHOLDS, iou_acc[k]),
               "ior_acc": streaming.by_threshold(IOR_THRESHOLDS, ior_acc[k]),
               "mean_tiou": json_float(tiou[k])}
        for k, name in enumerate(self.class_names)}
    return {
        "protocol": {"name": "ham", "image_size": self.image_size, "threshold": self.threshold,
                     "iou_thresholds": list(IOU_THRESHOLDS),
                     "ior_thresholds": list(IOR_THRESHOLDS), "rule": "value >= T"},
        "classes": classes,
        "n_pairs": int(n_pairs.sum()),
        "mean_tiou": json_float(streaming.defined_mean(tiou)),
        "mean_iou_acc": streaming.by_threshold(IOU_THRESHOLDS, streaming.defined_mean(iou_acc)),
        "mean_ior_acc": streaming.by_threshold(IOR_THRESHOLDS, streaming.defined_mean(ior_acc)),
    }

  def scalars(self) -> dict[str, float]:
    """Class means: loc/ham/{mean_tiou, iou@0.1, iou@0.3, iou@0.5, ior@0.5}, NaN without pairs."""
    iou_acc, ior_acc, tiou = (streaming.defined_mean(table) for table in self._tables())
    return {"loc/ham/mean_tiou": float(tiou),
            **_logged("loc/ham/iou", IOU_THRESHOLDS, iou_acc, _LOGGED_IOU),
            **_logged("loc/ham/ior", IOR_THRESHOLDS, ior_acc, _LOGGED_IOR)}


def _logged(prefix: str, thresholds: Sequence[float], values: np.ndarray,
            chosen: Sequence[float]) -> dict[str, float]:
  """{f"{prefix}@{t}": value} for the chosen thresholds of a grid."""
  return {f"{prefix}@{t:g}": float(values[thresholds.index(t)]) for t in chosen}


def _component_boxes(binary: np.ndarray) -> np.ndarray:
  """(P, 4) int64 [col0, row0, col1, row1] bounding rectangles of the 8-connected regions."""
  labels, _ = ndimage.label(binary, structure=_CONNECTIVITY)
  boxes = [[cols.start, rows.start, cols.stop, rows.stop]
           for rows, cols in ndimage.find_objects(labels)]
  return np.array(boxes, np.int64).reshape(-1, 4)


def _area(boxes: np.ndarray) -> np.ndarray:
  return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def _box_overlaps(predicted: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
  """(P, G) IoU and IoBB (intersection / predicted area) of pixel rectangles, by name."""
  low = np.maximum(predicted[:, None, :2], truth[None, :, :2])
  high = np.minimum(predicted[:, None, 2:], truth[None, :, 2:])
  inter = _area(np.concatenate([low, high], axis=-1))
  predicted_area, truth_area = _area(predicted)[:, None], _area(truth)[None, :]
  return {"iou": inter / np.maximum(predicted_area + truth_area - inter, 1),
          "iobb": inter / np.maximum(predicted_area, 1)}


class WangLocalization:
  """Wang et al.'s (ChestX-ray8) protocol: boxes around thresholded regions against the GT boxes.

  For each evaluated (image, class) pair and each level, the regions of the 0..255 map at or
  above the level become predicted boxes. Thresholding the float map equals thresholding the
  truncated 8-bit image the paper draws, since v >= level exactly when floor(v) >= level.

  Counted per class, level and threshold T (for IoU and IoBB alike):
  - localised: ground-truth boxes of the class that some predicted box overlaps by more than T;
    Acc = localised / ground-truth boxes of the class.
  - false positives: predicted boxes that overlap no ground-truth box of the class by more than
    T (a predicted box localising any ground-truth box is not one); AFP = false positives /
    evaluated images of the class. Images without a box of the class are not evaluated, so
    boxes drawn on them are not counted (the paper's AFP leaves this open).
  Only these sums are kept.
  """

  def __init__(self, class_names: Sequence[str], image_size: int,
               levels: Sequence[int] = (60, 180)):
    self.class_names, self.image_size = _settings("WangLocalization", class_names, image_size)
    self.levels = tuple(int(level) for level in levels)
    if not self.levels or not all(0 < level <= 255 for level in self.levels):
      raise ValueError(f"levels must be in (0, 255], got {levels}")
    n_classes, n_levels = len(self.class_names), len(self.levels)
    self._thresholds = {"iou": IOU_THRESHOLDS, "iobb": IOR_THRESHOLDS}
    self._n_images = np.zeros(n_classes, np.int64)
    self._n_boxes = np.zeros(n_classes, np.int64)
    self._localised = {name: np.zeros((n_classes, n_levels, len(grid)), np.int64)
                       for name, grid in self._thresholds.items()}
    self._false_pos = {name: np.zeros((n_classes, n_levels, len(grid)), np.int64)
                       for name, grid in self._thresholds.items()}

  def update(self, cams, boxes, box_labels, valid) -> None:
    """Scores every (valid image, class with a box) pair of a batch (see the module docstring)."""
    batch = _check_batch(cams, boxes, box_labels, valid, len(self.class_names))
    for k, heat, class_boxes in _boxed_maps(*batch, self.image_size):
      truth = _box_pixels(class_boxes, self.image_size)
      self._n_images[k] += 1
      self._n_boxes[k] += len(truth)
      scaled = heat * 255
      for level_index, level in enumerate(self.levels):
        overlaps = _box_overlaps(_component_boxes(scaled >= level), truth)
        for name, grid in self._thresholds.items():
          # hit[t, p, g]: predicted box p localises ground-truth box g at threshold t.
          hit = overlaps[name][None] > np.array(grid)[:, None, None]
          self._localised[name][k, level_index] += hit.any(axis=1).sum(axis=1)
          self._false_pos[name][k, level_index] += (~hit.any(axis=2)).sum(axis=1)

  def _tables(self, level_index: int) -> dict[str, np.ndarray]:
    """(K, T) acc and AFP per criterion and (K,) mean T(IoU) at one level; NaN where undefined."""
    tables = {}
    for name in self._thresholds:
      tables[f"{name}_acc"] = streaming.ratio(self._localised[name][:, level_index],
                                              self._n_boxes[:, None])
      tables[f"{name}_afp"] = streaming.ratio(self._false_pos[name][:, level_index],
                                              self._n_images[:, None])
    tables["mean_tiou"] = tables["iou_acc"].mean(axis=1)
    return tables

  def _level_result(self, level_index: int) -> dict[str, Any]:
    """The report of one level: per class, then unweighted means over classes with boxes."""
    tables = self._tables(level_index)
    grids = {f"{name}_{kind}": grid for name, grid in self._thresholds.items()
             for kind in ("acc", "afp")}
    classes = {}
    for k, class_name in enumerate(self.class_names):
      classes[class_name] = {"n_images": int(self._n_images[k]), "n_boxes": int(self._n_boxes[k]),
                             **{key: streaming.by_threshold(grid, tables[key][k])
                                for key, grid in grids.items()},
                             "mean_tiou": json_float(tables["mean_tiou"][k])}
    means = {f"mean_{key}": streaming.by_threshold(grid, streaming.defined_mean(tables[key]))
             for key, grid in grids.items()}
    return {"classes": classes, "mean_tiou": json_float(streaming.defined_mean(
        tables["mean_tiou"])), **means}

  def result(self) -> dict[str, Any]:
    """The JSON-ready report.

    Returns:
      protocol: {name "wang", image_size, levels, connectivity 8, iou_thresholds,
        iobb_thresholds, rule};
      n_pairs, n_boxes: evaluated (image, class) pairs and their ground-truth boxes;
      levels: {"60": {classes: {name: {n_images, n_boxes, iou_acc: {"0.1": acc, ...},
        iou_afp, iobb_acc, iobb_afp, mean_tiou}}, mean_tiou, mean_iou_acc, mean_iou_afp,
        mean_iobb_acc, mean_iobb_afp}, ...}; None where a class has no box, means over the
        classes with boxes.
    """
    return {
        "protocol": {"name": "wang", "image_size": self.image_size, "levels": list(self.levels),
                     "connectivity": 8, "iou_thresholds": list(IOU_THRESHOLDS),
                     "iobb_thresholds": list(IOR_THRESHOLDS), "rule": "value > T"},
        "n_pairs": int(self._n_images.sum()),
        "n_boxes": int(self._n_boxes.sum()),
        "levels": {str(level): self._level_result(i) for i, level in enumerate(self.levels)},
    }

  def scalars(self) -> dict[str, float]:
    """Class means per level L, NaN without boxes.

    Keys loc/wangL/{mean_tiou, iou@0.1, iou@0.3, iou@0.5, iobb@0.5, afp_iobb@0.5}.
    """
    scalars = {}
    for i, level in enumerate(self.levels):
      prefix = f"loc/wang{level}"
      means = {key: streaming.defined_mean(table) for key, table in self._tables(i).items()}
      scalars.update({f"{prefix}/mean_tiou": float(means["mean_tiou"]),
                      **_logged(f"{prefix}/iou", IOU_THRESHOLDS, means["iou_acc"], _LOGGED_IOU),
                      **_logged(f"{prefix}/iobb", IOR_THRESHOLDS, means["iobb_acc"], _LOGGED_IOR),
                      **_logged(f"{prefix}/afp_iobb", IOR_THRESHOLDS, means["iobb_afp"],
                                _LOGGED_IOR)})
    return scalars


def _section(title: str, report: dict[str, Any], count: str, key: str,
             thresholds: Sequence[float]) -> str:
  """One titled table: a row per evaluated class (its count, then `key` at each threshold), the
  mean last. Classes without boxes are left out (the JSON report keeps them, as undefined).

  The accuracy sections also show each class's mean T(IoU) when `key` is "iou_acc".
  """
  with_mean = key == "iou_acc"
  header = ["class", count] + [f"{t:g}" for t in thresholds] + (["mean"] if with_mean else [])

  def row(name, n, values, tiou):
    cells = [name, n] + [format_value(v) for v in values.values()]
    return cells + ([format_value(tiou)] if with_mean else [])

  rows = [row(name, str(c[f"n_{count}"]), c[key], c["mean_tiou"])
          for name, c in report["classes"].items() if c[f"n_{count}"]]
  rows.append(row("mean", "", report[f"mean_{key}"], report["mean_tiou"]))
  return f"{title}\n{text_table([header] + rows)}"


def format_table(report: dict[str, Any]) -> str:
  """Per-class text tables of a `HamLocalization` or `WangLocalization` report.

  HAM: accuracy at each T(IoU) (with the mean T(IoU)) and at each T(IoR). Wang, per level:
  accuracy at each T(IoU) and T(IoBB), and AFP at each T(IoBB), as in the paper's Table 4.
  """
  if report["protocol"]["name"] == "ham":
    return "\n\n".join([
        _section("accuracy at T(IoU)", report, "pairs", "iou_acc", IOU_THRESHOLDS),
        _section("accuracy at T(IoR)", report, "pairs", "ior_acc", IOR_THRESHOLDS)])
  sections = []
  for level, level_report in report["levels"].items():
    sections += [
        _section(f"level {level}: accuracy at T(IoU)", level_report, "boxes", "iou_acc",
                 IOU_THRESHOLDS),
        _section(f"level {level}: accuracy at T(IoBB)", level_report, "boxes", "iobb_acc",
                 IOR_THRESHOLDS),
        _section(f"level {level}: AFP at T(IoBB)", level_report, "images", "iobb_afp",
                 IOR_THRESHOLDS)]
  return "\n\n".join(sections)
