"""Random access to the records of TFRecord shards through a cached offset index.

Each shard gets an index (`<shard>.index.npy`: the byte offset of every record plus the file size)
built once by scanning the record headers and cached next to the shard; when that folder is not
writable the index lives in memory only. `RecordSource` then reads record i with one `os.pread`,
which is safe from the many threads and processes of a grain pipeline.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from absl import logging

from cxr_jax.data import tfrecord, writer

INDEX_SUFFIX = ".index.npy"


def _read_cached(cache: str) -> np.ndarray | None:
  """A cached index, or None when there is none or it cannot be read (np.load never unpickles:
  an index file holding objects raises, and is rebuilt)."""
  if not os.path.exists(cache):
    return None
  try:
    return np.load(cache)
  except (ValueError, OSError, EOFError) as e:
    logging.warning("unreadable index %s (%s); rebuilding", cache, e)
    return None


def load_index(shard: str) -> np.ndarray:
  """The offsets of a shard's records (N + 1 values), from the cache or by scanning the shard."""
  cache = shard + INDEX_SUFFIX
  size = os.path.getsize(shard)
  offsets = _read_cached(cache)
  if offsets is not None:
    if offsets.ndim == 1 and len(offsets) and offsets[0] == 0 and offsets[-1] == size:
      return offsets
    logging.warning("stale index %s (shard size changed); rebuilding", cache)
  offsets = tfrecord.record_offsets(shard)
  try:
    tmp = f"{cache}.tmp-{os.getpid()}.npy"
    np.save(tmp, offsets)
    os.replace(tmp, cache)
  except OSError as e:
    logging.info("index of %s kept in memory only (%s)", shard, e)
  return offsets


def locate(starts: np.ndarray, index: int) -> tuple[int, int]:
  """(part, position in that part) of `index` among parts beginning at `starts` (whose last entry
  is the total); IndexError outside it."""
  if not 0 <= index < starts[-1]:
    raise IndexError(f"record {index} out of range [0, {starts[-1]})")
  part = int(np.searchsorted(starts, index, side="right")) - 1
  return part, index - int(starts[part])


class RecordSource:
  """A grain random-access source over the serialized records of several shards, in order.

  `source[i]` is the payload (a serialized `tf.train.Example`) of the i-th record. Picklable:
  file descriptors are opened lazily in each process.
  """

  def __init__(self, shards: Sequence[str], *, verify_crc: bool = True):
    if not shards:
      raise ValueError("RecordSource needs at least one shard")
    self.shards = [os.fspath(s) for s in shards]
    self.verify_crc = verify_crc
    self._offsets = [load_index(s) for s in self.shards]
    self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
    self._fds: dict[int, int] = {}
    self._pid = os.getpid()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def describe(self, index: int) -> str:
    """Where record `index` is: its shard and its position in the shard."""
    shard, local = locate(self._starts, index)
    return f"{self.shards[shard]} record {local}"

  def __getitem__(self, index: int) -> bytes:
    shard, local = locate(self._starts, index)
    start, end = self._offsets[shard][local:local + 2]
    buf = os.pread(self._fd(shard), int(end - start), int(start))
    return tfrecord.unframe(buf, path=self.shards[shard], index=local, offset=int(start),
                            verify_crc=self.verify_crc)

  def _fd(self, shard: int) -> int:
    if self._pid != os.getpid():  # forked: descriptors are shared with the parent's offsets
      self._fds, self._pid = {}, os.getpid()
    if shard not in self._fds:
      self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
    return self._fds[shard]

  def close(self) -> None:
    """Closes the shards this process opened; a later read opens them again."""
    if self._pid == os.getpid():
      for fd in self._fds.values():
        os.close(fd)
    self._fds = {}

  def __del__(self):
    # Validation builds a source per pass: without this, each pass left its shards open until
    # a long run hit the open-files limit (benchmarks/long_run.py found one more per pass).
    if getattr(self, "_fds", None):
      self.close()

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state

  def __repr__(self) -> str:
    return f"RecordSource({len(self.shards)} shards, {len(self)} records)"


def split_source(data_dir: str, split: str, *, verify_crc: bool = True) -> RecordSource:
  """The records of one split of a prepared dataset folder, in manifest order."""
  manifest = writer.load_manifest(data_dir)
  if split not in manifest["splits"]:
    raise KeyError(f"{data_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
  shards = [os.path.join(data_dir, s["file"]) for s in manifest["splits"][split]["shards"]]
  missing = [s for s in shards if not os.path.exists(s)]
  if missing:
    raise FileNotFoundError(f"shards listed in {writer.MANIFEST} are missing: {missing}")
  return RecordSource(shards, verify_crc=verify_crc)
