"""Anatomy-XNet (Kamal et al., IEEE JBHI 2022) on NIH ChestX-ray14, official split: DenseNet-121
with anatomy-aware attention (A3) on the lungs and the heart, and probabilistic weighted average
pooling (PWAP), at 512 px. The organ masks are an input at train and test time, so the shards must
carry anatomy maps made by a segmenter (docs/methods/anatomy_xnet.md):

  # (1) the anatomy segmenter on JSRT/SCR organ masks (configs/jsrt/segmenter.py; the phantom's
  #     is configs/phantom.py:method=segmenter)
  python -m data_prep.jsrt --src $DATA/JSRT --out $DATA/shards/jsrt --image-size 256
  python -m cxr_jax.train --config configs/jsrt/segmenter.py --workdir runs/seg \
      --config.data.dir=$DATA/shards/jsrt --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  # (2) anatomy maps for every image of the classifier's dataset
  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/nih \
      --out $DATA/shards/nih-anatomy
  # (3) the classifier, then its test evaluation
  python -m cxr_jax.train --config configs/nih/anatomy_xnet.py --workdir runs/anatomy_xnet \
      --config.data.dir=$DATA/shards/nih-anatomy \
      --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/anatomy_xnet --split test

$DATA/shards/nih comes from `python -m data_prep.nih --src $DATA/ChestX-ray14 --out
$DATA/shards/nih --image-size 512`. The segmenter must never
have seen the test images (research note B.10).

Variants: `:res=<pixels>`, `:epochs=<n>`, `:smoke` (a tiny DenseNet at 64 px, a few steps).
Ablations on the command line: `--config.model.anatomy_xnet.a3=False` (A3 off, PWAP on),
`--config.model.anatomy_xnet.groups=lungs=right_lung+left_lung` (lungs only),
`--config.model.anatomy_xnet.fusion=sum`, `--config.model.anatomy_xnet.mask_resize=bilinear`.

The paper's: DenseNet-121 from ImageNet, A3 and PWAP, anatomy from a semi-supervised segmenter
trained with organ-annotated JSRT images; reported mean AUC 0.8578 on NIH (the paper's number,
not ours). Everything else is unknown from what we could read; ours: the A3 and PWAP wiring and
their fields (`config.model.anatomy_xnet`, the research note's reference design), BCE, and the
recipe taken as a prior from the same lab's ThoraX-PriorNet code (research note B.7): ImageNet
normalisation, Adam 1e-4 without weight decay, batch 16 at 512 px (without its gradient
accumulation x8 and model EMA, which the trainer lacks), horizontal flips (the anatomy maps and
left/right region ids follow), a mild zoom and shift standing in for its 586 -> 512 random crop,
and the best checkpoint on validation mean AUC; 10 epochs at a constant rate (ThoraX-PriorNet runs
50 at an effective batch of 128); no dropout on PWAP's pooled vectors (PCAM's default).
"""

import ml_collections

from configs import common
from cxr_jax.methods import anatomy_xnet

TRAIN_IMAGES = 78_000  # about 90% of NIH's official train_val list after carving validation


def get_config(arg=None):
  """The Anatomy-XNet recipe; `arg` may hold `smoke`, `res=<pixels>` and `epochs=<n>`."""
  arg = common.parse_arg(arg, smoke=False, res=512, epochs=10)
  c = recipe(arg, "data/shards/nih-anatomy", TRAIN_IMAGES, evals_per_epoch=1)
  c.eval.evaluators = "classification,ham_localization,wang_localization"  # boxes: test split
  if arg.smoke:
    common.smoke(c)
  return c


def recipe(arg, data_dir: str, train_images: int, evals_per_epoch: int):
  """The recipe every dataset's Anatomy-XNet config shares (module docstring), for `arg.res` and
  `arg.epochs` epochs of `train_images`, validated `evals_per_epoch` times an epoch."""
  c = common.get_config()
  c.data.dir = data_dir
  c.data.image_size = arg.res
  c.data.worker_count = 8
  c.data.augment.update(rotate_deg=0.0, scale=(1.0, 1.1), translate=0.05, brightness=0.0,
                        contrast=0.0, hflip=True)
  c.model.name = "anatomy_xnet"
  c.model.backbone.name = "densenet121"
  c.model.dropout = 0.0
  c.model.anatomy_xnet = ml_collections.ConfigDict(anatomy_xnet.DEFAULTS)
  c.loss.name = "bce"
  c.optim.update(name="adam", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, schedule="constant")
  c.train.global_batch = 16
  steps_per_epoch = train_images // c.train.global_batch
  c.train.steps = arg.epochs * steps_per_epoch
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch // evals_per_epoch
  c.checkpoint.every = c.train.eval_every
  c.checkpoint.best_metric = "val/mean_auc"
  c.eval.global_batch = 64
  return c
