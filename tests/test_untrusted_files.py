"""Files made by others are read without running code in them: `.pth` weights through
`torch.load(weights_only=True)`, `.npz` weights and cached shard indexes through numpy without
unpickling."""

import os
import pickle

import numpy as np
import pytest
import torch

import datasets
from cxr_jax.data import records, writer
from cxr_jax.interop import convert


class _Payload:
  """Unpickling this runs `os.system`-like code: here, it writes a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_a_pth_with_code_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "weights.pth"
  with open(path, "wb") as f:
    pickle.dump({"conv.weight": torch.zeros(2), "evil": _Payload(str(marker))}, f)
  with pytest.raises(ValueError, match=r"weights\.pth: refused by torch.load\(weights_only=True\)"):
    convert.load_state_dict_file(path)
  assert not marker.exists()
  torch.save({"conv.weight": torch.ones(2)}, tmp_path / "plain.pth")
  np.testing.assert_array_equal(convert.load_state_dict_file(tmp_path / "plain.pth")["conv.weight"],
                                np.ones(2, np.float32))


def test_an_npz_with_objects_is_refused(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, w=np.array([_Payload(str(tmp_path / "ran"))], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    convert.load_state_dict_file(path)
  assert not (tmp_path / "ran").exists()


def test_a_shard_index_holding_objects_is_rebuilt_not_unpickled(tmp_path):
  data = datasets.write(tmp_path / "ds", {"train": 6})
  shard = os.path.join(data, writer.load_manifest(data)["splits"]["train"]["shards"][0]["file"])
  good = records.load_index(shard)
  np.save(shard + records.INDEX_SUFFIX, np.array([_Payload(str(tmp_path / "ran"))], dtype=object),
          allow_pickle=True)
  np.testing.assert_array_equal(records.load_index(shard), good)
  assert not (tmp_path / "ran").exists()
  np.testing.assert_array_equal(np.load(shard + records.INDEX_SUFFIX), good)  # rewritten
