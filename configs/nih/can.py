"""CAN (Ma, Wang, Hoi, MICCAI 2019) on NIH ChestX-ray14, official split: two DenseNet-121 branches
fused by a Hadamard product, each gated by the other's attention map, trained with the multi-label
balance loss and an attention loss, at 512 px.

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih512 --image-size 512
  python -m cxr_jax.train --config configs/nih/can.py --workdir runs/can \
      --config.data.dir=$DATA/shards/nih512 --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/can --split test

`init_from=PATH` loads the one ImageNet file into both branches; the branches still part, since
their attention convs and heads start from different keys and draw different dropout masks
(`config.model.can.symmetric=False`). `init_from=backbone=A.pth,backbone_b=B.pth` gives branch B
other weights (e.g. a CXR-pretrained DenseNet-121).

Variants: `:res=224` (batch 32), `:smoke` (tiny DenseNets at 64 px, a few steps). Ablations on the
command line: `--config.model.can.gating=none` (no cross gating), `--config.loss.can.att_weight=0`
(no attention loss), `--config.loss.name=bce` (plain BCE for the balance loss),
`--config.model.can.fusion=concat`, the plain product H = F_A * F_B with
`--config.model.can.gating=none --config.model.can.branch_heads=False
--config.loss.can.att_weight=0`. At 512 px, `--config.model.backbone.remat=True` recomputes each
dense layer in the backward pass of both branches (docs/methods/can.md has XLA's estimates).

The paper's: two DenseNet-121s, the Hadamard product of their aligned maps, image-level labels,
a loss of a multi-label balance term and an attention term, ChestX-ray14's official split. Ours
(the research note's proposals; docs/methods/can.md): the gating wiring and the branch heads
(`config.model.can`); the balance loss as class-balanced focal BCE with W-CEL weights from the
training split's counts and gamma 2 (`config.loss.name=balanced_focal`); the attention loss as deep
supervision of both gated branches, weight 1 (`config.loss.can`); ImageNet initialisation and
normalisation; Adam 1e-4 with L2 1e-5, 20 epochs with the rate x0.1 after 10 and 15 (the research
note proposes x0.1 on a validation plateau, which the trainer does not do); batch 16 at 512 px;
rotation +-5 degrees, scale 0.95-1.05, no flip; dropout 0.2 before the heads.
"""

import ml_collections

from configs import common
from cxr_jax.methods import can

TRAIN_IMAGES = 78_000  # about 90% of NIH's official train_val list after carving validation


def get_config(arg=None):
  """The CAN recipe; `arg` may hold `smoke` and `res=<pixels>` (512 or 224)."""
  arg = common.parse_arg(arg, smoke=False, res=512)
  c = common.get_config()
  c.data.dir = "data/shards/nih512"
  c.data.image_size = arg.res
  c.data.worker_count = 8
  c.data.augment.update(rotate_deg=5.0, scale=(0.95, 1.05), translate=0.0, hflip=False)
  c.model.name = "can"
  c.model.backbone.name = "densenet121"
  c.model.dropout = 0.2
  c.model.can = ml_collections.ConfigDict(can.DEFAULTS)
  c.loss.update(name="balanced_focal", class_counts="train", focal_gamma=2.0)
  c.loss.can = ml_collections.ConfigDict(can.LOSS_DEFAULTS)
  c.optim.update(name="adam", lr=1e-4, weight_decay=1e-5, schedule="step", step_factor=0.1)
  c.train.global_batch = 16 if arg.res > 256 else 32
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 20 * steps_per_epoch
  c.optim.step_boundaries = (10 * steps_per_epoch, 15 * steps_per_epoch)
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch
  c.checkpoint.every = steps_per_epoch
  c.eval.global_batch = 64
  c.eval.evaluators = "classification,ham_localization,wang_localization"  # boxes: test split
  if arg.smoke:
    common.smoke(c)
  return c
