"""MSML's claim on the phantom: the multi-label softmax loss (and the bilinear head) over BCE.

  python benchmarks/msml_loss.py --seeds 3 --parallel 2 --workdir runs/msml

The 14 findings, `configs/phantom.py`'s DenseNet, data, optimizer and budget throughout: BCE on the
baseline's head (the README demo), MSML + BCE and MSML alone (`bce_weight=0`) on that same head,
and MSML + BCE on the bilinear head. Tables: mean AUC, and AUC per finding, on the test split. The
rest as in `studies.py`.
"""

from __future__ import annotations

import studies

VARIANTS = {
    "bce": ("method=baseline", ()),
    "msml-bce": ("method=msml,head=gap", ()),
    "msml-alone": ("method=msml,head=gap", ("--config.loss.msml.bce_weight=0.0",)),
    "bilinear-msml-bce": ("method=msml", ()),
}


STUDY = studies.Study(VARIANTS, studies.classification_report, studies.auc_tables,
                      default_variants=tuple(VARIANTS),
                      default_workdir="runs/msml")


if __name__ == "__main__":
  studies.run(STUDY)
