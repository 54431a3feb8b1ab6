"""The cxr_jax record schema and TFRecord files, written and read without TensorFlow.

A TFRecord file is a sequence of records, each framed as

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

and each payload is a serialized `tf.train.Example` (the proto bundled with tensorflow-datasets).
Feature keys (DESIGN.md section 3):

    image        bytes   PNG, 8-bit grayscale, pre-resized
    image_id     bytes   e.g. "00000001_000.png"
    patient_id   bytes
    study_id     bytes
    view         bytes   "PA", "AP", ...
    labels       float   one per label: 1 positive, 0 negative, -1 uncertain, NaN unknown
    box/label    int64   label index of each box
    box/xmin, box/ymin, box/xmax, box/ymax   float, normalised to [0, 1]
    box_supervised   int64   1 when the boxes may train a box term (HAM's "helper" images), else 0;
                             absent in records of format version 2 and older, read as 0
    fine_labels  float   optional, one per location-aware label ("Nodule|left|lower")
    anatomy      bytes   optional, PNG label map the size of the image
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import BinaryIO, Iterator

import crc32c
import numpy as np
from google.protobuf import message
from tensorflow_datasets.proto import tf_example_pb2

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
BOX_KEYS = ("box/xmin", "box/ymin", "box/xmax", "box/ymax")


class CorruptRecordError(ValueError):
  """A record whose framing or checksum is wrong; names the file, record and byte offset."""

  def __init__(self, path: str, index: int, offset: int, reason: str):
    super().__init__(f"{path}: record {index} at byte {offset}: {reason}")
    self.path, self.index, self.offset = path, index, offset


@dataclasses.dataclass
class CxrExample:
  """One chest radiograph with everything the schema carries (see module docstring)."""

  image: bytes
  image_id: str
  patient_id: str
  study_id: str
  view: str
  labels: np.ndarray
  boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
  box_labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  fine_labels: np.ndarray | None = None
  anatomy: bytes | None = None
  box_supervised: bool = False


def masked_crc(data: bytes) -> int:
  """The masked CRC32C that TFRecord framing stores."""
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
  """One TFRecord record: header, payload and footer."""
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", masked_crc(length)) + payload + _FOOTER.pack(masked_crc(payload))


def serialize(ex: CxrExample) -> bytes:
  """Serializes an example as a `tf.train.Example`."""
  proto = tf_example_pb2.Example()
  feature = proto.features.feature
  feature["image"].bytes_list.value.append(ex.image)
  for key in ("image_id", "patient_id", "study_id", "view"):
    feature[key].bytes_list.value.append(getattr(ex, key).encode())
  feature["labels"].float_list.value.extend(np.asarray(ex.labels, np.float32).tolist())
  boxes = np.asarray(ex.boxes, np.float32).reshape(-1, 4)
  feature["box/label"].int64_list.value.extend(np.asarray(ex.box_labels, np.int64).tolist())
  for column, key in enumerate(BOX_KEYS):
    feature[key].float_list.value.extend(boxes[:, column].tolist())
  feature["box_supervised"].int64_list.value.append(int(ex.box_supervised))
  if ex.fine_labels is not None:
    feature["fine_labels"].float_list.value.extend(np.asarray(ex.fine_labels, np.float32).tolist())
  if ex.anatomy is not None:
    feature["anatomy"].bytes_list.value.append(ex.anatomy)
  return proto.SerializeToString()


def parse(payload: bytes) -> CxrExample:
  """Parses a serialized `tf.train.Example` written by `serialize` or by TensorFlow; ValueError
  for anything else."""
  proto = tf_example_pb2.Example()
  try:
    proto.ParseFromString(payload)
  except message.DecodeError as e:
    raise ValueError(f"record is not a tf.train.Example: {e}") from None
  feature = proto.features.feature

  def first(key, kind):
    values = getattr(feature[key], kind).value
    if not values:
      raise ValueError(f"record feature {key!r} has no {kind} value")
    return values[0]

  def text(key):
    return first(key, "bytes_list").decode() if key in feature else ""

  def floats(key):
    return np.asarray(feature[key].float_list.value, np.float32)

  if "image" not in feature or "labels" not in feature:
    raise ValueError(f"record has no 'image' or 'labels' feature (has {sorted(feature)})")
  box_labels = np.asarray(feature["box/label"].int64_list.value, np.int64)
  boxes = np.stack([floats(key) for key in BOX_KEYS], axis=-1).reshape(-1, 4)
  if len(boxes) != len(box_labels):
    raise ValueError(f"{len(box_labels)} box labels but {len(boxes)} boxes")
  return CxrExample(
      image=first("image", "bytes_list"),
      image_id=text("image_id"),
      patient_id=text("patient_id"),
      study_id=text("study_id"),
      view=text("view"),
      labels=floats("labels"),
      boxes=boxes,
      box_labels=box_labels,
      fine_labels=floats("fine_labels") if "fine_labels" in feature else None,
      anatomy=first("anatomy", "bytes_list") if "anatomy" in feature else None,
      # Records of format version 2 and older have no flag: none of them was marked.
      box_supervised=(bool(first("box_supervised", "int64_list"))
                      if "box_supervised" in feature else False),
  )


def unframe(buf: bytes, *, path: str = "?", index: int = -1, offset: int = 0,
            verify_crc: bool = True) -> bytes:
  """Checks one framed record held whole in `buf` and returns its payload."""
  if len(buf) < _HEADER.size:
    raise CorruptRecordError(path, index, offset, "truncated header")
  length, length_crc = _HEADER.unpack_from(buf)
  if masked_crc(buf[:8]) != length_crc:
    raise CorruptRecordError(path, index, offset, "length checksum mismatch")
  if len(buf) < _HEADER.size + length + _FOOTER.size:
    raise CorruptRecordError(path, index, offset, f"truncated payload (expected {length} bytes)")
  payload = buf[_HEADER.size:_HEADER.size + length]
  if verify_crc and masked_crc(payload) != _FOOTER.unpack_from(buf, _HEADER.size + length)[0]:
    raise CorruptRecordError(path, index, offset, "payload checksum mismatch")
  return payload


def _record_size(f: BinaryIO, offset: int, path: str, index: int) -> int:
  """Total framed size of the record starting at `offset`, from its (checked) header."""
  f.seek(offset)
  header = f.read(_HEADER.size)
  if len(header) < _HEADER.size:
    raise CorruptRecordError(path, index, offset, "truncated header")
  length, length_crc = _HEADER.unpack(header)
  if masked_crc(header[:8]) != length_crc:
    raise CorruptRecordError(path, index, offset, "length checksum mismatch")
  return _HEADER.size + length + _FOOTER.size


def record_offsets(path: str | os.PathLike) -> np.ndarray:
  """Byte offsets of every record plus the file size as a final entry (N + 1 values).

  Reads only the headers, so indexing a shard costs one seek per record.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  offsets = [0]
  with open(path, "rb") as f:
    while offsets[-1] < size:
      end = offsets[-1] + _record_size(f, offsets[-1], path, len(offsets) - 1)
      if end > size:
        raise CorruptRecordError(path, len(offsets) - 1, offsets[-1], "truncated payload")
      offsets.append(end)
  return np.asarray(offsets, np.int64)


def iter_records(path: str | os.PathLike, *, verify_crc: bool = True) -> Iterator[tuple[int, bytes]]:
  """Yields (offset, payload) for every record of a TFRecord file, in order."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    offset, index = 0, 0
    while offset < size:
      record_size = _record_size(f, offset, path, index)
      if offset + record_size > size:  # never allocate the size a damaged header claims
        length = record_size - _HEADER.size - _FOOTER.size
        raise CorruptRecordError(path, index, offset,
                                 f"truncated payload (expected {length} bytes)")
      f.seek(offset)
      payload = unframe(f.read(record_size), path=path, index=index, offset=offset,
                        verify_crc=verify_crc)
      yield offset, payload
      offset, index = offset + record_size, index + 1
