"""The embedded default: the phantom dataset, built on first use, and a small DenseNet that trains
on 2 CPU cores in under ten minutes.

  python -m cxr_jax.train --config configs/phantom.py --workdir runs/phantom
  python -m cxr_jax.evaluate --workdir runs/phantom

The phantom (docs/phantom.md) is rendered in NIH ChestX-ray14's file layout and converted by
`data_prep.nih`, exactly as the real dataset would be, into `$CXR_JAX_CACHE` (default
`~/.cache/cxr_jax`). `configs/phantom.py:smoke` is a tiny version for tests (a few patients,
32 px, a few steps).

`configs/phantom.py:method=ham` (and `method=ham,smoke`) trains HAM on the same data with the
same optimizer, schedule and budget: a narrow ResNet at output stride 8 (16 x 16 maps at 128 px)
and FA module and fusion head of 64 channels instead of the authors' 512 (PHANTOM_HAM);
`backbone=resnet` gives the baseline that backbone. The phantom experiment of
docs/methods/ham.md (`benchmarks/localization.py`) compares them.

`method=spf` learns the location-aware task (`data.target=fine_labels`: `Finding|side|zone`,
scored by AUC and side/zone accuracy) with SPF on the same ResNet (16 x 16 maps, a 4 x 4 x 16
bottleneck; PHANTOM_SPF), `head=gap` or `head=flatten` its baselines with the same classifier.
The phantom recipe has no horizontal flip (a flip would also swap the labels' sides).
`method=msml` trains the 14 findings with MSML + BCE on the DenseNet, with a bilinear head of 128
reduced channels (PHANTOM_MSML); `head=gap` puts MSML on the baseline's head.
`method=can` trains CAN with two of the baseline's DenseNets as branches (each its own random
init), CAN's balance loss (class-balanced focal BCE, training-split counts) and attention loss; its
ablations are command-line overrides (benchmarks/can_ablations.py).
`method=anatomy_xnet` trains Anatomy-XNet on the baseline's DenseNet: A3 on the lungs and the
heart of the phantom's true anatomy maps (which the phantom renders with every image; on real data
they come from a segmenter, docs/methods/anatomy_xnet.md) and PWAP, with the baseline's BCE;
`--config.model.anatomy_xnet.a3=False` is the "A3 off, PWAP on" ablation.
`method=segmenter` trains the anatomy segmenter (Anatomy-XNet's stage 1) on the phantom's anatomy
maps (`data.target=anatomy`: its 7 regions) with the DenseNet as encoder and a decoder of 64, 32
and 16 channels (PHANTOM_SEGMENTER), ranked by validation mean Dice; `cxr_jax.pseudolabel` then
writes its maps into a copy of the phantom for `method=anatomy_xnet` with predicted masks.
"""

import os

import ml_collections

from configs import common
from cxr_jax.data import labels, writer
from cxr_jax.methods import anatomy_xnet, can, ham, msml, segmenter, spf
from data_prep import phantom

METHODS = ("baseline", "ham", "spf", "msml", "can", "anatomy_xnet", "segmenter")
# The phantom's small backbones: a DenseNet, and a ResNet-18-style one with one block per stage,
# widths 16..128, at output stride 8 for HAM (ours; HAM uses ResNet-50).
BACKBONES = {
    "densenet": dict(name="densenet121", growth_rate=16, block_config=(2, 4, 6, 4),
                     num_init_features=32),
    "resnet": dict(name="resnet18", stage_sizes=(1, 1, 1, 1), width=16, output_stride=8),
}
# HAM's FA module and fusion head, narrowed like the backbone (HAM: 512 channels each).
PHANTOM_HAM = dict(ham.DEFAULTS, fa_features=64, head_features=64)
# SPF and MSML heads narrowed for the phantom's backbones (ours, like every SPF/MSML layer size).
PHANTOM_SPF = dict(spf.DEFAULTS, reduce_channels=64, bottleneck_channels=16, hidden=128)
PHANTOM_MSML = dict(msml.DEFAULTS, features=128)
PHANTOM_SEGMENTER = dict(segmenter.DEFAULTS, decoder_features=(64, 32, 16))
CACHE = os.environ.get("CXR_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cxr_jax"))


def get_config(arg=None):
  """The phantom recipe; `arg` may hold `smoke`, `method=` one of METHODS,
  `head=` (the method's `head` field: SPF spf|gap|flatten, MSML bilinear|compact|gap) and
  `backbone=densenet|resnet` (default: resnet for HAM and SPF, densenet otherwise)."""
  arg = common.parse_arg(arg, smoke=False, method="baseline", backbone="", head="")
  if arg.method not in METHODS:
    raise ValueError(f"configs/phantom.py has no recipe for method {arg.method!r}; valid: {METHODS}")
  if arg.head and arg.method not in ("spf", "msml"):
    raise ValueError(f"configs/phantom.py: head={arg.head} is for method=spf or msml")
  backbone = arg.backbone or ("resnet" if arg.method in ("ham", "spf") else "densenet")
  if backbone not in BACKBONES:
    raise ValueError(f"configs/phantom.py has no backbone {backbone!r}; valid: {BACKBONES}")
  c = common.get_config()
  patients, size = (24, 32) if arg.smoke else (2000, 128)
  c.data.dir = os.path.join(
      CACHE, f"phantom-v{phantom.GENERATOR_VERSION}-f{writer.FORMAT_VERSION}-{patients}patients-"
      f"{size}px-seed0")
  c.data.prepare = "data_prep.prepared:phantom_dataset"
  c.data.prepare_args = dict(num_patients=patients, image_size=size, seed=0)
  c.data.image_size = size
  c.data.augment.update(rotate_deg=5.0, scale=(0.95, 1.05), translate=0.03)
  c.model.backbone.update(BACKBONES[backbone])
  c.model.channels = 1  # trained from scratch: no ImageNet stem to feed three channels
  c.model.normalization = "unit"
  c.optim.update(name="adam", lr=2e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0)
  c.train.update(steps=1000, global_batch=32, log_every=25, eval_every=250)
  c.checkpoint.every = 250
  c.eval.global_batch = 64
  c.eval.evaluators = "classification,ham_localization,wang_localization"
  # The phantom boxes every finding; NIH's protocol reports its 8 box classes.
  c.eval.localization_classes = ",".join(labels.NIH_BOX_LABELS)
  if arg.method in RECIPES:
    RECIPES[arg.method](c, arg.head)
  if arg.smoke:
    if backbone == "densenet":
      c.model.backbone.update(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8,
                              bn_size=2)
    else:
      c.model.backbone.width = 4
    if arg.method == "ham":
      c.model.ham.update(fa_features=8, head_features=8)
    if arg.method == "spf":  # 4 x 4 maps at 32 px
      c.model.spf.update(grid=2, reduce_channels=8, bottleneck_channels=4, hidden=16)
    if arg.method == "msml":
      c.model.msml.features = 8
    if arg.method == "segmenter":
      c.model.segmenter.decoder_features = (8, 8, 8)
    c.optim.warmup_steps = 0
    c.train.update(steps=4, global_batch=8, log_every=1, eval_every=4)
    c.checkpoint.every = 4
    c.eval.global_batch = 8
    c.eval.bootstrap = 100
  return c


def _use_ham(c: ml_collections.ConfigDict, head: str) -> None:
  """Switches the phantom recipe's model to HAM (PHANTOM_HAM), with the authors' dropout and
  loss weights."""
  del head  # HAM has one head
  c.model.name = "ham"
  c.model.dropout = 0.1
  c.model.ham = ml_collections.ConfigDict(PHANTOM_HAM)
  c.loss.ham_weights = ml_collections.ConfigDict(ham.LOSS_WEIGHTS)


def _use_spf(c: ml_collections.ConfigDict, head: str) -> None:
  """SPF (PHANTOM_SPF, `head` spf|gap|flatten) on the location-aware task."""
  c.model.name = "spf"
  c.model.spf = ml_collections.ConfigDict(dict(PHANTOM_SPF, head=head or "spf"))
  c.loss.spf = ml_collections.ConfigDict(spf.LOSS_DEFAULTS)
  c.data.target = "fine_labels"
  c.eval.evaluators = "classification,location_accuracy"
  c.eval.localization_classes = ""


def _use_msml(c: ml_collections.ConfigDict, head: str) -> None:
  """MSML + BCE (PHANTOM_MSML, `head` bilinear|compact|gap) on the 14 findings."""
  c.model.name = "msml"
  c.model.msml = ml_collections.ConfigDict(dict(PHANTOM_MSML, head=head or "bilinear"))
  c.loss.msml = ml_collections.ConfigDict(msml.LOSS_DEFAULTS)


def _use_can(c: ml_collections.ConfigDict, head: str) -> None:
  """CAN (can.DEFAULTS) with its balance and attention losses on the 14 findings."""
  del head  # CAN's variants are config.model.can fields
  c.model.name = "can"
  c.model.can = ml_collections.ConfigDict(can.DEFAULTS)
  c.loss.update(name="balanced_focal", class_counts="train")
  c.loss.can = ml_collections.ConfigDict(can.LOSS_DEFAULTS)


def _use_anatomy_xnet(c: ml_collections.ConfigDict, head: str) -> None:
  """Anatomy-XNet (anatomy_xnet.DEFAULTS: A3 on lungs and heart, PWAP) with BCE on the 14
  findings, reading the phantom's anatomy maps."""
  del head  # Anatomy-XNet's variants are config.model.anatomy_xnet fields
  c.model.name = "anatomy_xnet"
  c.model.anatomy_xnet = ml_collections.ConfigDict(anatomy_xnet.DEFAULTS)


def _use_segmenter(c: ml_collections.ConfigDict, head: str) -> None:
  """The anatomy segmenter (PHANTOM_SEGMENTER) on the phantom's anatomy maps, scored by Dice."""
  del head  # one decoder
  c.model.name = "segmenter"
  c.model.segmenter = ml_collections.ConfigDict(PHANTOM_SEGMENTER)
  c.data.target = "anatomy"
  c.eval.evaluators = "segmentation"
  c.eval.localization_classes = ""
  c.checkpoint.best_metric = "val/mean_dice"


RECIPES = {"ham": _use_ham, "spf": _use_spf, "msml": _use_msml, "can": _use_can,
           "anatomy_xnet": _use_anatomy_xnet, "segmenter": _use_segmenter}
