"""The embedded default: the phantom dataset, built on first use, and a small DenseNet that trains
on 2 CPU cores in under ten minutes.

  python -m cxr_jax.train --config configs/phantom.py --workdir runs/phantom
  python -m cxr_jax.evaluate --workdir runs/phantom

The phantom (docs/phantom.md) is rendered in NIH ChestX-ray14's file layout and converted by
`data_prep.nih`, exactly as the real dataset would be, into `$CXR_JAX_CACHE` (default
`~/.cache/cxr_jax`). `configs/phantom.py:smoke` is a tiny version for tests (a few patients,
32 px, a few steps).
"""

import os

from configs import common
from cxr_jax.data import labels, writer
from data_prep import phantom

CACHE = os.environ.get("CXR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cxr_jax"))


def get_config(arg=None):
  """The phantom recipe; `arg` may be `smoke`."""
  arg = common.parse_arg(arg, smoke=False)
  c = common.get_config()
  patients, size = (24, 32) if arg.smoke else (2000, 128)
  c.data.dir = os.path.join(
      CACHE, f"phantom-v{phantom.GENERATOR_VERSION}-f{writer.FORMAT_VERSION}-{patients}patients-"
      f"{size}px-seed0")
  c.data.prepare = "data_prep.prepared:phantom_dataset"
  c.data.prepare_args = dict(num_patients=patients, image_size=size, seed=0)
  c.data.image_size = size
  c.data.augment.update(rotate_deg=5.0, scale=(0.95, 1.05), translate=0.03)
  c.model.backbone.update(name="densenet121", growth_rate=16, block_config=(2, 4, 6, 4),
                          num_init_features=32)
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
    c.model.backbone.update(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8,
                            bn_size=2)
    c.optim.warmup_steps = 0
    c.train.update(steps=4, global_batch=8, log_every=1, eval_every=4)
    c.checkpoint.every = 4
    c.eval.global_batch = 8
    c.eval.bootstrap = 100
  return c
