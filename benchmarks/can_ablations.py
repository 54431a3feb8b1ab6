"""CAN's claim on the phantom: two cross-attending branches over one network, and what each part
of CAN adds.

  python benchmarks/can_ablations.py --seeds 3 --parallel 2 --workdir runs/can

The 14 findings, `configs/phantom.py`'s data, optimizer and budget throughout: the baseline (one
DenseNet, GAP, BCE: the README demo), CAN (`method=can`: two such DenseNets), and CAN with one part
removed each: no cross gating, no attention loss, plain BCE for the balance loss (its branch heads
then trained with BCE too). Tables: mean AUC, and AUC per finding, on the test split. The rest as
in `studies.py`.
"""

from __future__ import annotations

import studies

VARIANTS = {
    "baseline": ("method=baseline", ()),
    "can": ("method=can", ()),
    "can-no-gating": ("method=can", ("--config.model.can.gating=none",)),
    "can-no-att-loss": ("method=can", ("--config.loss.can.att_weight=0.0",)),
    "can-bce": ("method=can", ("--config.loss.name=bce",)),
}

STUDY = studies.Study(VARIANTS, studies.classification_report, studies.auc_tables,
                      default_variants=tuple(VARIANTS),
                      default_workdir="runs/can")


if __name__ == "__main__":
  studies.run(STUDY)
