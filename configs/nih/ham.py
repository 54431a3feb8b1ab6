"""HAM (Ouyang et al., TMI 2021) on NIH ChestX-ray14, official split, the authors' recipe.

Prepare the data once (at 573 px or more, so the random 512 crops come from real pixels), then
train and evaluate:

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih576 --image-size 576
  python -m cxr_jax.train --config configs/nih/ham.py --workdir runs/ham \
      --config.data.dir=$DATA/shards/nih576 --config.init_from=$WEIGHTS/resnet50-0676ba61.pth
  python -m cxr_jax.evaluate --workdir runs/ham --split test --heatmaps 16

`:setting=loc_fold` is HAM's localization 5-fold setting with box supervision (their
`localization/5fold_validation/fold1.yaml`), on data prepared from the authors' fold files
(`datasets/NIHChestXray14/ImageSets/` of their repository):

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih576-ham-fold1 \
      --image-size 576 --train-list $HAM_SETS/Main/fold1/train_0.5_0.8.txt \
      --test-list $HAM_SETS/bbox/fold1/test.txt --box-list $HAM_SETS/bbox/fold1/train_0.8.txt
  python -m cxr_jax.train --config configs/nih/ham.py:setting=loc_fold --workdir runs/ham-fold1 \
      --config.data.dir=$DATA/shards/nih576-ham-fold1 --config.init_from=$WEIGHTS/resnet50-0676ba61.pth

Their 694 box images of the train list get the box term; 30 epochs. Their folds are image-level,
not patient-disjoint (research note A.5); data_prep.nih counts the shared patients in the manifest.

`:smoke` is a tiny ResNet at 64 px for a few steps, to check an installation end to end.

Recipe (research note A.4, from the authors' code): ResNet-50 from ImageNet at output stride 8,
3-channel input with mean 0.5 / std 0.5, Adam at 2e-5 with coupled L2 1e-4 on every parameter,
x0.1 every 10 epochs, 20 epochs, batch 24 (BatchNorm over the global batch, as their SyncBN),
512 px. Ours, where the platform differs:
- training augmentation: a zoom of 1.0-1.12 (their square resize to 512-573 px before a random 512
  crop), a small translation and a horizontal flip; the flip also swaps left/right in location-aware
  labels, which HAM does not use;
- model selection on a validation split carved from train_val by patient. The authors select on
  the official test list (their classification config sets the validation list to
  `test_list.txt`); we never do, and report the test split once.
- in the localization setting validation is carved from the train list too (the authors use the
  test fold); it has no boxes, so checkpoints are ranked by its mean AUC there as well.
In the official split no image is marked for box supervision, so the box term is 0, as in the
authors' official-split configuration.
"""

import ml_collections

from configs import common
from cxr_jax.data import labels
from cxr_jax.methods import ham

# Per setting: training images (about 90% of the train list after carving validation), epochs.
SETTINGS = {"official": (78_000, 20), "loc_fold": (51_000, 30)}


def get_config(arg=None):
  """The HAM recipe; `arg` may hold `smoke` and `setting=official|loc_fold`."""
  arg = common.parse_arg(arg, smoke=False, setting="official")
  if arg.setting not in SETTINGS:
    raise ValueError(f"unknown HAM setting {arg.setting!r}; valid: {sorted(SETTINGS)}")
  train_images, epochs = SETTINGS[arg.setting]
  c = common.get_config()
  c.data.dir = {"official": "data/shards/nih576",
                "loc_fold": "data/shards/nih576-ham-fold1"}[arg.setting]
  c.data.image_size = 512
  c.data.worker_count = 8
  c.data.augment.update(rotate_deg=0.0, scale=(1.0, 1.12), translate=0.03, brightness=0.0,
                        contrast=0.0, hflip=True)
  c.model.name = "ham"
  c.model.backbone.update(name="resnet50", output_stride=8)
  c.model.normalization = "unit"
  c.model.channels = 3
  c.model.dropout = 0.1
  c.model.ham = ml_collections.ConfigDict(ham.DEFAULTS)
  c.loss.ham_weights = ml_collections.ConfigDict(ham.LOSS_WEIGHTS)
  c.optim.update(name="adam", lr=2e-5, weight_decay=1e-4, schedule="step", step_factor=0.1)
  c.train.global_batch = 24
  steps_per_epoch = train_images // c.train.global_batch
  c.train.steps = epochs * steps_per_epoch
  c.optim.step_boundaries = tuple(k * steps_per_epoch for k in range(10, epochs, 10))
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch
  c.checkpoint.every = steps_per_epoch
  c.eval.global_batch = 48
  c.eval.evaluators = "classification,ham_localization,wang_localization"
  c.eval.localization_classes = ",".join(labels.NIH_BOX_LABELS)
  if arg.smoke:
    common.smoke(c)
  return c
