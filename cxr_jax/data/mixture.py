"""Several prepared datasets trained as one: `config.data.mixture`.

  --config.data.mixture=nih=/data/shards/nih,chexpert=/data/shards/chexpert
  --config.data.mixture_weights=nih=1,chexpert=2      # optional

Labels: the union of the members' label names, in the order first seen (names are already the
project's: every converter writes `labels.canonical` spellings, so CheXpert's "Pleural Effusion"
and NIH's "Effusion" are one class). A record's labels go to its dataset's positions; the labels
its dataset lacks are unknown (NaN) and so masked out of the loss, as any unknown label is. Box
labels move with them. Fine labels and anatomy maps are kept when every member has the same ones.

Training order (`epoch_order`): an epoch holds N records, N the members' training records
together. With weights, member d gives `round(N * w_d / sum(w))` of them (largest remainders),
read in turn from its own endless stream of seeded permutations: an undersampled member shows
other records each epoch, an oversampled one repeats each record before any twice. Without
weights every member gives its own records once: plain concatenation.

Evaluation stays per member: each member's split is evaluated on that member's label set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cxr_jax.data import records, writer


@dataclasses.dataclass(frozen=True)
class Member:
  """One dataset of a mixture: the name its metrics carry, its folder, its sampling weight."""
  name: str
  dir: str
  weight: float | None = None  # None: its share is its size


def _pairs(text: str, field: str) -> list[tuple[str, str]]:
  pairs = []
  for item in (part.strip() for part in text.split(",")):
    name, eq, value = item.partition("=")
    if not item or not eq or not name.strip() or not value.strip():
      raise ValueError(f"config.data.{field}: {item!r} is not NAME=VALUE (in {text!r})")
    pairs.append((name.strip(), value.strip()))
  return pairs


def parse(mixture: str, weights: str = "") -> list[Member]:
  """`config.data.mixture` ("name=dir,...") and `mixture_weights` ("name=w,...") as members.

  Raises:
    ValueError: a malformed entry, a repeated name, a weight that is not a positive number, or
      weights for some members only or for members the mixture lacks.
  """
  dirs = _pairs(mixture, "mixture")
  names = [name for name, _ in dirs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"config.data.mixture names {repeated} more than once")
  given = dict(_pairs(weights, "mixture_weights")) if weights.strip() else {}
  if given and set(given) != set(names):
    raise ValueError(f"config.data.mixture_weights gives {sorted(given)}; give every member of "
                     f"the mixture {names} a weight, or none")
  parsed = {}
  for name, value in given.items():
    try:
      parsed[name] = float(value)
    except ValueError:
      parsed[name] = float("nan")
    if not parsed[name] > 0:
      raise ValueError(f"config.data.mixture_weights: {name}={value!r} is not a positive number")
  return [Member(name, path, parsed.get(name)) for name, path in dirs]


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
  union: list[str] = []
  for names in lists:
    union += [n for n in names if n not in union]
  return union


def _shared(manifests: Sequence[Mapping[str, Any]], key: str) -> list[str]:
  """A vocabulary kept only when every member has the same one (records must agree on it)."""
  values = [list(m.get(key) or []) for m in manifests]
  return values[0] if all(v == values[0] for v in values) else []


def _split(members: Sequence[Member], manifests: Sequence[Mapping[str, Any]], split: str,
           union: Sequence[str]) -> dict[str, Any]:
  """One split of the mixture: the members' shards (absolute paths) and union label counts."""
  entries = [m["splits"][split] for m in manifests]
  out: dict[str, Any] = dict(
      num_records=sum(e["num_records"] for e in entries),
      num_boxes=sum(e.get("num_boxes", 0) for e in entries),
      shards=[dict(shard, file=os.path.join(os.path.abspath(member.dir), shard["file"]))
              for member, e in zip(members, entries) for shard in e["shards"]])
  if all("label_counts" in e for e in entries):
    counts = {kind: np.zeros(len(union), np.int64) for kind in ("positive", "negative", "uncertain")}
    counts["unknown"] = np.zeros(len(union), np.int64)
    for manifest, e in zip(manifests, entries):
      where = positions(union, manifest["label_names"])
      absent = np.ones(len(union), bool)
      absent[where] = False
      for kind in counts:
        counts[kind][where] += np.asarray(e["label_counts"][kind], np.int64)
      counts["unknown"][absent] += e["num_records"]
    out["label_counts"] = {kind: c.tolist() for kind, c in counts.items()}
  return out


def positions(union: Sequence[str], names: Sequence[str]) -> list[int]:
  """Where each of a member's label names sits in the mixture's label names."""
  return [list(union).index(n) for n in names]


def combine(members: Sequence[Member], manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The mixture's manifest: union labels, shared vocabularies, the splits every member has, and
  `members` (name, dir, weight, label names, split names, boxes per split)."""
  union = _union([m["label_names"] for m in manifests])
  common_splits = set.intersection(*(set(m["splits"]) for m in manifests))
  return dict(
      name="mixture(" + "+".join(member.name for member in members) + ")",
      label_names=union,
      fine_label_names=_shared(manifests, "fine_label_names"),
      anatomy_names=_shared(manifests, "anatomy_names"),
      members=[dict(name=member.name, dir=os.path.abspath(member.dir), weight=member.weight,
                    label_names=list(m["label_names"]), splits=sorted(m["splits"]),
                    num_boxes={split: e.get("num_boxes", 0) for split, e in m["splits"].items()})
               for member, m in zip(members, manifests)],
      splits={split: _split(members, manifests, split, union)
              for split in sorted(common_splits)})


def load(members: Sequence[Member]) -> dict[str, Any]:
  """Reads every member's manifest and combines them (`combine`)."""
  return combine(members, [writer.load_manifest(member.dir) for member in members])


def quotas(sizes: Sequence[int], weights: Sequence[float | None]) -> np.ndarray:
  """Records each member gives an epoch of sum(sizes) records: its size without weights, else
  its weight's share rounded by largest remainders (so the quotas add up to the epoch)."""
  sizes = np.asarray(sizes, np.int64)
  if all(w is None for w in weights):
    return sizes
  share = np.asarray(weights, np.float64) / np.sum(weights) * sizes.sum()
  counts = np.floor(share).astype(np.int64)
  order = np.argsort(-(share - counts), kind="stable")
  counts[order[:sizes.sum() - counts.sum()]] += 1
  return counts


def epoch_order(sizes: Sequence[int], counts: Sequence[int], seed: int, epoch: int,
                order_stream: int, member_stream: int) -> np.ndarray:
  """The records of one training epoch (indices into the members' records concatenated), shuffled.

  Member d's records for epoch e are positions [e * c_d, (e + 1) * c_d) of its endless stream of
  permutations `default_rng([seed, member_stream, d, cycle]).permutation(n_d)`; the epoch's list
  is then shuffled by `default_rng([seed, order_stream, e])`.
  """
  starts = np.cumsum([0] + list(sizes[:-1]))
  picked = []
  for d, (size, count, start) in enumerate(zip(sizes, counts, starts)):
    first, last = epoch * count, (epoch + 1) * count
    cycles = range(first // size, -(-last // size))
    stream = np.concatenate([np.random.default_rng([seed, member_stream, d, c]).permutation(size)
                             for c in cycles]) if count else np.zeros(0, np.int64)
    offset = cycles.start * size if count else 0
    picked.append(start + stream[first - offset:last - offset])
  together = np.concatenate(picked)
  return together[np.random.default_rng([seed, order_stream, epoch]).permutation(len(together))]


class MixtureSource:
  """The records of one split of several members, one after the other, each knowing its member.

  `source[i]` is a payload as from `records.RecordSource`; `member_of(i)` is the index (in the
  mixture's `members`) of the dataset record i came from.
  """

  def __init__(self, sources: Sequence[records.RecordSource], member_ids: Sequence[int]):
    self.sources, self.member_ids = list(sources), list(member_ids)
    self.sizes = [len(s) for s in self.sources]
    self._starts = np.cumsum([0] + self.sizes)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> bytes:
    k, local = records.locate(self._starts, index)
    return self.sources[k][local]

  def describe(self, index: int) -> str:
    """Where record `index` is: its member's shard and position."""
    k, local = records.locate(self._starts, index)
    return self.sources[k].describe(local)

  def member_of(self, index: int) -> int:
    """The member record `index` belongs to."""
    return self.member_ids[records.locate(self._starts, index)[0]]

  def __repr__(self) -> str:
    return f"MixtureSource({self.sizes} records of members {self.member_ids})"


def split_source(members: Sequence[Member], split: str, *, verify_crc: bool = True,
                 member: str | None = None) -> MixtureSource:
  """The records of `split` of every member (or of the one named `member`) of a mixture."""
  names = [m.name for m in members]
  if member is not None and member not in names:
    raise KeyError(f"the mixture has no member {member!r}; it has {names}")
  chosen = [i for i, name in enumerate(names) if member in (None, name)]
  return MixtureSource([records.split_source(members[i].dir, split, verify_crc=verify_crc)
                        for i in chosen], chosen)
