"""Overlay PNGs of class activation maps: what a reader checks before trusting a localization table.

Each overlay shows the image, the class's map (upsampled with align corners, min-max normalised,
as the localization evaluators see it) in a heat colour scale, the ground-truth boxes of that
class in green, the outline of HAM's predicted mask (normalised map >= `config.eval.ham_threshold`)
in red, and a title with the image id, the class and its score. Images with boxes come first
(one overlay per image, for its first boxed class); a split without boxes shows each image's
highest-scoring class.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cxr_jax import experiment, parallel
from cxr_jax.data import pipeline
from cxr_jax.metrics import localization

_GREEN, _RED = (40, 220, 40), (255, 40, 40)
_TITLE_HEIGHT = 14
_MIN_SIDE = 384  # small training images are drawn larger, so that a reader sees the map


def heat_colors(values: np.ndarray) -> np.ndarray:
  """[0, 1] values -> uint8 RGB on a black-red-yellow-white ramp (readable over a radiograph)."""
  v = np.clip(values, 0, 1)[..., None]
  ramp = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                        axis=-1)
  return (255 * ramp).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it."""
  padded = np.pad(mask, 1)
  inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  return mask & ~inner


def overlay(image: np.ndarray, cam: np.ndarray, boxes: np.ndarray, *, threshold: float,
            title: str, alpha: float = 0.45) -> Image.Image:
  """One overlay (see the module docstring), at least `_MIN_SIDE` pixels wide.

  Args:
    image: (S, S) uint8 grayscale image.
    cam: (h, w) float map of one class.
    boxes: (n, 4) normalised ground-truth boxes of that class (may be empty).
    threshold: HAM's mask threshold on the normalised map.
    title: the line written above the image.
    alpha: weight of the heat colours over the image.
  """
  size = image.shape[0] * max(1, -(-_MIN_SIDE // image.shape[0]))
  image = np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))
  normalized = localization.minmax_normalize(localization.resize_align_corners(cam, size))
  gray = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
  rgb = ((1 - alpha) * gray + alpha * heat_colors(normalized)).astype(np.uint8)
  rgb[_outline(normalized >= threshold)] = _RED
  canvas = Image.new("RGB", (size, size + _TITLE_HEIGHT), (0, 0, 0))
  canvas.paste(Image.fromarray(rgb), (0, _TITLE_HEIGHT))
  draw = ImageDraw.Draw(canvas)
  for xmin, ymin, xmax, ymax in np.asarray(boxes).reshape(-1, 4) * size:
    draw.rectangle([xmin, ymin + _TITLE_HEIGHT, xmax - 1, ymax - 1 + _TITLE_HEIGHT], outline=_GREEN)
  draw.text((2, 1), title, fill=(255, 255, 255))
  return canvas


def _choose_class(scores: np.ndarray, box_labels: np.ndarray) -> int:
  """The first boxed class of an example, else its highest-scoring class."""
  boxed = box_labels[box_labels >= 0]
  return int(boxed[0]) if len(boxed) else int(np.argmax(scores))


def write_overlays(run: experiment.Run, state: Any, split: str, count: int, out_dir: str,
                   image_ids: Sequence[str]) -> list[str]:
  """Writes `count` overlays of `split` into `out_dir`, named by image id; returns their paths.

  Runs the model only until enough images are found (boxed images first, from a first pass over
  the boxes alone), one evaluation batch at a time.
  """
  if "cams" not in run.output_shapes():
    raise ValueError(f"method {run.config.model.name!r} returns no cams: no heatmaps to draw")
  eval_step = run.eval_step(with_cams=True)
  chosen: dict[int, tuple[np.ndarray, ...]] = {}  # index -> image, cams, scores, boxes, labels
  for boxed_pass in (True, False):
    for batch in pipeline.to_iterator(experiment.eval_dataset(run.config, run.manifest, run.method,
                                                              split)):
      if len(chosen) >= count:
        break
      local = {int(i): image for i, image in zip(batch["index"], batch["image"][..., 0])}
      device_batch, _ = pipeline.host_fields(batch)
      per_example, _ = eval_step(state, parallel.to_global(device_batch, run.mesh))
      per_example = parallel.gather(per_example)
      for row, index in enumerate(per_example["index"].astype(int)):
        has_boxes = (per_example["box_labels"][row] >= 0).any()
        if index in local and index not in chosen and has_boxes == boxed_pass:
          chosen[index] = (local[index], per_example["cams"][row], per_example["scores"][row],
                           per_example["boxes"][row], per_example["box_labels"][row])
        if len(chosen) >= count:
          break
  if not parallel.is_main_process():
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for index, (image, cams, scores, boxes, box_labels) in list(chosen.items())[:count]:
    k = _choose_class(scores, box_labels)
    title = f"{image_ids[index]}  {run.task.class_names[k]}  p={scores[k]:.3f}"
    picture = overlay(image, cams[..., k], boxes[box_labels == k],
                      threshold=run.config.eval.ham_threshold, title=title)
    paths.append(os.path.join(out_dir, os.path.splitext(image_ids[index])[0] + ".png"))
    picture.save(paths[-1])
  return paths
