"""The trainer: data parallelism, exact resume, clear failures, the NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
from cxr_jax import checkpoint, experiment, parallel, steps, train
from cxr_jax.data import pipeline, writer
from cxr_jax.interop import convert, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 32, "val": 8, "test": 8})


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {d["step"]: d["loss"] for d in lines if d["split"] == "train"}


def donor_weights(config, tmp_path):
  """(run, example batch, donor variables, a torch-named .safetensors file of the donor)."""
  manifest = writer.load_manifest(config.data.dir)
  run = experiment.assemble(config, manifest)
  example = experiment.example_batch(experiment.train_dataset(config, manifest, run.method))
  donor = steps.init_variables(run.model, config, jax.random.PRNGKey(7), example, run.method)
  weights = tmp_path / "donor.safetensors"
  convert.state_dict_to_safetensors(convert.to_state_dict(donor, registry.torch_names(config)),
                                    str(weights))
  return run, example, donor, weights


def test_eight_devices_match_one(data_dir):
  """The same global batch on 1 and on 8 devices gives the same parameters (SGD: Adam would
  amplify float noise in zero-gradient leaves into lr-sized updates)."""
  assert jax.device_count() == 8
  config = datasets.tiny_config(data_dir)
  config.optim.update(name="sgd", lr=0.01)
  manifest = writer.load_manifest(data_dir)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    run = experiment.assemble(config, manifest)
    run.mesh = mesh
    ds = experiment.train_dataset(config, manifest, run.method)
    batches = [pipeline.host_fields(ds[i])[0] for i in range(3)]
    state = steps.create_state(run.model, run.tx, config, mesh, batches[0], run.method)
    step = steps.make_train_step(run.model, run.tx, run.method, run.task, config, mesh)
    for batch in batches:
      state, _ = step(state, parallel.to_global(batch, mesh))
    assert len(state.params["head"]["kernel"].sharding.device_set) == len(devices)
    results.append(jax.device_get(state))
  chex.assert_trees_all_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_interrupted_run_resumes_the_same_loss_sequence(data_dir, tmp_path):
  """SIGTERM mid-run saves a checkpoint; the same command resumes, and the losses equal those of
  an uninterrupted run step for step."""
  config = datasets.tiny_config(data_dir, steps=150, eval_every=1000)
  config.checkpoint.every = 1000
  train.train_and_evaluate(config, str(tmp_path / "straight"))

  workdir = tmp_path / "interrupted"
  config_file = tmp_path / "config.py"
  config_file.write_text(
      "import sys\nsys.path.insert(0, %r)\nimport datasets\n"
      "def get_config():\n  c = datasets.tiny_config(%r, steps=150, eval_every=1000)\n"
      "  c.checkpoint.every = 1000\n  return c\n" % (os.path.join(REPO, "tests"), str(data_dir)))
  command = [sys.executable, "-m", "cxr_jax.train", "--config", str(config_file),
             "--workdir", str(workdir)]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  while not (workdir / "metrics.jsonl").exists() or len(losses_by_step(workdir)) < 5:
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  stopped_at = checkpoint.Checkpointer(str(workdir / "checkpoints")).latest_step()
  assert 5 <= stopped_at < 150, stderr
  assert max(losses_by_step(workdir)) == stopped_at

  resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {stopped_at}" in resumed.stderr
  assert losses_by_step(workdir) == losses_by_step(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  config = datasets.tiny_config(data_dir, steps=20, eval_every=0)
  config.optim.update(name="sgd", lr=1e30)
  config.checkpoint.every = 1
  with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+.*last good checkpoint is step \d+"):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() >= 1
  losses = losses_by_step(tmp_path)
  assert all(np.isfinite(losses[s]) for s in losses if s <= ckpt.latest_step())


def test_update_that_breaks_the_weights_is_never_saved(data_dir, tmp_path):
  """Fault 1: a finite loss whose update makes the parameters infinite stops the run at that
  step; that state is not saved as a good checkpoint."""
  config = datasets.tiny_config(data_dir, steps=4, eval_every=0)
  config.optim.update(name="sgd", lr=float("inf"), momentum=0.0)
  config.checkpoint.every = 1
  with pytest.raises(FloatingPointError, match=r"parameters or BatchNorm statistics are not finite "
                     r"at step 1.*no checkpoint was saved"):
    train.train_and_evaluate(config, str(tmp_path))
  assert losses_by_step(tmp_path) and np.isfinite(losses_by_step(tmp_path)[1])
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() is None


@pytest.mark.parametrize("field", ["checkpoint.every", "train.log_every"])
def test_zero_periods_are_config_errors(data_dir, field):
  """Fault 2: a zero period is refused at start, not a ZeroDivisionError mid-run."""
  config = datasets.tiny_config(data_dir)
  section, name = field.split(".")
  config[section][name] = 0
  with pytest.raises(ValueError, match=rf"config\.{field}=0: must be > 0"):
    train.train_and_evaluate(config, "unused")


def test_negative_eval_period_is_a_config_error(data_dir):
  config = datasets.tiny_config(data_dir, eval_every=-1)
  with pytest.raises(ValueError, match=r"config\.train\.eval_every=-1: must be >= 0"):
    train.train_and_evaluate(config, "unused")


@pytest.mark.parametrize("change", ["other_data", "image_size", "moved"])
def test_resume_refuses_changed_data(data_dir, tmp_path, change):
  """Fault 3: a run resumes only on the data stream it checkpointed."""
  config = datasets.tiny_config(data_dir, steps=3, eval_every=0)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config.train.steps = 6
  if change == "other_data":  # same layout and size, other records
    other = datasets.write(tmp_path / "other", {"train": 40, "val": 8, "test": 8})
    config.data.dir = other
    expected = "data_fingerprint"
  elif change == "image_size":
    config.data.image_size = 16
    expected = "image_size"
  else:
    moved = tmp_path / "moved"
    os.symlink(data_dir, moved)
    config.data.dir = str(moved)
    expected = "data_dir"
  with pytest.raises(ValueError, match=rf"cannot resume: .*{expected}: saved"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_resume_does_not_need_the_init_from_file(data_dir, tmp_path):
  """Fault 4: a resumed run restores onto the abstract state; the pretrained file may be gone."""
  config = datasets.tiny_config(data_dir, steps=3, eval_every=0)
  _, _, _, weights = donor_weights(config, tmp_path)
  config.init_from = str(weights)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  os.remove(weights)
  config.train.steps = 5
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert last["train"]["loss"] > 0
  assert max(losses_by_step(tmp_path / "run")) == 5


def test_config_typo_stops_at_start(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "cxr_jax.train", "--config", "configs/phantom.py",
       "--workdir", str(tmp_path), "--config.optim.lrr=0.1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--config.optim.lrr" in result.stderr and 'Did you mean "lr"' in result.stderr
  assert not os.listdir(tmp_path)


def test_bad_values_are_listed(data_dir):
  config = datasets.tiny_config(data_dir)
  config.optim.name = "adamm"
  config.data.uncertainty_per_label = "Edema:ones"
  config.data.lsr_ones = (0.9, 0.5)
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(config, "unused")
  assert "config.optim.name='adamm'" in str(err.value)
  assert "uncertainty_per_label" in str(err.value)
  assert "config.data.lsr_ones=(0.9, 0.5): need 0 <= low <= high <= 1" in str(err.value)


def test_missing_checkpoint_is_an_error(data_dir, tmp_path):
  from cxr_jax import config_utils
  config_utils.save(datasets.tiny_config(data_dir), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    experiment.restore_for_inference(str(tmp_path), "best")


def test_a_run_saved_before_newer_config_fields_still_loads_with_their_defaults(data_dir,
                                                                               tmp_path):
  """A config.json without fields added since (config_utils.ADDED_FIELDS) loads with the values
  that mean what the run did, the current defaults, and validates: old runs stay evaluable."""
  from cxr_jax import config_utils
  config = datasets.tiny_config(data_dir)
  config_utils.save(config, str(tmp_path))
  with open(tmp_path / config_utils.CONFIG_FILE) as f:
    saved = json.load(f)
  for dotted in config_utils.ADDED_FIELDS:
    section, field = dotted.split(".")
    del saved[section][field]
  with open(tmp_path / config_utils.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  loaded = config_utils.load(str(tmp_path))
  for dotted in config_utils.ADDED_FIELDS:
    assert config_utils.get(loaded, dotted) == config_utils.get(config, dotted), dotted
  config_utils.validate(loaded)


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_best=1)
  for step, auc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7)]:
    ckpt.save(step, {"w": jnp.full(3, float(step))}, {"next_batch": step},
              metrics={"val/mean_auc": auc})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 3, 4]
  assert ckpt.resolve("best") == 2 and ckpt.resolve("latest") == 4
  restored = ckpt.restore_state(2, checkpoint.abstract({"w": jnp.zeros(3)}))
  chex.assert_trees_all_equal(restored, {"w": np.full(3, 2.0, np.float32)})
  with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 3, 4\]"):
    ckpt.resolve(1)


def test_best_checkpoint_by_a_configured_metric_and_mode(tmp_path):
  """The best checkpoint is ranked by any validation metric, lower-is-better when asked."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric="val/loss",
                                 best_mode="min")
  for step, loss in [(1, 0.5), (2, 0.2), (3, 0.6), (4, 0.7)]:
    ckpt.save(step, {"w": jnp.full(3, float(step))}, {"next_batch": step},
              metrics={"val/loss": loss})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 4]
  assert ckpt.resolve("best") == 2


def test_unknown_best_metric_is_named(data_dir, tmp_path):
  config = datasets.tiny_config(data_dir, steps=3, eval_every=3)
  config.checkpoint.best_metric = "val/loc/ham/mean_tiou"  # no cams evaluator on val: not there
  with pytest.raises(ValueError, match=r"best_metric='val/loc/ham/mean_tiou' is not a validation "
                     r"metric.*val/mean_auc"):
    train.train_and_evaluate(config, str(tmp_path))


def test_init_from_fills_the_backbone_and_keeps_a_fresh_head(data_dir, tmp_path):
  config = datasets.tiny_config(data_dir)
  run, example, donor, weights = donor_weights(config, tmp_path)
  config.init_from = str(weights)
  state = experiment.initial_state(run, example)
  chex.assert_trees_all_equal(state.params["backbone"], donor["params"]["backbone"])
  chex.assert_trees_all_equal(state.batch_stats, donor["batch_stats"])
  assert not np.array_equal(state.params["head"]["kernel"], donor["params"]["head"]["kernel"])


def open_files_under(directory) -> list[str]:
  """The files under `directory` this process holds open (Linux /proc)."""
  targets = [os.path.realpath(os.path.join("/proc/self/fd", fd)) for fd in os.listdir("/proc/self/fd")]
  return [t for t in targets if t.startswith(os.path.realpath(directory) + os.sep)]


def test_validations_leave_no_shard_open(data_dir, tmp_path):
  """Each validation pass reads its split through a new source; a long run must not pile up one
  open descriptor per pass (benchmarks/long_run.py found it doing so)."""
  import gc
  config = datasets.tiny_config(data_dir, steps=6, eval_every=1)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  gc.collect()
  assert open_files_under(data_dir) == []
  source = experiment.split_source(config, "val")
  source[0]
  assert len(open_files_under(data_dir)) == 1
  del source
  assert open_files_under(data_dir) == []
