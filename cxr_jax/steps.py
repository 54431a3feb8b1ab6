"""The train state, its sharded initialisation, the jitted train and eval steps, and the eval loop.

Nothing here knows a method by name: a method module supplies `build`, `loss` and `INPUTS`
(see `cxr_jax.methods`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxr_jax import layers, parallel
from cxr_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def model_images(batch: Mapping[str, jax.Array], config: Mapping[str, Any]) -> jax.Array:
  """uint8 batch images -> normalised model input in the compute dtype (runs on the device)."""
  preset = layers.PRESETS[config["model"]["normalization"]]
  return layers.normalize_images(batch["image"], mean=preset["mean"], std=preset["std"],
                                 channels=config["model"]["channels"],
                                 dtype=jnp.dtype(config["dtype"]))


def _method_inputs(method: ModuleType, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in method.INPUTS}


def init_variables(model: nn.Module, config: Mapping[str, Any], rng: jax.Array,
                   example_batch: Mapping[str, Any], method: ModuleType) -> dict[str, Any]:
  """Initial `params` and `batch_stats` of a model for a batch like `example_batch`."""
  images = model_images(example_batch, config)
  variables = model.init({"params": rng, "dropout": rng}, images, train=False,
                         **_method_inputs(method, example_batch))
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _state_initializer(model, tx, config, example_batch, method):
  def init(rng, variables):
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
      variables = init_variables(model, config, init_rng, example_batch, method)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                      rng=state_rng)
  return init


def create_state(model: nn.Module, tx: optax.GradientTransformation, config: Mapping[str, Any],
                 mesh: jax.sharding.Mesh, example_batch: Mapping[str, Any],
                 method: ModuleType, variables: Mapping[str, Any] | None = None) -> TrainState:
  """A fresh train state, born replicated on the mesh (from `variables` when given)."""
  init = _state_initializer(model, tx, config, example_batch, method)
  # `variables` is an argument, not a closure: imported weights must not become jit constants.
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
      jax.random.PRNGKey(config["seed"]), variables)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, config: Mapping[str, Any],
                   mesh: jax.sharding.Mesh, example_batch: Mapping[str, Any],
                   method: ModuleType) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, without computing it: a restore target."""
  init = _state_initializer(model, tx, config, example_batch, method)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(config["seed"]), None)
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, method: ModuleType,
                    config: Mapping[str, Any], mesh: jax.sharding.Mesh):
  """`train_step(state, batch) -> (state, metrics)`, jitted with donated state."""

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    images = model_images(batch, config)

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng}, **_method_inputs(method, batch))
      loss, metrics = method.loss(outputs, batch, config)
      return loss, (metrics, updates.get("batch_stats", state.batch_stats))

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, method: ModuleType, config: Mapping[str, Any],
                   mesh: jax.sharding.Mesh):
  """`eval_step(state, batch)` in inference mode: probabilities, the batch's labels, mask and
  example index (sharded alike, so they gather in the same order), and the loss sum and weight."""

  def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
    outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          model_images(batch, config), train=False,
                          **_method_inputs(method, batch))
    loss, _ = method.loss(outputs, batch, config)
    weight = jnp.sum(batch["label_mask"] * batch["valid"][:, None])
    return dict(probs=jax.nn.sigmoid(outputs["logits"]), labels=batch["labels"],
                label_mask=batch["label_mask"], index=batch["index"],
                loss_sum=loss * weight, loss_weight=weight)

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  out_shardings = dict(probs=sharded, labels=sharded, label_mask=sharded, index=sharded,
                       loss_sum=replicated, loss_weight=replicated)
  return jax.jit(eval_step, in_shardings=(replicated, sharded), out_shardings=out_shardings)


def predict(eval_step, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]],
            mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Runs `eval_step` over padded eval batches; returns every valid example once, in index order.

  Keys: probs, labels, label_mask (N, K), index (N,), loss (mean over the mask).
  """
  collected, loss_sum, loss_weight = [], 0.0, 0.0
  for batch in batches:
    device_batch, _ = pipeline.host_fields(batch)
    out = parallel.gather(eval_step(state, parallel.to_global(device_batch, mesh)))
    loss_sum += float(out.pop("loss_sum"))
    loss_weight += float(out.pop("loss_weight"))
    collected.append(out)
  merged = {k: np.concatenate([c[k] for c in collected]) for k in collected[0]}
  keep = merged["index"] >= 0
  order = np.argsort(merged["index"][keep], kind="stable")
  result = {k: v[keep][order] for k, v in merged.items()}
  result["loss"] = loss_sum / max(loss_weight, 1.0)
  return result

