"""Evaluation metrics computed on the host with numpy.

Modules (import the one you need; nothing is re-exported here):
  classification: exact ROC AUC and AUPRC per class, their mean, the JSON report and its table.
  bootstrap: the exact tie-aware AUC engine and the patient-level bootstrap of AUC intervals.
  streaming: the protocol the streaming evaluators share (update / result / scalars).
  localization: weakly-supervised localization from CAMs by HAM's and Wang et al.'s protocols.
  location_aware: side and zone accuracy of location-aware `Finding|side|zone` labels.
"""
