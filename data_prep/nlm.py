"""Converts the NLM Montgomery or Shenzhen chest X-ray set, with lung masks, into a prepared
cxr_jax dataset (train/val/test) with anatomy label maps, for training the anatomy segmenter on
real lung masks.

    python -m data_prep.nlm --src DIR --out DIR --image-size S [--set montgomery|shenzhen|auto]
        [--masks DIR] [--val-fraction F --test-fraction F --seed K] [--workers N] [--skip-bad]
        [--overwrite]

One run converts one set (--set; `auto`, the default, finds the one in --src and refuses to guess
when both are there).

Reads from --src (the dataset's layout; the masks' meaning is partly ours, see below):
  Montgomery: the images `MontgomerySet/CXR_png/MCUCXR_nnnn_t.png` (t = 1: tuberculosis; not
      read) and their lung masks `MontgomerySet/ManualMask/leftMask/<same name>.png` and
      `.../rightMask/<same name>.png` (no `_mask` suffix); --src may also be MontgomerySet itself,
      and --masks may name the ManualMask folder elsewhere. Each mask is one lung.
  Shenzhen: the images `ChinaSet_AllFiles/CXR_png/CHNCXR_nnnn_t.png` (--src may also be
      ChinaSet_AllFiles itself) and the third-party masks of Kaggle's yoctoman/shcxr-lung-mask
      (CC BY-NC-SA; not NLM's), `mask/CHNCXR_nnnn_t_mask.png`, in --masks or else the first
      `mask` folder found in ChinaSet_AllFiles, in --src or beside ChinaSet_AllFiles. Each mask
      holds BOTH lungs, with no left/right split. The masks cover 566 of the 662 images: an image
      without a mask is left out and counted (`images_without_mask` in cxr_manifest.json), not an
      error.
  Only `*.png` files are read (case-insensitive); others (`Thumbs.db`, readmes) are ignored.
  Images may be 8- or 16-bit grayscale or RGB: common.prepare_image makes them 8-bit grayscale,
  area-resized to S x S. A mask must have its image's size; it is made 8-bit grayscale and a
  pixel > 127 is lung (the threshold the sets' loaders use).

Which lung is which (ours): the sets do not say reliably whether Montgomery's `leftMask` is the
patient's left lung, and Shenzhen's masks do not split the lungs at all. So each lung's side is
decided from its centre of mass: on a frontal radiograph the patient's right lung is shown on the
image's left, so of an image's two lungs the one whose centre lies further left (smaller x) is
`right_lung` and the other `left_lung`. In Montgomery the two masks are the two lungs (pixels in
both are painted `left_lung`); cxr_manifest.json counts in `montgomery_mask_sides` how often
`leftMask` lay on the image's right (i.e. named the patient's side) and how often on its left. In
Shenzhen the mask is split into its connected regions (8-connected): the two largest are the
lungs, and the smaller one must hold at least MIN_LUNG_RATIO of the larger's pixels (else the
lungs are probably merged or one is missing: bad input); every smaller region (a detached tip, an
annotation speck) is kept and given to the lung whose centre of mass is nearer its own, rather
than dropped, so that no annotated lung pixel becomes background.

Label map: one uint8 map per image, ids indexing ANATOMY_NAMES (background, right_lung,
left_lung: a subset of labels.ANATOMY_VOCABULARY), built at the image's size and resized to S with
NEAREST.

Records (ours): image id and study id = the image name (`MCUCXR_0001_0`), patient id = the name
without its label suffix (`MCUCXR_0001`; the sets give one image per patient), view PA (both sets
are frontal films), and the label vector of JSRT's schema, ("Nodule",), set to NaN (unknown): the
sets are for the segmenter, and neither says whether an image shows a nodule (the tuberculosis
flag of the name is not written).

Splits (ours; neither set has an official one): every patient is ranked by a hash of (--seed,
patient id), as common.carve_by_patient does; the first round(--test-fraction x patients) go to
"test", the next round(--val-fraction x patients) to "val", the rest to "train" (each positive
fraction takes at least one patient while one is left for training). The split of an image
depends only on the seed, its id and the number of patients, never on file order or machine.

Every bad input (an image linked from outside --src, or unreadable, empty or truncated; a PNG of
an unknown name among the images or masks; a mask linked from outside its folder, of no image,
unreadable, of another size than its image or empty; a Montgomery image lacking one of its two
masks; a Shenzhen mask with fewer than two lungs) stops the conversion with an error naming the
file, and leaves --out as it was; with --skip-bad it is logged, left out (with its image, where it
spoils one) and listed in cxr_manifest.json instead.
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
from scipy import ndimage

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import tfrecord, writer
from data_prep import common
from data_prep.common import BadInputError

VERSION = "1.0"
SETS = ("montgomery", "shenzhen")
SET_DIRS = {"montgomery": "MontgomerySet", "shenzhen": "ChinaSet_AllFiles"}  # under --src
IMAGE_DIR = "CXR_png"  # under the set's folder
NAMES = {"montgomery": re.compile(r"(?P<patient>MCUCXR_\d{4})_[01]"),
         "shenzhen": re.compile(r"(?P<patient>CHNCXR_\d{4})_[01]")}
MONTGOMERY_MASKS = "ManualMask"  # under MontgomerySet, unless --masks
MONTGOMERY_SIDES = ("leftMask", "rightMask")  # its folders, one lung each
SHENZHEN_MASKS = "mask"
SHENZHEN_MASK_SUFFIX = "_mask"  # CHNCXR_0001_0_mask.png
SUFFIX = ".png"  # compared in lower case
LABEL_NAMES = ("Nodule",)  # JSRT's schema; every value is NaN (module docstring)
VIEW = "PA"
ANATOMY_NAMES = tuple(name for name in labels_lib.ANATOMY_VOCABULARY
                      if name in ("background", "right_lung", "left_lung"))
RIGHT, LEFT = ANATOMY_NAMES.index("right_lung"), ANATOMY_NAMES.index("left_lung")
MASK_THRESHOLD = 127  # a mask pixel above it is lung
MIN_LUNG_RATIO = 0.05  # Shenzhen: the smaller lung's pixels over the larger's, at least
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a set's files are: its name, images folder and masks folder."""

  set: str
  images: str
  masks: str


@dataclasses.dataclass(frozen=True)
class Item:
  """An image to write: its name, patient, file, split and mask files (by Montgomery's folder,
  or `mask` for Shenzhen's one)."""

  name: str
  patient: str
  path: str
  split: str
  masks: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Job:
  """What a worker prepares: an image file, its set, its mask files and the output size."""

  path: str
  set: str
  masks: dict[str, str]
  size: int


@dataclasses.dataclass(frozen=True)
class Result(common.ImageResult):
  """A prepared image and, for Montgomery, whether `leftMask` lay on the image's right."""

  left_mask_on_image_right: bool | None = None


def set_folders(src: str, name: str) -> list[str]:
  """The folders that may be the set's own (holding CXR_png): --src/<set folder>, --src."""
  return [os.path.join(src, SET_DIRS[name]), src]


def images_folder_sets(folder: str) -> set[str]:
  """The sets whose image names a CXR_png folder holds."""
  found = set()
  for entry in os.scandir(folder):
    stem, suffix = os.path.splitext(entry.name)
    for name, pattern in NAMES.items():
      if suffix.lower() == SUFFIX and pattern.fullmatch(stem):
        found.add(name)
  return found


def detect_set(src: str) -> str:
  """The set in --src: the one whose folder is there, or whose image names --src/CXR_png holds."""
  found = {name for name in SETS if os.path.isdir(os.path.join(src, SET_DIRS[name], IMAGE_DIR))}
  if os.path.isdir(os.path.join(src, IMAGE_DIR)):
    found |= images_folder_sets(os.path.join(src, IMAGE_DIR))
  if not found:
    raise FileNotFoundError(f"neither {SET_DIRS['montgomery']}/{IMAGE_DIR} nor "
                            f"{SET_DIRS['shenzhen']}/{IMAGE_DIR} nor a {IMAGE_DIR} of their "
                            f"images in {src}")
  if len(found) > 1:
    raise common.OptionsError(f"both the Montgomery and the Shenzhen set are in {src}: choose one "
                              "with --set")
  return found.pop()


def find_layout(src: str, name: str, masks: str | None) -> Layout:
  """The images and masks folders of set `name` in --src (module docstring)."""
  roots = [root for root in set_folders(src, name) if os.path.isdir(os.path.join(root, IMAGE_DIR))]
  if not roots:
    raise FileNotFoundError(f"no {IMAGE_DIR} folder in {' or '.join(set_folders(src, name))}")
  root = roots[0]
  if name == "montgomery":
    masks = masks or os.path.join(root, MONTGOMERY_MASKS)
    for side in MONTGOMERY_SIDES:
      if not os.path.isdir(os.path.join(masks, side)):
        raise FileNotFoundError(f"{os.path.join(masks, side)} not found: is --masks Montgomery's "
                                f"{MONTGOMERY_MASKS} folder?")
  elif masks is None:
    candidates = list(dict.fromkeys(os.path.join(folder, SHENZHEN_MASKS) for folder in (
        root, src, os.path.dirname(os.path.abspath(root)))))
    found = [c for c in candidates if os.path.isdir(c)]
    if not found:
      raise FileNotFoundError(f"no Shenzhen mask folder ({' or '.join(candidates)}): pass --masks")
    masks = found[0]
  elif not os.path.isdir(masks):
    raise FileNotFoundError(f"--masks {masks} is not a folder")
  return Layout(name, os.path.join(root, IMAGE_DIR), masks)


def png_entries(folder: str) -> list[os.DirEntry]:
  """The `.png` files of a folder (any case), by name; other files are ignored."""
  return [entry for entry in sorted(os.scandir(folder), key=lambda e: e.name)
          if entry.is_file() and os.path.splitext(entry.name)[1].lower() == SUFFIX]


def find_images(layout: Layout, src: str, bad: common.BadInputs) -> dict[str, str]:
  """The file of each image by name; a PNG of an unknown name or linked from outside --src is bad
  input."""
  pattern = NAMES[layout.set]
  paths = {}
  for entry in png_entries(layout.images):
    stem = os.path.splitext(entry.name)[0]
    if not pattern.fullmatch(stem):
      bad.report(BadInputError(entry.path, None, f"unknown image name {stem!r}; the "
                               f"{layout.set} set's are {pattern.pattern}"))
      continue
    paths[stem] = entry.path
    try:
      common.check_inside(entry.path, src)
    except ValueError as e:
      bad.report(BadInputError(entry.path, None, str(e), image=stem))
  if not paths and not bad.dropped:
    raise FileNotFoundError(f"no {layout.set} images in {layout.images}")
  return paths


def mask_name(layout: Layout, stem: str) -> str | None:
  """The image name of a mask file's stem, or None if it is not a mask name of the set."""
  if layout.set == "shenzhen":
    if not stem.endswith(SHENZHEN_MASK_SUFFIX):
      return None
    stem = stem[:-len(SHENZHEN_MASK_SUFFIX)]
  return stem if NAMES[layout.set].fullmatch(stem) else None


def mask_folders(layout: Layout) -> dict[str, str]:
  """The mask folders by key: Montgomery's leftMask and rightMask, or Shenzhen's one `mask`."""
  if layout.set == "montgomery":
    return {side: os.path.join(layout.masks, side) for side in MONTGOMERY_SIDES}
  return {SHENZHEN_MASKS: layout.masks}


def find_masks(layout: Layout, images: dict[str, str],
               bad: common.BadInputs) -> dict[str, dict[str, str]]:
  """The mask files as {image name: {key: path}}; a PNG of an unknown name, of no image or linked
  from outside its folder is bad input."""
  masks: dict[str, dict[str, str]] = collections.defaultdict(dict)
  for key, folder in mask_folders(layout).items():
    for entry in png_entries(folder):
      name = mask_name(layout, os.path.splitext(entry.name)[0])
      expected = "<image name>_mask" if layout.set == "shenzhen" else "<image name>"
      if name is None:
        bad.report(BadInputError(entry.path, None, f"unknown mask name {entry.name!r}; expected "
                                 f"{expected}.png"))
      elif name not in images:
        bad.report(BadInputError(entry.path, None, f"no image {name}.png in {layout.images}"))
      else:
        masks[name][key] = entry.path
        try:
          common.check_inside(entry.path, folder)
        except ValueError:
          bad.report(BadInputError(entry.path, None, f"a link to {os.path.realpath(entry.path)},"
                                   f" outside the mask folder {folder}", image=name))
  return masks


def check_montgomery_masks(name: str, masks: dict[str, str], layout: Layout,
                           bad: common.BadInputs) -> bool:
  """Whether an image has both its masks; a missing one is bad input."""
  for side in MONTGOMERY_SIDES:
    if side not in masks:
      missing = os.path.join(layout.masks, side, f"{name}{SUFFIX}")
      bad.report(BadInputError(missing, None, f"mask not found ({name} needs both "
                               f"{' and '.join(MONTGOMERY_SIDES)})", image=name))
      return False
  return True


def assign_splits(patients: Sequence[str], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
  """The split of each patient (module docstring)."""
  if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
    raise common.OptionsError(f"--val-fraction {val_fraction} and --test-fraction "
                              f"{test_fraction} must be >= 0 with a sum below 1")
  test = common.carve_by_patient(patients, test_fraction, seed)
  rest = sorted(set(patients) - test)
  # The same ranking continues: of the remaining patients, val_fraction of all of them.
  val = common.carve_by_patient(rest, val_fraction / (1 - test_fraction), seed)
  return {p: "test" if p in test else "val" if p in val else "train" for p in patients}


def plan(src: str, layout: Layout, bad: common.BadInputs, val_fraction: float,
         test_fraction: float, seed: int) -> tuple[list[Item], dict]:
  """Finds and checks the images and masks and assigns the splits; returns the items in split
  order and the manifest facts."""
  images = find_images(layout, src, bad)
  masks = find_masks(layout, images, bad)
  without_mask = []
  kept = []
  for name in sorted(set(images) - bad.dropped):
    if layout.set == "shenzhen" and name not in masks:
      without_mask.append(name)
    elif layout.set == "shenzhen" or check_montgomery_masks(name, masks.get(name, {}), layout,
                                                            bad):
      kept.append(name)
  kept = [name for name in kept if name not in bad.dropped]
  if without_mask:
    logging.info("left out %d images without a mask (e.g. %s)", len(without_mask),
                 without_mask[0])
  patient = {name: NAMES[layout.set].fullmatch(name)["patient"] for name in kept}
  splits = assign_splits(sorted(set(patient.values())), val_fraction, test_fraction, seed)
  items = [Item(name, patient[name], images[name], splits[patient[name]], masks[name])
           for name in kept]
  items.sort(key=lambda item: (SPLITS.index(item.split), item.name))
  facts = dict(set=layout.set, images=os.path.abspath(layout.images),
               masks=os.path.abspath(layout.masks), mask_threshold=MASK_THRESHOLD,
               val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
               split_method="ours: patients ranked by sha256(seed:patient), test then val",
               side_rule="centre of mass: the lung further left in the image is right_lung",
               images_without_mask=len(without_mask))
  if layout.set == "shenzhen":
    facts.update(mask_source="Kaggle yoctoman/shcxr-lung-mask (third-party)",
                 min_lung_ratio=MIN_LUNG_RATIO, small_regions="given to the nearer lung")
  return items, facts


class _MaskError(Exception):
  """A bad mask in a worker: its file and why (plain strings, so that it pickles)."""

  def __init__(self, path: str, reason: str):
    super().__init__(path, reason)
    self.path, self.reason = path, reason


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
  """A mask PNG as a boolean array (> MASK_THRESHOLD); _MaskError unless readable, of the image's
  `size` (width, height) and not empty."""
  try:
    with Image.open(path) as image:
      image.load()
      if image.size != size:
        raise ValueError(f"size {image.size[0]} x {image.size[1]} differs from its image's "
                         f"{size[0]} x {size[1]}")
      mask = np.asarray(common.to_gray8(image)) > MASK_THRESHOLD
  except common.UNREADABLE as e:
    raise _MaskError(path, str(e)) from e
  if not mask.any():
    raise _MaskError(path, f"empty: no pixel above {MASK_THRESHOLD}")
  return mask


def centre_x(mask: np.ndarray) -> float:
  """The x of a non-empty mask's centre of mass."""
  return float(np.nonzero(mask)[1].mean())


def montgomery_map(left_mask: np.ndarray, right_mask: np.ndarray) -> tuple[np.ndarray, bool]:
  """The ids of Montgomery's two lung masks, sides by centre of mass (module docstring), and
  whether `leftMask` lies on the image's right."""
  left_on_right = centre_x(left_mask) > centre_x(right_mask)
  on_left, on_right = (right_mask, left_mask) if left_on_right else (left_mask, right_mask)
  ids = np.zeros(left_mask.shape, np.uint8)
  ids[on_left] = RIGHT  # the patient's right lung is on the image's left
  ids[on_right] = LEFT
  return ids, left_on_right


def split_lungs(mask: np.ndarray) -> np.ndarray:
  """The ids of a mask holding both lungs (module docstring); ValueError when it does not have
  two regions of which the smaller has at least MIN_LUNG_RATIO of the larger's pixels."""
  regions, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
  sizes = np.bincount(regions.ravel())[1:]
  if count < 2:
    raise ValueError("one connected region: expected two lungs")
  first, second = np.argsort(-sizes, kind="stable")[:2] + 1
  if sizes[second - 1] < MIN_LUNG_RATIO * sizes[first - 1]:
    raise ValueError(f"the second-largest region has {sizes[second - 1]} pixels, less than "
                     f"{MIN_LUNG_RATIO:.0%} of the largest's {sizes[first - 1]}: expected two "
                     "lungs")
  centres = np.array(ndimage.center_of_mass(mask, regions, np.arange(1, count + 1)))  # (y, x)
  lungs = centres[[first - 1, second - 1]]
  sides = (RIGHT, LEFT) if lungs[0, 1] < lungs[1, 1] else (LEFT, RIGHT)
  nearer = np.argmin(((centres[:, None, :] - lungs[None, :, :]) ** 2).sum(-1), axis=1)
  lookup = np.zeros(count + 1, np.uint8)
  lookup[1:] = np.array(sides, np.uint8)[nearer]  # the lungs themselves are nearest to themselves
  return lookup[regions]


def label_map(job: Job, size: tuple[int, int]) -> tuple[np.ndarray, bool | None]:
  """The full-size ids of an image's masks and, for Montgomery, whether leftMask lies on the
  image's right; a bad mask raises _MaskError naming it."""
  if job.set == "montgomery":
    left, right = (read_mask(job.masks[side], size) for side in MONTGOMERY_SIDES)
    return montgomery_map(left, right)
  path = job.masks[SHENZHEN_MASKS]
  try:
    return split_lungs(read_mask(path, size)), None
  except ValueError as e:
    raise _MaskError(path, str(e)) from e


def prepare(job: Job) -> Result:
  """Prepares one image (common.prepare_image) and builds and NEAREST-resizes its label map.
  Runs in pool workers, so a bad file is returned with the error, not raised."""
  image = common.prepare_image(common.ImageJob(job.path, job.size))
  if image.error:
    return Result(error=image.error)
  try:
    ids, left_on_right = label_map(job, (image.width, image.height))
  except _MaskError as e:
    return Result(error=f"bad mask: {e.reason}", error_file=e.path)
  # NEAREST: averaging ids would invent labels at lung borders.
  resized = Image.fromarray(ids, "L").resize((job.size, job.size), Image.Resampling.NEAREST)
  return Result(png=image.png, width=image.width, height=image.height,
                label_map_png=common.encode_png(resized), left_mask_on_image_right=left_on_right)


def make_example(item: Item, result: common.ImageResult) -> tfrecord.CxrExample:
  """The record of a prepared image: its anatomy map, no boxes and unknown labels."""
  return tfrecord.CxrExample(
      image=result.png, image_id=item.name, patient_id=item.patient, study_id=item.name,
      view=VIEW, labels=np.full(len(LABEL_NAMES), np.nan, np.float32),
      boxes=np.zeros((0, 4), np.float32), box_labels=np.zeros(0, np.int64),
      anatomy=result.label_map_png)


def convert(src: str, out: str, *, image_size: int, which: str = "auto", masks: str | None = None,
            val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
            workers: int = 1, skip_bad: bool = False, overwrite: bool = False,
            max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> dict:
  """Converts the Montgomery or Shenzhen set in `src` (`which`: montgomery, shenzhen or auto) with
  its lung masks (`masks`, default found in `src`) into a prepared dataset in `out`; returns its
  manifest (module docstring).

  Raises:
    BadInputError (a ValueError) naming the file of the first bad input, leaving `out` untouched,
      unless skip_bad.
    common.OptionsError: an unknown set, both sets in `src` with set auto, or fractions that do
      not fit.
    FileNotFoundError: no images folder or images, or no mask folder.
  """
  if which not in SETS + ("auto",):
    raise common.OptionsError(f"--set must be one of {SETS + ('auto',)}, got {which!r}")
  name = detect_set(src) if which == "auto" else which
  layout = find_layout(src, name, masks)
  bad = common.BadInputs(skip_bad)
  items, facts = plan(src, layout, bad, val_fraction, test_fraction, seed)
  sides = collections.Counter()

  def make(item: Item, result: Result) -> tfrecord.CxrExample:
    if result.left_mask_on_image_right is not None:
      sides["left_mask_on_image_right" if result.left_mask_on_image_right
            else "left_mask_on_image_left"] += 1
    return make_example(item, result)

  with writer.DatasetWriter(
      out, name, label_names=LABEL_NAMES, image_size=image_size, converter="data_prep.nlm",
      converter_version=VERSION, source=os.path.abspath(src), anatomy_names=ANATOMY_NAMES,
      max_shard_bytes=max_shard_bytes, overwrite=overwrite, extra=facts) as dataset:
    bad.record_to(dataset)
    common.add_examples(dataset, items,
                        [Job(item.path, name, item.masks, image_size) for item in items],
                        workers, bad, lambda item: (item.path, None, item.name), make,
                        prepare=prepare)
    if name == "montgomery":
      dataset.record_fact("montgomery_mask_sides", dict(
          left_mask_on_image_right=sides["left_mask_on_image_right"],
          left_mask_on_image_left=sides["left_mask_on_image_left"]))
  return writer.load_manifest(out)


def argument_parser() -> argparse.ArgumentParser:
  """Every converter's arguments, the set, its mask folder and the test fraction."""
  parser = common.argument_parser(__doc__)
  parser.add_argument("--set", choices=SETS + ("auto",), default="auto",
                      help="the set in --src (default: found there)")
  parser.add_argument("--masks", help="Montgomery's ManualMask or Shenzhen's mask folder "
                      "(default: found in --src)")
  parser.add_argument("--test-fraction", type=float, default=0.1,
                      help="fraction of patients put in the test split")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point."""
  parser = argument_parser()
  args = parser.parse_args(argv)
  manifest = common.run_converter(parser, lambda: convert(
      args.src, args.out, image_size=args.image_size, which=args.set, masks=args.masks,
      val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
      workers=args.workers, skip_bad=args.skip_bad, overwrite=args.overwrite))
  print(f"wrote {args.out} ({manifest['set']}): {common.split_counts(manifest)}; skipped "
        f"{manifest['skipped']['count']} bad inputs; left out {manifest['images_without_mask']} "
        "images without a mask")


if __name__ == "__main__":
  main()
