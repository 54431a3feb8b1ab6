"""The exact AUC engine and the patient-level (cluster) bootstrap of per-class and mean AUC.

Inputs follow `cxr_jax.metrics.classification`: (N, K) scores, 0/1 targets (NaN unknown) and an
optional mask. The checks, the tie groups and the weighted Mann-Whitney AUC live here because
both modules use them: `classification.roc_auc` is the weighted AUC with unit weights.

AUC counts a tied positive/negative pair as 1/2 (sklearn's `roc_auc_score`). Confidence intervals
come from a percentile bootstrap that resamples patients with replacement (all images of a drawn
patient come along), recomputing every class AUC and the mean in each resample. A resample where
a class has one kind of target is dropped for that class, and for the mean.

The bootstrap never materialises a resample: drawing patients with replacement gives each image
an integer weight (how often its patient was drawn), and the AUC of the resampled set is the
weighted Mann-Whitney statistic over tie groups that were sorted once. All resamples of a chunk
are evaluated together with array operations.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Resamples evaluated together: bounds memory at a few (N, chunk) float32 arrays.
# Counts are drawn from the seeded stream chunk by chunk: changing it may change the CIs.
_CHUNK = 64
# Rows per block in `_sums_before`.
_BLOCK = 16
# Row r < _BLOCK sums a block's rows before r; the last row sums the whole block.
_BLOCK_SUMS = np.tril(np.ones((_BLOCK + 1, _BLOCK), np.float32), -1)


def check_binary(targets: np.ndarray) -> None:
  """Raises unless every target is 0 or 1."""
  bad = (targets != 0) & (targets != 1)
  if bad.any():
    raise ValueError(
        f"targets must be 0 or 1 where counted, found {np.unique(targets[bad])[:5].tolist()}; "
        "map or mask uncertain (-1) labels first")


def prepare_inputs(scores, targets, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checked float scores, 0/1 int targets and the bool mask of labels that count.

  Args:
    scores: (N, K) scores.
    targets: (N, K) 0/1 targets; NaN marks an unknown label, which is not counted.
    mask: None or broadcastable to (N, K); true (or 1) where the label counts. Masks out
      ignored uncertain labels and padded evaluation examples.
  """
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, K)")
  mask = np.ones(scores.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  mask = np.broadcast_to(mask, scores.shape) & np.isfinite(targets)
  check_binary(targets[mask])
  return scores, np.where(mask, targets, 0).astype(np.int64), mask


def tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ascending sort order of `scores` and the start of each run of equal sorted scores."""
  if not np.isfinite(scores).all():
    raise ValueError("scores must be finite where counted")
  order = np.argsort(scores, kind="stable")
  ranked = scores[order]
  starts = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]]))
  return order, starts


@dataclasses.dataclass(frozen=True)
class Ranking:
  """One class's examples sorted by score once, with the tie structure the AUC needs.

  Attributes:
    order: ascending score order of the examples.
    pos_at: positions of the positives in that order.
    bounds: (2, n_pos) first and one-past-last position of each positive's tie group.
    pos_before: (2, n_pos) number of positives before each of those positions.
  """

  order: np.ndarray
  pos_at: np.ndarray
  bounds: np.ndarray
  pos_before: np.ndarray


def rank(scores: np.ndarray, targets: np.ndarray) -> Ranking:
  """Sorts one class's examples and locates each positive's tie group."""
  order, starts = tie_groups(scores)
  pos_at = np.flatnonzero(targets[order] == 1)
  group = np.searchsorted(starts, pos_at, side="right") - 1
  ends = np.append(starts[1:], len(scores))
  bounds = np.stack([starts[group], ends[group]])
  return Ranking(order, pos_at, bounds, np.searchsorted(pos_at, bounds))


class Scratch:
  """Float32 work buffers, grown on demand and reused across bootstrap chunks and classes.

  A fresh multi-megabyte temporary per call is paid for in page faults, which measured more than
  half of the bootstrap's time; reusing buffers avoids that.
  """

  def __init__(self):
    self._buffers = {}

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape`, sharing memory with earlier arrays of the same name."""
    size = int(np.prod(shape))
    if name not in self._buffers or self._buffers[name].size < size:
      self._buffers[name] = np.empty(size, np.float32)
    return self._buffers[name][:size].reshape(shape)


def _sums_before(weights: np.ndarray, positions: np.ndarray, scratch: Scratch) -> np.ndarray:
  """Exact int64 sums of the rows of `weights` before each position.

  Args:
    weights: (n, B) non-negative integer weights.
    positions: int array of values in [0, n].
    scratch: buffers to work in.

  Returns:
    positions.shape + (B,) sums.

  numpy's cumsum runs element by element; summing within blocks of rows by one small matrix
  product and across blocks by a short cumsum is several times faster. float32 is exact while a
  block's weight stays below 2**24 (16 rows of resampling counts stay far below it).
  """
  n, width = weights.shape
  n_blocks, n_tail = divmod(n, _BLOCK)
  # Block b, row r: weight of block b's rows before r; row _BLOCK: the whole block. The rows
  # after the last full block form one more, partial block.
  sums = scratch.get("sums", (n_blocks + 1, _BLOCK + 1, width))
  full = weights[:n - n_tail].reshape(n_blocks, _BLOCK, width)
  np.matmul(_BLOCK_SUMS, full, out=sums[:-1])
  sums[-1, 0] = 0
  np.cumsum(weights[n - n_tail:], axis=0, out=sums[-1, 1:n_tail + 1])
  before_block = np.zeros((n_blocks + 1, width), np.int64)
  np.cumsum(sums[:-1, -1], axis=0, out=before_block[1:])
  block, row = np.divmod(positions, _BLOCK)
  return before_block[block] + sums[block, row].astype(np.int64)


def weighted_auc(weights: np.ndarray, ranking: Ranking, scratch: Scratch) -> np.ndarray:
  """AUC for each column of (n, B) integer example weights, rows in `ranking.order`.

  A positive beats the negatives below its tie group and half of those inside it, so twice the
  Mann-Whitney U sums, over positives, weight x (negative weight below the group's start + below
  its end). Negative weight below a position is all weight below it less the positives' weight:
  one pass over all examples, the rest over positives only, in exact integers.
  """
  (n, width), n_pos = weights.shape, len(ranking.pos_at)
  pos_weights = weights[ranking.pos_at]
  below = _sums_before(weights, np.append(ranking.bounds, n), scratch)
  pos_below = _sums_before(pos_weights, np.append(ranking.pos_before, n_pos), scratch)
  neg_below = (below[:-1] - pos_below[:-1]).reshape(2, n_pos, width)
  twice_u = np.einsum("jb,kjb->b", pos_weights.astype(np.int64), neg_below)
  pairs = pos_below[-1] * (below[-1] - pos_below[-1])
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
  """Percentile bootstrap of per-class and mean AUC.

  Attributes:
    class_ci: (K, 2) lower and upper bounds per class; NaN where no resample was usable.
    mean_ci: (2,) bounds for the mean AUC over the classes defined on the full data.
    class_n_used: (K,) resamples in which each class had both targets.
    mean_n_used: resamples in which every class of the mean had both targets.
    class_samples: (n_boot, K) AUC of each class in each resample, NaN where dropped.
    mean_samples: (n_boot,) mean AUC in each resample, NaN where dropped.
  """

  class_ci: np.ndarray
  mean_ci: np.ndarray
  class_n_used: np.ndarray
  mean_n_used: int
  class_samples: np.ndarray
  mean_samples: np.ndarray


def _percentile_ci(samples: np.ndarray, level: float) -> np.ndarray:
  """(2,) percentile interval of the finite samples, NaN if there are none."""
  samples = samples[np.isfinite(samples)]
  if not samples.size:
    return np.full(2, np.nan)
  tail = 100 * (1 - level) / 2
  return np.percentile(samples, [tail, 100 - tail])


def _cluster_index(patient_ids, keep: np.ndarray) -> np.ndarray:
  """Dense 0..P-1 cluster of each kept example; without ids each example is its own cluster."""
  if patient_ids is None:
    return np.arange(np.count_nonzero(keep))
  patient_ids = np.asarray(patient_ids)
  if patient_ids.shape != keep.shape:
    raise ValueError(f"patient_ids has shape {patient_ids.shape}, expected {keep.shape}")
  return np.unique(patient_ids[keep], return_inverse=True)[1]


def _draw_counts(rng: np.random.Generator, n_clusters: int, n_resamples: int) -> np.ndarray:
  """(n_clusters, n_resamples) times each cluster is drawn when each resample draws n_clusters."""
  drawn = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
  slot = drawn * n_resamples + np.arange(n_resamples)[:, None]
  counts = np.bincount(slot.ravel(), minlength=n_clusters * n_resamples)
  return counts.reshape(n_clusters, n_resamples).astype(np.float32)


def bootstrap_auc(scores, targets, mask=None, patient_ids=None, *, n_boot: int = 1000,
                  level: float = 0.95, seed: int = 0) -> BootstrapResult:
  """Patient-level (cluster) percentile bootstrap of per-class and mean AUC.

  Each resample draws as many patients as there are, with replacement, and keeps all their
  images; the same resamples serve every class, so the mean is recomputed per resample.

  Args:
    scores, targets, mask: as in `prepare_inputs` (mask may be None).
    patient_ids: optional (N,) patient of each example (any hashable numpy dtype). Without it
      every example is its own patient (image-level bootstrap), which gives too narrow intervals
      when patients contribute several images.
    n_boot: number of bootstrap resamples.
    level: coverage of the two-sided interval, e.g. 0.95 for percentiles 2.5 and 97.5.
    seed: seed of `np.random.default_rng`; equal inputs and seed give equal intervals.

  Returns:
    A `BootstrapResult`.
  """
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be positive, got {n_boot}")
  scores, targets, mask = prepare_inputs(scores, targets, mask)
  # Examples that count for no class (e.g. padding) must not be drawn as patients.
  counted = mask.any(axis=1)
  scores, targets, mask = scores[counted], targets[counted], mask[counted]
  cluster = _cluster_index(patient_ids, counted)
  n_clusters = int(cluster.max()) + 1 if cluster.size else 0

  classes = []
  for k, m in enumerate(mask.T):
    ranking = rank(scores[m, k], targets[m, k])
    classes.append((cluster[m][ranking.order], ranking))

  samples = np.full((n_boot, len(classes)), np.nan)
  rng = np.random.default_rng(seed)
  scratch = Scratch()
  for first in range(0, n_boot if n_clusters else 0, _CHUNK):
    counts = _draw_counts(rng, n_clusters, min(_CHUNK, n_boot - first))
    for k, (class_cluster, ranking) in enumerate(classes):
      weights = scratch.get("weights", (len(class_cluster), counts.shape[1]))
      # mode="clip" writes straight into `out` (the default buffers); the indices are in range.
      np.take(counts, class_cluster, axis=0, out=weights, mode="clip")
      samples[first:first + counts.shape[1], k] = weighted_auc(weights, ranking, scratch)

  defined = np.array([0 < len(r.pos_at) < len(r.order) for _, r in classes], bool)
  # A resample missing a class would average a different set of classes: drop it for the mean.
  mean_samples = samples[:, defined].mean(axis=1) if defined.any() else np.full(n_boot, np.nan)
  return BootstrapResult(
      class_ci=np.array([_percentile_ci(column, level) for column in samples.T]).reshape(-1, 2),
      mean_ci=_percentile_ci(mean_samples, level),
      class_n_used=np.isfinite(samples).sum(axis=0),
      mean_n_used=int(np.isfinite(mean_samples).sum()),
      class_samples=samples,
      mean_samples=mean_samples,
  )
