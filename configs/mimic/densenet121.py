"""DenseNet-121 on MIMIC-CXR-JPG 2.x, official split, the 14 CheXpert-labeller observations, one
frontal image per study, 224 px: the CheXNet recipe of configs/nih/densenet121.py on MIMIC.

  python -m data_prep.mimic --src $DATA/mimic-cxr-jpg/2.0.0 --out $DATA/shards/mimic \
      --image-size 256 --one-per-study
  python -m cxr_jax.train --config configs/mimic/densenet121.py --workdir runs/mimic \
      --config.data.dir=$DATA/shards/mimic --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/mimic --split test

Variants: `:res=512`, `:smoke` (a tiny DenseNet at 64 px for a few steps).

All ours: DenseNet-121 from ImageNet, Adam 1e-4, batch 16 (8 at 512 px), BCE, 3 epochs with the
rate x0.1 at 60% and 85%; uncertain (-1) labels U-Zeros in training (`data.uncertainty`) and
masked in evaluation; "No Finding" and "Support Devices" are learned and reported like the rest.
MIMIC's official validation and test splits are small (about 3,000 and 5,000 images), so AUCs of
rare observations are noisy; many papers use their own patient-wise 80/10/10 split instead, which
is not comparable. Published numbers to expect (not run here): Anatomy-XNet reports 0.8404 mean AUC
on its MIMIC-CXR label set.
"""

from configs import common

TRAIN_IMAGES = 210_000  # approximate: one frontal image per labelled study of the train split


def get_config(arg=None):
  """The recipe; `arg` is `smoke` and/or `res=<pixels>`."""
  arg = common.parse_arg(arg, smoke=False, res=224)
  c = common.get_config()
  c.data.dir = "data/shards/mimic"
  c.data.image_size = arg.res
  c.data.worker_count = 8
  c.data.uncertainty = "zeros"
  c.model.backbone.name = "densenet121"
  c.loss.name = "bce"
  c.optim.update(name="adam", lr=1e-4, schedule="step")
  c.train.global_batch = 16 if arg.res <= 256 else 8
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 3 * steps_per_epoch
  c.optim.step_boundaries = (int(0.6 * c.train.steps), int(0.85 * c.train.steps))
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch // 2
  c.checkpoint.every = c.train.eval_every
  c.eval.global_batch = 64
  if arg.smoke:
    common.smoke(c)
  return c
