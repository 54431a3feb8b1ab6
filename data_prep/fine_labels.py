"""Location-aware (fine) labels from a user's CSV: the `--fine-labels` of data_prep.nih and mimic.

The CSV has a column naming the image (`Image Index` for NIH, `dicom_id` for MIMIC-CXR-JPG) and
`Fine Labels`, found by header name (other columns are ignored), one row per image. A cell holds
`Finding|side|zone` names separated by `;` (`Nodule|left|lower;Effusion|right|lower`), empty for
none; each must be in labels.fine_vocabulary(findings) over the dataset's located findings
(`Images.findings`), spelt as labels.fine_label accepts it (aliases such as `Infiltrate`).

A row gives its image 1 at each listed name and 0 at every other location, but NaN (unknown) at
every location of a finding that the image's own labels call positive (1) and that the row does
not locate: 0 there would contradict those labels. An image without a row gets NaN everywhere.

How a listed name meets the image's labels: its finding must not be negative (0) there, which
would contradict them. A finding that is uncertain (-1) or unknown (NaN) may be listed, and then
the row settles where it is; unlisted, it is 0 at every location, the row being the authority on
what the image shows. (NIH's labels are 0 or 1: there every listed finding must be in the image's
Finding Labels.)

Bad rows, each a BadInputError naming the file and row (with --skip-bad logged and skipped, the
image keeping unknown fine labels): a malformed row; an id that is not one of the dataset's images;
a second row for an image (both are dropped, as neither is more trustworthy); a name that is not a
fine label or not in the vocabulary; a listed finding that the image's labels call negative.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Container, Mapping, Sequence

import numpy as np
from absl import logging

from cxr_jax.data import labels as labels_lib
from data_prep import common
from data_prep.common import BadInputError

LABELS_COLUMN = "Fine Labels"
SEPARATOR = ";"  # `|` already separates a fine label's finding, side and zone


@dataclasses.dataclass
class FineLabels:
  """Location-aware label vectors over `names` by image, read from `source` (named in the
  manifest). An image without a vector gets `absent` for every name: 0 from the phantom, which
  lists every finding instance; NaN (unknown) from --fine-labels, which need not cover every image.
  """

  names: tuple[str, ...]
  source: str
  absent: float
  vectors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def position(self, name: str) -> int:
    """Index of a fine label in `names`; ValueError if it is not there."""
    if name not in self.names:
      raise ValueError(f"unknown fine label {name!r}: not in the fine-label vocabulary (Finding|"
                       f"side|zone, side in {labels_lib.SIDES}, zone in {labels_lib.ZONES})")
    return self.names.index(name)

  def vector_of(self, image_id: str) -> np.ndarray:
    """The fine labels of an image."""
    return self.vectors.get(image_id, np.full(len(self.names), self.absent, np.float32))

  def count_unlabelled(self, image_ids: Sequence[str]) -> int:
    """How many of the images get unknown fine labels, having no vector."""
    if not np.isnan(self.absent):
      return 0
    return sum(1 for image_id in image_ids if image_id not in self.vectors)


@dataclasses.dataclass(frozen=True)
class Images:
  """The images a --fine-labels CSV may name, as its converter knows them: what differs by
  dataset."""

  findings: tuple[str, ...]  # the findings with locations, whose fine_vocabulary is learned
  label_names: tuple[str, ...]  # the order of the vectors of `labels`
  id_column: str  # the CSV column naming the image
  labels: Mapping[str, np.ndarray]  # the label vector of each image, by its id in `id_column`
  listed_in: str  # the file that lists the images, named when a row names another
  # Names an image's labels that call `finding` negative: "the Finding Labels 'Mass' of X (F row
  # N)"; called with (id, finding) for an error message only.
  describe: Callable[[str, str], str]
  skip: Container[str] = frozenset()  # ids of images that bad input left out: rows ignored

  def __post_init__(self):
    missing = [f for f in self.findings if f not in self.label_names]
    if missing:
      raise ValueError(f"located findings {missing} are not among the labels {self.label_names}")

  def value(self, image_id: str, finding: str) -> float:
    """The image's label of a finding: 1, 0, -1 or NaN."""
    return float(self.labels[image_id][self.label_names.index(finding)])


def parse_fine_label(text: str) -> str:
  """The vocabulary's spelling of a `Finding|side|zone` name (`Infiltrate` -> `Infiltration`)."""
  parts = text.split("|")
  if len(parts) != 3:
    raise ValueError(f"{text!r} is not a fine label Finding|side|zone")
  return labels_lib.fine_label(*(part.strip() for part in parts))


def finding_of(fine_name: str) -> str:
  """The finding of a `Finding|side|zone` name."""
  return fine_name.partition("|")[0]


def fine_vector(cell: str, image_id: str, images: Images, fine: FineLabels) -> np.ndarray:
  """The fine labels of a `Fine Labels` cell about an image (module docstring). ValueError for
  an unknown fine label, or one whose finding the image's labels call negative."""
  vector = np.zeros(len(fine.names), np.float32)
  listed = [parse_fine_label(text) for text in cell.split(SEPARATOR) if text.strip()]
  for name in listed:
    position = fine.position(name)
    if images.value(image_id, finding_of(name)) == 0:
      raise ValueError(f"{name} contradicts {images.describe(image_id, finding_of(name))}")
    vector[position] = 1.0
  positive = {f for f in images.findings if images.value(image_id, f) == 1}
  unlocated = positive - {finding_of(name) for name in listed}
  vector[[finding_of(name) in unlocated for name in fine.names]] = np.nan
  return vector


def read_fine_labels(path: str, images: Images, bad: common.BadInputs) -> FineLabels:
  """The location-aware labels of a --fine-labels CSV (module docstring), by image id; an image
  it lacks, or whose row is bad, gets unknown (NaN) fine labels."""
  fine = FineLabels(labels_lib.fine_vocabulary(images.findings), source=os.path.basename(path),
                    absent=np.nan)
  rows, width, column = common.read_columns(path, (images.id_column, LABELS_COLUMN))
  row_of: dict[str, int] = {}
  for line, fields in rows:
    try:
      fields = common.fit_fields(fields, width)
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e)))
      continue
    image_id, cell = fields[column[images.id_column]], fields[column[LABELS_COLUMN]]
    if image_id in images.skip:
      continue
    if image_id not in images.labels:
      bad.report(BadInputError(path, line, f"fine labels for {image_id}, which is not in "
                               f"{images.listed_in}"))
      continue
    if image_id in row_of:
      fine.vectors.pop(image_id, None)  # neither row is more trustworthy than the other
      bad.report(BadInputError(path, line, f"{image_id} is also at row {row_of[image_id]}"))
      continue
    row_of[image_id] = line
    try:
      fine.vectors[image_id] = fine_vector(cell, image_id, images, fine)
    except ValueError as e:
      bad.report(BadInputError(path, line, str(e)))
  return fine


def manifest_facts(fine: FineLabels | None, image_ids: Sequence[str]) -> dict:
  """What the manifest records of the fine labels of the written images (`image_ids`, as the
  vectors are keyed): their file, and how many images they leave unknown (None without fine
  labels)."""
  if fine is None:
    return dict(fine_labels_from=None, fine_labels_unlabelled=None)
  unlabelled = fine.count_unlabelled(image_ids)
  if unlabelled:
    logging.info("%d images have no usable row in %s: their fine labels are unknown", unlabelled,
                 fine.source)
  return dict(fine_labels_from=fine.source, fine_labels_unlabelled=unlabelled)
