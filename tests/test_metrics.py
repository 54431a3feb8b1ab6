"""Tests for cxr_jax.metrics.classification and .bootstrap: AUC and AUPRC against sklearn,
masking, and the patient bootstrap."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_jax.metrics import bootstrap, classification, evaluators

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Hernia")


def _informative(rng, n, k, rate=0.3, signal=1.0):
  """Scores that rank positives higher on average, with targets at the given positive rate."""
  targets = (rng.random((n, k)) < rate).astype(np.float64)
  scores = rng.normal(size=(n, k)) + signal * targets
  return scores, targets


def _both_classes(rng, n, rate=0.3):
  targets = (rng.random(n) < rate).astype(np.int64)
  targets[:2] = [0, 1]
  return rng.permutation(targets)


@pytest.mark.parametrize("n", [2, 15, 16, 17, 33, 250, 2000])
def test_roc_auc_matches_sklearn_on_random_scores(n):
  # Sizes around the 16-row blocks of the prefix sums exercise full blocks and the tail.
  rng = np.random.default_rng(n)
  for _ in range(5):
    targets = _both_classes(rng, n)
    scores = rng.normal(size=n) + targets
    assert classification.roc_auc(scores, targets) == pytest.approx(
        skm.roc_auc_score(targets, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [0, 1])
def test_roc_auc_matches_sklearn_on_heavy_ties(decimals):
  rng = np.random.default_rng(decimals)
  for n in (5, 40, 500):
    targets = _both_classes(rng, n)
    scores = np.round(rng.random(n) + 0.3 * targets, decimals)
    assert len(np.unique(scores)) < n / 2 or n == 5
    assert classification.roc_auc(scores, targets) == pytest.approx(
        skm.roc_auc_score(targets, scores), abs=1e-12)


def test_roc_auc_counts_tied_pairs_as_half():
  rng = np.random.default_rng(3)
  targets = _both_classes(rng, 60)
  scores = rng.integers(0, 4, 60).astype(float)
  pos, neg = scores[targets == 1], scores[targets == 0]
  wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
  assert classification.roc_auc(scores, targets) == pytest.approx(
      wins / (len(pos) * len(neg)), abs=1e-12)
  assert classification.roc_auc(np.full(60, 0.3), targets) == 0.5


def test_roc_auc_is_nan_without_both_classes():
  assert np.isnan(classification.roc_auc([0.1, 0.9, 0.4], [0, 0, 0]))
  assert np.isnan(classification.roc_auc([0.1, 0.9, 0.4], [1, 1, 1]))
  assert np.isnan(classification.roc_auc([], []))


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_average_precision_matches_sklearn(decimals):
  rng = np.random.default_rng(10)
  for n in (3, 17, 400):
    targets = _both_classes(rng, n)
    scores = rng.random(n) + 0.4 * targets
    if decimals is not None:
      scores = np.round(scores, decimals)
    assert classification.average_precision(scores, targets) == pytest.approx(
        skm.average_precision_score(targets, scores), abs=1e-12)


def test_average_precision_edge_cases():
  targets = np.array([0, 1, 1, 0, 1])
  constant = np.full(5, 0.5)
  assert classification.average_precision(constant, targets) == pytest.approx(
      skm.average_precision_score(targets, constant))
  assert classification.average_precision([0.2, 0.1, 0.7], [1, 1, 1]) == 1.0
  assert np.isnan(classification.average_precision([0.2, 0.1, 0.7], [0, 0, 0]))


def test_counted_targets_must_be_binary_and_scores_finite():
  scores, targets = np.random.default_rng(0).random((6, 2)), np.array([[0, 1]] * 3 + [[1, 0]] * 3)
  uncertain = targets.astype(float)
  uncertain[0, 0] = -1
  with pytest.raises(ValueError, match="0 or 1"):
    classification.per_class_auc(scores, uncertain)
  mask = np.ones_like(targets, bool)
  mask[0, 0] = False
  expected = [classification.roc_auc(scores[1:, 0], targets[1:, 0]),
              classification.roc_auc(scores[:, 1], targets[:, 1])]
  np.testing.assert_array_equal(classification.per_class_auc(scores, uncertain, mask), expected)
  broken = scores.copy()
  broken[2, 1] = np.nan
  with pytest.raises(ValueError, match="finite"):
    classification.per_class_auc(broken, targets)
  with pytest.raises(ValueError, match="must both be"):
    classification.roc_auc([0.1, 0.2], [0, 1, 1])


def test_per_class_metrics_with_mask_and_unknown_labels_match_sklearn():
  rng = np.random.default_rng(4)
  scores, targets = _informative(rng, 300, 5)
  mask = rng.random((300, 5)) < 0.8
  targets[rng.random((300, 5)) < 0.1] = np.nan  # unknown labels are never counted
  counted = mask & ~np.isnan(targets)
  aucs = classification.per_class_auc(scores, targets, mask)
  aps = classification.per_class_average_precision(scores, targets, mask)
  for k in range(5):
    y, s = targets[counted[:, k], k], scores[counted[:, k], k]
    assert aucs[k] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert aps[k] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
  # Garbage behind the mask must not matter.
  hidden = np.where(counted, scores, 1e6)
  np.testing.assert_array_equal(classification.per_class_auc(hidden, targets, mask), aucs)


def test_single_class_columns_are_nan_and_left_out_of_the_mean():
  rng = np.random.default_rng(5)
  scores, targets = _informative(rng, 200, 4)
  targets[:, 1] = 0
  mask = np.ones((200, 4), bool)
  mask[:, 3] = False  # a class with no counted example at all
  aucs = classification.per_class_auc(scores, targets, mask)
  assert np.isnan(aucs[[1, 3]]).all() and np.isfinite(aucs[[0, 2]]).all()
  mean, skipped = classification.mean_auc(aucs)
  assert mean == pytest.approx((aucs[0] + aucs[2]) / 2)
  np.testing.assert_array_equal(skipped, [1, 3])
  assert np.isnan(classification.mean_auc([np.nan, np.nan])[0])


def test_bootstrap_resamples_equal_sklearn_on_materialised_patient_resamples():
  rng = np.random.default_rng(6)
  n, n_patients, n_resamples = 150, 40, 12
  patients = rng.integers(0, n_patients, n)
  patients[:n_patients] = np.arange(n_patients)  # every id in use, so ids are the cluster index
  scores, targets = _informative(rng, n, 3)
  scores = np.round(scores, 1)  # ties across resampled copies too
  result = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=n_resamples, seed=11)
  counts = bootstrap._draw_counts(np.random.default_rng(11), n_patients, n_resamples)
  for b in range(n_resamples):
    # The resample as a list of images: every image of a drawn patient, once per draw.
    rows = np.concatenate([np.flatnonzero(patients == p).repeat(int(counts[p, b]))
                           for p in range(n_patients)])
    for k in range(3):
      assert result.class_samples[b, k] == pytest.approx(
          skm.roc_auc_score(targets[rows, k], scores[rows, k]), abs=1e-12)
    assert result.mean_samples[b] == pytest.approx(result.class_samples[b].mean())


def test_bootstrap_is_deterministic_with_the_seed():
  rng = np.random.default_rng(7)
  scores, targets = _informative(rng, 300, 3)
  patients = rng.integers(0, 100, 300)
  first = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=100, seed=3)
  again = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=100, seed=3)
  other = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=100, seed=4)
  np.testing.assert_array_equal(first.class_samples, again.class_samples)
  np.testing.assert_array_equal(first.class_ci, again.class_ci)
  assert not np.array_equal(first.class_samples, other.class_samples)


def test_bootstrap_ci_contains_the_point_estimate():
  rng = np.random.default_rng(8)
  scores, targets = _informative(rng, 600, 4)
  patients = rng.integers(0, 200, 600)
  result = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=300, seed=0)
  aucs = classification.per_class_auc(scores, targets)
  assert (result.class_ci[:, 0] < aucs).all() and (aucs < result.class_ci[:, 1]).all()
  mean = classification.mean_auc(aucs)[0]
  assert result.mean_ci[0] < mean < result.mean_ci[1]
  np.testing.assert_array_equal(result.class_n_used, 300)
  assert result.mean_n_used == 300
  narrower = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=300, level=0.5)
  assert (narrower.class_ci[:, 0] > result.class_ci[:, 0]).all()
  assert (narrower.class_ci[:, 1] < result.class_ci[:, 1]).all()


def test_bootstrap_resamples_whole_patients():
  rng = np.random.default_rng(9)
  scores, targets = _informative(rng, 200, 2)
  patients = np.arange(200)
  # Four identical images per patient: patient resampling sees the same data as before, image
  # resampling wrongly sees four times as many independent cases and shrinks the interval.
  copies = (np.repeat(scores, 4, axis=0), np.repeat(targets, 4, axis=0), np.repeat(patients, 4))
  kwargs = dict(n_boot=200, seed=1)
  once = bootstrap.bootstrap_auc(scores, targets, None, patients, **kwargs)
  by_patient = bootstrap.bootstrap_auc(copies[0], copies[1], None, copies[2], **kwargs)
  by_image = bootstrap.bootstrap_auc(copies[0], copies[1], None, None, **kwargs)
  np.testing.assert_allclose(by_patient.class_samples, once.class_samples, atol=1e-12)
  width = lambda result: np.diff(result.class_ci, axis=1).ravel()
  assert (width(by_image) < 0.7 * width(by_patient)).all()


def test_bootstrap_drops_resamples_where_a_class_is_single_valued():
  rng = np.random.default_rng(10)
  scores, targets = _informative(rng, 120, 2)
  patients = np.arange(120) // 2
  targets[:, 1] = 0
  targets[0, 1] = 1  # one positive: about 1/e of the resamples miss its patient
  result = bootstrap.bootstrap_auc(scores, targets, None, patients, n_boot=300, seed=2)
  dropped = np.isnan(result.class_samples[:, 1])
  assert 0.2 < dropped.mean() < 0.55
  assert result.class_n_used[1] == 300 - dropped.sum()
  assert result.class_n_used[0] == 300
  np.testing.assert_array_equal(np.isnan(result.mean_samples), dropped)
  assert result.mean_n_used == 300 - dropped.sum()
  assert np.isfinite(result.class_ci[1]).all()


def test_padded_examples_change_nothing():
  rng = np.random.default_rng(12)
  scores, targets = _informative(rng, 150, 3)
  patients = rng.integers(0, 50, 150).astype(str)
  mask = np.ones((150, 3), bool)
  # Padding as the eval pipeline makes it: masked rows with arbitrary content and a dummy id.
  pad_scores = np.vstack([scores, rng.normal(size=(10, 3))])
  pad_targets = np.vstack([targets, np.full((10, 3), -1.0)])
  pad_mask = np.vstack([mask, np.zeros((10, 3), bool)])
  pad_patients = np.concatenate([patients, np.full(10, "")])
  kwargs = dict(n_boot=50, seed=0)
  plain = bootstrap.bootstrap_auc(scores, targets, mask, patients, **kwargs)
  padded = bootstrap.bootstrap_auc(pad_scores, pad_targets, pad_mask, pad_patients, **kwargs)
  np.testing.assert_array_equal(padded.class_samples, plain.class_samples)
  report = classification.evaluate_predictions(pad_scores, pad_targets, pad_mask, LABELS[:3],
                                               pad_patients, **kwargs)
  assert report["n_examples"] == 150 and report["n_patients"] == len(set(patients))


def test_evaluate_predictions_report():
  rng = np.random.default_rng(13)
  scores, targets = _informative(rng, 400, 4)
  targets[:, 3] = 0  # Hernia: no positive in this test set
  targets[:20, 0] = np.nan
  patients = rng.integers(0, 150, 400)
  report = classification.evaluate_predictions(scores, targets, None, LABELS, patients,
                                               n_boot=100, seed=5)
  json.dumps(report, allow_nan=False)  # strict JSON: undefined values are None, not NaN
  assert list(report["classes"]) == list(LABELS)
  aucs = classification.per_class_auc(scores, targets)
  atelectasis = report["classes"]["Atelectasis"]
  assert atelectasis["auc"] == pytest.approx(aucs[0])
  assert atelectasis["auprc"] == pytest.approx(
      skm.average_precision_score(targets[20:, 0], scores[20:, 0]))
  assert atelectasis["n_pos"] + atelectasis["n_neg"] == 380
  assert atelectasis["n_pos"] == int(np.nansum(targets[:, 0]))
  assert atelectasis["auc_ci"][0] < atelectasis["auc"] < atelectasis["auc_ci"][1]
  assert atelectasis["n_boot_used"] == 100 and report["mean_auc_n_boot_used"] == 100
  hernia = report["classes"]["Hernia"]
  assert hernia["auc"] is None and hernia["auc_ci"] == [None, None] and hernia["n_boot_used"] == 0
  assert report["skipped"] == ["Hernia"]
  assert report["mean_auc"] == pytest.approx(aucs[:3].mean())
  assert report["mean_auc_ci"][0] < report["mean_auc"] < report["mean_auc_ci"][1]
  assert report["n_patients"] == len(np.unique(patients))
  assert report["bootstrap"] == {"n_boot": 100, "level": 0.95, "seed": 5, "unit": "patient"}
  quick = classification.evaluate_predictions(scores, targets, None, LABELS, n_boot=0)
  assert quick["mean_auc_ci"] is None and quick["classes"]["Effusion"]["auc_ci"] is None
  assert quick["mean_auc"] == report["mean_auc"]
  with pytest.raises(ValueError, match="distinct label names"):
    classification.evaluate_predictions(scores, targets, None, LABELS[:3], n_boot=0)


def test_format_table():
  rng = np.random.default_rng(14)
  scores, targets = _informative(rng, 200, 4)
  targets[:, 3] = 0
  report = classification.evaluate_predictions(scores, targets, None, LABELS,
                                               rng.integers(0, 80, 200), n_boot=50)
  lines = classification.format_table(report).splitlines()
  header, rows, mean = lines[0], lines[2:-2], lines[-1]
  assert [row.split()[0] for row in rows] == list(LABELS)
  assert "95% CI" in header and "AUPRC" in header
  # Right-aligned number columns end where their header ends.
  auc_end = header.index("AUC") + len("AUC")
  for row in rows:
    assert len(row) == len(header)
  assert rows[0][:auc_end].endswith(f"{report['classes']['Atelectasis']['auc']:.3f}")
  assert mean.startswith("mean (3/4)") and mean[:auc_end].endswith(f"{report['mean_auc']:.3f}")
  low, high = report["mean_auc_ci"]
  assert f"[{low:.3f}, {high:.3f}]" in mean
  assert "n/a" in rows[3]
  quick = classification.format_table(
      classification.evaluate_predictions(scores, targets, None, LABELS, n_boot=0))
  assert "CI" not in quick and "[" not in quick


def test_classification_reports_the_configured_classes_and_predicts_every_class():
  """`config.eval.classes` (CheXpert's 5 of 14): the report and its mean cover those, in the
  task's spelling; predictions keep every column; an unknown name is refused."""
  rng = np.random.default_rng(5)
  names = ["Atelectasis", "Effusion", "Edema", "Fracture"]
  scores = rng.random((40, 4)).astype(np.float32)
  targets = (rng.random((40, 4)) < 0.4).astype(np.float32)
  batch = dict(scores=scores, labels=targets, label_mask=np.ones_like(targets),
               index=np.arange(40))
  columns = evaluators.class_indices({"classes": "Edema, Pleural Effusion"}, "classes", names)
  assert columns == [2, 1]
  chosen = evaluators.Classification("labels", "label_mask", names, columns=columns)
  chosen.update(batch)
  report = chosen.result()
  assert list(report["classes"]) == ["Edema", "Effusion"]
  aucs = [skm.roc_auc_score(targets[:, k], scores[:, k]) for k in (2, 1)]
  np.testing.assert_allclose(report["mean_auc"], np.mean(aucs), rtol=1e-12)
  assert chosen.predictions()["scores"].shape == (40, 4)
  assert evaluators.class_indices({"classes": ""}, "classes", names) is None
  with pytest.raises(ValueError, match=r"config.eval.classes names \['Hernia'\]"):
    evaluators.class_indices({"classes": "Hernia"}, "classes", names)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_study_level_evaluation_pools_each_study_and_matches_sklearn(how):
  """`config.eval.study_level`: one row per study, its images' scores pooled; a class is positive
  when any known image target is, unknown when none is known."""
  rng = np.random.default_rng(6)
  studies = np.repeat([f"s{i}" for i in range(30)], 2)[::-1]  # 2 views each, studies shuffled
  patients = np.array([f"p{i // 4}" for i in range(60)])
  scores = rng.random((60, 2))
  study_targets = (rng.random((30, 2)) < 0.4).astype(np.float64)
  index = {s: i for i, s in enumerate(dict.fromkeys(studies))}
  targets = study_targets[[index[s] for s in studies]]
  mask = np.ones_like(targets)
  mask[0, 0] = 0  # one view's label unknown: the study keeps its other view's
  batch = dict(scores=scores, labels=targets, label_mask=mask, index=np.arange(60))
  evaluator = evaluators.Classification("labels", "label_mask", ["a", "b"],
                                        patient_ids=patients, study_ids=studies, study_pool=how,
                                        n_boot=20)
  evaluator.update(batch)
  report = evaluator.result()
  pool = np.max if how == "max" else np.mean
  pooled = np.array([[pool(scores[studies == s, k]) for k in range(2)] for s in index])
  for k, name in enumerate(["a", "b"]):
    want = skm.roc_auc_score(study_targets[:, k], pooled[:, k])
    np.testing.assert_allclose(report["classes"][name]["auc"], want, rtol=1e-12)
    assert report["classes"][name]["n_pos"] + report["classes"][name]["n_neg"] == 30
  assert report["unit"] == f"study ({how})" and report["n_patients"] == 15
  with pytest.raises(ValueError, match="needs the records' study ids"):
    evaluators.Classification("labels", "label_mask", ["a", "b"], study_pool=how)
