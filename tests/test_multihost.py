"""Multi-host training on one machine: processes joined by jax.distributed on localhost.

One scenario, run once for the module (under a minute with a warm compilation cache, about two on
a cold, busy 2-core machine), checked by the tests:
  1. `launch/local_multi_process.sh` starts two processes with 4 CPU devices each; process 0
     writes the dataset through the config's `data.prepare` hook while process 1 waits, then they
     train the tiny config with SGD (`tests/multihost_worker.py`: the trainer, noting the records
     each process takes). Process 1 alone gets SIGTERM after 3 steps, like a preemption notice,
     so both must stop at one agreed step and save a checkpoint.
  2. This process (one process, 8 devices) trains the same config straight through, saving a
     checkpoint at every step: the reference.
  3. One process with one device resumes a copy of run 1's workdir and finishes the run."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import datasets
from cxr_jax import experiment, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 36 records in global batches of 8: each epoch reads 32 and leaves 4 out (the drop-remainder cut).
RECORDS, GLOBAL_BATCH, EPOCHS = 36, 8, 3
STEPS_PER_EPOCH = RECORDS // GLOBAL_BATCH
STEPS = EPOCHS * STEPS_PER_EPOCH
SIGTERM_AFTER = 3
# SGD: Adam would blow float noise in zero gradients up to lr-sized updates. A small lr: with 0.1
# the 1e-5 float noise between 8 devices and 1 grows to 3e-2 in 12 steps of this tiny net; with
# 0.01 the resumed run's parameters miss the 1e-5 tolerance by 1.5e-5 on these 36 records, with
# 0.005 they are 6x inside it.
OPTIM = dict(name="sgd", lr=0.005)

CONFIG_FILE = """\
import sys
sys.path.insert(0, {tests!r})
import test_multihost
def get_config():
  return test_multihost.config({data!r})
"""


def config(data_dir):
  """The tiny config on a dataset that the run writes itself (`datasets.write` as the hook)."""
  c = datasets.tiny_config(data_dir, steps=STEPS, global_batch=GLOBAL_BATCH, eval_every=4)
  c.data.prepare = "datasets:write"
  c.data.prepare_args = dict(splits=dict(train=RECORDS, val=8, test=8))
  c.optim.update(OPTIM)
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(command, env_changes, timeout):
  """Runs a command from the repository root; returns its output, failing the test on an error."""
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, **env_changes),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  return result.stdout + result.stderr


def state_at(workdir, step):
  """The train state saved at `step`, as numpy."""
  _, state, _ = experiment.restore_for_inference(str(workdir), step)
  return jax.device_get(state)


def metrics(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [line for line in map(json.loads, f) if line["split"] == split]


def recorded(record_dir, processes):
  """Per process, the record numbers of its part of each training batch: {"taken": those the
  trainer took, "stream": those of the whole run} (`tests/multihost_worker.py`)."""
  out = []
  for p in range(processes):
    with open(os.path.join(record_dir, f"process_{p}.json")) as f:
      out.append(json.load(f))
  return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  data_dir = str(tmp / "data")
  config_file = tmp / "config.py"
  config_file.write_text(CONFIG_FILE.format(tests=os.path.join(REPO, "tests"), data=data_dir))
  worker = [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
            "--config", str(config_file)]

  two = tmp / "two_processes"
  two_log = run(
      ["launch/local_multi_process.sh", "2", "--", *worker, "--workdir", str(two),
       "--record_dir", str(tmp / "records_two"), f"--sigterm_after={SIGTERM_AFTER}",
       "--sigterm_process=1"],
      dict(PORT=str(free_port()), DEVICES_PER_PROCESS="4", LOG_DIR=str(tmp / "logs")), 240)
  stopped = [int(s) for s in re.findall(r"stopped at step (\d+)", two_log)]

  reference = tmp / "reference"
  reference_config = config(data_dir)
  reference_config.checkpoint.update(every=1, keep=STEPS)
  train.train_and_evaluate(reference_config, str(reference))

  resumed = tmp / "resumed"
  shutil.copytree(two, resumed)
  resumed_log = run([*worker, "--workdir", str(resumed), "--record_dir", str(tmp / "records_one")],
                    dict(XLA_FLAGS="--xla_force_host_platform_device_count=1",
                         JAX_PLATFORMS="cpu"), 300)
  return dict(tmp=tmp, data=data_dir, two=two, two_log=two_log, stopped=stopped,
              reference=reference, resumed=resumed, resumed_log=resumed_log)


def test_sigterm_to_one_process_stops_both_at_one_step(scenario):
  stopped = scenario["stopped"]
  assert len(stopped) == 2 and stopped[0] == stopped[1], scenario["two_log"][-3000:]
  assert SIGTERM_AFTER < stopped[0] < STEPS
  assert max(line["step"] for line in metrics(scenario["two"], "train")) == stopped[0]


def test_two_processes_match_one_process(scenario):
  """Same global batches, same parameters, optimizer state, losses and validation metrics."""
  step = scenario["stopped"][0]
  two, one = state_at(scenario["two"], step), state_at(scenario["reference"], step)
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  for split, key in (("train", "loss"), ("val", "loss")):
    got = {m["step"]: m[key] for m in metrics(scenario["two"], split)}
    want = {m["step"]: m[key] for m in metrics(scenario["reference"], split)}
    common = sorted(set(got) & set(want))
    assert common, (split, got, want)
    np.testing.assert_allclose([got[s] for s in common], [want[s] for s in common], rtol=1e-5,
                               err_msg=f"{split} at steps {common}")


def test_the_trainers_took_their_streams(scenario):
  """Each process's trainer took its stream's batches in order; the resumed run (one process) took
  the same global batches as the two processes together."""
  step = scenario["stopped"][0]
  two = recorded(scenario["tmp"] / "records_two", 2)
  for process in two:
    assert process["taken"] == process["stream"][:step]
  global_batches = [sorted(first + second) for first, second in zip(two[0]["stream"], two[1]["stream"])]
  resumed = recorded(scenario["tmp"] / "records_one", 1)[0]
  assert [sorted(batch) for batch in resumed["taken"]] == global_batches[step:]


def test_every_record_once_per_epoch_across_processes(scenario):
  """Over every batch of the 3 epochs, the two processes' shares together read each record at most
  once per epoch, all but the drop-remainder cut's RECORDS % GLOBAL_BATCH, which differ by epoch."""
  streams = [process["stream"] for process in recorded(scenario["tmp"] / "records_two", 2)]
  image_ids = experiment.record_ids(
      experiment.split_source(config(scenario["data"]), "train")).image
  train_records = {int(image_id.split("_")[0]) for image_id in image_ids}
  assert len(train_records) == RECORDS
  left_out = []
  for epoch in range(EPOCHS):
    batches = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
    shares = streams[0][batches] + streams[1][batches]
    assert [len(share) for share in shares] == [GLOBAL_BATCH // 2] * 2 * STEPS_PER_EPOCH
    seen = sum(shares, [])
    assert len(set(seen)) == len(seen), f"epoch {epoch} reads a record twice"
    assert set(seen) <= train_records, f"epoch {epoch} reads {sorted(set(seen) - train_records)}"
    left_out.append(train_records - set(seen))
    assert len(left_out[-1]) == RECORDS % GLOBAL_BATCH, f"epoch {epoch} leaves out {left_out[-1]}"
  assert len({frozenset(records) for records in left_out}) > 1, "the cut falls on the same records"


def test_only_process_zero_writes(scenario):
  """The dataset, metrics, TensorBoard and checkpoints are written once, not once per process."""
  two, step = scenario["two"], scenario["stopped"][0]
  train_steps = [line["step"] for line in metrics(two, "train")]
  assert train_steps == list(range(1, step + 1))
  assert len(os.listdir(two / "tensorboard")) == 1
  checkpoints = os.listdir(two / "checkpoints")
  assert all(name.isdigit() for name in checkpoints), checkpoints  # no temporary folder left
  assert max(map(int, checkpoints)) == step
  for name in checkpoints:
    assert os.path.exists(two / "checkpoints" / name / "commit_success.txt")
  logs = [(scenario["tmp"] / "logs" / f"process_{p}.log").read_text() for p in (0, 1)]
  assert all("process %d of 2, 4 local / 8 global devices" % p in logs[p] for p in (0, 1))
  assert "preparing" in logs[0] and "preparing" not in logs[1]  # the dataset, by process 0 only
  assert f"step 1/{STEPS}" in logs[0] and f"step 1/{STEPS}" not in logs[1]  # progress lines


def test_checkpoint_of_two_processes_resumes_on_one_device(scenario):
  step, log = scenario["stopped"][0], scenario["resumed_log"]
  assert f"resumed from step {step}" in log and "jax.distributed" not in log
  lines = metrics(scenario["resumed"], "train")
  assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
  losses = {m["step"]: m["loss"] for m in lines}
  reference = {m["step"]: m["loss"] for m in metrics(scenario["reference"], "train")}
  for s in range(step + 1, STEPS + 1):
    np.testing.assert_allclose(losses[s], reference[s], rtol=1e-5, err_msg=f"step {s}")
  finished, straight = state_at(scenario["resumed"], STEPS), state_at(scenario["reference"], STEPS)
  for a, b in zip(jax.tree.leaves(finished), jax.tree.leaves(straight)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# Faults of one process: the processes are started directly, not by launch/local_multi_process.sh,
# which would stop the others itself.
HEARTBEAT_S = 5


def start_processes(tmp, overrides_by_process):
  """Starts one trainer per entry of `overrides_by_process` (extra flags of that process), joined
  on localhost, writing tmp/process_<i>.log; returns the Popen objects."""
  config_file = tmp / "config.py"
  config_file.write_text(CONFIG_FILE.format(tests=os.path.join(REPO, "tests"),
                                            data=str(tmp / "data")))
  port = free_port()
  processes = []
  for i, overrides in enumerate(overrides_by_process):
    command = [sys.executable, "-m", "cxr_jax.train", "--config", str(config_file), "--workdir",
               str(tmp / "run"), "--config.parallel.distributed=explicit",
               f"--config.parallel.coordinator_address=localhost:{port}",
               f"--config.parallel.num_processes={len(overrides_by_process)}",
               f"--config.parallel.process_id={i}",
               f"--config.parallel.heartbeat_timeout_s={HEARTBEAT_S}", *overrides]
    with open(tmp / f"process_{i}.log", "w") as log:
      processes.append(subprocess.Popen(
          command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
          env=dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")))
  return processes


def wait_all(processes, timeout):
  """Waits for every process; kills what is left after `timeout` seconds and fails."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()


def test_processes_started_with_different_configs_or_data_are_refused_at_start(tmp_path):
  processes = start_processes(tmp_path, [[], ["--config.optim.lr=0.5",
                                             f"--config.data.dir={tmp_path / 'other'}"]])
  assert wait_all(processes, 240) != [0, 0]
  want = (f"the processes of this run have different configs: data.dir: process 0 has "
          f"'{tmp_path / 'data'}', process 1 has '{tmp_path / 'other'}'; optim.lr: process 0 has "
          "0.005, process 1 has 0.5")
  for i in (0, 1):
    log = (tmp_path / f"process_{i}.log").read_text()
    assert want in log, log[-3000:]
    assert "step 1/" not in log
  assert not os.path.exists(tmp_path / "data") and not os.path.exists(tmp_path / "other")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_within_seconds(tmp_path, victim):
  """kill -9 of one process mid-training: the other exits within the heartbeat timeout and a few
  seconds, not after JAX's 300 s shutdown barrier, naming the process that died (process 0 hosts
  the coordination service, so its death is named as the leader's)."""
  processes = start_processes(tmp_path, [["--config.train.steps=100000",
                                          "--config.train.eval_every=0"]] * 2)
  log_0 = tmp_path / "process_0.log"
  deadline = time.monotonic() + 240
  while "step 2/" not in log_0.read_text():  # process 0 alone logs progress
    assert time.monotonic() < deadline and processes[0].poll() is None, log_0.read_text()[-3000:]
    time.sleep(0.5)
  processes[victim].kill()
  killed = time.monotonic()
  survivor = processes[1 - victim]
  assert wait_all([survivor], HEARTBEAT_S + 30) != [0]
  elapsed = time.monotonic() - killed
  log = (tmp_path / f"process_{1 - victim}.log").read_text()
  # jax.distributed names the dead process in one of these ways, by the path that noticed it.
  named = (r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b" if victim == 1 else
           r"Failed to send RPC to coordination service. Either the leader task")
  assert re.search(named, log), "\n".join(line for line in log.splitlines()
                                          if line.startswith(("E", "F", "jax.errors")))[-5000:]
  print(f"process {1 - victim} stopped {elapsed:.1f} s after process {victim} was killed")
