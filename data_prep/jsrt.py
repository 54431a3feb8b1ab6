"""Converts JSRT with the SCR organ masks into a prepared cxr_jax dataset (train/val/test) with
anatomy label maps, for training the anatomy segmenter on real organ masks.

    python -m data_prep.jsrt --src DIR --out DIR --image-size S [--masks DIR]
        [--val-fraction F --seed K] [--workers N] [--skip-bad] [--overwrite]

Reads from --src:
  Images: JSRT's 247 files `JPCLNnnn.IMG` (154 with a nodule) and `JPCNNnnn.IMG` (93 without), in
      --src/All247images/ or directly in --src (both are searched; the extension's case does not
      matter, the name's does). Each file is raw, headerless, 2048 x 2048 big-endian uint16
      (8,388,608 bytes) of 12-bit optical density, where HIGH is DARK: values are clipped to
      0..4095 and inverted (4095 - v), so lungs are dark as in every other dataset, scaled to
      8 bits and area-resized to S x S. Other files are ignored.
  Masks: SCR's `scratch/` tree, --src/scratch unless --masks names it:
      fold1/masks/<organ>/<name>.gif and fold2/masks/<organ>/<name>.gif, organ folders
      `left lung`, `right lung`, `heart`, `left clavicle`, `right clavicle` (or with `_` for the
      space, as some mirrors spell them); other files than `.gif` are ignored. Each mask is a
      1024 x 1024 GIF of values 0 and 255. Left and right are the PATIENT's (SCR's `left lung` lies
      on the image's right) and stay the patient's: `left lung` -> left_lung.
  Clinical_Information/CLNDAT_EN.txt (optional; also looked for in --src itself): tab-separated,
      CR line endings, fields name (`JPCLN001.IMG`), subtlety, size (mm), age, sex, x, y, ... of
      each nodule (x, y: its centre in pixels of the 2048 grid, origin top left; free text after y
      may hold stray tabs and is not read). A nodule becomes a square `Nodule` box of side
      size / 0.175 mm per pixel around its centre. CNNDAT_EN.TXT (age and sex of the images
      without a nodule) is not read.

Label map: one uint8 map per image, ids indexing ANATOMY_NAMES (a subset of
labels.ANATOMY_VOCABULARY; JSRT has no body, mediastinum or abdomen masks). The SCR masks overlap
(about 90% of clavicle pixels lie inside a lung; lungs and heart share a few hundred border
pixels), so the organs are painted in PAINT_ORDER, each over the ones before: heart, lungs,
clavicles. Clavicles win because otherwise the lung would swallow them whole; lungs win over the
heart because their shared pixels are border disagreement and the lung fields are what the
segmenter is mostly for. The map is built at 1024 px and resized to S with NEAREST.

Records: image id, patient id and study id = the image name (`JPCLN001`; one image per patient),
view PA, label_names ("Nodule",): 1 for JPCLN images, 0 for JPCNN ones; boxes from CLNDAT.

Splits: SCR's fold1 is "train" and fold2 "test" (the fold of an image is the one holding its
masks; both folds are searched). Validation is carved from fold1 by patient (--val-fraction,
--seed). cxr_manifest.json records the folds (`folds`), the paint order and the files read.

Every bad input (an image file of another byte size or linked from outside --src, an image name
that is not JPCLNnnn/JPCNNnnn, an image without SCR masks, an organ mask missing, masks of an image
in both folds, a mask with an unknown name or of no image, a mask GIF that is not 1024 x 1024 or
not binary or unreadable, a malformed CLNDAT row or one of no nodule image) stops the conversion
with an error naming the file (and row), and leaves --out as it was; with --skip-bad it is logged,
left out (with its image, where it spoils one) and listed in cxr_manifest.json instead.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import tfrecord, writer
from data_prep import common
from data_prep.common import BadInputError

VERSION = "1.0"
DATASET_NAME = "jsrt"
LABEL_NAMES = ("Nodule",)
VIEW = "PA"  # every JSRT image is a PA film
IMAGE_DIRS = ("All247images", "")  # under --src; "" is --src itself
IMAGE_SUFFIX = ".img"  # compared in lower case
NAME = re.compile(r"JPC(?P<kind>LN|NN)\d{3}")  # LN: lung nodule, NN: no nodule
IMAGE_SIDE, MASK_SIDE = 2048, 1024
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE * 2
MAX_DENSITY = 4095  # 12-bit values
PIXEL_MM = 0.175  # pixel spacing of the 2048 grid
MASKS_DIR = "scratch"  # under --src, unless --masks
FOLDS = {"fold1": "train", "fold2": "test"}
# SCR's organ folders (spaces; some mirrors use `_`) and the anatomy name of each.
ORGANS = {"right lung": "right_lung", "left lung": "left_lung", "heart": "heart",
          "right clavicle": "right_clavicle", "left clavicle": "left_clavicle"}
# The names of labels.ANATOMY_VOCABULARY that SCR has, in its order: background, right_lung,
# left_lung, heart, right_clavicle, left_clavicle.
ANATOMY_NAMES = tuple(name for name in labels_lib.ANATOMY_VOCABULARY
                      if name == "background" or name in ORGANS.values())
PAINT_ORDER = ("heart", "right lung", "left lung", "right clavicle", "left clavicle")
CLINICAL_DIRS = ("Clinical_Information", "")
CLINICAL_FILE = "CLNDAT_EN.txt"  # matched case-insensitively
CLINICAL_FIELDS = 7  # name, subtlety, size, age, sex, x, y; the free text after is not read
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Item:
  """An image to write: its name, file, split, organ mask files (by SCR organ) and boxes."""

  name: str
  path: str
  split: str
  masks: dict[str, str]
  boxes: tuple[tuple[float, float, float, float], ...]  # xywh in pixels of the 2048 grid


@dataclasses.dataclass(frozen=True)
class Job:
  """What a worker prepares: an image file, its organ masks and the output size."""

  path: str
  masks: dict[str, str]
  size: int


def nodule_label(name: str) -> np.ndarray:
  """The label vector of an image name: Nodule 1 for JPCLN, 0 for JPCNN."""
  return np.array([1.0 if NAME.fullmatch(name)["kind"] == "LN" else 0.0], np.float32)


def find_images(src: str, bad: common.BadInputs) -> dict[str, str]:
  """The file of each JSRT image by name, from --src/All247images and --src; a `.IMG` of an
  unknown name, of another byte size or that is a link leading out of --src is bad input, and so
  is a name found twice."""
  paths: dict[str, str] = {}
  for folder in (os.path.join(src, d) if d else src for d in IMAGE_DIRS):
    if not os.path.isdir(folder):
      continue
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
      stem, suffix = os.path.splitext(entry.name)
      if not entry.is_file() or suffix.lower() != IMAGE_SUFFIX:
        continue
      if not NAME.fullmatch(stem):
        bad.report(BadInputError(entry.path, None, f"unknown image name {stem!r}; JSRT's are "
                                 "JPCLNnnn and JPCNNnnn"))
      elif stem in paths:
        bad.report(BadInputError(entry.path, None, f"another image of this name is at "
                                 f"{paths[stem]}; keep one of them", image=stem))
      else:
        paths[stem] = entry.path  # kept even when bad, so that its masks are not "of no image"
        check_image_file(entry.path, stem, src, bad)
  if not paths and not bad.dropped:
    raise FileNotFoundError(f"no JSRT .IMG files in {src} or {os.path.join(src, IMAGE_DIRS[0])}")
  return paths


def check_image_file(path: str, name: str, src: str, bad: common.BadInputs) -> None:
  """A raw JSRT image must be inside `src` (a link must not lead out) and exactly 2048 x 2048
  uint16: any other is bad input."""
  try:
    common.check_inside(path, src)
  except ValueError as e:
    bad.report(BadInputError(path, None, str(e), image=name))
    return
  size = os.path.getsize(path)
  if size != IMAGE_BYTES:
    bad.report(BadInputError(path, None, f"{size:,} bytes, expected {IMAGE_BYTES:,} (raw "
                             f"{IMAGE_SIDE} x {IMAGE_SIDE} big-endian uint16)", image=name))


def organ_dir(fold_dir: str, organ: str) -> str:
  """The folder of one organ's masks in a fold: `masks/left lung` or `masks/left_lung`."""
  found = [os.path.join(fold_dir, "masks", spelling)
           for spelling in dict.fromkeys((organ, organ.replace(" ", "_")))
           if os.path.isdir(os.path.join(fold_dir, "masks", spelling))]
  if not found:
    raise FileNotFoundError(f"{os.path.join(fold_dir, 'masks', organ)} (or with `_` for the "
                            "space) not found: is --masks SCR's scratch folder?")
  if len(found) > 1:
    raise BadInputError(found[1], None, f"{found[0]} holds the same organ; keep one of them")
  return found[0]


def find_masks(masks_dir: str, bad: common.BadInputs) -> dict[str, dict[str, dict[str, str]]]:
  """The mask files as {image name: {fold: {organ: path}}}; a GIF of an unknown name is bad
  input."""
  masks: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
  for fold in FOLDS:
    for organ in ORGANS:
      folder = organ_dir(os.path.join(masks_dir, fold), organ)
      for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, suffix = os.path.splitext(entry.name)
        if not entry.is_file() or suffix.lower() != ".gif":
          continue
        if NAME.fullmatch(stem):
          masks[stem][fold][organ] = entry.path
        else:
          bad.report(BadInputError(entry.path, None, f"unknown mask name {stem!r}; JSRT's "
                                   "images are JPCLNnnn and JPCNNnnn"))
  return masks


def fold_of(name: str, image: str, folds: dict[str, dict[str, str]], masks_dir: str,
            bad: common.BadInputs) -> str | None:
  """The fold holding an image's five masks, or None after reporting why there is none."""
  if not folds:
    bad.report(BadInputError(image, None, f"no SCR masks of {name} in "
                             f"{' or '.join(os.path.join(masks_dir, f) for f in FOLDS)}",
                             image=name))
    return None
  if len(folds) > 1:
    second = sorted(folds)[1]
    bad.report(BadInputError(next(iter(folds[second].values())), None, f"{name} has masks in "
                             f"both {' and '.join(sorted(folds))}", image=name))
    return None
  fold, organs = next(iter(folds.items()))
  for organ in ORGANS:
    if organ not in organs:
      missing = os.path.join(masks_dir, fold, "masks", organ, f"{name}.gif")
      bad.report(BadInputError(missing, None, f"mask not found (the other masks of {name} are "
                               f"in {fold})", image=name))
      return None
  return fold


def check_masks_have_images(masks: dict, images: dict[str, str], src: str,
                            bad: common.BadInputs) -> None:
  """A mask of a name without an image file is bad input (reported once per name)."""
  for name in sorted(set(masks) - set(images)):
    first = next(iter(next(iter(masks[name].values())).values()))
    bad.report(BadInputError(first, None, f"no image {name}.IMG in {src} or "
                             f"{os.path.join(src, IMAGE_DIRS[0])}"))


def find_clinical_file(src: str) -> str | None:
  """CLNDAT_EN.txt in --src/Clinical_Information or --src (any case), or None."""
  for folder in (os.path.join(src, d) if d else src for d in CLINICAL_DIRS):
    if os.path.isdir(folder):
      for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower() == CLINICAL_FILE.lower():
          return entry.path
  return None


def parse_nodule(fields: Sequence[str]) -> tuple[str, tuple[float, float, float, float]]:
  """(image name, xywh box) of a CLNDAT row; ValueError if it is malformed."""
  if len(fields) < CLINICAL_FIELDS:
    raise ValueError(f"malformed row: {len(fields)} tab-separated fields, expected at least "
                     f"{CLINICAL_FIELDS}")
  name = fields[0].removesuffix(".IMG")
  match = NAME.fullmatch(name)
  if not match or match["kind"] != "LN":
    raise ValueError(f"{fields[0]!r} is not a nodule image (JPCLNnnn.IMG)")
  try:
    size_mm, x, y = float(fields[2]), float(fields[5]), float(fields[6])
  except ValueError:
    raise ValueError(f"size, x and y must be numbers, got {fields[2]!r}, {fields[5]!r}, "
                     f"{fields[6]!r}") from None
  if not (0 < size_mm < IMAGE_SIDE * PIXEL_MM and 0 <= x < IMAGE_SIDE and 0 <= y < IMAGE_SIDE):
    raise ValueError(f"size {size_mm} mm must be positive and less than the image's, and "
                     f"x, y = {x}, {y} inside the {IMAGE_SIDE} x {IMAGE_SIDE} image")
  side = size_mm / PIXEL_MM
  return name, (x - side / 2, y - side / 2, side, side)


def read_clinical(path: str, images: dict[str, str],
                  bad: common.BadInputs) -> dict[str, list[tuple[float, float, float, float]]]:
  """The nodule boxes of CLNDAT_EN.txt by image name (module docstring)."""
  boxes = collections.defaultdict(list)
  # newline=None reads its CR-only line ends; latin-1 never fails on the free text, which is
  # not read.
  with open(path, encoding="latin-1", newline=None) as f:
    for line, text in enumerate(f, 1):
      fields = [field.strip() for field in text.rstrip("\n").split("\t")]
      if not any(fields):
        continue
      try:
        name, box = parse_nodule(fields)
      except ValueError as e:
        bad.report(BadInputError(path, line, str(e)))
        continue
      if name not in images:
        bad.report(BadInputError(path, line, f"no image {name}.IMG"))
      else:
        boxes[name].append(box)
  return boxes


def plan(src: str, masks_dir: str, bad: common.BadInputs, val_fraction: float,
         seed: int) -> tuple[list[Item], dict]:
  """Finds the images, masks and nodule boxes, checks them and assigns the splits; returns the
  items in split order and the manifest facts."""
  images = find_images(src, bad)
  masks = find_masks(masks_dir, bad)
  check_masks_have_images(masks, images, src, bad)
  folds = {}
  for name in sorted(set(images) - bad.dropped):
    fold = fold_of(name, images[name], masks.get(name, {}), masks_dir, bad)
    if fold is not None:
      folds[name] = fold
  clinical = find_clinical_file(src)
  boxes = read_clinical(clinical, images, bad) if clinical else {}
  kept = sorted(set(folds) - bad.dropped)
  train = [name for name in kept if FOLDS[folds[name]] == "train"]
  val = common.carve_by_patient(train, val_fraction, seed)  # one patient, one image
  items = [Item(name, images[name], "val" if name in val else FOLDS[folds[name]],
                masks[name][folds[name]], tuple(boxes.get(name, ()))) for name in kept]
  items.sort(key=lambda item: (SPLITS.index(item.split), item.name))
  unboxed = [i.name for i in items if nodule_label(i.name)[0] and not i.boxes]
  if clinical and unboxed:
    logging.warning("%d nodule images have no row in %s, so no box", len(unboxed), clinical)
  facts = dict(folds=FOLDS, masks=os.path.abspath(masks_dir), paint_order=list(PAINT_ORDER),
               val_fraction=val_fraction, seed=seed, val_patients=len(val),
               clinical_file=os.path.basename(clinical) if clinical else None,
               nodule_images_without_box=len(unboxed) if clinical else None)
  return items, facts


def read_image(path: str) -> Image.Image:
  """A raw JSRT file as an 8-bit image, inverted so that lungs are dark."""
  density = np.fromfile(path, ">u2")
  if density.size * 2 != IMAGE_BYTES:  # the file changed since find_images checked it
    raise ValueError(f"{density.size * 2:,} bytes, expected {IMAGE_BYTES:,}")
  density = np.clip(density.reshape(IMAGE_SIDE, IMAGE_SIDE), 0, MAX_DENSITY).astype(np.int32)
  gray = ((MAX_DENSITY - density) * 255 + MAX_DENSITY // 2) // MAX_DENSITY
  return Image.fromarray(gray.astype(np.uint8), "L")


def read_mask(path: str) -> np.ndarray:
  """A SCR mask GIF as a boolean array; ValueError unless 1024 x 1024 with values 0 and 255."""
  with Image.open(path) as image:
    image.load()
    if image.size != (MASK_SIDE, MASK_SIDE):
      raise ValueError(f"size {image.size[0]} x {image.size[1]}, expected {MASK_SIDE} x "
                       f"{MASK_SIDE}")
    values = np.asarray(image.convert("L"))
  stray = values[(values != 0) & (values != 255)]
  if stray.size:
    raise ValueError(f"not binary: {stray.size} pixels are neither 0 nor 255 (e.g. {stray[0]})")
  return values == 255


class _MaskError(Exception):
  """A bad mask in a worker: its file and why (plain strings, so that it pickles)."""

  def __init__(self, path: str, reason: str):
    super().__init__(path, reason)
    self.path, self.reason = path, reason


def label_map(masks: dict[str, str]) -> np.ndarray:
  """The 1024 x 1024 uint8 map of ANATOMY_NAMES ids, organs painted in PAINT_ORDER; a bad or
  unreadable mask raises _MaskError naming it."""
  ids = np.zeros((MASK_SIDE, MASK_SIDE), np.uint8)
  for organ in PAINT_ORDER:
    try:
      ids[read_mask(masks[organ])] = ANATOMY_NAMES.index(ORGANS[organ])
    except common.UNREADABLE as e:
      raise _MaskError(masks[organ], str(e)) from e
  return ids


def prepare(job: Job) -> common.ImageResult:
  """Reads, inverts, area-resizes and PNG-encodes one image, and builds and NEAREST-resizes its
  label map. Runs in pool workers, so a bad file is returned with the error, not raised."""
  try:
    image = read_image(job.path)
    png = common.encode_png(common.resize_area(image, job.size))
  except (ValueError, OSError) as e:
    return common.ImageResult(error=f"cannot read image: {e}")
  try:
    ids = label_map(job.masks)
  except _MaskError as e:
    return common.ImageResult(error=f"bad mask: {e.reason}", error_file=e.path)
  # NEAREST: averaging ids would invent labels at organ borders.
  resized = Image.fromarray(ids, "L").resize((job.size, job.size), Image.Resampling.NEAREST)
  return common.ImageResult(png=png, width=IMAGE_SIDE, height=IMAGE_SIDE,
                            label_map_png=common.encode_png(resized))


def make_example(item: Item, result: common.ImageResult) -> tfrecord.CxrExample:
  """The record of a prepared image."""
  return tfrecord.CxrExample(
      image=result.png, image_id=item.name, patient_id=item.name, study_id=item.name, view=VIEW,
      labels=nodule_label(item.name),
      boxes=common.normalise_boxes(item.boxes, IMAGE_SIDE, IMAGE_SIDE),
      box_labels=np.zeros(len(item.boxes), np.int64), anatomy=result.label_map_png)


def convert(src: str, out: str, *, image_size: int, masks: str | None = None,
            val_fraction: float = 0.1, seed: int = 0, workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False,
            max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Converts JSRT in `src` with the SCR masks in `masks` (default `src`/scratch) into a prepared
  dataset in `out`; returns its manifest (module docstring).

  Raises:
    BadInputError (a ValueError) naming the file (and row) of the first bad input, leaving `out`
      untouched, unless skip_bad.
    FileNotFoundError: no image in `src`, or an organ folder missing from the masks.
  """
  masks_dir = masks or os.path.join(src, MASKS_DIR)
  bad = common.BadInputs(skip_bad)
  items, facts = plan(src, masks_dir, bad, val_fraction, seed)
  with writer.DatasetWriter(
      out, DATASET_NAME, label_names=LABEL_NAMES, image_size=image_size,
      converter="data_prep.jsrt", converter_version=VERSION, source=os.path.abspath(src),
      anatomy_names=ANATOMY_NAMES, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
      extra=facts) as dataset:
    bad.record_to(dataset)
    common.add_examples(dataset, items, [Job(item.path, item.masks, image_size) for item in items],
                        workers, bad, lambda item: (item.path, None, item.name), make_example,
                        prepare=prepare)
  return writer.load_manifest(out)


def argument_parser() -> argparse.ArgumentParser:
  """Every converter's arguments and the SCR mask folder."""
  parser = common.argument_parser(__doc__)
  parser.add_argument("--masks", help="SCR's scratch folder (default: --src/scratch)")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argument_parser()
  args = parser.parse_args(argv)
  manifest = common.run_converter(parser, lambda: convert(
      args.src, args.out, image_size=args.image_size, masks=args.masks,
      val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
      skip_bad=args.skip_bad, overwrite=args.overwrite))
  print(f"wrote {args.out}: {common.split_counts(manifest)}; skipped "
        f"{manifest['skipped']['count']} bad inputs")


if __name__ == "__main__":
  main()
