"""The train state, its sharded initialisation, and the jitted train and eval steps.

Nothing here knows a method by name: a `cxr_jax.methods.Method` supplies the model, its loss,
its inputs and its score function.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cxr_jax import layers, methods, parallel


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


def _method_inputs(method: methods.Method, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in method.inputs}


def init_variables(model: nn.Module, config: Mapping[str, Any], rng: jax.Array,
                   example_batch: Mapping[str, Any], method: methods.Method) -> dict[str, Any]:
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
                 method: methods.Method, variables: Mapping[str, Any] | None = None) -> TrainState:
  """A fresh train state, born replicated on the mesh (from `variables` when given)."""
  init = _state_initializer(model, tx, config, example_batch, method)
  # `variables` is an argument, not a closure: imported weights must not become jit constants.
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
      jax.random.PRNGKey(config["seed"]), variables)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, config: Mapping[str, Any],
                   mesh: jax.sharding.Mesh, example_batch: Mapping[str, Any],
                   method: methods.Method) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, without computing it: a restore target."""
  init = _state_initializer(model, tx, config, example_batch, method)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(config["seed"]), None)
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every floating leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, method: methods.Method,
                    task: methods.Task, config: Mapping[str, Any], mesh: jax.sharding.Mesh):
  """`train_step(state, batch) -> (state, metrics)`, jitted with donated state.

  Metrics: `loss`, each named term of the method's loss, `grad_norm`, and `state_finite` (1 when
  the loss and every parameter and statistic after the update are finite), which the trainer
  checks before it saves: a finite loss can still come with an update that breaks the weights.
  """

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    images = model_images(batch, config)
    weight = jnp.ones(images.shape[:1], jnp.float32)

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng}, **_method_inputs(method, batch))
      loss, terms = method.loss(outputs, batch, task=task, config=config, weight=weight)
      return loss, (terms, updates.get("batch_stats", state.batch_stats))

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & all_finite((params, batch_stats))
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                   state_finite=finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# Batch fields the eval step hands back beside the scores, for the evaluators.
PASSTHROUGH = ("labels", "label_mask", "fine_labels", "fine_label_mask", "boxes", "box_labels",
               "anatomy", "valid", "index", "bad_records")


def apply_model(model: nn.Module, method: methods.Method, config: Mapping[str, Any],
                variables: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, Any]:
  """The model's outputs for a batch in inference mode."""
  return model.apply(variables, model_images(batch, config), train=False,
                     **_method_inputs(method, batch))


def make_eval_step(model: nn.Module, method: methods.Method, task: methods.Task,
                   config: Mapping[str, Any], mesh: jax.sharding.Mesh, *, with_cams: bool = False):
  """`eval_step(state, batch) -> (per_example, totals)` in inference mode.

  per_example (sharded like the batch, so it gathers in the same order): `scores` (B, K) from the
  method's score function, `cams` (B, h, w, K) when `with_cams`, and the batch's label, box,
  validity and index fields. totals (replicated): `weight` (valid examples), and `loss` and each
  named loss term multiplied by it, so that sums over batches divided by the summed weight are
  the split's weighted means.
  """

  def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
    outputs = apply_model(model, method, config,
                          {"params": state.params, "batch_stats": state.batch_stats}, batch)
    weight = batch["valid"]
    loss, terms = method.loss(outputs, batch, task=task, config=config, weight=weight)
    total = jnp.sum(weight)
    totals = {name: value * total for name, value in dict(terms, loss=loss).items()}
    per_example = {k: batch[k] for k in PASSTHROUGH if k in batch}
    per_example["scores"] = method.score(outputs["logits"])
    if with_cams:
      per_example["cams"] = outputs["cams"]
    return per_example, dict(totals, weight=total)

  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, sharded),
                 out_shardings=(sharded, replicated))
