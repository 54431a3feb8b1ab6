"""The anatomy segmenter of Anatomy-XNet's stage 1 on JSRT with SCR organ masks: DenseNet-121 from
ImageNet with a U-Net decoder (`cxr_jax.methods.segmenter`), Dice + cross-entropy, 256 px.

Prepare the organ-annotated set, train the segmenter, then pseudo-label a classification set:

  python -m data_prep.jsrt --src $DATA/JSRT --out $DATA/shards/jsrt --image-size 256
  python -m cxr_jax.train --config configs/jsrt/segmenter.py --workdir runs/seg \
      --config.data.dir=$DATA/shards/jsrt --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/seg --split test       # Dice and IoU per organ
  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/nih \
      --out $DATA/shards/nih-anatomy

A self-training round adds the confident pseudo-labels of the unlabelled set's training split to
the labelled set and trains again (both carry this segmenter's anatomy names):

  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/nih \
      --out $DATA/shards/nih-confident --keep confident --threshold 0.9
  python -m cxr_jax.train --config configs/jsrt/segmenter.py --workdir runs/seg-round2 \
      --config.data.dir= --config.data.mixture=jsrt=$DATA/shards/jsrt,nih=$DATA/shards/nih-confident \
      --config.init_from=$WEIGHTS/densenet121-a639ec97.pth

`:smoke` is a tiny version for a few steps. Everything here is our choice: Anatomy-XNet names
neither the segmenter nor its recipe (docs/methods/anatomy_xnet.md). The 247 JSRT images give
about 110 training images (SCR fold 1 less the validation carve), so the budget is counted in
epochs of that: 150 epochs of batch 8, Adam 1e-3 with a cosine schedule, checkpoints ranked by
validation mean Dice. No horizontal flip: the heart's side is anatomy, not noise.
"""

import ml_collections

from configs import common

TRAIN_IMAGES = 110  # SCR fold 1 (124 images) less a 10% validation carve


def get_config(arg=None):
  """The segmenter recipe; `arg` may be `smoke` and/or `res=<pixels>`."""
  arg = common.parse_arg(arg, smoke=False, res=256)
  c = common.get_config()
  c.data.dir = "data/shards/jsrt"
  c.data.target = "anatomy"
  c.data.image_size = arg.res
  c.data.augment.update(rotate_deg=5.0, scale=(0.95, 1.05), translate=0.03)
  c.model.name = "segmenter"
  c.model.backbone.name = "densenet121"
  c.model.segmenter = ml_collections.ConfigDict(dict(decoder_features=(256, 128, 64)))
  c.optim.update(name="adam", lr=1e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0)
  c.train.global_batch = 8
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 150 * steps_per_epoch
  c.train.log_every = 25
  c.train.eval_every = 10 * steps_per_epoch
  c.checkpoint.every = c.train.eval_every
  c.eval.global_batch = 8
  c.eval.evaluators = "segmentation"
  c.checkpoint.best_metric = "val/mean_dice"
  if arg.smoke:
    common.smoke(c)
    c.model.segmenter.decoder_features = (8, 8, 8)
  return c
