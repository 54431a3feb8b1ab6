"""benchmarks/localization.py: every variant is a valid config, and the tables report mean and
spread over seeds from the evaluation reports."""

import ast
import os
import sys

import pytest

from cxr_jax import config_utils
from cxr_jax.data import labels
from test_end_to_end import REPO, load_config

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import localization  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse(text):
  """A command-line value as config_flags reads it: a Python literal, else the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


@pytest.mark.parametrize("variant", list(localization.VARIANTS))
def test_every_variant_is_a_valid_phantom_config(variant):
  arg, overrides = localization.VARIANTS[variant]
  config = load_config(os.path.join(REPO, "configs", "phantom.py"), arg)
  for override in overrides:
    path, value = override.removeprefix("--config.").split("=")
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
      section = section[name]
    assert leaf in section, override
    section[leaf] = parse(value)
  config_utils.validate(config)
  assert config.model.name == variant.split("-")[0]


def fake_run(auc, iou03):
  """The reports of one run, as cxr_jax.evaluate writes them, with two numbers set."""
  acc = {"0.1": 0.5, "0.3": iou03}
  classes = {name: {"iou_acc": acc} for name in labels.NIH_BOX_LABELS}
  wang = {"mean_iou_acc": {"0.3": 0.0}}
  return dict(classification={"mean_auc": auc},
              ham=dict(mean_iou_acc=acc, mean_tiou=0.1, mean_ior_acc={"0.5": 0.2}, classes=classes),
              wang={"levels": {"60": wang, "180": wang}})


def test_tables_give_mean_and_sample_spread_per_variant():
  text = localization.tables({"baseline": [fake_run(0.9, 0.1), fake_run(0.8, 0.3)],
                              "ham": [fake_run(0.7, 0.2)]})
  summary, per_class = text.split("per box class")
  assert "| baseline | 2 | 0.850 ± 0.071 | 0.200 ± 0.141 |" in summary
  assert "| ham | 1 | 0.700 | 0.200 |" in summary
  assert per_class.count("0.200 ± 0.141") == len(labels.NIH_BOX_LABELS)
