"""Anatomy-XNet (Kamal et al., IEEE JBHI 2022) on CheXpert v1.0: DenseNet-121 with anatomy-aware
attention (A3) on the lungs and the heart, and probabilistic weighted average pooling (PWAP), at
512 px, reported on the 5 competition observations of the validation set. The organ masks are an
input at train and test time, so the shards must carry anatomy maps made by a segmenter
(docs/methods/anatomy_xnet.md):

  # (1) the anatomy segmenter on JSRT/SCR organ masks (configs/jsrt/segmenter.py; the phantom's
  #     is configs/phantom.py:method=segmenter)
  python -m data_prep.jsrt --src $DATA/JSRT --out $DATA/shards/jsrt --image-size 256
  python -m cxr_jax.train --config configs/jsrt/segmenter.py --workdir runs/seg \
      --config.data.dir=$DATA/shards/jsrt --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  # (2) anatomy maps for every image of the classifier's dataset
  python -m cxr_jax.pseudolabel --workdir runs/seg --data $DATA/shards/chexpert \
      --out $DATA/shards/chexpert-anatomy
  # (3) the classifier, then its evaluation on valid.csv (the test split)
  python -m cxr_jax.train --config configs/chexpert/anatomy_xnet.py \
      --workdir runs/chexpert-anatomy_xnet --config.data.dir=$DATA/shards/chexpert-anatomy \
      --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/chexpert-anatomy_xnet --split test

$DATA/shards/chexpert comes from `python -m data_prep.chexpert --src $DATA --out
$DATA/shards/chexpert --image-size 512` (frontal images; valid.csv is the test split).
Variants: `:res=<pixels>`, `:epochs=<n>`, `:smoke`. Ablations as in
configs/nih/anatomy_xnet.py (`--config.model.anatomy_xnet.a3=False`, ...).

The paper's: DenseNet-121 from ImageNet, A3 and PWAP, JSRT-based anatomy; reported mean AUC 0.9207
on CheXpert (the paper's number, not ours; the research note infers the 5 competition classes of
the validation set). Unknown, so ours: the uncertainty policy (U-Ones for Atelectasis and Edema,
U-Zeros for the rest, as configs/chexpert/densenet121.py), per-study AUC as the maximum over
views, the A3 and PWAP wiring (`config.model.anatomy_xnet`), BCE, and the ThoraX-PriorNet prior
of configs/nih/anatomy_xnet.py: Adam 1e-4, batch 16 at 512 px, flips, a mild zoom and shift, the
best checkpoint on validation mean AUC (over the 5 reported classes), a constant rate for 3
epochs (the CheXpert recipe's length).
"""

from configs import common
from configs.nih import anatomy_xnet as nih_anatomy_xnet
from cxr_jax.data import labels

TRAIN_IMAGES = 172_000  # about 90% of train.csv's 191,027 frontal images after carving validation


def get_config(arg=None):
  """The recipe; `arg` may hold `smoke`, `res=<pixels>` and `epochs=<n>`."""
  arg = common.parse_arg(arg, smoke=False, res=512, epochs=3)
  c = nih_anatomy_xnet.recipe(arg, "data/shards/chexpert-anatomy", TRAIN_IMAGES, evals_per_epoch=4)
  c.data.uncertainty = "zeros"
  c.data.uncertainty_per_label = "Atelectasis=ones,Edema=ones"
  c.eval.classes = ",".join(labels.CHEXPERT_COMPETITION_LABELS)
  c.eval.study_level = "max"
  if arg.smoke:
    common.smoke(c)
  return c
