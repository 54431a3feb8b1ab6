"""Segmentation quality of anatomy maps: Dice and IoU per region, streamed batch by batch.

Each image's prediction is the argmax of its per-pixel scores. Per region k the accumulator sums,
over the split, the pixels predicted k, the pixels truly k and their overlap: the pooled Dice
2|P∩T| / (|P| + |T|) and IoU |P∩T| / |P∪T| come from those sums (large and small organs weigh by
their pixels). It also keeps the mean of the per-image Dice over the images where region k is
present (each image weighs one). Means over regions leave out `background` (it dominates the
pixels and would flatter the mean) and any region absent from the split.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

BACKGROUND = "background"


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _pixel_counts(ids: np.ndarray, where: np.ndarray, k: int) -> np.ndarray:
  """(B, K) counts of the pixels of each image with each id, among the pixels `where` is True."""
  flat = (ids + np.arange(len(ids))[:, None] * k)[where]
  return np.bincount(flat, minlength=len(ids) * k).reshape(len(ids), k)


class SegmentationAccumulator:
  """Dice and IoU per region of predicted vs true label maps."""

  def __init__(self, class_names: Sequence[str]):
    self.class_names = list(class_names)
    k = len(self.class_names)
    self.overlap, self.predicted, self.true = (np.zeros(k, np.int64) for _ in range(3))
    self.image_dice_sum, self.images_present = np.zeros(k), np.zeros(k, np.int64)
    self.n_examples = 0

  def update(self, scores: np.ndarray, true_maps: np.ndarray) -> None:
    """Adds a batch: `scores` (B, H, W, K) per-pixel scores, `true_maps` (B, H, W) region ids."""
    if scores.shape[:3] != true_maps.shape:
      raise ValueError(f"scores {scores.shape} and anatomy maps {true_maps.shape} differ in size")
    k = len(self.class_names)
    predicted = np.argmax(scores, axis=-1).reshape(len(scores), -1)
    true = np.asarray(true_maps, np.int64).reshape(len(scores), -1)
    if true.size and (true.min() < 0 or true.max() >= k):
      raise ValueError(f"anatomy maps hold ids outside 0..{k - 1} ({self.class_names})")
    everywhere = np.ones_like(true, bool)
    both = _pixel_counts(true, predicted == true, k)
    pred_n, true_n = _pixel_counts(predicted, everywhere, k), _pixel_counts(true, everywhere, k)
    self.overlap += both.sum(0)
    self.predicted += pred_n.sum(0)
    self.true += true_n.sum(0)
    present = true_n > 0
    image_dice = _ratio(2 * both, pred_n + true_n)
    self.image_dice_sum += np.where(present, image_dice, 0).sum(0)
    self.images_present += present.sum(0)
    self.n_examples += len(scores)

  def result(self) -> dict[str, Any]:
    """{"classes": {region: dice, iou, image_dice, n_images}, "mean_dice", "mean_iou",
    "mean_image_dice" (over regions present, background left out), "n_examples"}."""
    dice = _ratio(2 * self.overlap, self.predicted + self.true)
    iou = _ratio(self.overlap, self.predicted + self.true - self.overlap)
    image_dice = _ratio(self.image_dice_sum, self.images_present)
    counted = [i for i, name in enumerate(self.class_names)
               if name != BACKGROUND and self.true[i] > 0]
    mean = lambda values: float(np.mean(values[counted])) if counted else float("nan")
    classes = {name: dict(dice=_float(dice[i]), iou=_float(iou[i]),
                          image_dice=_float(image_dice[i]), n_images=int(self.images_present[i]))
               for i, name in enumerate(self.class_names)}
    return dict(classes=classes, mean_dice=mean(dice), mean_iou=mean(iou),
                mean_image_dice=mean(image_dice), n_examples=self.n_examples)

  def scalars(self, report: dict[str, Any] | None = None) -> dict[str, float]:
    """`mean_dice`, `mean_iou`, `dice/<region>` for logs and best-checkpoint ranking."""
    report = report or self.result()
    values = {"mean_dice": report["mean_dice"], "mean_iou": report["mean_iou"]}
    values.update({f"dice/{name}": c["dice"] for name, c in report["classes"].items()})
    return {k: float("nan") if v is None else float(v) for k, v in values.items()}


def _float(value: float) -> float | None:
  return None if np.isnan(value) else float(value)


def format_table(report: dict[str, Any]) -> str:
  """The report as a text table: Dice, IoU and per-image Dice per region, then the means."""
  lines = [f"{'region':<16} {'dice':>7} {'iou':>7} {'img dice':>9} {'images':>7}"]
  show = lambda v: "    n/a" if v is None else f"{v:7.4f}"
  for name, c in report["classes"].items():
    lines.append(f"{name:<16} {show(c['dice'])} {show(c['iou'])} {show(c['image_dice'])}  "
                 f"{c['n_images']:>7}")
  lines.append(f"{'mean':<16} {report['mean_dice']:7.4f} {report['mean_iou']:7.4f} "
               f"{report['mean_image_dice']:9.4f}  (background left out)")
  return "\n".join(lines)
