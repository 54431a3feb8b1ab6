"""Side and zone accuracy of location-aware (fine) labels such as `Nodule|left|lower`.

Fine labels are named `Finding|side|zone` with sides and zones from `cxr_jax.data.labels`. For each
finding, the examples counted are those positive for it: some known fine label of the finding
is 1. On those, with the finding's highest-scoring fine label as the prediction:
- side accuracy: its side is a positive side (one with a known positive fine label). This is the
  side whose best zone scores highest, i.e. the side of max over that side's zones' scores.
- zone accuracy: its zone is a positive zone on either side.
Ties go to the first fine label in vocabulary order.

This is our definition, not a paper's: how SPF (the location-aware paper this follows) evaluates
location is unknown to us (research/methods_spf_msml_can.md 2.6, which proposes checking that
location is preserved across a finding's location variants, as these accuracies do).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cxr_jax.data.labels import SIDES, ZONES
from cxr_jax.metrics import streaming
from cxr_jax.metrics.classification import json_float


def _group_by_finding(fine_names: Sequence[str]) -> dict[str, tuple[np.ndarray, ...]]:
  """{finding: (columns, side index, zone index)} of each finding's fine labels, in order."""
  groups: dict[str, list[tuple[int, int, int]]] = {}
  for column, name in enumerate(fine_names):
    parts = name.split("|")
    if len(parts) != 3 or parts[1] not in SIDES or parts[2] not in ZONES:
      raise ValueError(f"{name!r} is not Finding|side|zone with side in {SIDES}, zone in {ZONES}")
    finding, side, zone = parts
    groups.setdefault(finding, []).append((column, SIDES.index(side), ZONES.index(zone)))
  return {finding: tuple(np.array(values, np.int64) for values in zip(*members))
          for finding, members in groups.items()}


def _check_batch(scores, targets, mask, valid, n_fine: int):
  """The batch as numpy arrays, shapes checked."""
  scores, targets, mask = np.asarray(scores), np.asarray(targets), np.asarray(mask)
  valid = np.asarray(valid).astype(bool)
  if (scores.ndim != 2 or scores.shape[1] != n_fine or targets.shape != scores.shape
      or mask.shape != scores.shape or valid.shape != scores.shape[:1]):
    raise ValueError(f"expected scores, targets, mask (B, {n_fine}) and valid (B,); got "
                     f"{scores.shape}, {targets.shape}, {mask.shape}, {valid.shape}")
  return scores, targets, mask, valid


class LocationAccuracy:
  """Streaming side and zone accuracy per finding (definitions in the module docstring)."""

  def __init__(self, fine_names: Sequence[str]):
    self.fine_names = tuple(fine_names)
    self._groups = _group_by_finding(self.fine_names)
    self.findings = tuple(self._groups)
    n_findings = len(self.findings)
    self._n_pos = np.zeros(n_findings, np.int64)
    self._side_hits = np.zeros(n_findings, np.int64)
    self._zone_hits = np.zeros(n_findings, np.int64)

  def update(self, scores, targets, mask, valid) -> None:
    """Adds a batch.

    Args:
      scores: (B, F) scores of the fine labels (any monotone scale: only the argmax matters).
      targets: (B, F) 0/1 fine targets.
      mask: (B, F) 1 where the target is known.
      valid: (B,) 0 for padding examples, which are skipped.
    """
    scores, targets, mask, valid = _check_batch(scores, targets, mask, valid,
                                                len(self.fine_names))
    scores, positive = scores[valid], (targets[valid] == 1) & (mask[valid] > 0)
    for f, (columns, sides, zones) in enumerate(self._groups.values()):
      counted = positive[:, columns].any(axis=1)
      finding_positive = positive[counted][:, columns]
      best = scores[counted][:, columns].argmax(axis=1)
      self._n_pos[f] += np.count_nonzero(counted)
      self._side_hits[f] += _hits(finding_positive, sides, sides[best])
      self._zone_hits[f] += _hits(finding_positive, zones, zones[best])

  def _accuracies(self) -> tuple[np.ndarray, np.ndarray]:
    """(n_findings,) side and zone accuracies, NaN for findings without positives."""
    return (streaming.ratio(self._side_hits, self._n_pos),
            streaming.ratio(self._zone_hits, self._n_pos))

  def result(self) -> dict[str, Any]:
    """The JSON-ready report.

    Returns:
      findings: {finding: {n_pos, side_acc, zone_acc}} (None without positives);
      mean_side_acc, mean_zone_acc: unweighted means over findings with positives (None if none).
    """
    side_acc, zone_acc = self._accuracies()
    findings = {name: {"n_pos": int(self._n_pos[f]), "side_acc": json_float(side_acc[f]),
                       "zone_acc": json_float(zone_acc[f])}
                for f, name in enumerate(self.findings)}
    return {"findings": findings,
            "mean_side_acc": json_float(streaming.defined_mean(side_acc)),
            "mean_zone_acc": json_float(streaming.defined_mean(zone_acc))}

  def scalars(self) -> dict[str, float]:
    """loc_aware/mean_side_acc and loc_aware/mean_zone_acc, NaN without positives."""
    side_acc, zone_acc = self._accuracies()
    return {"loc_aware/mean_side_acc": float(streaming.defined_mean(side_acc)),
            "loc_aware/mean_zone_acc": float(streaming.defined_mean(zone_acc))}


def _hits(positive: np.ndarray, place: np.ndarray, predicted: np.ndarray) -> int:
  """Examples whose predicted place (side or zone index) holds one of their positive labels.

  Args:
    positive: (n, m) which of a finding's m fine labels are known positives.
    place: (m,) side or zone index of each fine label.
    predicted: (n,) predicted side or zone index.
  """
  return int(np.count_nonzero((positive & (place == predicted[:, None])).any(axis=1)))
