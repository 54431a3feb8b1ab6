"""MSML's claim on the phantom: the multi-label softmax loss (and the bilinear head) over BCE.

  python benchmarks/msml_loss.py --seeds 3 --parallel 2 --workdir runs/msml

The 14 findings, `configs/phantom.py`'s DenseNet, data, optimizer and budget throughout: BCE on the
baseline's head (the README demo), MSML + BCE and MSML alone (`bce_weight=0`) on that same head,
and MSML + BCE on the bilinear head. Tables: mean AUC, and AUC per finding, on the test split. The
rest as in `studies.py`.
"""

from __future__ import annotations

from typing import Any

import studies
from cxr_jax.data import labels

VARIANTS = {
    "bce": ("method=baseline", ()),
    "msml-bce": ("method=msml,head=gap", ()),
    "msml-alone": ("method=msml,head=gap", ("--config.loss.msml.bce_weight=0.0",)),
    "bilinear-msml-bce": ("method=msml", ()),
}


def read_run(directory: str) -> dict[str, Any]:
  """A run's test classification report."""
  return studies.read_json(directory, "eval_test.json")


def tables(results: studies.Results) -> str:
  """Mean AUC, then AUC per finding, mean ± std over seeds."""
  summary = studies.summary_table(results, {"mean AUC": lambda r: r["mean_auc"]})
  per_class = studies.markdown(
      ["finding", *results],
      [[name, *(studies.mean_spread([r["classes"][name]["auc"] for r in runs])
                for runs in results.values())] for name in labels.NIH_LABELS])
  return (f"Test split, mean ± sample std over seeds.\n\n{summary}\n\n"
          f"AUC per finding:\n\n{per_class}\n")


STUDY = studies.Study(VARIANTS, read_run, tables, default_variants=tuple(VARIANTS),
                      default_workdir="runs/msml")


if __name__ == "__main__":
  studies.run(STUDY)
