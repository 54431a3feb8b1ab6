"""The training-step benchmark: the CLI's JSON line, the peak-FLOP/s table and the overrides."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.nih import densenet121
from cxr_jax import benchmark, layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_times_jax_and_torch(tmp_path):
  """A tiny DenseNet for 2 steps in both frameworks: one JSON line with sane numbers, also
  appended to --output."""
  output = tmp_path / "bench.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "cxr_jax.benchmark", "--config", "configs/nih/densenet121.py:smoke",
       "--steps", "2", "--warmup", "1", "--torch", "--dtype", "bfloat16", "--remat",
       "--output", str(output)],
      cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, proc.stdout
  record = json.loads(lines[0])
  assert output.read_text().strip() == lines[0]
  assert record["config"] == "configs/nih/densenet121.py:smoke"
  assert (record["image_size"], record["dtype"], record["remat"]) == (64, "bfloat16", True)
  jax_part, torch_part = record["jax"], record["torch"]
  assert record["per_device_batch"] * jax_part["devices"] == record["global_batch"] == 8
  for part in (jax_part, torch_part):
    assert 0 < part["step_s_min"] <= part["step_s_median"] <= part["step_s_max"]
    assert part["first_step_s"] > 0 and part["images_per_s"] > 0
    assert part["tflops_per_s"] > 0
    assert part["final_loss"] == pytest.approx(0.69, abs=0.2)  # BCE of random 0/1 labels
  assert jax_part["params"] == torch_part["params"]
  assert jax_part["compile_s"] > 0 and jax_part["lower_s"] > 0 and jax_part["flops_per_step"] > 0
  assert jax_part["xla_memory_bytes"] > 0
  assert jax_part["platform"] == "cpu" and jax_part["mfu"] is None  # no known peak for a CPU
  assert jax_part["peak_memory_bytes"] is None and "unavailable" in jax_part["peak_memory_source"]
  assert torch_part["autocast_bf16"] and torch_part["channels_last"]
  assert record["jax_over_torch"] == pytest.approx(  # per device: torch uses one
      jax_part["images_per_s"] / jax_part["devices"] / torch_part["images_per_s"], rel=1e-2)


def test_compile_only_estimates_without_running_a_step():
  config = benchmark.apply_overrides(densenet121.get_config("smoke"), batch=8, image_size=32,
                                     dtype=None, remat=None)
  record = benchmark.benchmark(config, steps_timed=3, warmup=1, with_torch=False, compile_only=True)
  part = record["jax"]
  assert record["compile_only"] and part["xla_memory_bytes"] > 0 and part["flops_per_step"] > 0
  assert part["step_s_median"] is None and part["images_per_s"] is None
  assert record["jax_over_torch"] is None and record["torch"] is None
  with pytest.raises(ValueError, match="leave out --torch"):
    benchmark.benchmark(config, steps_timed=3, warmup=1, with_torch=True, compile_only=True)


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H200", "float32", 494.7),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),
    ("cpu", "float32", None),
])
def test_peak_tflops_matches_the_most_specific_device(kind, dtype, expected):
  assert benchmark.peak_tflops(kind, dtype) == expected


def test_overrides_leave_the_config_alone():
  config = densenet121.get_config()
  changed = benchmark.apply_overrides(config, batch=64, image_size=512, dtype="bfloat16", remat=True)
  assert (changed.train.global_batch, changed.data.image_size, changed.dtype,
          changed.model.backbone.remat) == (64, 512, "bfloat16", True)
  assert (config.train.global_batch, config.dtype) == (16, "float32")
  assert benchmark.apply_overrides(config).to_dict() == config.to_dict()


def test_pointwise_conv_is_a_1x1_conv():
  """The matmul form of 1x1 convs (faster on XLA:CPU) has nn.Conv's parameter, output and
  gradients."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 6)), jnp.float32)
  pointwise = layers.conv(4, 1, name="c")
  reference = nn.Conv(4, (1, 1), padding=((0, 0), (0, 0)), use_bias=False,
                      kernel_init=pointwise.kernel_init)
  assert isinstance(pointwise, layers.PointwiseConv)
  variables = pointwise.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(variables["params"]["kernel"],
                                reference.init(jax.random.PRNGKey(0), x)["params"]["kernel"])
  np.testing.assert_allclose(pointwise.apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda v, x, m=m: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))(variables, x)
           for m in (pointwise, reference)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
