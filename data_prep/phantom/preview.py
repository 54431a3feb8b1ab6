"""The preview: one normal image and one image per label of the same patient, on one sheet.

Every tile shares the patient, pose, exposure and noise, so that the tiles differ by their finding
alone; boxes are drawn in red and each tile is captioned with its label and the instances'
side/zone (docs/phantom.md shows one).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_jax.data import labels as label_lib
from data_prep.phantom import streams
from data_prep.phantom.anatomy import sample_anatomy
from data_prep.phantom.render import Rendered, render
from data_prep.phantom.study import sample_study

PREVIEW_CAPTION = 26  # pixels under each preview tile: two lines of text
_RED = 255  # the palette index of the boxes; greys 0..254 are pixels and text


def make_preview(path: str | os.PathLike, image_size: int = 256, seed: int = 0,
                 columns: int = 5) -> None:
  """Writes a grid: one normal image and one per label on the same patient, boxes in red and
  each tile captioned with its label and the instances' side/zone."""
  sheet = _sheet(_tiles(image_size, seed), image_size, columns)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sheet.save(path, optimize=True)


def _tiles(image_size: int, seed: int) -> list[tuple[Rendered, str]]:
  """(rendered image, caption) of the normal tile and of one tile per label."""
  anatomy = sample_anatomy(np.random.default_rng([seed, 0, streams.PREVIEW, 0]))
  normal = sample_study(np.random.default_rng([seed, 0, streams.PREVIEW, 1]), anatomy, (), "PA")
  tiles = []
  for k, findings in enumerate([()] + [(n,) for n in label_lib.NIH_LABELS]):
    # Each finding placed by its own draws, seen with the normal tile's pose, exposure and noise.
    study = sample_study(np.random.default_rng([seed, 0, streams.PREVIEW, 2 + k]), anatomy,
                         findings, "PA")
    study = dataclasses.replace(study, pose=normal.pose, exposure=normal.exposure,
                                noise_seed=normal.noise_seed, texture=normal.texture)
    rendered = render(study, image_size)
    places = ", ".join(f"{i.side}/{i.zone}" for i in rendered.instances)
    tiles.append((rendered, f"{findings[0]}\n{places}" if findings else label_lib.NO_FINDING))
  return tiles


def _sheet(tiles: list[tuple[Rendered, str]], image_size: int, columns: int) -> Image.Image:
  """The tiles in rows of `columns`, as a palette image with red boxes and grey captions."""
  caption = PREVIEW_CAPTION
  rows = math.ceil(len(tiles) / columns)
  sheet = np.zeros((rows * (image_size + caption), columns * image_size), np.uint8)
  canvas = Image.new("P", (sheet.shape[1], sheet.shape[0]))
  for k, (rendered, _) in enumerate(tiles):
    r, c = divmod(k, columns)
    y0, x0 = r * (image_size + caption), c * image_size
    sheet[y0:y0 + image_size, x0:x0 + image_size] = _boxed(rendered)
  canvas.putdata(sheet.ravel().tolist())
  canvas.putpalette([v for g in range(255) for v in (g, g, g)] + [255, 0, 0])
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for k, (_, text) in enumerate(tiles):
    r, c = divmod(k, columns)
    draw.multiline_text((c * image_size + 3, r * (image_size + caption) + image_size + 2), text,
                        fill=254, font=font, spacing=1)
  return canvas


def _boxed(rendered: Rendered) -> np.ndarray:
  """The image in greys 0..254 with each instance's box outlined in `_RED`."""
  tile = np.minimum(rendered.image, 254)
  for inst in rendered.instances:
    x, y, w, h = inst.box
    tile[y, x:x + w] = tile[y + h - 1, x:x + w] = _RED
    tile[y:y + h, x] = tile[y:y + h, x + w - 1] = _RED
  return tile
