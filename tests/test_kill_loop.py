"""kill -9 of training at random moments, many times in a row, checkpoint saves included.

One run is killed KILLS times: every fourth start at a random delay (start-up, restore, compile,
training), the others a random 0-150 ms after a new entry appears in its checkpoint folder, which
is when orbax is writing a checkpoint (one every step here, kept 2, so old ones are being deleted
too). After each kill the run's latest complete checkpoint is read; the next start must say it
resumed from exactly that step. The run then finishes, and its parameters, BatchNorm statistics
and optimizer state must equal those of a run never interrupted.
"""

import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import datasets
from cxr_jax import checkpoint, experiment, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS, STEPS = 20, 40
CONFIG_FILE = """\
import sys
sys.path.insert(0, {tests!r})
import test_kill_loop
def get_config():
  return test_kill_loop.config({data!r})
"""


def config(data_dir):
  """The tiny config, a checkpoint at every step and a validation every 10."""
  c = datasets.tiny_config(data_dir, steps=STEPS, eval_every=10, log_every=5)
  c.checkpoint.update(every=1, keep=2, keep_best=1)
  return c


def latest_complete(workdir) -> int | None:
  """The newest checkpoint orbax counts as complete (None before the first)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  return checkpoint.Checkpointer(directory, read_only=True).latest_step()


def entries(workdir) -> set[str]:
  directory = os.path.join(workdir, "checkpoints")
  return set(os.listdir(directory)) if os.path.isdir(directory) else set()


def wait_for_new_entry(workdir, before: set[str], proc, log) -> None:
  """Waits until the checkpoint folder holds an entry it did not hold at `before`."""
  deadline = time.monotonic() + 300
  while not entries(workdir) - before:
    assert proc.poll() is None, log.read_text()[-3000:]
    assert time.monotonic() < deadline, "no checkpoint written in 300 s"
    time.sleep(0.01)


@pytest.fixture
def data_dir(tmp_path):
  return datasets.write(tmp_path / "data", {"train": 32, "val": 8, "test": 8})


def test_kill_9_loop_resumes_from_the_last_complete_checkpoint(data_dir, tmp_path):
  straight = tmp_path / "straight"
  train.train_and_evaluate(config(data_dir), str(straight))

  workdir, log = tmp_path / "killed", tmp_path / "train.log"
  config_file = tmp_path / "config.py"
  config_file.write_text(CONFIG_FILE.format(tests=os.path.join(REPO, "tests"), data=str(data_dir)))
  command = [sys.executable, "-m", "cxr_jax.train", "--config", str(config_file), "--workdir",
             str(workdir)]
  rng = random.Random(0)
  resumed_from, mid_save = [], 0
  for kill in range(KILLS + 1):
    expected = latest_complete(workdir)
    before = entries(workdir)
    with open(log, "w") as out:
      proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if kill == KILLS:
      assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    else:
      if kill % 4 == 0:
        time.sleep(rng.uniform(0.0, 4.0))
      else:
        wait_for_new_entry(workdir, before, proc, log)
        time.sleep(rng.uniform(0.0, 0.15))
      proc.kill()
      assert proc.wait(timeout=60) == -9, f"kill {kill}: the run ended before the kill"
      mid_save += any(".orbax-checkpoint-tmp" in name for name in entries(workdir))
    text = log.read_text()
    if expected is None:
      assert "resumed from step" not in text, text[-3000:]
    elif "resumed from step" in text or kill == KILLS:  # a kill may come before the restore
      assert f"resumed from step {expected} " in text, (kill, expected, text[-3000:])
      resumed_from.append(expected)

  assert latest_complete(workdir) == STEPS
  _, want, _ = experiment.restore_for_inference(str(straight), STEPS)
  _, got, _ = experiment.restore_for_inference(str(workdir), STEPS)
  differences = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                 for a, b in zip(jax.tree.leaves(jax.device_get(got)),
                                 jax.tree.leaves(jax.device_get(want)))]
  print(f"{KILLS} kills ({mid_save} left a checkpoint half written), {len(resumed_from)} resumes "
        f"from steps {resumed_from}; largest parameter difference {max(differences)}")
  assert len(resumed_from) >= KILLS // 2 and mid_save >= 1
  assert max(differences) == 0.0
