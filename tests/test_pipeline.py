"""The grain pipeline: order, sharding over processes, resume, eval padding, augmentation, labels."""

import dataclasses

import numpy as np
import pytest

import datasets
from cxr_jax.data import augment, labels, pipeline, records, tfrecord, writer

NO_AUGMENT = dict(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
                  hflip=False)


def data_config(**changes):
  config = dict(image_size=32, uncertainty="ignore", uncertainty_per_label="",
                max_boxes=4, augment=dict(NO_AUGMENT))
  config.update(changes)
  return config


MARKED = frozenset({2, 5, 11, 30})  # records marked box_supervised: three train, one val


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return datasets.write(tmp_path_factory.mktemp("data") / "ds", {"train": 24, "val": 11},
                        box_supervised=MARKED)


def spec(dataset, train=True, **changes):
  return pipeline.make_spec(data_config(**changes), writer.load_manifest(dataset), train=train,
                            inputs=("anatomy",))


def train_ids(dataset, *, seed, steps, global_batch=8, process_index=0, process_count=1):
  ds = pipeline.train_dataset(records.split_source(dataset, "train"), spec(dataset),
                              global_batch=global_batch, seed=seed, process_index=process_index,
                              process_count=process_count)
  it = pipeline.to_iterator(ds)
  return [datasets.record_ids(next(it)) for _ in range(steps)]


def test_seed_fixes_the_order(dataset):
  first = train_ids(dataset, seed=1, steps=6)
  assert first == train_ids(dataset, seed=1, steps=6)
  assert first != train_ids(dataset, seed=2, steps=6)
  epochs = [sum(first[:3], []), sum(first[3:], [])]  # 24 records = 3 batches of 8 per epoch
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
  assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_processes_split_each_global_batch(dataset):
  """Two processes together read every record once per epoch, and their halves of each global
  batch are exactly the single-process batch."""
  single = train_ids(dataset, seed=3, steps=6)
  halves = [train_ids(dataset, seed=3, steps=6, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(6):
    assert len(halves[0][step]) == len(halves[1][step]) == 4
    assert sorted(halves[0][step] + halves[1][step]) == sorted(single[step])
  for epoch in (slice(0, 3), slice(3, 6)):
    seen = sum(halves[0][epoch] + halves[1][epoch], [])
    assert sorted(seen) == list(range(24))


def test_epoch_drops_only_the_remainder(dataset):
  steps = train_ids(dataset, seed=0, steps=2, global_batch=10)  # 24 records: 2 batches of 10
  assert len(set(sum(steps, []))) == 20


def documented_batch(num_records, *, seed, global_batch, index) -> np.ndarray:
  """The record indices of global batch `index` by the formula in pipeline's docstring, without grain."""
  per_epoch = num_records // global_batch
  order = np.random.default_rng([seed, 0, index // per_epoch]).permutation(num_records)
  start = (index % per_epoch) * global_batch
  return order[start:start + global_batch]


def test_global_batches_follow_the_documented_order(dataset):
  """Batch g is a slice of epoch g // 2's permutation (24 records: 2 batches of 10, 4 dropped), the
  same global batch on one process or two, each process taking `[process_index::2]` of it."""
  source = records.split_source(dataset, "train")
  image_ids = [tfrecord.parse(source[i]).image_id for i in range(len(source))]
  for process_count in (1, 2):
    shares = [pipeline.train_dataset(source, spec(dataset), global_batch=10, seed=7,
                                     process_index=p, process_count=process_count)
              for p in range(process_count)]
    for index in range(5):  # epochs 0, 1 and the start of 2
      want = [image_ids[i] for i in documented_batch(len(source), seed=7, global_batch=10, index=index)]
      for p, ds in enumerate(shares):
        assert list(ds[index]["image_id"]) == want[p::process_count], (process_count, p, index)


def test_augmentation_is_seeded_by_global_position(dataset):
  """Example k of global batch g is augmented by `default_rng([seed, 1, g * global_batch + k])`: the
  same pixels on any number of processes."""
  source = records.split_source(dataset, "train")
  rotated = spec(dataset, augment=dict(NO_AUGMENT, rotate_deg=10.0))
  index = 3  # the second batch of epoch 1
  want = np.stack([
      pipeline.make_example(source[int(i)], rotated, np.random.default_rng([7, 1, index * 8 + k]))["image"]
      for k, i in enumerate(documented_batch(len(source), seed=7, global_batch=8, index=index))])
  for process_count in (1, 2):
    for p in range(process_count):
      ds = pipeline.train_dataset(source, rotated, global_batch=8, seed=7, process_index=p,
                                  process_count=process_count)
      np.testing.assert_array_equal(ds[index]["image"], want[p::process_count])


def test_worker_processes_give_the_same_stream(dataset):
  ds = pipeline.train_dataset(records.split_source(dataset, "train"),
                              spec(dataset, augment=dict(NO_AUGMENT, rotate_deg=10.0)),
                              global_batch=8, seed=5)
  inline = pipeline.to_iterator(ds)
  workers = pipeline.to_iterator(ds, worker_count=2)
  for _ in range(4):
    np.testing.assert_array_equal(next(workers)["image"], next(inline)["image"])
  workers.close()


def test_eval_padding_counts_each_example_once(dataset):
  source = records.split_source(dataset, "val")  # 11 records
  seen, batches = [], []
  for process in range(2):
    ds = pipeline.eval_dataset(source, spec(dataset, train=False), global_batch=4,
                               process_index=process, process_count=2)
    out = list(pipeline.to_iterator(ds))
    batches.append(len(out))
    for batch in out:
      valid = batch["valid"] > 0
      assert np.all(batch["index"][valid] >= 0) and np.all(batch["index"][~valid] == -1)
      seen += [i - 24 for i, v in zip(datasets.record_ids(batch), valid) if v]
  assert batches[0] == batches[1] == 3  # ceil(ceil(11 / 2) / 2)
  assert sorted(seen) == list(range(11))


def test_box_supervised_flag_reaches_the_device_fields(dataset):
  """Every example carries its record's flag as a float32 scalar, in training and evaluation."""
  ds = pipeline.train_dataset(records.split_source(dataset, "train"), spec(dataset),
                              global_batch=8, seed=1)
  seen = []
  for index in range(3):  # one epoch: every training record once
    batch = ds[index]
    device, host = pipeline.host_fields(batch)
    assert device["box_supervised"].dtype == np.float32 and device["box_supervised"].shape == (8,)
    assert "box_supervised" not in host
    ids = datasets.record_ids(batch)
    np.testing.assert_array_equal(device["box_supervised"], [float(i in MARKED) for i in ids])
    seen += ids
  assert MARKED & set(seen) == {2, 5, 11}
  batch = next(pipeline.to_iterator(pipeline.eval_dataset(
      records.split_source(dataset, "val"), spec(dataset, train=False), global_batch=12)))
  valid = batch["valid"] > 0
  ids = np.array(datasets.record_ids(batch))[valid]
  np.testing.assert_array_equal(batch["box_supervised"][valid], [float(i in MARKED) for i in ids])
  assert batch["box_supervised"].dtype == np.float32 and batch["box_supervised"][valid].sum() == 1


def test_uncertainty_policies():
  raw = np.array([1, 0, -1, np.nan, -1, -1], np.float32)
  names = ["a", "b", "c", "d", "e", "f"]
  codes = labels.resolve_policies(names, "ignore", labels.parse_policy_overrides("e=zeros,f=ones"))
  targets, mask = labels.apply_policy(raw, codes)
  np.testing.assert_array_equal(targets, [1, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(mask, [1, 1, 0, 0, 1, 1])
  with pytest.raises(ValueError, match="unknown labels"):
    labels.resolve_policies(names, "ignore", {"Edema": "ones"})
  with pytest.raises(ValueError, match="LABEL=POLICY"):
    labels.parse_policy_overrides("Edema:ones")


def test_label_smoothing_policies_draw_soft_targets_in_their_intervals():
  """U-Ones-LSR / U-Zeros-LSR: each uncertain label a fresh draw from its interval in training,
  the midpoint without a generator; known labels and masks as with the hard policies."""
  raw = np.array([[1, 0, -1, -1, np.nan, -1]] * 500, np.float32)
  codes = labels.resolve_policies(["a", "b", "c", "d", "e", "f"], "ones_lsr",
                                  {"d": "zeros_lsr", "f": "ignore"})
  lsr = {"ones_lsr": (0.55, 0.85), "zeros_lsr": (0.1, 0.3)}
  targets, mask = labels.apply_policy(raw, codes, lsr, np.random.default_rng(0))
  np.testing.assert_array_equal(targets[:, :2], [[1, 0]] * 500)
  assert 0.55 <= targets[:, 2].min() and targets[:, 2].max() <= 0.85
  assert 0.1 <= targets[:, 3].min() and targets[:, 3].max() <= 0.3
  assert np.unique(targets[:, 2]).size == 500  # a draw per example
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
  midpoint, _ = labels.apply_policy(raw[:1], codes, lsr)
  np.testing.assert_allclose(midpoint[0, 2:4], [0.7, 0.2])
  np.testing.assert_array_equal(labels.hard_codes(codes), labels.resolve_policies(
      ["a", "b", "c", "d", "e", "f"], "ones", {"d": "zeros", "f": "ignore"}))


def test_flip_swaps_patient_sides(dataset):
  flip = spec(dataset, augment=dict(NO_AUGMENT, hflip=True))
  payload = records.split_source(dataset, "train")[0]
  plain = pipeline.make_example(payload, spec(dataset, train=False))
  fine = labels.fine_vocabulary()
  for seed in range(8):  # hflip happens with probability 1/2
    ex = pipeline.make_example(payload, flip, np.random.default_rng(seed))
    if not np.array_equal(ex["image"], plain["image"]):
      break
  np.testing.assert_array_equal(ex["image"], plain["image"][:, ::-1])
  assert ex["fine_labels"][fine.index("Nodule|right|lower")] == 1
  assert ex["fine_labels"][fine.index("Nodule|left|lower")] == 0
  # The flipped film shows a mirrored patient: the lung on the viewer's left (pixels that held the
  # left lung) is that patient's right lung again, so the ids are swapped with the pixels.
  assert set(np.unique(plain["anatomy"][:, 16:])) == {3}
  assert set(np.unique(ex["anatomy"][:, :16])) == {2}
  np.testing.assert_allclose(ex["boxes"][0], [0.1, 0.6, 0.4, 0.8], atol=1e-6)


def test_boxes_follow_the_warp():
  rng = np.random.default_rng(0)
  image = np.zeros((64, 64), np.uint8)
  image[10:30, 35:55] = 255  # rows y 10..29, columns x 35..54
  box = np.array([[35 / 64, 10 / 64, 55 / 64, 30 / 64]])
  params = augment.AugmentParams(rotate_deg=15, scale=(0.8, 1.2), translate=0.1)
  for _ in range(5):
    a, t, _ = augment.sample_transform(rng, params)
    warped = augment.warp(image, a, t, 48, nearest=True)
    ys, xs = np.nonzero(warped > 127)
    got, keep = augment.warp_boxes(box, a, t)
    assert keep[0]
    want = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 48
    np.testing.assert_allclose(got[0], want, atol=2.5 / 48)


def test_too_many_boxes_is_an_error(dataset):
  payload = records.split_source(dataset, "train")[0]
  with pytest.raises(ValueError, match="max_boxes"):
    pipeline.make_example(payload, dataclasses.replace(spec(dataset, train=False), max_boxes=0))


def test_unknown_and_uncertain_fine_labels_are_masked(dataset):
  """NaN (unknown) and -1 in fine labels count nowhere, like NaN in labels."""
  ex = tfrecord.parse(records.split_source(dataset, "train")[0])
  ex.fine_labels = np.array(ex.fine_labels, np.float32)
  ex.fine_labels[:3] = [np.nan, -1.0, 1.0]
  out = pipeline.make_example(tfrecord.serialize(ex), spec(dataset, train=False))
  np.testing.assert_array_equal(out["fine_label_mask"][:3], [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(out["fine_labels"][:3], [0.0, 0.0, 1.0])
  assert out["fine_label_mask"][3:].all() and np.isfinite(out["fine_labels"]).all()


def test_corrupt_image_names_the_record(dataset):
  ex = tfrecord.parse(records.split_source(dataset, "train")[0])
  ex.image = ex.image[:40]
  with pytest.raises(ValueError, match="00000000_000.png"):
    pipeline.make_example(tfrecord.serialize(ex), spec(dataset, train=False))


def test_stream_restarts_at_any_batch(dataset):
  """A run resumed at step k reads `ds[k:]`: the same batches as one that never stopped."""
  ds = pipeline.train_dataset(records.split_source(dataset, "train"),
                              spec(dataset, augment=dict(NO_AUGMENT, rotate_deg=10.0)),
                              global_batch=8, seed=5)
  straight = pipeline.to_iterator(ds)
  expected = [next(straight) for _ in range(7)][4:]
  resumed = pipeline.to_iterator(ds[4:])
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])
