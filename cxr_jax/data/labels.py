"""Label vocabularies, aliases, location-aware (fine) labels and uncertainty policies.

Label values in records: 1 positive, 0 negative, -1 uncertain, NaN unknown. Before the loss every
label becomes a (target, mask) pair: NaN is always masked out; -1 follows the label's policy:
  ignore: masked out (CheXpert U-Ignore), zeros: target 0 (U-Zeros), ones: target 1 (U-Ones),
  zeros_lsr / ones_lsr: a soft target drawn uniformly, per example and label, from an interval
  (U-Zeros-LSR, U-Ones-LSR of Pham et al. 2021: [0, 0.3] and [0.55, 0.85] by default,
  `config.data.lsr_zeros` and `lsr_ones`); without a random generator (evaluation) the
  interval's midpoint.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# NIH ChestX-ray14 in the order used by CheXNet reimplementations and HAM (the output head order).
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
# The 8 classes with boxes in NIH's BBox_List_2017.csv: the classes localization is reported on.
NIH_BOX_LABELS = NIH_LABELS[:8]
NO_FINDING = "No Finding"
# CheXpert's 14 observations in its CSVs' column order (also MIMIC-CXR-JPG's chexpert and negbio
# label files), in the project's spelling: "Pleural Effusion" is "Effusion" (ALIASES).
CHEXPERT_LABELS = (
    NO_FINDING, "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# The CheXpert competition's 5 evaluated observations, in its order.
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion")
# Spellings found in the official files and peers, mapped to the project's names.
ALIASES = {"Infiltrate": "Infiltration", "Pleural Effusion": "Effusion",
           "Pleural Thickening": "Pleural_Thickening"}

# One vocabulary for every dataset's anatomy label maps: each dataset's `anatomy_names` are a
# subset of it, "background" first (the phantom's 7 regions; the SCR organs of JSRT).
ANATOMY_VOCABULARY = ("background", "body", "right_lung", "left_lung", "heart", "mediastinum",
                      "abdomen", "right_clavicle", "left_clavicle")

SIDES = ("right", "left")  # the patient's side (shown on the viewer's left and right in a PA film)
ZONES = ("upper", "middle", "lower")
POLICIES = ("ignore", "zeros", "ones", "zeros_lsr", "ones_lsr")
LSR_POLICIES = {"zeros_lsr": "zeros", "ones_lsr": "ones"}  # each smoothed policy's hard one
DEFAULT_LSR = {"zeros_lsr": (0.0, 0.3), "ones_lsr": (0.55, 0.85)}


def canonical(name: str) -> str:
  """The project's spelling of a label name."""
  name = name.strip()
  return ALIASES.get(name, name)


def fine_label(finding: str, side: str, zone: str) -> str:
  """A location-aware label name, e.g. `Nodule|left|lower`."""
  if side not in SIDES or zone not in ZONES:
    raise ValueError(f"bad location {side!r}/{zone!r}: side in {SIDES}, zone in {ZONES}")
  return f"{canonical(finding)}|{side}|{zone}"


def fine_vocabulary(findings: Sequence[str] = NIH_LABELS) -> tuple[str, ...]:
  """Every `Finding|side|zone` combination, finding-major."""
  return tuple(fine_label(f, s, z) for f in findings for s in SIDES for z in ZONES)


def mirror_permutation(names: Sequence[str]) -> np.ndarray:
  """Index permutation that swaps patient left and right in a list of names (for flips).

  A name containing `left` maps to the same name with `right`, and vice versa; others map to
  themselves. Works for fine labels (`Nodule|left|lower`) and anatomy names (`left_lung`).
  """
  index = {n: i for i, n in enumerate(names)}

  def mirror(name):
    parts = name.replace("left", "\0").replace("right", "left").replace("\0", "right")
    if parts not in index:
      raise ValueError(f"{name!r} has no mirrored counterpart {parts!r} in the vocabulary")
    return index[parts]

  return np.array([mirror(n) for n in names], np.int64)


def parse_policy_overrides(text: str) -> dict[str, str]:
  """Parses `"Edema=ones,Atelectasis=ones"` into {label: policy}."""
  overrides = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, policy = item.partition("=")
    if not sep or policy.strip() not in POLICIES:
      raise ValueError(f"{item!r} is not LABEL=POLICY with POLICY in {POLICIES}")
    overrides[canonical(name)] = policy.strip()
  return overrides


def resolve_policies(label_names: Sequence[str], default: str = "ignore",
                     per_label: Mapping[str, str] | None = None) -> np.ndarray:
  """Per-label uncertainty policy codes (index into POLICIES), checked by name."""
  per_label = dict(per_label or {})
  unknown = sorted(set(per_label) - set(label_names))
  if unknown:
    raise ValueError(f"uncertainty policy for unknown labels {unknown}; labels are {list(label_names)}")
  codes = []
  for name in label_names:
    policy = per_label.get(name, default)
    if policy not in POLICIES:
      raise ValueError(f"uncertainty policy {policy!r} for {name!r}: choose from {POLICIES}")
    codes.append(POLICIES.index(policy))
  return np.array(codes, np.int64)


def hard_codes(policy_codes: np.ndarray) -> np.ndarray:
  """The codes with each smoothed policy replaced by its hard one (ones_lsr -> ones), for what
  only asks positive or negative, such as class counts."""
  codes = np.asarray(policy_codes).copy()
  for soft, hard in LSR_POLICIES.items():
    codes[codes == POLICIES.index(soft)] = POLICIES.index(hard)
  return codes


def apply_policy(labels: np.ndarray, policy_codes: np.ndarray,
                 lsr: Mapping[str, tuple[float, float]] | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Maps raw labels (1/0/-1/NaN) to (targets in [0, 1], mask in {0, 1}), both float32.

  `lsr` maps zeros_lsr and ones_lsr to their (low, high) intervals (default DEFAULT_LSR); `rng`
  draws their targets, or without it they take the midpoint.
  """
  labels = np.asarray(labels, np.float32)
  policy_codes = np.asarray(policy_codes)
  uncertain = labels == -1
  known = ~np.isnan(labels)
  targets = np.where(known & ~uncertain, labels, 0.0)
  targets = np.where(uncertain & (policy_codes == POLICIES.index("ones")), 1.0, targets)
  for name, (low, high) in {**DEFAULT_LSR, **(lsr or {})}.items():
    smoothed = uncertain & (policy_codes == POLICIES.index(name))
    if smoothed.any():
      drawn = rng.uniform(low, high, labels.shape) if rng is not None else (low + high) / 2
      targets = np.where(smoothed, drawn, targets)
  mask = known & ~(uncertain & (policy_codes == POLICIES.index("ignore")))
  return targets.astype(np.float32), mask.astype(np.float32)
