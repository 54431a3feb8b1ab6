"""Evaluation metrics computed on the host with numpy.

Modules (import the one you need; nothing is re-exported here):
  classification: exact ROC AUC and AUPRC per class, their mean, the JSON report and its table.
  bootstrap: the exact tie-aware AUC engine and the patient-level bootstrap of AUC intervals.
"""
