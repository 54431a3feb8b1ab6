"""Anatomy-XNet's claim on the phantom: does anatomy guidance help classification, with the masks a
segmenter predicts as with true ones?

  python benchmarks/anatomy_xnet.py --seeds 3 --parallel 2 --workdir runs/anatomy

First, once (`prepare`): the segmenter (`configs/phantom.py:method=segmenter`, seed 0) learns the
phantom's anatomy maps, is scored on the test split (Dice and IoU per region), and writes its own
maps into a copy of the phantom (`<workdir>/phantom-pseudo`, `cxr_jax.pseudolabel`: every split,
test included, so no test image is classified with its true maps). Then, with `configs/phantom.py`'s
data, optimizer and budget, per seed: the baseline DenseNet (GAP, BCE), Anatomy-XNet on the
phantom's true maps (an upper bound), on the predicted maps, and without anatomy (A3 off, PWAP
on). Tables: the segmenter's Dice and the pseudo-labels' confidence, then mean AUC and
localization of the CAMs (PWAP's logit maps for Anatomy-XNet), and AUC per finding. The rest as in
`studies.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Sequence

import localization
import studies

SEGMENTER = "segmenter-seed0"
PSEUDO = "phantom-pseudo"
VARIANTS = {
    "baseline": ("method=baseline", ()),
    "anatomy_xnet-true": ("method=anatomy_xnet", ()),
    "anatomy_xnet-predicted": ("method=anatomy_xnet", ("--config.data.dir={workdir}/" + PSEUDO,
                                                       "--config.data.prepare=")),
    "anatomy_xnet-no-a3": ("method=anatomy_xnet", ("--config.model.anatomy_xnet.a3=False",)),
}
NEEDS_SEGMENTER = ("anatomy_xnet-predicted",)


def prepare(workdir: str, variants: Sequence[str]) -> str:
  """Trains and scores the segmenter and writes the pseudo-labelled phantom, unless done; returns
  their tables ("" when no chosen variant reads predicted maps)."""
  if not set(variants) & set(NEEDS_SEGMENTER):
    return ""
  segmenter = os.path.join(workdir, SEGMENTER)
  if not studies.is_evaluated(segmenter):
    studies.run_all({"segmenter": ("method=segmenter", ())}, [("segmenter", 0, segmenter)], 1)
  pseudo = os.path.join(workdir, PSEUDO)
  if not os.path.exists(os.path.join(pseudo, "cxr_manifest.json")):
    phantom = studies.read_json(segmenter, "config.json")["data"]["dir"]
    subprocess.run([sys.executable, "-m", "cxr_jax.pseudolabel", "--workdir", segmenter,
                    "--data", phantom, "--out", pseudo], check=True)
  return segmenter_tables(studies.read_json(segmenter, "eval_test.json"),
                          studies.read_json(pseudo, "cxr_manifest.json")["pseudo_labels"])


def segmenter_tables(report: dict[str, Any], pseudo: dict[str, Any]) -> str:
  """The segmenter's Dice and IoU per region on the test split, and the confidence quantiles of
  its pseudo-labels per split."""
  show = lambda v: "n/a" if v is None else f"{v:.3f}"
  regions = studies.markdown(["region", "Dice", "IoU", "images"],
                             [[name, show(c["dice"]), show(c["iou"]), str(c["n_images"])]
                              for name, c in report["classes"].items()])
  quantiles = list(next(iter(pseudo["splits"].values()))["confidence_quantiles"])
  confidence = studies.markdown(
      ["split", "images", f"below {pseudo['threshold']}", *quantiles],
      [[split, str(v["images"]), str(v["flagged"]), *(show(q) for q in v["confidence_quantiles"].values())]
       for split, v in pseudo["splits"].items()])
  return (f"Segmenter (seed 0), test split: mean Dice {report['mean_dice']:.3f}, mean IoU "
          f"{report['mean_iou']:.3f} (background left out).\n\n{regions}\n\nPseudo-label "
          f"confidence (mean winning probability per image):\n\n{confidence}\n\n")


def tables(results: studies.Results) -> str:
  """Mean AUC and CAM localization (localization.py's tables), then AUC per finding."""
  per_finding = studies.finding_auc_table({v: [r["classification"] for r in runs]
                                           for v, runs in results.items()})
  return f"{localization.tables(results)}\nAUC per finding:\n\n{per_finding}\n"


STUDY = studies.Study(VARIANTS, localization.read_run, tables, default_variants=tuple(VARIANTS),
                      default_workdir="runs/anatomy", prepare=prepare)


if __name__ == "__main__":
  studies.run(STUDY)
