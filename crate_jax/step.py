"""The train state (born sharded), masking noise, and the jitted train and eval steps."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from crate_jax import sharding

# Separate RNG streams derived from config.seed.
PARAMS_STREAM, MASK_STREAM, EVAL_MASK_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed updates
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)  # other collections, e.g. batch_stats


def image_init(model):
    """key -> the model's boxed variables, from one dummy image of the model's size."""

    def init(key):
        return model.init(key, jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32))

    return init


def abstract_state_from(
    init_variables, tx_factory, mesh: Mesh, rules, update_axes: tuple[str, ...] = ()
) -> tuple[TrainState, TrainState, Any]:
    """(abstract state, its shardings, the optimizer), all without allocating anything.

    `init_variables(key)` returns flax variables whose params carry logical axis names.
    Parameter shardings come from those names and the rules; the optimizer's moments take
    the shardings of the parameters they mirror, further split over the mesh axes
    `update_axes` (`config.mesh.update_sharding`; `sharding.update_shardings`), where the
    returned optimizer also runs its update; other collections are replicated unless they
    carry names too."""
    key = jax.random.key(0)  # concrete values before entering the mesh (topology meshes have no devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_variables, key)
    boxed = dict(boxed)
    boxed_params = boxed.pop("params")
    param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
    rest_shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = nn.unbox(boxed_params)
    tx = tx_factory(params)
    moment_shardings = sharding.update_shardings(params, param_shardings, mesh, update_axes)
    if moment_shardings != param_shardings:
        tx = sharding.sharded_updates(tx, moment_shardings)
    opt_state = jax.eval_shape(tx.init, params)
    repl = sharding.replicated(mesh)
    # Parameter-shaped leaves take their moment sharding; `MaskedNode`s (the parameters an
    # `optax.multi_transform` / `masked` branch keeps no state for) stay empty.
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s,
        opt_state,
        moment_shardings,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=scalar, params=params, opt_state=opt_state, model_state=nn.unbox(boxed))
    shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, model_state=rest_shardings)
    return state, shardings, tx


def abstract_state(model, tx_factory, mesh: Mesh, rules, update_axes=()) -> tuple[TrainState, TrainState, Any]:
    """`abstract_state_from` for a model that takes images."""
    return abstract_state_from(image_init(model), tx_factory, mesh, rules, update_axes)


def init_state_from(init_variables, tx, seed: int, shardings: TrainState, mesh: Mesh, rules, params=None):
    """A fresh state created directly on its shardings (`jax.jit(init, out_shardings=...)`).

    Given `params` (e.g. from `init_from`), they replace the initialised ones."""

    def init(key, params):
        variables = dict(nn.unbox(init_variables(key)))
        fresh = variables.pop("params")
        params = fresh if params is None else params
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=variables
        )

    key = jax.random.fold_in(jax.random.key(seed), PARAMS_STREAM)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if params is None:
            return jax.jit(lambda k: init(k, None), out_shardings=shardings)(key)
        params = jax.device_put(params, shardings.params)
        return jax.jit(init, out_shardings=shardings, donate_argnums=(1,))(key, params)


def init_state(model, tx, seed: int, shardings: TrainState, mesh: Mesh, rules, params=None) -> TrainState:
    """`init_state_from` for a model that takes images."""
    return init_state_from(image_init(model), tx, seed, shardings, mesh, rules, params)


def masking_noise(seed: int, stream: int, step: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
    """The MAE masking noise a run uses: (batch_size, num_patches) float32 in [0, 1).

    Public API, for step-level comparisons with other trainers: the pretraining step of
    update `step` (0-based: the number of updates done before it) masks row i of its global
    batch with `masking_noise(config.seed, MASK_STREAM, step, config.batch_size, L)[i]`
    (MAE's `random_masking`: keep the patches of the smallest noise), and evaluations use
    `EVAL_MASK_STREAM` at step 0. Row i depends only on (seed, stream, step, i): not on the
    mesh, the process count, the micro-batch split (with gradient accumulation, micro-batch
    k holds rows k, k + A, k + 2A, ... with their own rows of noise) or the batch size."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))
    return jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(keys)


def _loss_sum(model, params, images, noise, weight):
    out = model.apply({"params": params}, images, noise=noise, example_weight=weight)
    return out.loss * out.loss_weight, out.loss_weight


def make_train_step(model, tx, schedule, *, seed: int, batch_size: int, grad_accum_steps: int):
    """step(state, batch) -> (state, metrics): one optimizer update on the global batch.

    With grad_accum_steps > 1 the batch is split into strided micro-batches (each device
    keeps its share of every micro-batch) and the summed gradient gives the same update
    as one large batch."""
    grad_fn = jax.value_and_grad(lambda p, x, n, w: _loss_sum(model, p, x, n, w), has_aux=True)

    def split(x):
        return x.reshape(batch_size // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        images, weight = batch["image"], batch["weight"]
        noise = masking_noise(seed, MASK_STREAM, state.step, batch_size, model.num_patches)
        noise = jax.lax.with_sharding_constraint(noise, P(sharding.BATCH_AXES))
        if grad_accum_steps == 1:
            (loss_sum, denom), grads = grad_fn(state.params, images, noise, weight)
        else:

            def micro(carry, xs):
                grad_acc, loss_acc, denom_acc = carry
                (loss, denom), grad = grad_fn(state.params, *xs)
                return (jax.tree.map(jnp.add, grad_acc, grad), loss_acc + loss, denom_acc + denom), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, denom), _ = jax.lax.scan(micro, init, (split(images), split(noise), split(weight)))
        denom = jnp.maximum(denom, 1e-12)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "skipped_examples": jnp.sum(weight == 0),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def jit_train_step(fn, shardings: TrainState, mesh: Mesh):
    """`fn(state, batch) -> (state, metrics)` jitted as the trainer runs it: the state in and
    out with its shardings and donated (updated in place), the batch split over the mesh's batch
    axes, the metrics replicated."""
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in ("image", "label", "weight")}
    return jax.jit(
        fn,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(model, *, seed: int, batch_size: int):
    """(params, batch) -> (loss sum, weight): masks fixed across evaluations."""

    def step(params, batch):
        noise = masking_noise(seed, EVAL_MASK_STREAM, jnp.zeros((), jnp.int32), batch_size, model.num_patches)
        return _loss_sum(model, params, batch["image"], noise, batch["weight"])

    return step


def make_reconstruct(model, *, seed: int, num_images: int):
    """(params, images) -> (pred, mask) for the first `num_images` of a batch."""

    def reconstruct(params, images):
        images = images[:num_images]
        noise = masking_noise(seed, EVAL_MASK_STREAM, jnp.zeros((), jnp.int32), num_images, model.num_patches)
        out = model.apply({"params": params}, images, noise=noise)
        return out.pred, out.mask

    return reconstruct
