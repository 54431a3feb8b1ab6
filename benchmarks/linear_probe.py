"""How hard is a dataset? A logistic regression on 32x32 downsampled pixels, per label.

  python benchmarks/linear_probe.py --data_dir ~/.cache/cxr_jax/phantom-v1.0-f2-2000patients-128px-seed0

Fits one L2-regularised logistic regression per label on the train split's pixels (area-resized
to --size, standardised), picks the regularisation on the val split by mean AUC, and prints the
test split's per-class AUC table, so it can be set beside a CNN's (`python -m cxr_jax.evaluate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cxr_jax import losses
from cxr_jax.metrics import classification
from cxr_jax.data import augment, labels, records, tfrecord, writer

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset folder.", required=True)
_SIZE = flags.DEFINE_integer("size", 32, "Side of the downsampled images.")
_L2 = flags.DEFINE_list("l2", ["1e-4", "1e-3", "1e-2", "1e-1"], "L2 strengths tried on val.")
_ITERATIONS = flags.DEFINE_integer("iterations", 300, "L-BFGS iterations per fit.")


def load(data_dir: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pixels (N, size*size) float32, targets (N, K), mask (N, K)) of a split, no augmentation."""
  source = records.split_source(data_dir, split)
  num_labels = len(writer.load_manifest(data_dir)["label_names"])
  codes = np.full(num_labels, labels.POLICIES.index("ignore"))
  pixels, targets, masks = [], [], []
  for i in range(len(source)):
    ex = tfrecord.parse(source[i])
    pixels.append(augment.resize(augment.decode_png(ex.image), size).reshape(-1))
    target, mask = labels.apply_policy(ex.labels, codes)
    targets.append(target)
    masks.append(mask)
  return np.asarray(pixels, np.float32) / 255, np.asarray(targets), np.asarray(masks)


def fit(x: np.ndarray, y: np.ndarray, mask: np.ndarray, l2: float, iterations: int):
  """Weights (D + 1, K) of K independent logistic regressions, fitted jointly with L-BFGS."""
  x1 = jnp.concatenate([x, jnp.ones((len(x), 1))], axis=1)

  def loss(w):
    return losses.bce(x1 @ w, y, mask) + l2 * jnp.sum(w[:-1] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(w, state):
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(w, updates), state

  w = jnp.zeros((x1.shape[1], y.shape[1]))
  state = solver.init(w)
  for _ in range(iterations):
    w, state = step(w, state)
  return np.asarray(w)


def scores(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Logits of the fitted regressions."""
  return np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1) @ w


def main(argv):
  del argv
  label_names = writer.load_manifest(_DATA_DIR.value)["label_names"]
  train, val, test = (load(_DATA_DIR.value, split, _SIZE.value) for split in ("train", "val", "test"))
  mean, std = train[0].mean(axis=0), train[0].std(axis=0) + 1e-6
  standardise = lambda x: (x - mean) / std  # noqa: E731
  best = None
  for l2 in map(float, _L2.value):
    w = fit(standardise(train[0]), train[1], train[2], l2, _ITERATIONS.value)
    val_scores = scores(w, standardise(val[0]))
    val_auc, _ = classification.mean_auc(classification.per_class_auc(val_scores, val[1], val[2]))
    print(f"l2={l2:g}: val mean AUC {val_auc:.3f}")
    if best is None or val_auc > best[0]:
      best = (val_auc, l2, w)
  _, l2, w = best
  report = classification.evaluate_predictions(scores(w, standardise(test[0])), test[1],
                                               test[2], label_names, n_boot=0)
  print(f"logistic regression on {_SIZE.value}x{_SIZE.value} pixels, l2={l2:g}, test split:")
  print(classification.format_table(report))


if __name__ == "__main__":
  app.run(main)
