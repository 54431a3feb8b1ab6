"""Localization on the phantom: a method's CAMs against the baseline's, with seeds and ablations.

  python benchmarks/localization.py --methods baseline,ham --seeds 3 --workdir runs/localization
  python benchmarks/localization.py --methods ham-no-fa,ham-no-ordinal,ham-avg-pool,ham-os32,\
baseline-resnet-os8 --seeds 3 --workdir runs/localization

Each variant of VARIANTS trains with `configs/phantom.py` (the README demo's data, optimizer and
budget) once per seed (`--config.seed`), then `cxr_jax.evaluate` scores its best-by-validation
checkpoint on the test split: per-class AUC, and localization of NIH's 8 box classes by HAM's
protocol (normalised map >= 0.469 as a pixel mask against the box mask) and by Wang et al.'s
(boxes around thresholded blobs). Tables of mean and sample standard deviation over the seeds; the
rest (resuming, `--parallel`, `<workdir>/table.md`) as in `studies.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import studies
from cxr_jax.data import labels

VARIANTS = {
    "baseline": ("method=baseline", ()),
    "ham": ("method=ham", ()),
    "ham-no-fa": ("method=ham", ("--config.model.ham.fa=False",)),
    "ham-no-ordinal": ("method=ham", ("--config.loss.ham_weights.bound_loss=0.0",
                                      "--config.loss.ham_weights.union_loss=0.0")),
    "ham-avg-pool": ("method=ham", ("--config.model.ham.pooling=avg",)),
    "ham-os32": ("method=ham", ("--config.model.backbone.output_stride=32",)),
    # The baseline (GAP + linear, CAM from C5) on HAM's phantom backbone at output stride 8.
    "baseline-resnet-os8": ("method=baseline,backbone=resnet", ()),
}
IOU_AT = "0.3"  # the claim's threshold: T(IoU=0.3)


def read_run(directory: str) -> dict[str, Any]:
  """The reports `cxr_jax.evaluate` wrote for the test split."""
  located = studies.read_json(directory, "localization_test.json")
  return dict(classification=studies.read_json(directory, "eval_test.json"),
              ham=located["ham_localization"], wang=located["wang_localization"])


# Summary columns: name -> value of one run's reports.
SUMMARY: dict[str, Callable[[dict[str, Any]], float]] = {
    "mean AUC": lambda r: r["classification"]["mean_auc"],
    "HAM T(IoU=0.3)": lambda r: r["ham"]["mean_iou_acc"][IOU_AT],
    "HAM T(IoU=0.1)": lambda r: r["ham"]["mean_iou_acc"]["0.1"],
    "HAM mean T(IoU)": lambda r: r["ham"]["mean_tiou"],
    "HAM T(IoR=0.5)": lambda r: r["ham"]["mean_ior_acc"]["0.5"],
    "Wang L180 IoU>0.3": lambda r: r["wang"]["levels"]["180"]["mean_iou_acc"][IOU_AT],
    "Wang L60 IoU>0.3": lambda r: r["wang"]["levels"]["60"]["mean_iou_acc"][IOU_AT],
}


def tables(results: studies.Results) -> str:
  """The summary table and the per-class HAM-protocol T(IoU=0.3) table, mean ± std over seeds."""
  per_class = studies.markdown(
      ["variant", *labels.NIH_BOX_LABELS],
      [[variant, *(studies.mean_spread([r["ham"]["classes"][name]["iou_acc"][IOU_AT] for r in runs])
                   for name in labels.NIH_BOX_LABELS)]
       for variant, runs in results.items()])
  return (f"Test split, mean ± sample std over seeds.\n\n{studies.summary_table(results, SUMMARY)}"
          f"\n\nHAM protocol, T(IoU={IOU_AT}) per box class:\n\n{per_class}\n")


STUDY = studies.Study(VARIANTS, read_run, tables, default_variants=("baseline", "ham"),
                      default_workdir="runs/localization")


if __name__ == "__main__":
  studies.run(STUDY)
