"""SPF (Srivathsa et al., ISBI 2022) on MIMIC-CXR-JPG with your own location-aware labels: the
recipe of configs/nih/spf.py (ResNet-50 at 512 px, a 4 x 4 x 64 bottleneck auto-encoding the
reduced feature map), on MIMIC's official split and its frontal images.

The learned labels are `Finding|side|zone` over the CheXpert observations that have a location
(data_prep.mimic.FINE_FINDINGS: all but "No Finding" and "Support Devices"; sides right/left,
zones upper/middle/lower). MIMIC-CXR-JPG has none: build them yourself, per image, as a CSV with
the header `dicom_id,Fine Labels`, one row per image, fine labels separated by `;`
(e.g. `02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,Atelectasis|left|lower;Effusion|right|lower`),
empty for an image that shows none. One source is Chest ImaGenome's scene graphs: for each
image, every finding attribute (`atelectasis`, `pleural effusion`, `lung opacity`, ...) with the
anatomical location it is attached to (`left lower lung zone`, `right costophrenic angle`,
`left hilar structures`, ...) becomes one `Finding|side|zone` name. That mapping of ImaGenome's
attribute names to CheXpert findings and of its anatomical locations to a side and one of three
zones is yours to choose (and to report); the converter only checks the result. A finding your
mapping cannot place (at the cardiac silhouette, say) is left out of the cell: it is then unknown
where the study's report labels call it positive, and 0 (absent) otherwise. Images without a row
get unknown fine labels (masked in training), not negative ones; a listed finding that the report
labels call negative is refused (data_prep.mimic's docstring, data_prep.fine_labels). Then:

  python -m data_prep.mimic --src $DATA/mimic-cxr-jpg/2.0.0 --out $DATA/shards/mimic-fine \
      --image-size 576 --fine-labels fine.csv
  python -m cxr_jax.train --config configs/mimic/spf.py --workdir runs/mimic-spf \
      --config.data.dir=$DATA/shards/mimic-fine --config.init_from=$WEIGHTS/resnet50-0676ba61.pth
  python -m cxr_jax.evaluate --workdir runs/mimic-spf --split test

Variants, as configs/nih/spf.py's: `:head=gap`, `:head=flatten` (the baselines with the same
classifier), `:smoke`; `--config.loss.spf.rec_weight=0` removes the reconstruction loss.

Everything but the data comes from configs/nih/spf.py (the paper's and our choices are listed
there), horizontal flips off included; only the schedule is rescaled to MIMIC's training split,
keeping its number of epochs and its one epoch of warmup.
"""

from configs import common
from configs.nih import spf as nih_spf

# Approximate: the frontal (PA, AP) images of labelled studies in the official train split (the
# converter's defaults). The manifest's splits.train.num_records is the exact count; the schedule
# only needs it to size epochs.
TRAIN_IMAGES = 210_000


def get_config(arg=None):
  """configs/nih/spf.py's recipe on MIMIC-CXR-JPG; `arg` as there: `smoke`,
  `head=spf|gap|flatten`."""
  c = nih_spf.get_config(arg)
  c.data.dir = "data/shards/mimic-fine"
  if common.parse_arg(arg, smoke=False, head="spf").smoke:
    return c  # the smoke's few steps need no rescaling
  epochs = c.train.steps // (nih_spf.TRAIN_IMAGES // c.train.global_batch)
  steps_per_epoch = TRAIN_IMAGES // c.train.global_batch
  c.train.steps = epochs * steps_per_epoch
  c.optim.warmup_steps = steps_per_epoch
  c.train.eval_every = steps_per_epoch
  c.checkpoint.every = steps_per_epoch
  return c
