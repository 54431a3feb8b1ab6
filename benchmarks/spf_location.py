"""SPF's claim on the phantom: the bottleneck keeps where a finding is, pooling loses it.

  python benchmarks/spf_location.py --seeds 3 --parallel 2 --workdir runs/spf
  python benchmarks/spf_location.py --methods spf-rec10,spf-grid8,spf-densenet,spf-gap-densenet \
      --seeds 3 --parallel 2 --workdir runs/spf

Every variant learns the location-aware task (`Finding|side|zone` fine labels) with
`configs/phantom.py:method=spf` (the same ResNet, classifier width, data, optimizer and budget);
only what the classifier reads changes: SPF's bottleneck, global average pooling, the plain
flattened map, or SPF without its reconstruction loss (CLAIM, the default); the other variants
vary the reconstruction weight, the bottleneck and the backbone. Tables: mean AUC over the fine
labels with at least `MIN_TEST_POSITIVES` test positives, and side and zone accuracy among
positives (the `location_accuracy` evaluator), overall and per finding. The rest as in
`studies.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import studies

VARIANTS = {
    "spf": ("method=spf", ()),
    "spf-gap": ("method=spf,head=gap", ()),
    "spf-flatten": ("method=spf,head=flatten", ()),
    "spf-no-rec": ("method=spf", ("--config.loss.spf.rec_weight=0.0",)),
    # What else was tried (not run by default): a 10x reconstruction weight, a finer bottleneck
    # (8 x 8 x 16), and the phantom DenseNet (4 x 4 C5 at 128 px, so a 2 x 2 grid).
    "spf-rec10": ("method=spf", ("--config.loss.spf.rec_weight=10.0",)),
    "spf-grid8": ("method=spf", ("--config.model.spf.grid=8",)),
    "spf-densenet": ("method=spf,backbone=densenet", ("--config.model.spf.grid=2",)),
    "spf-gap-densenet": ("method=spf,head=gap,backbone=densenet", ()),
}
CLAIM = ("spf", "spf-gap", "spf-flatten", "spf-no-rec")
MIN_TEST_POSITIVES = 10  # a fine label's AUC enters the mean from this many test positives


def fine_mean_auc(report: dict[str, Any]) -> float:
  """Mean AUC over the fine labels with at least MIN_TEST_POSITIVES test positives."""
  aucs = [c["auc"] for c in report["classes"].values()
          if c["n_pos"] >= MIN_TEST_POSITIVES and c["auc"] is not None]
  return float(np.mean(aucs))


def scored_labels(report: dict[str, Any]) -> int:
  """How many fine labels enter `fine_mean_auc`."""
  return sum(c["n_pos"] >= MIN_TEST_POSITIVES for c in report["classes"].values())


SUMMARY = {
    f"mean AUC (fine labels, >= {MIN_TEST_POSITIVES} positives)": fine_mean_auc,
    "side accuracy": lambda r: r["location_accuracy"]["mean_side_acc"],
    "zone accuracy": lambda r: r["location_accuracy"]["mean_zone_acc"],
}


def per_finding(results: studies.Results, key: str) -> str:
  """Rows: findings with test positives; columns: variants; cells: `key` mean ± std."""
  first = next(iter(results.values()))[0]["location_accuracy"]["findings"]
  findings = [name for name, value in first.items() if value is not None]
  return studies.markdown(
      ["finding", "test positives", *results],
      [[name, str(first[name]["n_pos"]),
        *(studies.mean_spread([r["location_accuracy"]["findings"][name][key] for r in runs])
          for runs in results.values())] for name in findings])


def tables(results: studies.Results) -> str:
  """The summary, then side and zone accuracy per finding."""
  if not results:
    return "No variant has all its seeds evaluated.\n"
  counts = sorted({scored_labels(r) for runs in results.values() for r in runs})
  return (f"Test split, mean ± sample std over seeds; {counts} fine labels have >= "
          f"{MIN_TEST_POSITIVES} test positives.\n\n{studies.summary_table(results, SUMMARY)}\n\n"
          f"Side accuracy per finding:\n\n{per_finding(results, 'side_acc')}\n\n"
          f"Zone accuracy per finding:\n\n{per_finding(results, 'zone_acc')}\n")


STUDY = studies.Study(VARIANTS, studies.classification_report, tables, default_variants=CLAIM,
                      default_workdir="runs/spf")


if __name__ == "__main__":
  studies.run(STUDY)
