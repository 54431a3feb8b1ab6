"""A method that uses every seam of the contract, registered for the tests as `toy`:

- two backbones (`backbone`, `branch`), each loadable from its own `init_from` file;
- an extra input, `anatomy`: the fraction of lung pixels feeds a head of its own;
- `cams` (the head over `backbone` + `branch` C5 maps) and an auxiliary output;
- a two-term loss (classification + 0.5 x auxiliary "any finding" BCE), both weighted by example;
- a torch mirror and torch loss declared in the interop registry.
`toy_nan_eval` is the same model with NaN logits in inference mode only.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax import backbones, losses, methods
from cxr_jax.interop import convert, registry

AUX_WEIGHT = 0.5
LUNGS = (2, 3)  # right_lung, left_lung ids of tests/datasets.py


class ToyModel(nn.Module):
  backbone: nn.Module
  branch: nn.Module
  num_classes: int
  nan_in_eval: bool = False

  @nn.compact
  def __call__(self, images, *, train, anatomy):
    f = self.backbone(images, train=train)["C5"] + self.branch(images, train=train)["C5"]
    cams = nn.Dense(self.num_classes, name="head")(f)
    lung = jnp.mean((anatomy >= LUNGS[0]) & (anatomy <= LUNGS[1]), axis=(1, 2))[:, None]
    logits = jnp.mean(cams, axis=(1, 2)) + nn.Dense(self.num_classes, name="anatomy_head")(lung)
    if self.nan_in_eval and not train:
      logits = logits * jnp.nan
    aux = nn.Dense(1, name="aux_head")(jnp.mean(f, axis=(1, 2)))[:, 0]
    return dict(logits=logits.astype(jnp.float32), cams=cams.astype(jnp.float32),
                aux_logit=aux.astype(jnp.float32))


def build(config, task, nan_in_eval=False):
  cfg = config["model"]["backbone"]
  return ToyModel(backbone=backbones.build(cfg), branch=backbones.build(cfg),
                  num_classes=task.num_classes, nan_in_eval=nan_in_eval)


def loss(outputs, batch, *, task, config, weight):
  targets, mask = task.targets(batch)
  cls = losses.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                   config["loss"], task)
  any_finding = jnp.max(targets * mask, axis=1)
  aux = losses.masked_mean(losses.bce_terms(outputs["aux_logit"], any_finding), weight)
  return cls + AUX_WEIGHT * aux, {"cls_loss": cls, "aux_loss": aux}


def torch_names(model_cfg):
  return convert.TorchNames((
      convert.backbone_scope(model_cfg["backbone"], flax="backbone", torch="backbone"),
      convert.backbone_scope(model_cfg["backbone"], flax="branch", torch="branch"),
      convert.Scope("", "")))


def torch_mirror(config, task):
  """The plain-torch ToyModel (imports torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import torch_modules  # pylint: disable=g-import-not-at-top

  class TorchToy(torch.nn.Module):

    def __init__(self):
      super().__init__()
      channels = config["model"]["channels"]
      self.backbone = torch_modules.backbone(config["model"]["backbone"], channels)
      self.branch = torch_modules.backbone(config["model"]["backbone"], channels)
      width = self.backbone.out_channels
      self.head = torch.nn.Linear(width, task.num_classes)
      self.anatomy_head = torch.nn.Linear(1, task.num_classes)
      self.aux_head = torch.nn.Linear(width, 1)

    def forward(self, x, anatomy):
      f = (self.backbone(x)["C5"] + self.branch(x)["C5"]).permute(0, 2, 3, 1)
      cams = self.head(f)
      lung = ((anatomy >= LUNGS[0]) & (anatomy <= LUNGS[1])).float().mean(dim=(1, 2))[:, None]
      logits = cams.mean(dim=(1, 2)) + self.anatomy_head(lung)
      return {"logits": logits, "cams": cams, "aux_logit": self.aux_head(f.mean(dim=(1, 2)))[:, 0]}

  return TorchToy()


def torch_loss(outputs, batch, *, task, config, weight):
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from cxr_jax.interop import torch_modules  # pylint: disable=g-import-not-at-top
  targets, mask = batch[task.target], batch[task.mask_key]
  cls = torch_modules.classification_loss(outputs["logits"], targets, mask * weight[:, None],
                                          config["loss"], task)
  any_finding = (targets * mask).amax(dim=1)
  aux = (F.binary_cross_entropy_with_logits(outputs["aux_logit"], any_finding, reduction="none")
         * weight).sum() / weight.sum().clamp(min=1.0)
  return cls + AUX_WEIGHT * aux, {"cls_loss": cls, "aux_loss": aux}


BACKBONES = (("backbone", "model.backbone"), ("branch", "model.backbone"))
METHOD = methods.Method(build=build, loss=loss, inputs=("anatomy",), backbones=BACKBONES)
NAN_EVAL = methods.Method(build=lambda config, task: build(config, task, nan_in_eval=True),
                          loss=loss, inputs=("anatomy",), backbones=BACKBONES)


def register() -> None:
  """Registers `toy` and `toy_nan_eval` once per process (both frameworks)."""
  for name, method in (("toy", METHOD), ("toy_nan_eval", NAN_EVAL)):
    if name not in methods.available():
      methods.register(name, method)
      registry.register(name, registry.TorchSpec(names=torch_names,
                                                 mirror="toy_method:torch_mirror",
                                                 loss="toy_method:torch_loss"))


register()
