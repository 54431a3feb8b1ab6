"""Anatomy-XNet (Kamal et al., IEEE JBHI 2022) on MIMIC-CXR-JPG 2.x, official split, the 14
CheXpert-labeller observations: DenseNet-121 with anatomy-aware attention (A3) on the lungs and the
heart, and probabilistic weighted average pooling (PWAP), at 512 px. The organ masks are an input
at train and test time, so the shards must carry anatomy maps made by a segmenter
(docs/methods/anatomy_xnet.md):

  # (1) the anatomy segmenter on JSRT/SCR organ masks (configs/jsrt/segmenter.py; the phantom's
  #     is configs/phantom.py:method=segmenter)
  python -m data_prep.jsrt --src $DATA/JSRT --out $DATA/shards/jsrt --image-size 256
  python -m cxr_jax.train --config configs/jsrt/segmenter.py --workdir runs/seg \
      --config.data.dir=$DATA/shards/jsrt --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  # (2) anatomy maps for every image of the classifier's dataset
  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/mimic \
      --out $DATA/shards/mimic-anatomy
  # (3) the classifier, then its test evaluation
  python -m cxr_jax.train --config configs/mimic/anatomy_xnet.py --workdir runs/mimic-anatomy_xnet \
      --config.data.dir=$DATA/shards/mimic-anatomy \
      --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/mimic-anatomy_xnet --split test

$DATA/shards/mimic comes from `python -m data_prep.mimic --src $DATA/mimic-cxr-jpg/2.0.0 --out
$DATA/shards/mimic --image-size 512 --one-per-study`.
Variants: `:res=<pixels>`, `:epochs=<n>`, `:smoke`. Ablations as in configs/nih/anatomy_xnet.py
(`--config.model.anatomy_xnet.a3=False`, ...).

The paper's: DenseNet-121 from ImageNet, A3 and PWAP, JSRT-based anatomy; reported mean AUC 0.8404
on MIMIC-CXR (the paper's number, not ours; its split, view filter and label set are unknown).
Ours: the official split, one frontal image per study, U-Zeros in training and uncertain labels
masked in evaluation (as configs/mimic/densenet121.py), the A3 and PWAP wiring
(`config.model.anatomy_xnet`), BCE, and the ThoraX-PriorNet prior of configs/nih/anatomy_xnet.py:
Adam 1e-4, batch 16 at 512 px, flips, a mild zoom and shift, the best checkpoint on validation
mean AUC, a constant rate for 3 epochs.
"""

from configs import common
from configs.nih import anatomy_xnet as nih_anatomy_xnet

TRAIN_IMAGES = 210_000  # approximate: one frontal image per labelled study of the train split


def get_config(arg=None):
  """The recipe; `arg` may hold `smoke`, `res=<pixels>` and `epochs=<n>`."""
  arg = common.parse_arg(arg, smoke=False, res=512, epochs=3)
  c = nih_anatomy_xnet.recipe(arg, "data/shards/mimic-anatomy", TRAIN_IMAGES, evals_per_epoch=2)
  c.data.uncertainty = "zeros"
  if arg.smoke:
    common.smoke(c)
  return c
