"""Defaults shared by every experiment config (ml_collections), and the smoke-argument parser.

Every field can be overridden on the command line, e.g. `--config.optim.lr=3e-4`; unknown
fields and values of the wrong type stop the run at start. Fields set to None (placeholders)
mean "the architecture's default".
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from cxr_jax.data import augment


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:smoke,res=128` style arguments into typed values.

  A bare name (`smoke`) sets that boolean to True; `key=value` takes the type of the default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = value.lower() in ("", "1", "true", "yes")
    else:
      parsed[key] = kind(value)
  return parsed


def get_config() -> ml_collections.ConfigDict:
  """The base config; experiment configs start from it and change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype; params and optimizer state stay float32
  # torchvision ImageNet weights (.pth, .safetensors or .npz): one file for every backbone of the
  # method, or per backbone "branch_a=a.pth,branch_b=b.pth" (names: the method's `backbones`);
  # or "model=PATH": every variable from a whole-model state_dict in the method's torch names (an
  # export's model.safetensors, or the HAM authors' checkpoints, `module.model.` keys).
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # a folder prepared by data_prep (holds cxr_manifest.json)
  c.data.prepare = ""  # "module:function" that creates data.dir when it is absent
  # Several prepared datasets instead of data.dir: "name=DIR,name=DIR" (cxr_jax.data.mixture),
  # drawn by "name=WEIGHT,..." (empty: by their sizes); metrics per member, e.g. val/nih/mean_auc.
  c.data.mixture = ""
  c.data.mixture_weights = ""
  c.data.prepare_args = ml_collections.ConfigDict()
  c.data.target = "labels"  # the field learned: labels | fine_labels (Finding|side|zone)
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.test_split = "test"
  c.data.image_size = 224
  # policy for -1 labels: ignore | zeros | ones | zeros_lsr | ones_lsr (cxr_jax.data.labels)
  c.data.uncertainty = "ignore"
  c.data.uncertainty_per_label = ""  # overrides, e.g. "Edema=ones,Atelectasis=ones"
  c.data.lsr_zeros = (0.0, 0.3)  # the soft targets' intervals of zeros_lsr and ones_lsr
  c.data.lsr_ones = (0.55, 0.85)
  c.data.max_boxes = 16
  c.data.verify_crc = True
  # A bad record (corrupt, undecodable, wrong size or label count): "raise" stops the run naming
  # it; "skip" logs it, reads the next good record instead and counts it (`bad_records`).
  c.data.on_bad_record = "raise"
  c.data.worker_count = 0  # decoding processes per host; 0 decodes in the training process
  c.data.prefetch = 2  # batches buffered per worker
  c.data.augment = ml_collections.ConfigDict(dataclasses.asdict(augment.AugmentParams()))

  c.model = ml_collections.ConfigDict()
  c.model.name = "baseline"
  c.model.backbone = ml_collections.ConfigDict(dict(
      name="densenet121", remat=False,
      growth_rate=config_dict.placeholder(int), block_config=config_dict.placeholder(tuple),
      num_init_features=config_dict.placeholder(int), bn_size=config_dict.placeholder(int),
      stage_sizes=config_dict.placeholder(tuple), output_stride=config_dict.placeholder(int),
      width=config_dict.placeholder(int)))
  c.model.dropout = 0.0
  c.model.normalization = "imagenet"  # a preset of cxr_jax.layers.PRESETS
  c.model.channels = 3  # grayscale replicated to 3 channels for ImageNet stems

  # class_counts: W-CEL's |P|, |N| from the batch (Wang et al.) or the training split ("train").
  c.loss = ml_collections.ConfigDict(dict(name="bce", focal_gamma=2.0, focal_alpha=-1.0,
                                          class_counts="batch"))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.9, nesterov=False, schedule="constant", warmup_steps=0, final_lr_fraction=0.0,
      step_boundaries=(), step_factor=0.1, clip_norm=0.0))
  # Parameter groups by regex over paths like "backbone/conv0/kernel" (cxr_jax/optim.py):
  # ((pattern, multiplier), ...), first match wins; `frozen` matches parameters never updated.
  c.optim.lr_mults = ()
  c.optim.wd_mults = ()
  c.optim.frozen = ""

  c.train = ml_collections.ConfigDict(dict(steps=1000, global_batch=16, log_every=50,
                                           eval_every=500))
  # evaluators: comma-separated names of cxr_jax.metrics.evaluators.EVALUATORS. classes: the
  # classes classification reports (its mean AUC too), comma-separated; empty: all (CheXpert
  # recipes report its 5 competition labels). study_level: "" scores images; "max" or "mean" scores
  # studies, pooling their images' scores (the CheXpert paper takes the max over views).
  # Localization evaluators
  # run where the method returns `cams` and the split has boxes, on the classes named in
  # localization_classes (empty: every class with boxes). uncertain: "mask" leaves -1 labels out
  # of evaluation; "policy" scores them as the training policy maps them.
  c.eval = ml_collections.ConfigDict(dict(
      global_batch=32, bootstrap=1000, evaluators="classification", classes="", study_level="",
      uncertain="mask",
      ham_threshold=0.469, wang_levels=(60, 180), localization_classes=""))
  # best_metric: a validation scalar ("val/mean_auc", "val/loc/ham/mean_tiou", ...) ranking the
  # kept best checkpoints; best_mode: max or min.
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, keep_best=1,
                                                best_metric="val/mean_auc", best_mode="max"))
  # heartbeat_timeout_s: a process silent this long counts as dead, and jax.distributed stops the
  # others naming it (JAX's default is 100 s); shutdown_timeout_s: how long a stopping process
  # waits for the others at exit (JAX's default 300 s).
  c.parallel = ml_collections.ConfigDict(dict(
      distributed="none", coordinator_address="", num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int), heartbeat_timeout_s=30, shutdown_timeout_s=30))
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Turns a recipe into its `:smoke` variant: a tiny version of its backbone (one layer or
  block per stage) on 64 px images for 4 steps, to check an installation end to end."""
  c.data.image_size = 64
  c.data.worker_count = 0
  if c.model.backbone.name.startswith("densenet"):
    c.model.backbone.update(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8,
                            bn_size=2)
  else:
    c.model.backbone.stage_sizes = (1, 1, 1, 1)
  c.optim.update(step_boundaries=(), warmup_steps=0)
  c.train.update(steps=4, global_batch=8, log_every=1, eval_every=4)
  c.checkpoint.every = 4
  c.eval.global_batch = 8
