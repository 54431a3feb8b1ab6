"""CheXNet on NIH ChestX-ray14, official split: DenseNet-121 from ImageNet, Adam 1e-4, BCE, 224 px.

Prepare the data once, then train and evaluate:

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih --image-size 256
  python -m cxr_jax.train --config configs/nih/densenet121.py --workdir runs/chexnet \
      --config.data.dir=$DATA/shards/nih --config.init_from=$WEIGHTS/densenet121-a639ec97.pth
  python -m cxr_jax.evaluate --workdir runs/chexnet --split test

Variants after the colon: `configs/nih/densenet121.py:res=512` (prepare shards at 512 or more;
batch 8 as in the paper's high-resolution follow-ups) and `:smoke` (a tiny DenseNet for a few
steps, to check an installation end to end on any prepared NIH-format data).

Recipe (Rajpurkar et al. 2017): DenseNet-121 with ImageNet weights, grayscale replicated to three
channels with ImageNet normalisation, Adam (beta 0.9, 0.999) at 1e-4, batch 16, unweighted BCE.
The paper divides the learning rate by 10 when the validation loss plateaus; here that is a step
schedule at 60% and 85% of 5 epochs of the official train split (our choice, not the paper's).
Validation is carved from train_val by patient (never the test list).
"""

from configs import common

TRAIN_IMAGES = 78_000  # about 90% of NIH's official train_val list after carving validation


def get_config(arg=None):
  """The CheXNet recipe; `arg` is `smoke` and/or `res=<pixels>`."""
  arg = common.parse_arg(arg, smoke=False, res=224)
  c = common.get_config()
  c.data.dir = "data/shards/nih"
  c.data.image_size = arg.res
  c.data.worker_count = 8
  c.model.backbone.name = "densenet121"
  c.loss.name = "bce"
  c.optim.update(name="adam", lr=1e-4, b1=0.9, b2=0.999, schedule="step")
  c.train.global_batch = 16 if arg.res <= 256 else 8
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 5 * steps_per_epoch
  c.optim.step_boundaries = (int(0.6 * c.train.steps), int(0.85 * c.train.steps))
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch // 2
  c.checkpoint.every = c.train.eval_every
  c.eval.global_batch = 64
  c.eval.evaluators = "classification,ham_localization,wang_localization"  # boxes: test split
  if arg.smoke:
    common.smoke(c)
  return c
