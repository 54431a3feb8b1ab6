"""A long training run with its resident memory, open files and threads sampled (Linux /proc).

  python benchmarks/long_run.py --workdir runs/long_run --steps 3000

Trains `--config` (default: the phantom smoke recipe, so that thousands of steps, many epochs,
validations and checkpoints fit in minutes on a CPU) for `--steps` steps with a validation and
a checkpoint every `--every` steps, in a fresh process as a user would, and samples it every
`--interval` seconds: the resident memory (VmRSS) of the trainer and of any child processes, its
open file descriptors and its threads. Warm-up is the first `--warmup` of the steps (compilation,
caches, the first validation and save). Prints the samples, then the growth of resident memory
after warm-up (last sample minus the first after warm-up, and the largest above it) against
`--bound_mb`, and the range of open files and threads after warm-up, which should be constant.
Exits 1 when the bound is exceeded or the run fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/phantom.py:smoke", "Config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", "runs/long_run", "Run directory (emptied first).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 250, "Steps between validations and checkpoints.")
_INTERVAL = flags.DEFINE_float("interval", 2.0, "Seconds between samples.")
_WARMUP = flags.DEFINE_float("warmup", 0.1, "Fraction of the steps counted as warm-up.")
_BOUND_MB = flags.DEFINE_float("bound_mb", 100.0, "Allowed growth of resident memory after "
                               "warm-up, MiB.")


def _status(pid: int) -> dict[str, str]:
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _descendants(pid: int) -> list[int]:
  """The process and every process below it."""
  children: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat", encoding="utf-8") as f:
          parent = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue  # exited while listed
      children.setdefault(parent, []).append(int(name))
  found, todo = [], [pid]
  while todo:
    found.append(todo.pop())
    todo.extend(children.get(found[-1], []))
  return found


def sample(pid: int) -> dict[str, float]:
  """Resident MiB of the process tree; open files and threads of the trainer itself."""
  rss_kib = 0
  for p in _descendants(pid):
    try:
      rss_kib += int(_status(p).get("VmRSS", "0 kB").split()[0])
    except OSError:
      continue
  return dict(rss_mib=rss_kib / 1024, files=len(os.listdir(f"/proc/{pid}/fd")),
              threads=int(_status(pid)["Threads"]))


def last_step(workdir: str) -> int:
  """The latest step in the run's metrics.jsonl (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue  # a line being written
  return 0


def run_sampled(command: list[str], workdir: str, interval: float) -> tuple[int, list[dict[str, Any]]]:
  """Runs the trainer, sampling it until it exits; returns its exit code and the samples."""
  proc = subprocess.Popen(command)
  samples, start = [], time.monotonic()
  while proc.poll() is None:
    try:
      samples.append(dict(sample(proc.pid), seconds=time.monotonic() - start,
                          step=last_step(workdir)))
    except (OSError, KeyError):
      pass  # the trainer exited between poll and sample
    time.sleep(interval)
  return proc.returncode, samples


def report(samples: list[dict[str, Any]], warmup_step: int, bound_mb: float) -> bool:
  """Prints the samples and the after-warm-up summary; whether the memory stayed in bound."""
  print("| seconds | step | resident MiB | open files | threads |\n|---|---|---|---|---|")
  shown = samples[::max(len(samples) // 30, 1)] + samples[-1:]
  for s in shown:
    print(f"| {s['seconds']:.0f} | {s['step']} | {s['rss_mib']:.1f} | {s['files']} | "
          f"{s['threads']} |")
  after = [s for s in samples if s["step"] >= warmup_step]
  if len(after) < 2:
    print(f"too few samples after warm-up (step {warmup_step}); lower --interval")
    return False
  first = after[0]["rss_mib"]
  growth, peak = after[-1]["rss_mib"] - first, max(s["rss_mib"] for s in after) - first
  print(f"\nafter warm-up (step {after[0]['step']} to {after[-1]['step']}, {len(after)} samples): "
        f"resident {first:.1f} -> {after[-1]['rss_mib']:.1f} MiB (growth {growth:+.1f}, largest "
        f"{peak:+.1f}; bound {bound_mb:.0f}); open files {_spread(after, 'files')}; threads "
        f"{_spread(after, 'threads')}")
  return peak <= bound_mb


def _spread(samples: list[dict[str, Any]], key: str) -> str:
  """The most frequent value (the level between validations and saves) and the range."""
  values = [s[key] for s in samples]
  return f"mostly {max(set(values), key=values.count)} ({min(values)}..{max(values)})"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  workdir = _WORKDIR.value
  shutil.rmtree(workdir, ignore_errors=True)
  every = _EVERY.value
  command = [sys.executable, "-m", "cxr_jax.train", "--config", _CONFIG.value, "--workdir", workdir,
             f"--config.train.steps={_STEPS.value}", f"--config.train.eval_every={every}",
             f"--config.checkpoint.every={every}", f"--config.train.log_every={min(every, 50)}"]
  print(" ".join(command))
  code, samples = run_sampled(command, workdir, _INTERVAL.value)
  if code:
    print(f"the run failed with exit code {code}")
    sys.exit(1)
  if not report(samples, int(_WARMUP.value * _STEPS.value), _BOUND_MB.value):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
