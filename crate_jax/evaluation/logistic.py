"""The CRATE-MAE paper's linear probe: full-batch multinomial logistic regression on frozen
features, the L2 strength chosen on a held-out part of the training split.

  1. features of the training and eval splits, once (features.py), evaluation transform;
  2. standardised with the mean and std of the rows being fitted;
  3. for every L2 strength in config.logistic.l2_grid, fit on (1 - holdout_fraction) of the
     training rows and score the held-out rest (all strengths at once: the fit is vmapped);
  4. refit on the whole training split with the best strength (ties: the strongest), score
     the eval split.

Objective: mean cross-entropy + l2 / 2 x |W|^2 (bias not penalised), minimised by L-BFGS
(optax.lbfgs with its zoom line search) from zero until the gradient norm is below `tol` or
`max_iters` steps. Writes WORKDIR/linear_probe_logistic.json and `eval_accuracy` etc. to
WORKDIR/metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from etils import epath

from crate_jax import watchdog
from crate_jax.evaluation import backbone, features
from crate_jax.metrics import MetricsLog


def _objective(params, x_NxD, y_N, l2, num_classes: int):
    logits = x_NxD @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy(logits, jax.nn.one_hot(y_N, num_classes)).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def fit(x_NxD, y_N, l2, *, num_classes: int, max_iters: int = 1000, tol: float = 1e-6) -> dict[str, jax.Array]:
    """{"w": (D, C), "b": (C,), "iters", "grad_norm"}; `l2` may be a vector (one fit each)."""

    def one(l2_value):
        fun = functools.partial(_objective, x_NxD=x_NxD, y_N=y_N, l2=l2_value, num_classes=num_classes)
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(fun)

        def step(carry):
            params, state = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(params, updates), state

        def going(carry):
            _, state = carry
            count = otu.tree_get(state, "count")
            return (count == 0) | ((count < max_iters) & (otu.tree_norm(otu.tree_get(state, "grad")) >= tol))

        d = x_NxD.shape[1]
        init = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
        params, state = jax.lax.while_loop(going, step, (init, opt.init(init)))
        return dict(params, iters=otu.tree_get(state, "count"), grad_norm=otu.tree_norm(otu.tree_get(state, "grad")))

    l2 = jnp.asarray(l2, jnp.float32)
    return jax.vmap(one)(l2) if l2.ndim else one(l2)


def predict(params, x_NxD) -> np.ndarray:
    """Class indices; `params` of one fit, or of several (a leading axis): (fits, N)."""
    logits = jnp.einsum("nd,...dc->...nc", x_NxD, params["w"]) + params["b"][..., None, :]
    return np.asarray(jnp.argmax(logits, axis=-1))


def standardise(fit_rows: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array shifted and scaled by the mean and std of `fit_rows` (std 0 -> 1)."""
    mean, std = fit_rows.mean(axis=0), fit_rows.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (fit_rows, *others)]


def select_and_fit(
    train_x, train_y, eval_x, eval_y, *, num_classes: int, l2_grid, holdout_fraction: float, seed: int,
    max_iters: int, tol: float,
) -> dict:  # fmt: skip
    """Steps 2-4 of the module docstring; returns the accuracies and the chosen strength."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"config.logistic.holdout_fraction={holdout_fraction} must be in (0, 1)")
    grid = np.asarray(sorted(l2_grid, reverse=True), np.float32)  # strongest first: ties keep it
    if grid.size == 0 or np.any(grid < 0):
        raise ValueError(f"config.logistic.l2_grid={list(l2_grid)} must be non-empty and non-negative")
    order = np.random.default_rng(seed).permutation(len(train_x))
    held = int(round(len(train_x) * holdout_fraction))
    if held < 1 or held >= len(train_x):
        raise ValueError(f"holdout_fraction={holdout_fraction} of {len(train_x)} rows leaves an empty part")
    fit_idx, held_idx = order[held:], order[:held]
    x_fit, x_held = standardise(train_x[fit_idx], train_x[held_idx])
    kw = dict(num_classes=num_classes, max_iters=max_iters, tol=tol)
    watchdog.beat(f"fitting the logistic probe: {grid.size} L2 strengths")
    sweep = fit(x_fit, train_y[fit_idx], grid, **kw)
    watchdog.beat("fitting the logistic probe: the chosen L2 strength")
    held_acc = (predict(sweep, x_held) == train_y[held_idx][None]).mean(axis=1)
    best = int(np.argmax(held_acc))
    x_train, x_eval = standardise(train_x, eval_x)
    final = fit(x_train, train_y, grid[best], **kw)
    watchdog.beat("fitted the logistic probe")
    return {
        "eval_accuracy": float((predict(final, x_eval) == eval_y).mean()),
        "train_accuracy": float((predict(final, x_train) == train_y).mean()),
        "holdout_accuracy": float(held_acc[best]),
        "l2": float(grid[best]),
        "iters": int(final["iters"]),
        "grad_norm": float(final["grad_norm"]),
        "sweep": {f"{g:.3g}": float(a) for g, a in zip(grid, held_acc, strict=True)},
    }


def run(config, workdir: str) -> dict[str, float]:
    """The "logistic" protocol of the linear_probe task."""
    features.check_pool(config.head.pool, "config.head.pool")
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    model, params, step = backbone.load(config)
    transform, pool = config.data.eval_transform, config.head.pool
    train_x, train_y = features.extract(config, model, params, config.data.split, transform, pool)
    eval_x, eval_y = features.extract(config, model, params, config.data.eval_split, transform, pool)
    lc = config.logistic
    result = select_and_fit(
        train_x, train_y, eval_x, eval_y, num_classes=config.num_classes, l2_grid=list(lc.l2_grid),
        holdout_fraction=lc.holdout_fraction, seed=config.seed, max_iters=lc.max_iters, tol=lc.tol,
    )  # fmt: skip
    result |= {
        "protocol": "logistic", "pool": features.pool_used(model, pool),
        "train": f"{config.data.name}/{config.data.split}",
        "num_train": len(train_x), "eval": f"{config.data.name}/{config.data.eval_split}", "num_eval": len(eval_x),
        "init_from": config.init_from, "random_init": config.random_init, "checkpoint_step": step,
    }  # fmt: skip
    logging.info("logistic probe: %s", result)
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: result[k] for k in ("eval_accuracy", "train_accuracy", "holdout_accuracy", "l2")}
    log = MetricsLog(str(out))
    log.scalars(step, metrics)
    log.close()
    if jax.process_index() == 0:
        (out / "linear_probe_logistic.json").write_text(json.dumps(result, indent=2))
    return metrics
