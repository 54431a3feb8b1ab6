"""Several datasets in one run: the union label namespace, weighted draws, per-member evaluation."""

import json
import os

import numpy as np
import pytest

import datasets
from cxr_jax import config_utils, evaluate, experiment, train
from cxr_jax.data import labels, mixture, pipeline, writer


def test_parse_reads_members_and_weights():
  members = mixture.parse("nih=/d/nih, cx=/d/cx", "nih=1,cx=2.5")
  assert members == [mixture.Member("nih", "/d/nih", 1.0), mixture.Member("cx", "/d/cx", 2.5)]
  assert [m.weight for m in mixture.parse("a=/x,b=/y")] == [None, None]


@pytest.mark.parametrize("text,weights,match", [
    ("nih=/d/nih,/d/cx", "", r"'/d/cx' is not NAME=VALUE"),
    ("nih=/a,nih=/b", "", r"names \['nih'\] more than once"),
    ("nih=/a,cx=/b", "nih=1", r"give every member"),
    ("nih=/a,cx=/b", "nih=1,cx=0", r"cx='0' is not a positive number"),
    ("nih=/a,cx=/b", "nih=1,cx=lots", r"cx='lots' is not a positive number"),
    ("nih=/a,cx=/b", "nih=1,mimic=1", r"give every member"),
])
def test_parse_names_what_is_wrong(text, weights, match):
  with pytest.raises(ValueError, match=match):
    mixture.parse(text, weights)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  """An NIH-labelled and a CheXpert-labelled toy dataset, with different record ids."""
  root = tmp_path_factory.mktemp("mixture")
  nih = datasets.write(root / "nih", {"train": 24, "val": 8, "test": 8})
  cx = datasets.write(root / "cx", {"train": 8, "val": 8, "test": 8},
                      label_names=labels.CHEXPERT_LABELS, first_id=100)
  return mixture.parse(f"nih={nih},cx={cx}")


def test_union_namespace_and_counts(two_datasets):
  manifest = mixture.load(two_datasets)
  union = manifest["label_names"]
  assert union[:14] == list(labels.NIH_LABELS)
  assert union[14:] == [n for n in labels.CHEXPERT_LABELS if n not in labels.NIH_LABELS]
  assert len(union) == 14 + 7  # CheXpert shares 7 names with NIH (Effusion among them)
  train = manifest["splits"]["train"]
  assert train["num_records"] == 32
  nih, cx = (writer.load_manifest(m.dir)["splits"]["train"]["label_counts"] for m in two_datasets)
  counts = train["label_counts"]
  effusion = union.index("Effusion")
  assert counts["positive"][effusion] == (nih["positive"][labels.NIH_LABELS.index("Effusion")] +
                                          cx["positive"][labels.CHEXPERT_LABELS.index("Effusion")])
  hernia, devices = union.index("Hernia"), union.index("Support Devices")
  assert counts["unknown"][hernia] == nih["unknown"][13] + 8  # every CheXpert record lacks it
  assert counts["unknown"][devices] == cx["unknown"][13] + 24
  assert all(os.path.isabs(s["file"]) for s in train["shards"])


def test_records_carry_their_labels_in_the_union_positions(two_datasets):
  manifest = mixture.load(two_datasets)
  spec = pipeline.make_spec(datasets.tiny_config("").data.to_dict(), manifest, train=False)
  source = mixture.split_source(two_datasets, "val")
  union = manifest["label_names"]
  nih_example = pipeline.make_example(source[0], spec, member=source.member_of(0))
  cx_example = pipeline.make_example(source[8], spec, member=source.member_of(8))
  raw_nih, raw_cx = datasets.example(24, 32).labels, datasets.example(108, 32, 14).labels
  assert source.member_of(0) == 0 and source.member_of(8) == 1
  only_cx = [union.index(n) for n in labels.CHEXPERT_LABELS if n not in labels.NIH_LABELS]
  assert nih_example["label_mask"][only_cx].sum() == 0
  assert cx_example["label_mask"][union.index("Hernia")] == 0
  where = [union.index(n) for n in labels.CHEXPERT_LABELS]
  known = np.isin(raw_cx, (0, 1))  # -1 is masked at evaluation, NaN always
  np.testing.assert_array_equal(cx_example["labels"][where][known], raw_cx[known])
  np.testing.assert_array_equal(nih_example["labels"][:14][np.isin(raw_nih, (0, 1))],
                                raw_nih[np.isin(raw_nih, (0, 1))])
  # The toy box is labelled 5: Nodule for NIH, Edema for CheXpert.
  assert union[cx_example["box_labels"][0]] == labels.CHEXPERT_LABELS[5] == "Edema"
  assert union[nih_example["box_labels"][0]] == "Nodule"


def test_quotas_follow_weights_and_fill_the_epoch():
  np.testing.assert_array_equal(mixture.quotas([30, 10], [None, None]), [30, 10])
  np.testing.assert_array_equal(mixture.quotas([30, 10], [1, 1]), [20, 20])
  np.testing.assert_array_equal(mixture.quotas([10, 10, 10], [1, 1, 1]), [10, 10, 10])
  counts = mixture.quotas([7, 3, 1], [1, 1, 1])
  assert counts.sum() == 11 and sorted(counts.tolist()) == [3, 4, 4]


def test_epoch_order_draws_each_member_by_its_quota_and_cycles_through_it():
  sizes, counts = [30, 10], [20, 20]  # the big member undersampled, the small one twice over
  epochs = [mixture.epoch_order(sizes, counts, seed=3, epoch=e, order_stream=0, member_stream=2)
            for e in range(3)]
  for order in epochs:
    assert len(order) == 40 and (order < 30).sum() == 20
    small = np.bincount(order[order >= 30] - 30, minlength=10)
    assert (small == 2).all()  # each of its records twice, none three times
  big = np.concatenate([order[order < 30] for order in epochs[:3]])
  # Epochs 0 and 1 read 40 of the big member's stream: all 30 records, then 10 of the next cycle.
  assert set(big[:40].tolist()) == set(range(30))
  np.testing.assert_array_equal(
      epochs[1], mixture.epoch_order(sizes, counts, seed=3, epoch=1, order_stream=0, member_stream=2))
  assert not np.array_equal(epochs[0], epochs[1])


def test_weighted_training_stream_draws_members_by_weight(two_datasets):
  manifest = mixture.load(two_datasets)
  config = datasets.tiny_config("")
  config.data.augment.update(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0,
                             contrast=0.0)  # the record ids are written in the pixels
  spec = pipeline.make_spec(config.data.to_dict(), manifest, train=True)
  source = mixture.split_source(two_datasets, "train")
  ds = pipeline.train_dataset(source, spec, global_batch=8, seed=0, weights=[1.0, 1.0])
  ids = [i for g in range(4) for i in datasets.record_ids(ds[g])]  # one epoch: 32 records
  from_cx = sum(i >= 100 for i in ids)
  assert from_cx == 16 and len(set(i for i in ids if i >= 100)) == 8


def mixture_config(members, **changes):
  config = datasets.tiny_config("", **changes)
  config.data.dir = ""
  config.data.mixture = ",".join(f"{m.name}={m.dir}" for m in members)
  return config


def test_mixture_trains_and_evaluates_per_member(two_datasets, tmp_path):
  config = mixture_config(two_datasets, steps=4, eval_every=2)
  config.data.mixture_weights = "nih=1,cx=1"
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(config, workdir)
  val = last["val"]
  assert {"nih/mean_auc", "cx/mean_auc", "mean_auc", "nih/loss", "loss"} <= set(val)
  assert "nih/auc/Hernia" in val and "cx/auc/Hernia" not in val
  assert "cx/auc/Support Devices" in val and "nih/auc/Support Devices" not in val
  finite = [v for v in (val["nih/mean_auc"], val["cx/mean_auc"]) if np.isfinite(v)]
  assert val["mean_auc"] == pytest.approx(np.mean(finite))

  result = evaluate.evaluate(workdir, "test", "best", n_boot=0)
  assert set(result["members"]) == {"nih", "cx"}
  nih_report = json.load(open(os.path.join(workdir, "eval_test_nih.json")))
  cx_report = json.load(open(os.path.join(workdir, "eval_test_cx.json")))
  assert nih_report["n_examples"] == cx_report["n_examples"] == 8
  assert set(nih_report["classes"]) == set(labels.NIH_LABELS)
  assert set(cx_report["classes"]) == set(labels.CHEXPERT_LABELS)
  summary = json.load(open(os.path.join(workdir, "eval_test.json")))
  assert summary["members"]["cx"]["n_examples"] == 8
  with open(os.path.join(workdir, "predictions_test_cx.csv")) as f:
    rows = f.read().splitlines()
  assert len(rows) == 9 and rows[1].startswith("00000116_000.png")
  # The stream records the mixture, so a resume with other weights is refused.
  config.data.mixture_weights = "nih=1,cx=3"
  config.train.steps = 6
  with pytest.raises(ValueError, match="data_dir"):
    train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("changes,match", [
    (dict(dir="/d/x", mixture="a=/d/a"), "leave config.data.dir and config.data.prepare empty"),
    (dict(mixture_weights="a=1"), "mixture_weights is set without config.data.mixture"),
    (dict(dir="", mixture="a=/d/a,b"), "'b' is not NAME=VALUE"),
])
def test_config_names_a_bad_mixture(changes, match):
  config = datasets.tiny_config("/d/data")
  config.data.update(changes)
  with pytest.raises(ValueError, match=match):
    config_utils.validate(config)


def test_old_runs_read_without_a_mixture(tmp_path):
  config = datasets.tiny_config(str(tmp_path))
  config_utils.save(config, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  del saved["data"]["mixture"], saved["data"]["mixture_weights"]
  json.dump(saved, open(tmp_path / "config.json", "w"))
  loaded = config_utils.load(str(tmp_path))
  assert experiment.member_names(loaded) == [None]


def test_a_member_without_the_validation_split_is_refused_at_start(two_datasets, tmp_path):
  lacking = datasets.write(tmp_path / "no_val", {"train": 8, "test": 8})
  config = mixture_config([*two_datasets, mixture.Member("extra", lacking)])
  with pytest.raises(ValueError, match=r"member 'extra' .* has no split \['val'\]"):
    experiment.prepare_data(config)
