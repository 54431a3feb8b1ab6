"""MSML (Ge et al. 2018) on NIH ChestX-ray14, official split: a bilinear (fine-grained) head on
ResNet-50 at 448 px, trained with MSML + BCE.

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih512 --image-size 512
  python -m cxr_jax.train --config configs/nih/msml.py --workdir runs/msml \
      --config.data.dir=$DATA/shards/nih512 --config.init_from=$WEIGHTS/resnet50-0676ba61.pth
  python -m cxr_jax.evaluate --workdir runs/msml --split test

Variants: `:head=compact` (Tensor Sketch to 8192), `:head=gap` (MSML on the plain GAP head),
`:smoke` (a tiny ResNet at 64 px for a few steps). Ablations on the command line, e.g.
`--config.loss.msml.bce_weight=0` (MSML alone), `--config.loss.msml.anchor=False`.

The paper's: the multi-label softmax loss (each positive against the pooled negatives), a
fine-grained network, ChestX-ray14. Ours (the research note's proposals, as the paper's details
are not available): the loss's normalisation and its sum with BCE and a No-Finding anchor logit
(`config.loss.msml`); 1x1 reduce to 512, symmetric bilinear pooling, signed square root, L2
normalisation (`config.model.msml`); ResNet-50 from ImageNet with ImageNet normalisation; Adam
1e-4, batch 32, 20 epochs with the rate x0.1 after 10 and 15; zoom 1.0-1.25 (a random resized
crop of 0.8-1.0 of the side), rotation +-10 degrees, no horizontal flip; validation carved from
train_val by patient, never the test list.
"""

import ml_collections

from configs import common
from cxr_jax.methods import msml

TRAIN_IMAGES = 78_000  # about 90% of NIH's official train_val list after carving validation


def get_config(arg=None):
  """The MSML recipe; `arg` may hold `smoke` and `head=bilinear|compact|gap`."""
  arg = common.parse_arg(arg, smoke=False, head="bilinear")
  c = common.get_config()
  c.data.dir = "data/shards/nih512"
  c.data.image_size = 448
  c.data.worker_count = 8
  c.data.augment.update(rotate_deg=10.0, scale=(1.0, 1.25), translate=0.0, hflip=False)
  c.model.name = "msml"
  c.model.backbone.name = "resnet50"
  c.model.dropout = 0.5
  c.model.msml = ml_collections.ConfigDict(dict(msml.DEFAULTS, head=arg.head))
  c.loss.name = "bce"
  c.loss.msml = ml_collections.ConfigDict(msml.LOSS_DEFAULTS)
  c.optim.update(name="adam", lr=1e-4, schedule="step", step_factor=0.1)
  c.train.global_batch = 32
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 20 * steps_per_epoch
  c.optim.step_boundaries = (10 * steps_per_epoch, 15 * steps_per_epoch)
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch
  c.checkpoint.every = steps_per_epoch
  c.eval.global_batch = 64
  if arg.smoke:
    common.smoke(c)
    c.model.msml.update(features=16, sketch_dim=64)
  return c
