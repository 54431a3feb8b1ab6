"""What every command-line program of the package does the same way: its start and its checks.

Each CLI defines its absl flags only under `__main__` (so the CLIs' functions import side by side)
and then calls `run(main)`; `main(argv)` starts with `check_no_arguments(argv)`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import app

from cxr_jax import config_utils, run_log


def check_no_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments and hides the libraries' info-level log chatter."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  run_log.quiet_library_logs()


def run(main: Callable[[Sequence[str]], None]) -> None:
  """Runs `main` as an absl program; a `--config.<field>` override naming no field is a one-line
  error."""
  app.run(main, flags_parser=config_utils.parse_flags)
