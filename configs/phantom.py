"""The embedded default: the phantom dataset, built on first use, and a small DenseNet that trains
on 2 CPU cores in under ten minutes.

  python -m cxr_jax.train --config configs/phantom.py --workdir runs/phantom
  python -m cxr_jax.evaluate --workdir runs/phantom

The phantom (docs/phantom.md) is rendered in NIH ChestX-ray14's file layout and converted by
`data_prep.nih`, exactly as the real dataset would be, into `$CXR_JAX_CACHE` (default
`~/.cache/cxr_jax`). `configs/phantom.py:smoke` is a tiny version for tests (a few patients,
32 px, a few steps).

`configs/phantom.py:method=ham` (and `method=ham,smoke`) trains HAM on the same data with the
same optimizer, schedule and budget: a narrow ResNet at output stride 8 (16 x 16 maps at 128 px)
and FA module and fusion head of 64 channels instead of the authors' 512 (PHANTOM_HAM);
`backbone=resnet` gives the baseline that backbone. The phantom experiment of
docs/methods/ham.md (`benchmarks/localization.py`) compares them.
"""

import os

import ml_collections

from configs import common
from cxr_jax.data import labels, writer
from cxr_jax.methods import ham
from data_prep import phantom

METHODS = ("baseline", "ham")
# The phantom's small backbones: a DenseNet, and a ResNet-18-style one with one block per stage,
# widths 16..128, at output stride 8 for HAM (ours; HAM uses ResNet-50).
BACKBONES = {
    "densenet": dict(name="densenet121", growth_rate=16, block_config=(2, 4, 6, 4),
                     num_init_features=32),
    "resnet": dict(name="resnet18", stage_sizes=(1, 1, 1, 1), width=16, output_stride=8),
}
# HAM's FA module and fusion head, narrowed like the backbone (HAM: 512 channels each).
PHANTOM_HAM = dict(ham.DEFAULTS, fa_features=64, head_features=64)
CACHE = os.environ.get("CXR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cxr_jax"))


def get_config(arg=None):
  """The phantom recipe; `arg` may hold `smoke`, `method=baseline|ham` and
  `backbone=densenet|resnet` (default: densenet for the baseline, resnet for HAM)."""
  arg = common.parse_arg(arg, smoke=False, method="baseline", backbone="")
  if arg.method not in METHODS:
    raise ValueError(f"configs/phantom.py has no recipe for method {arg.method!r}; valid: {METHODS}")
  backbone = arg.backbone or ("resnet" if arg.method == "ham" else "densenet")
  if backbone not in BACKBONES:
    raise ValueError(f"configs/phantom.py has no backbone {backbone!r}; valid: {BACKBONES}")
  c = common.get_config()
  patients, size = (24, 32) if arg.smoke else (2000, 128)
  c.data.dir = os.path.join(
      CACHE, f"phantom-v{phantom.GENERATOR_VERSION}-f{writer.FORMAT_VERSION}-{patients}patients-"
      f"{size}px-seed0")
  c.data.prepare = "data_prep.prepared:phantom_dataset"
  c.data.prepare_args = dict(num_patients=patients, image_size=size, seed=0)
  c.data.image_size = size
  c.data.augment.update(rotate_deg=5.0, scale=(0.95, 1.05), translate=0.03)
  c.model.backbone.update(BACKBONES[backbone])
  if arg.method == "ham":
    _use_ham(c)
  c.model.channels = 1  # trained from scratch: no ImageNet stem to feed three channels
  c.model.normalization = "unit"
  c.optim.update(name="adam", lr=2e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0)
  c.train.update(steps=1000, global_batch=32, log_every=25, eval_every=250)
  c.checkpoint.every = 250
  c.eval.global_batch = 64
  c.eval.evaluators = "classification,ham_localization,wang_localization"
  # The phantom boxes every finding; NIH's protocol reports its 8 box classes.
  c.eval.localization_classes = ",".join(labels.NIH_BOX_LABELS)
  if arg.smoke:
    if backbone == "densenet":
      c.model.backbone.update(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8,
                              bn_size=2)
    else:
      c.model.backbone.width = 4
    if arg.method == "ham":
      c.model.ham.update(fa_features=8, head_features=8)
    c.optim.warmup_steps = 0
    c.train.update(steps=4, global_batch=8, log_every=1, eval_every=4)
    c.checkpoint.every = 4
    c.eval.global_batch = 8
    c.eval.bootstrap = 100
  return c


def _use_ham(c: ml_collections.ConfigDict) -> None:
  """Switches the phantom recipe's model to HAM (PHANTOM_HAM), with the authors' dropout and
  loss weights."""
  c.model.name = "ham"
  c.model.dropout = 0.1
  c.model.ham = ml_collections.ConfigDict(PHANTOM_HAM)
  c.loss.ham_weights = ml_collections.ConfigDict(ham.LOSS_WEIGHTS)
