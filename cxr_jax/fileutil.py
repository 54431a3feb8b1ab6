"""Writing a folder all at once: it is built in a staging folder beside its final place and
renamed there only when complete, so an interrupted or failed write leaves no half folder behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
  """Yields a new, empty staging folder that becomes `out` when the `with` block succeeds.

  The staging folder is `<out>.partial-<pid>`: beside `out`, so the final move is a rename on one
  file system (missing parent folders are created). Without `replace`, `out` must then be absent
  or an empty folder, which the rename replaces atomically; with `replace`, an existing `out` of
  any content is replaced (see `replace_dir`). On any exception, in the block or in the move,
  the staging folder is removed and the exception propagates.
  """
  out = os.path.abspath(out)
  staging = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)  # a leftover of an earlier process with this pid
  os.makedirs(staging)
  try:
    yield staging
    if replace:
      replace_dir(staging, out)
    else:
      os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
  """Adds `path` to an OSError of the block that names no file, and re-raises it.

  A failed write or flush (ENOSPC, EDQUOT, EIO) reaches Python without the file's name, so
  "No space left on device" alone would not say which disk is full.
  """
  try:
    yield
  except OSError as e:
    if e.errno is not None and e.filename is None:
      e.filename = os.fspath(path)
    raise


def replace_dir(src: str, dst: str) -> None:
  """Moves `src` to `dst`, replacing an existing `dst` only after `src` is complete."""
  if os.path.isdir(dst) and not os.listdir(dst):
    os.rmdir(dst)
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  old = f"{dst}.old-{os.getpid()}"
  os.rename(dst, old)
  os.rename(src, dst)
  shutil.rmtree(old)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on the file `<path>.lock` (created if absent) for the `with` block.

  Processes of one machine that may build the same folder (two runs of a study preparing one
  cached dataset) take turns; the lock goes with the process, so a killed holder leaves none.
  """
  lock = f"{os.path.abspath(path)}.lock"
  os.makedirs(os.path.dirname(lock), exist_ok=True)
  with open(lock, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
