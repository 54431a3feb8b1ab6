"""Pieces every dataset converter shares: bad-input policy, CSV quirks, images, workers, splits.

A converter (`data_prep.nih`, later `chexpert`, `mimic`) reads its dataset's own files, reports
each bad input as a `BadInputError` (file + 1-based row) through `BadInputs`, turns images into
pre-resized 8-bit grayscale PNGs with `prepare_image` in a pool (`parallel_map`), carves a
validation split by patient with `carve_by_patient`, and writes everything with
`cxr_jax.data.writer.DatasetWriter`. A user's location-aware labels (--fine-labels) are read by
`data_prep.fine_labels`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import multiprocessing
import os
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from cxr_jax.data.augment import encode_png

# Tasks per message to a worker: large enough to amortise the pickling, small enough to keep the
# ordered results flowing.
_CHUNK_SIZE = 8
_PROGRESS_EVERY = 1000
# What PIL raises for a missing, empty, truncated, corrupt or absurdly large image file.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadInputError(ValueError):
  """A bad input, named by its file and 1-based row (line) number.

  `image` is the id of the image the bad input makes unusable, if any: with --skip-bad that image
  is left out of the dataset.
  """

  def __init__(self, file: str, row: int | None, reason: str, *, image: str | None = None):
    where = f"{file}, row {row}" if row is not None else file
    super().__init__(f"{where}: {reason}")
    self.file, self.row, self.reason, self.image = file, row, reason, image

  def as_item(self) -> dict[str, Any]:
    """The record of this input in the manifest's `skipped` list."""
    item = dict(file=self.file, row=self.row, reason=self.reason)
    if self.image is not None:
      item["image"] = self.image
    return item


class OptionsError(ValueError):
  """Converter options that do not go together or do not fit the source: a usage error."""


class BadInputs:
  """The bad-input policy: raise the first one, or (skip_bad) skip and record each one.

  Bad inputs found before the dataset writer exists are held and handed to it by `record_to`, so
  that every skipped input ends up in the manifest.
  """

  def __init__(self, skip_bad: bool):
    self.skip_bad = skip_bad
    self.dropped: set[str] = set()  # ids of the images left out
    self._pending: list[dict[str, Any]] = []
    self._writer = None

  def report(self, error: BadInputError) -> None:
    """Raises `error`, or with skip_bad records it as skipped."""
    if not self.skip_bad:
      raise error
    if error.image is not None:
      self.dropped.add(error.image)
    if self._writer is None:
      self._pending.append(error.as_item())
    else:
      self._writer.skip(**error.as_item())

  def record_to(self, writer) -> None:
    """Sends the held and all later skipped inputs to a `DatasetWriter`'s `skip`."""
    for item in self._pending:
      writer.skip(**item)
    self._pending = []
    self._writer = writer


def read_csv(path: str) -> Iterator[tuple[int, list[str]]]:
  """Yields (1-based line number, stripped fields) for each non-blank row of a CSV file, plain or
  gzipped (a `.gz` name, as MIMIC-CXR distributes its tables; lines count in the decompressed
  text)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    try:
      for fields in reader:
        if any(field.strip() for field in fields):
          yield reader.line_num, [field.strip() for field in fields]
    except csv.Error as e:
      raise BadInputError(path, reader.line_num, f"unreadable CSV: {e}") from e
    except UnicodeDecodeError as e:  # decoding runs ahead of the rows, so no row to name
      raise BadInputError(path, None, f"not UTF-8 text: {e}") from e
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a corrupt or truncated .gz
      raise BadInputError(path, None, f"cannot read: {e}") from e


def read_exact_table(path: str, header: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
  """The (line, fields) rows after the header of a CSV whose header must be exactly `header`
  (trailing empty fields aside): a release's tables of another version must not be misread, so
  any other header is a BadInputError at row 1, even with --skip-bad."""
  rows = read_csv(path)
  line, found = next(rows, (1, []))
  found = strip_trailing_empty(found)
  if tuple(found) != tuple(header):
    missing = [name for name in header if name not in found]
    extra = [name for name in found if name not in header]
    raise BadInputError(path, line, f"header is {found}, expected exactly {list(header)} "
                        f"(missing {missing}, unexpected {extra})")
  return rows


# CheXpert-style label cells (CheXpert's CSVs, MIMIC-CXR-JPG's chexpert and negbio tables):
# positive, negative, uncertain, not mentioned.
CHEXPERT_VALUES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": np.nan}


def chexpert_value(cell: str, column: str) -> float:
  """A CheXpert-style label cell as 1, 0, -1 or NaN; ValueError naming the column otherwise."""
  if cell not in CHEXPERT_VALUES:
    raise ValueError(f"column {column!r}: {cell!r} is not 1.0, 0.0, -1.0 or blank")
  return CHEXPERT_VALUES[cell]


def strip_trailing_empty(fields: Sequence[str]) -> list[str]:
  """The fields without the empty ones a trailing comma leaves at the end."""
  fields = list(fields)
  while fields and not fields[-1]:
    fields.pop()
  return fields


def fit_fields(fields: Sequence[str], width: int) -> list[str]:
  """The first `width` fields of a row that may end in empty fields (trailing commas).

  Raises ValueError for a row with fewer fields, or with non-empty fields beyond `width`.
  """
  if len(fields) < width or any(fields[width:]):
    raise ValueError(f"malformed row: {len(strip_trailing_empty(fields))} fields, expected {width}")
  return list(fields[:width])


def column_index(header: Sequence[str], required: Sequence[str], path: str,
                 line: int) -> dict[str, int]:
  """Column positions of the `required` names in a CSV header; a missing name is an error."""
  missing = [name for name in required if name not in header]
  if missing:
    raise BadInputError(path, line, f"header lacks columns {missing}; it has {list(header)}")
  return {name: list(header).index(name) for name in required}


def read_columns(path: str, columns: Sequence[str],
                 ) -> tuple[Iterator[tuple[int, list[str]]], int, dict[str, int]]:
  """The (line, fields) rows after a CSV file's header, the header's width and the positions of
  the named `columns` in it, found by name (others are ignored); a header without them is bad
  input."""
  rows = read_csv(path)
  header_line, header = next(rows, (1, []))
  header = strip_trailing_empty(header)
  return rows, len(header), column_index(header, columns, path, header_line)


def check_inside(path: str, root: str) -> None:
  """ValueError when `path`, its links followed, is not inside the folder `root` (--src): a link
  (of the file or of a folder above it) must not let a source read files from elsewhere."""
  real, real_root = os.path.realpath(path), os.path.realpath(root)
  if os.path.commonpath([real, real_root]) != real_root:
    raise ValueError(f"{path} is a link to {real}, outside --src {root}")


def to_gray8(image: Image.Image) -> Image.Image:
  """The image as 8-bit grayscale ("L"); 16-bit images are scaled from their full 0..65535 range."""
  if image.mode.startswith("I"):
    pixels = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
  return image if image.mode == "L" else image.convert("L")


def resize_area(image: Image.Image, size: int) -> Image.Image:
  """Resizes to size x size with area averaging (PIL's BOX filter)."""
  return image.resize((size, size), Image.Resampling.BOX)


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """One image to prepare: its file, the output size, and optionally its anatomy label map."""

  path: str
  size: int
  label_map_path: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """A prepared image: PNG bytes, the source's width and height, and the resized label map.

  `error` says why the image (or its label map) could not be read; the other fields are then empty.
  `error_file` names the file to blame when it is not the item's own (e.g. a bad mask).
  """

  png: bytes = b""
  width: int = 0
  height: int = 0
  label_map_png: bytes | None = None
  error: str | None = None
  error_file: str | None = None


def prepare_image(job: ImageJob) -> ImageResult:
  """Reads, turns upright (EXIF orientation), converts to 8-bit grayscale, area-resizes and
  PNG-encodes one image; width and height are the upright image's.

  Runs in pool workers, so an unreadable file is returned as `error` instead of raised: one bad
  image must not take down the other images of its batch.
  """
  try:
    with Image.open(job.path) as image:
      image.load()
      # Photographed or scanned JPEGs may store the pixels sideways with an EXIF orientation tag
      # saying how to show them: the model, like a reader, must see them upright.
      ImageOps.exif_transpose(image, in_place=True)
      width, height = image.size
      png = encode_png(resize_area(to_gray8(image), job.size))
  except UNREADABLE as e:
    return ImageResult(error=f"cannot read image {job.path}: {e}")
  label_map_png = None
  if job.label_map_path is not None:
    try:
      label_map_png = _prepare_label_map(job.label_map_path, (width, height), job.size)
    except UNREADABLE as e:
      return ImageResult(error=f"cannot read label map {job.label_map_path}: {e}")
  return ImageResult(png=png, width=width, height=height, label_map_png=label_map_png)


def _prepare_label_map(path: str, image_size: tuple[int, int], size: int) -> bytes:
  with Image.open(path) as label_map:
    label_map.load()
    if label_map.size != image_size:
      raise ValueError(f"size {label_map.size} differs from the image's {image_size}")
    ids = np.asarray(label_map)  # palette images give their indices, which are the ids
  if ids.ndim != 2 or ids.min() < 0 or ids.max() > 255:
    raise ValueError(f"expected one channel of ids in 0..255, got shape {ids.shape}")
  resized = Image.fromarray(ids.astype(np.uint8), "L").resize(
      (size, size), Image.Resampling.NEAREST)  # averaging ids would invent labels at boundaries
  return encode_png(resized)


def normalise_boxes(xywh: np.ndarray, width: int, height: int) -> np.ndarray:
  """Pixel boxes (x, y = top-left, w, h) -> (xmin, ymin, xmax, ymax) in [0, 1] of the image."""
  xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
  scale = np.array([width, height, width, height], np.float64)
  corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / scale
  return np.clip(corners, 0.0, 1.0).astype(np.float32)


@contextlib.contextmanager
def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any],
                 workers: int) -> Iterator[Iterator[Any]]:
  """A context giving an iterator over fn(item) for each item, in order, from `workers` processes.

  `fn` must be a module-level function (workers are spawned, which is safe in a process that has
  threads); with workers <= 1 it runs inline. Leaving the context stops the workers.
  """
  if workers <= 1:
    yield map(fn, items)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield pool.imap(fn, items, chunksize=_CHUNK_SIZE)


def add_examples(dataset: Any, items: Sequence[Any], jobs: Sequence[Any], workers: int,
                 bad: BadInputs, source_of: Callable[[Any], tuple[str, int | None, str]],
                 make: Callable[[Any, ImageResult], Any],
                 prepare: Callable[[Any], ImageResult] | None = None) -> None:
  """Prepares each item's image (its job in `jobs`, by `prepare`, default `prepare_image`) in a
  pool of `workers` and adds `make(item, result)`, a CxrExample, to the item's `split`. An image
  that cannot be prepared is bad input named by `source_of(item)`: the file and row that list
  it, and its image id (or by the result's `error_file`, when it blames another file)."""
  with parallel_map(prepare or prepare_image, jobs, workers) as results:
    for item, result in zip(items, with_progress(results, len(jobs))):
      if result.error:
        file, line, image_id = source_of(item)
        if result.error_file:
          file, line = result.error_file, None
        bad.report(BadInputError(file, line, result.error, image=image_id))
        continue
      dataset.add(item.split, make(item, result))


def with_progress(results: Iterable[Any], total: int, what: str = "images") -> Iterator[Any]:
  """Passes `results` through, logging the count and rate every so often."""
  start = time.perf_counter()
  for count, result in enumerate(results, 1):
    if count % _PROGRESS_EVERY == 0 or count == total:
      elapsed = time.perf_counter() - start
      logging.info("%s: %d/%d (%.1f/s)", what, count, total, count / max(elapsed, 1e-9))
    yield result


def carve_by_patient(patients: Iterable[str], fraction: float, seed: int) -> frozenset[str]:
  """The patients moved to validation: round(fraction * #patients) of them, chosen by seed.

  Patients are ranked by a hash of (seed, patient id), so the choice is the same on every machine
  and numpy version, and does not depend on the order of `patients`. With a positive fraction at
  least one patient goes to validation and at least one stays in training.
  """
  if not 0 <= fraction < 1:
    raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
  unique = sorted(set(patients))
  count = round(fraction * len(unique))
  if fraction > 0:
    count = min(max(count, 1), len(unique) - 1)
  ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
  return frozenset(ranked[:count])


def run_converter(parser: argparse.ArgumentParser, convert: Callable[[], dict]) -> dict:
  """Runs a converter for its command line and returns the manifest: options that do not fit are
  usage errors (exit 2), a bad input or an occupied --out a one-line error."""
  logging.set_verbosity(logging.INFO)
  try:
    return convert()
  except OptionsError as e:
    parser.error(str(e))
  except (BadInputError, FileExistsError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e


def split_counts(manifest: dict) -> str:
  """`train 5, val 2, test 2`: the records of each split, for a converter's summary line."""
  return ", ".join(f"{s} {v['num_records']}" for s, v in manifest["splits"].items())


def argument_parser(description: str) -> argparse.ArgumentParser:
  """The command-line arguments every converter takes."""
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="the dataset as released")
  parser.add_argument("--out", required=True, help="folder for the prepared dataset")
  parser.add_argument("--image-size", type=int, required=True, help="output images are S x S")
  parser.add_argument("--val-fraction", type=float, default=0.1,
                      help="fraction of training patients carved out for validation")
  parser.add_argument("--seed", type=int, default=0, help="seed of the validation carve")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="image processes (default: all cores)")
  parser.add_argument("--skip-bad", action="store_true",
                      help="skip bad inputs, log them and count them in the manifest")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return parser
