"""Training-step speed of a config on this machine, in JAX and (with `--torch`) in PyTorch.

  python -m cxr_jax.benchmark --config configs/nih/densenet121.py --torch
  python -m cxr_jax.benchmark --config configs/nih/densenet121.py:res=512 --dtype bfloat16 \
      --batch 16 --steps 20 --warmup 10 --torch --output bench.jsonl

Prints one JSON line per invocation (one setting). `--compile_only` compiles the step and prints
XLA's FLOP and memory estimates without running it: the memory a 512 px step would need, on a
machine that could not run it. The batch is synthetic: uint8 images of the
config's size, random labels and fine labels, every label known, random anatomy maps, and a box
on every image, each marked for box supervision (so HAM's box term runs): every method finds its
inputs. It is placed on the devices once, so this times the step alone (the input pipeline has
its own benchmark, `cxr_jax.data.throughput`). The step is the trainer's:
`steps.make_train_step` with the config's model, loss and optimizer, jitted, sharded over every
local device, state donated. Fields of the `jax` part:

  lower_s, compile_s    tracing + lowering, and XLA compilation (autotuning included on GPU)
  first_step_s          the first call of the compiled step
  step_s_median/min/max over `--steps` steps after `--warmup` (the first included), each ended
                        with `block_until_ready`
  images_per_s          global batch / median step time
  flops_per_step        XLA's cost analysis of the compiled step, summed over the devices; with
                        remat it counts the recomputation too
  mfu                   flops_per_step / step time / (peak FLOP/s per device x devices): the
                        device's dense peak for the compute dtype (`PEAK_TFLOPS`, or
                        `--peak_tflops`); null when the peak is unknown (CPUs)
  peak_memory_bytes     `device.memory_stats()["peak_bytes_in_use"]` (max over devices); null
                        where the backend keeps no statistics (CPU), with the reason
  xla_memory_bytes      XLA's static estimate for the step executable per device (arguments +
                        outputs + temporaries - donated aliases), available on every backend

`--torch` adds the same method's PyTorch mirror and its own loss in torch (both named in
`cxr_jax.interop.registry`) on the same batch, the method's extra inputs included, the config's
optimizer family with torch's semantics (`torch.optim.Adam` couples weight decay, like
`cxr_jax.optim`), channels_last, autocast bfloat16
when `config.dtype` is bfloat16, `cudnn.benchmark` on CUDA and one thread per usable core on CPU.
It runs first, so JAX later finds the accelerator's memory free. PyTorch uses one device, so
`jax_over_torch` is the ratio of images/s per device (on a multi-GPU host,
`CUDA_VISIBLE_DEVICES=0` compares whole runs).

CPU timings need an idle machine: PyTorch's OpenMP threads wait for each other at every operator,
so on cores shared with other jobs its steps slow down several-fold, XLA's much less, and the ratio
means nothing. `taskset -c 0 python -m cxr_jax.benchmark ...` compares one core against one core.

Batch sizes. `config.train.global_batch` is the batch of one optimizer step across every device of
every process; each device computes global_batch / device_count examples (it must divide, checked
at start) and each process feeds global_batch / process_count. BatchNorm statistics are taken over
the global batch, so a config means the same optimisation on 1 or 64 devices: more devices make
steps faster, not bigger. To fill larger or more devices, raise the global batch and, as a rule of
thumb, the learning rate linearly with it, with a linear warm-up (`config.optim.warmup_steps`, a
few hundred steps) when the factor is large: lr = base_lr x global_batch / base_batch, e.g.
1e-4 x B / 16 for the CheXNet recipe (for Adam at large factors, square-root scaling is the more
cautious choice). Check the validation AUC against the base recipe before trusting a new batch.

Mixed precision: `config.dtype=bfloat16` computes convolutions, BatchNorm and the head in bfloat16
while parameters, optimizer state, BatchNorm statistics, logits and the loss stay float32.
`config.model.backbone.remat=True` (or `--remat`) recomputes each dense layer (DenseNet) or
residual block (ResNet) in the backward pass instead of keeping its inside activations: 13% more
FLOPs for DenseNet-121 by XLA's count. DenseNet keeps every layer's input (the growing
concatenation) either way, and XLA:CPU's memory estimate does not drop; `peak_memory_bytes` on an
accelerator says what it saves there.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from cxr_jax import cli, experiment, layers, methods, parallel, steps
from cxr_jax.data import labels as labels_lib

# Dense (no sparsity) peak TFLOP/s of one JAX device, by compute dtype; the first key that is a
# substring of the lower-cased device kind wins. "float32" is the TF32 tensor-core peak on NVIDIA
# GPUs and the bfloat16 peak on TPUs, because both frameworks compute float32 convolutions that way
# by default there (JAX: "TF32 on recent GPUs, bfloat16 on TPU", docs.jax.dev "Matmul precision";
# PyTorch: torch.backends.cudnn.allow_tf32 defaults to True).
# Sources: NVIDIA H100 and H200 datasheets (SXM: BF16 1,979 and TF32 989 TFLOPS with sparsity;
# PCIe 1,513 / 756; NVL 1,671 / 835), A100 datasheet (BF16 312, TF32 156 dense); Google Cloud TPU
# docs (bf16 per chip: v4 275, v5e 197, v5p 459, v6e 918).
PEAK_TFLOPS = (
    ("h100 pcie", {"bfloat16": 756.5, "float32": 378.0}),
    ("h100 nvl", {"bfloat16": 835.5, "float32": 417.5}),
    ("h100", {"bfloat16": 989.4, "float32": 494.7}),
    ("h200 nvl", {"bfloat16": 835.5, "float32": 417.5}),
    ("h200", {"bfloat16": 989.4, "float32": 494.7}),
    ("a100", {"bfloat16": 312.0, "float32": 156.0}),
    ("tpu v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("tpu v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("tpu v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("tpu v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("tpu v6", {"bfloat16": 918.0, "float32": 918.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The dense peak TFLOP/s of one device of `device_kind` for `dtype`, or None when unknown."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(dtype)
  return None


def apply_overrides(config: ml_collections.ConfigDict, *, batch: int | None = None,
                    image_size: int | None = None, dtype: str | None = None,
                    remat: bool | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the benchmark's shortcuts applied (None keeps the config's value)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if batch is not None:
    config.train.global_batch = batch
    config.eval.global_batch = batch  # `assemble` checks it divides too; the benchmark never evaluates
  if image_size is not None:
    config.data.image_size = image_size
  if dtype is not None:
    config.dtype = dtype
  if remat is not None:
    config.model.backbone.remat = remat
  return config


# Anatomy ids of the synthetic batch: the phantom's vocabulary (docs/architecture.md).
ANATOMY_NAMES = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum", "abdomen")


def synthetic_manifest(global_batch: int) -> dict[str, Any]:
  """A manifest with NIH's labels, the fine-label vocabulary and the phantom's anatomy names, and
  balanced training counts: enough for every method's task and inputs."""
  fine = labels_lib.fine_vocabulary()

  def counts(n):
    return dict(positive=[global_batch // 2] * n, negative=[global_batch // 2] * n,
                uncertain=[0] * n, unknown=[0] * n)
  return dict(name="synthetic", label_names=list(labels_lib.NIH_LABELS), fine_label_names=list(fine),
              anatomy_names=list(ANATOMY_NAMES), image_size=None,
              splits={"train": dict(num_records=global_batch, label_counts=counts(len(labels_lib.NIH_LABELS)),
                                    fine_label_counts=counts(len(fine)), num_boxes=global_batch)})


def synthetic_batch(global_batch: int, image_size: int, manifest: Mapping[str, Any],
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch with every field the pipeline makes (so every method finds its inputs):
  uint8 images, random 0/1 labels and fine labels with full masks, random anatomy ids, one box,
  every image marked for box supervision."""
  rng = np.random.default_rng(seed)
  b, size = global_batch, image_size
  num_labels, num_fine = len(manifest["label_names"]), len(manifest["fine_label_names"])
  corner = rng.uniform(0, 0.5, (b, 1, 2))
  return dict(
      image=rng.integers(0, 256, (b, size, size, 1), dtype=np.uint8),
      labels=rng.integers(0, 2, (b, num_labels)).astype(np.float32),
      label_mask=np.ones((b, num_labels), np.float32),
      fine_labels=rng.integers(0, 2, (b, num_fine)).astype(np.float32),
      fine_label_mask=np.ones((b, num_fine), np.float32),
      anatomy=rng.integers(0, len(manifest["anatomy_names"]), (b, size, size), dtype=np.uint8),
      boxes=np.concatenate([corner, corner + 0.4], axis=-1).astype(np.float32),
      box_labels=rng.integers(0, num_labels, (b, 1)).astype(np.int32),
      box_supervised=np.ones((b,), np.float32))


def time_steps(step: Callable[[], Any], *, steps: int, warmup: int) -> dict[str, float]:
  """Runs `step` (which must block until its work is done) warmup + steps times; returns the
  first call's time and the median/min/max of the timed calls, in seconds."""
  times = []
  for _ in range(max(warmup, 1) + steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  timed = times[max(warmup, 1):]
  return dict(first_step_s=times[0], step_s_median=statistics.median(timed),
              step_s_min=min(timed), step_s_max=max(timed))


def xla_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable per device, from XLA's cost analysis.

  `Compiled.cost_analysis()` returns a dict in current JAX and a list with one dict per program in
  older versions; some backends return nothing.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _xla_memory_bytes(compiled) -> int | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def _device_peak_memory(devices) -> tuple[int | None, str]:
  """(peak bytes in use on the busiest device, where the number comes from)."""
  stats = [d.memory_stats() for d in devices]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  if not peaks:
    return None, f"unavailable: {devices[0].platform} keeps no memory statistics"
  return int(max(peaks)), "device.memory_stats()['peak_bytes_in_use']"


def _rates(timing: Mapping[str, float], global_batch: int, flops_per_step: float | None,
           peak_per_device: float | None, num_devices: int) -> dict[str, Any]:
  """images/s, achieved TFLOP/s and MFU from a median step time."""
  step_s = timing["step_s_median"]
  achieved = flops_per_step / step_s / 1e12 if flops_per_step else None
  mfu = achieved / (peak_per_device * num_devices) if achieved and peak_per_device else None
  return dict(images_per_s=global_batch / step_s, tflops_per_s=achieved, peak_tflops=peak_per_device,
              mfu=mfu)


def _compile_train_step(run: experiment.Run, host_batch: Mapping[str, np.ndarray]):
  """(state, device batch, compiled step, {init_s, lower_s, compile_s}) for `run`'s train step."""
  config = run.config
  start = time.perf_counter()
  example = {k: v[:1] for k, v in host_batch.items()}
  state = jax.block_until_ready(
      steps.create_state(run.model, run.tx, config, run.mesh, example, run.method))
  init_s = time.perf_counter() - start
  batch = parallel.to_global(dict(host_batch), run.mesh)
  train_step = steps.make_train_step(run.model, run.tx, run.method, run.task, config, run.mesh)
  start = time.perf_counter()
  lowered = train_step.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  logging.info("jax: init %.1f s, lower %.1f s, compile %.1f s", init_s, lower_s, compile_s)
  return state, batch, compiled, dict(init_s=init_s, lower_s=lower_s, compile_s=compile_s)


def measure_jax(config: ml_collections.ConfigDict, host_batch: Mapping[str, np.ndarray], *,
                steps_timed: int, warmup: int, peak: float | None = None,
                compile_only: bool = False) -> dict[str, Any]:
  """Compiles and times the trainer's train step on every local device; see the module doc.
  `compile_only`: no step runs (timings and rates null): XLA's FLOP and memory estimates of a
  step too large for this machine's memory."""
  run = experiment.assemble(config, synthetic_manifest(config.train.global_batch))
  state, batch, compiled, compile_times = _compile_train_step(run, host_batch)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  devices = run.mesh.devices.flatten().tolist()
  per_device = xla_flops(compiled)
  flops_per_step = per_device * len(devices) if per_device else None
  estimates = dict(framework="jax", version=jax.__version__, platform=devices[0].platform,
                   device_kind=devices[0].device_kind, devices=len(devices),
                   xla_flags=os.environ.get("XLA_FLAGS", ""), params=int(params), **compile_times,
                   flops_per_step=flops_per_step, xla_memory_bytes=_xla_memory_bytes(compiled))
  if compile_only:
    return dict(estimates, step_s_median=None, images_per_s=None, final_loss=None)
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    # One executable: its outputs are ready together, so waiting for the loss waits for the step.
    holder["loss"] = metrics["loss"].block_until_ready()

  timing = time_steps(step, steps=steps_timed, warmup=warmup)
  peak = peak or peak_tflops(devices[0].device_kind, config.dtype)
  peak_memory, memory_source = _device_peak_memory(devices)
  return dict(
      estimates, **timing,
      **_rates(timing, config.train.global_batch, flops_per_step, peak, len(devices)),
      peak_memory_bytes=peak_memory, peak_memory_source=memory_source,
      final_loss=float(holder["loss"]))


def _torch_optimizer(optim_config: Mapping[str, Any], parameters):
  """The config's optimizer family and hyper-parameters in torch (the lr schedule and the backbone
  lr multiplier do not change a step's cost and are left out)."""
  import torch  # pylint: disable=g-import-not-at-top  (torch is needed only with --torch)
  name, lr, wd = optim_config["name"], optim_config["lr"], optim_config["weight_decay"]
  betas = (optim_config["b1"], optim_config["b2"])
  if name == "adam":
    return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=optim_config["eps"], weight_decay=wd)
  if name == "adamw":
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, eps=optim_config["eps"], weight_decay=wd)
  if name == "sgd":
    return torch.optim.SGD(parameters, lr=lr, momentum=optim_config["momentum"],
                           nesterov=optim_config["nesterov"], weight_decay=wd)
  raise ValueError(f"no torch optimizer for config.optim.name={name!r}")


def _torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True  # autotuned convolutions, as XLA autotunes its own
    return torch.device("cuda"), torch.cuda.get_device_name(), torch.cuda.synchronize
  torch.set_num_threads(parallel.usable_cpus())
  return torch.device("cpu"), "cpu", lambda: None


def _torch_step(config: ml_collections.ConfigDict, task, host_batch: Mapping[str, np.ndarray],
                device, sync: Callable[[], None], channels_last: bool):
  """The mirror's train step on `host_batch` as a blocking closure; (step, parameter count)."""
  import torch  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import registry  # pylint: disable=g-import-not-at-top

  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = registry.build_mirror(config, task).to(device, memory_format=memory_format).train()
  loss_fn = registry.torch_loss(config)
  optimizer = _torch_optimizer(config.optim, model.parameters())
  preset, channels = layers.PRESETS[config.model.normalization], config.model.channels
  mean = torch.tensor(preset["mean"], device=device).reshape(-1, 1, 1)
  std = torch.tensor(preset["std"], device=device).reshape(-1, 1, 1)
  images = torch.from_numpy(host_batch["image"]).to(device).permute(0, 3, 1, 2)
  batch = {k: torch.from_numpy(v).to(device) for k, v in host_batch.items() if k != "image"}
  inputs = {k: batch[k] for k in methods.get(config.model.name).inputs}
  weight = torch.ones(len(images), device=device)

  def step():
    # The same normalisation as `steps.model_images`, on the device, inside the step.
    x = ((images.float() / 255.0).expand(-1, channels, -1, -1) - mean) / std
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
      outputs = model(x.contiguous(memory_format=memory_format), **inputs)
    loss, _ = loss_fn(outputs, batch, task=task, config=config, weight=weight)
    loss.backward()
    if config.optim.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
    optimizer.step()
    sync()
    return loss.detach()

  return step, sum(p.numel() for p in model.parameters())


def measure_torch(config: ml_collections.ConfigDict, host_batch: Mapping[str, np.ndarray], *,
                  steps_timed: int, warmup: int, channels_last: bool = True,
                  peak: float | None = None) -> dict[str, Any]:
  """Times the PyTorch mirror's train step on the same batch; see the module doc. The FLOP rates
  stay null here: `benchmark` fills them in from XLA's count."""
  import torch  # pylint: disable=g-import-not-at-top

  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"torch step supports float32 and bfloat16 compute, not {config.dtype}")
  device, device_kind, sync = _torch_device()
  cuda = device.type == "cuda"
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  # The mirror's initial weights come from torch's global generator: seeded, so that a record
  # does not depend on what ran before in the process.
  torch.manual_seed(config.seed)
  step, params = _torch_step(config, experiment.make_task(config, synthetic_manifest(
      config.train.global_batch)), host_batch, device, sync, channels_last)
  losses = []
  timing = time_steps(lambda: losses.append(step()), steps=steps_timed, warmup=warmup)
  result = dict(
      framework="torch", version=torch.__version__, platform=device.type, device_kind=device_kind,
      devices=1, threads=torch.get_num_threads(), channels_last=channels_last,
      autocast_bf16=config.dtype == "bfloat16", params=params, **timing,
      **_rates(timing, config.train.global_batch, None, peak or peak_tflops(device_kind, config.dtype),
               1),
      peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
      peak_memory_source=("torch.cuda.max_memory_allocated()" if cuda
                          else "unavailable: torch keeps no CPU memory statistics"),
      final_loss=float(losses[-1]))
  del step  # the model, optimizer and batch with it
  if cuda:
    torch.cuda.empty_cache()  # hand the memory back before JAX allocates its pool
  return result


def benchmark(config: ml_collections.ConfigDict, *, steps_timed: int, warmup: int,
              with_torch: bool, channels_last: bool = True,
              peak: float | None = None, compile_only: bool = False) -> dict[str, Any]:
  """One setting: the JSON-able record of the JAX step and, optionally, the torch step
  (`compile_only`: XLA's estimates alone, see `measure_jax`)."""
  if compile_only and with_torch:
    raise ValueError("--compile_only runs no step, so there is no PyTorch step to compare: "
                     "leave out --torch")
  manifest = synthetic_manifest(config.train.global_batch)
  task = experiment.make_task(config, manifest)
  num_classes = task.num_classes
  host_batch = synthetic_batch(config.train.global_batch, config.data.image_size, manifest,
                               config.seed)
  torch_result = None
  if with_torch:  # first: JAX's GPU allocator keeps what it takes
    torch_result = measure_torch(config, host_batch, steps_timed=steps_timed, warmup=warmup,
                                 channels_last=channels_last, peak=peak)
    logging.info("torch: %.3f s/step, %.1f images/s", torch_result["step_s_median"],
                 torch_result["images_per_s"])
  jax_result = measure_jax(config, host_batch, steps_timed=steps_timed, warmup=warmup, peak=peak,
                           compile_only=compile_only)
  if not compile_only:
    logging.info("jax: %.3f s/step, %.1f images/s", jax_result["step_s_median"],
                 jax_result["images_per_s"])
  if torch_result is not None and jax_result["flops_per_step"]:
    # The same model and batch: XLA's count is torch's work too.
    torch_result.update(_rates(torch_result, config.train.global_batch,
                               jax_result["flops_per_step"], torch_result["peak_tflops"], 1))
  backbone = config.model.backbone
  return dict(
      benchmark="train_step", method=config.model.name, backbone=backbone.name,
      image_size=config.data.image_size, global_batch=config.train.global_batch,
      per_device_batch=config.train.global_batch // jax_result["devices"], dtype=config.dtype,
      remat=backbone.remat, num_classes=num_classes, steps=steps_timed, warmup=warmup,
      jax=jax_result, torch=torch_result,
      compile_only=compile_only,
      jax_over_torch=(jax_result["images_per_s"] / jax_result["devices"]
                      / torch_result["images_per_s"] if torch_result else None))


def _rounded(value: Any) -> Any:
  """Floats to 4 significant digits (timings on a shared machine carry no more), recursively."""
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  if isinstance(value, float):
    return float(f"{value:.4g}")
  return value


def main(argv):
  cli.check_no_arguments(argv)
  args = flags.FLAGS
  config = apply_overrides(args.config, batch=args.batch, image_size=args.image_size,
                           dtype=args.dtype, remat=args.remat)
  record = benchmark(config, steps_timed=args.steps, warmup=args.warmup, with_torch=args.torch,
                     channels_last=args.torch_channels_last, peak=args.peak_tflops,
                     compile_only=args.compile_only)
  record = dict(config=config_flags.get_config_filename(args["config"]), **record)
  line = json.dumps(_rounded(record))
  print(line, flush=True)
  if args.output:
    with open(args.output, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that the CLIs' functions import side by side.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first, the first call included.")
  flags.DEFINE_integer("batch", None, "Global batch (default: config.train.global_batch).")
  flags.DEFINE_integer("image_size", None, "Image side (default: config.data.image_size).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: config.dtype).")
  flags.DEFINE_bool("remat", None, "Rematerialise backbone blocks (default: the config's).")
  flags.DEFINE_bool("torch", False, "Also time the PyTorch mirror on the same batch.")
  flags.DEFINE_bool("compile_only", False,
                    "Compile the step and report XLA's FLOP and memory estimates; run nothing.")
  flags.DEFINE_bool("torch_channels_last", True, "PyTorch in channels_last layout.")
  flags.DEFINE_float("peak_tflops", None,
                     "Peak TFLOP/s of one device for the MFU (default: PEAK_TFLOPS).")
  flags.DEFINE_string("output", None, "Also append the JSON line to this file.")
  flags.mark_flag_as_required("config")
  cli.run(main)
