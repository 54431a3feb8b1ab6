"""Datasets a config can build on first use: `config.data.prepare = "data_prep.prepared:phantom_dataset"`.

The trainer calls the function with `config.data.dir` and `config.data.prepare_args` when that
folder holds no prepared dataset, on process 0 only.
"""

from __future__ import annotations

import os

from absl import logging

from data_prep import nih, phantom


def phantom_dataset(data_dir: str, *, num_patients: int, image_size: int, seed: int = 0,
                    val_fraction: float = 0.1) -> None:
  """Renders the phantom in NIH layout next to `data_dir`, then converts it into `data_dir`.

  The NIH-layout folder (`<data_dir>-nih`) is kept: it holds the original PNGs that the exported
  PyTorch model can be run on.
  """
  raw = f"{data_dir}-nih"
  workers = os.cpu_count() or 1
  if not os.path.isdir(raw):  # generate() renames a complete folder into place, never a partial one
    logging.info("rendering %d phantom patients at %d px into %s", num_patients, image_size, raw)
    phantom.generate(raw, num_patients, image_size, seed, workers=workers, overwrite=True)
  nih.convert(raw, data_dir, image_size=image_size, val_fraction=val_fraction, seed=seed,
              workers=workers, overwrite=True)
