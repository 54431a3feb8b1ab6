"""SPF (Srivathsa et al., ISBI 2022) on NIH ChestX-ray14 with your own location-aware labels:
ResNet-50 at 512 px, a 4 x 4 x 64 bottleneck auto-encoding the reduced feature map.

The learned labels are `Finding|side|zone` (cxr_jax.data.labels.fine_vocabulary). Write them as a
CSV with the header `Image Index,Fine Labels`, one row per image, fine labels separated by `;`
(e.g. `00000013_005.png,Nodule|left|upper;Effusion|right|lower`); images without a row are
unknown, not negative. Sources: a radiologist's reading, or scene graphs such as Chest ImaGenome
mapped to sides and zones. Then:

  python -m data_prep.nih --src $DATA/ChestX-ray14 --out $DATA/shards/nih-fine --image-size 576 \
      --fine-labels my_fine_labels.csv
  python -m cxr_jax.train --config configs/nih/spf.py --workdir runs/spf \
      --config.data.dir=$DATA/shards/nih-fine --config.init_from=$WEIGHTS/resnet50-0676ba61.pth
  python -m cxr_jax.evaluate --workdir runs/spf --split test

Variants: `:head=gap`, `:head=flatten` (the baselines with the same classifier), `:smoke`;
`--config.loss.spf.rec_weight=0` removes the reconstruction loss.

The paper's: auto-encoding the feature maps while flattening, the classifier reading the
bottleneck, end-to-end training on location-aware labels, no segmentation or boxes. Ours (the
paper gives no layer-level design or recipe): every layer size (`config.model.spf`), the
reconstruction weight 1 (`config.loss.spf`), unweighted BCE, AdamW at 1e-4 for the backbone and
1e-3 for the new layers with weight decay 1e-4, cosine schedule with one epoch of warmup, 20
epochs, batch 32, rotation +-7 degrees, zoom 0.9-1.1, brightness and contrast jitter, and no
horizontal flip (the pipeline would swap the labels' sides, but the heart is not symmetric).
"""

import ml_collections

from configs import common
from cxr_jax.methods import spf

TRAIN_IMAGES = 78_000  # about 90% of NIH's official train_val list after carving validation


def get_config(arg=None):
  """The SPF recipe; `arg` may hold `smoke` and `head=spf|gap|flatten`."""
  arg = common.parse_arg(arg, smoke=False, head="spf")
  c = common.get_config()
  c.data.dir = "data/shards/nih-fine"
  c.data.target = "fine_labels"
  c.data.image_size = 512
  c.data.worker_count = 8
  c.data.augment.update(rotate_deg=7.0, scale=(0.9, 1.1), translate=0.03, brightness=0.1,
                        contrast=0.1, hflip=False)
  c.model.name = "spf"
  c.model.backbone.name = "resnet50"
  c.model.spf = ml_collections.ConfigDict(dict(spf.DEFAULTS, head=arg.head))
  c.loss.name = "bce"
  c.loss.spf = ml_collections.ConfigDict(spf.LOSS_DEFAULTS)
  c.optim.update(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine")
  c.optim.lr_mults = ((r"^backbone/", 0.1),)
  c.train.global_batch = 32
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = 20 * steps_per_epoch
  c.optim.warmup_steps = steps_per_epoch
  c.train.log_every = 100
  c.train.eval_every = steps_per_epoch
  c.checkpoint.every = steps_per_epoch
  c.eval.global_batch = 64
  c.eval.evaluators = "classification,location_accuracy"
  if arg.smoke:
    common.smoke(c)
    c.model.spf.update(grid=4, reduce_channels=8, bottleneck_channels=4, hidden=16)
    c.model.backbone.output_stride = 8
  return c
