"""Learning-rate schedules and the optimizer of FAIR's MAE recipe.

AdamW (beta 0.9 / 0.95), lr = base_lr x global_batch / 256, linear warmup then cosine
(per update, as FAIR's per-iteration `lr_sched.adjust_learning_rate`), optional global-norm
clipping. Weight decay as FAIR's pretraining (timm's `add_weight_decay`): on every
parameter except 1-D ones (norms) and biases, so the (1, 1, d) `cls_token` and `mask_token`
ARE decayed; `config.optim.no_decay` names further parameters to exempt by leaf name (e.g.
("cls_token", "mask_token"), mmselfsup's choice). Fine-tuning passes FAIR's fine-tuning set
(`FINETUNE_NO_DECAY`, `util/lr_decay.py`'s `param_groups_lrd`).
"""

from __future__ import annotations

import jax
import optax


def learning_rate(optim_config, batch_size: int, total_steps: int) -> optax.Schedule:
    peak = optim_config.base_lr * batch_size / 256
    warmup = int(optim_config.warmup_steps)
    if warmup >= total_steps:
        raise ValueError(f"config.optim.warmup_steps={warmup} must be below config.total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=optim_config.end_lr,
    )


# What FAIR's fine-tuning exempts by name besides 1-D parameters (`model.no_weight_decay()`).
FINETUNE_NO_DECAY = ("pos_embed", "cls_token")


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _layer_rank(path, leaf) -> int:
    """The rank a parameter has in one layer: scanned stacks (`.../layers/...`) add a leading axis."""
    scanned = any(str(getattr(p, "key", p)) == "layers" for p in path[:-1])
    return len(leaf.shape) - (1 if scanned else 0)


def decay_mask(params, no_decay: tuple[str, ...] = ()):
    """True where weight decay applies: every parameter except 1-D ones, biases and the leaf
    names in `no_decay` (FAIR's pretraining: timm's `add_weight_decay` with that skip list)."""

    def decays(path, leaf) -> bool:
        name = _leaf_name(path)
        return _layer_rank(path, leaf) >= 2 and name != "bias" and name not in no_decay

    return jax.tree_util.tree_map_with_path(decays, params)


def check_no_decay(params, no_decay, key: str = "config.optim.no_decay") -> tuple[str, ...]:
    """`no_decay` as a tuple of leaf names the model has; a one-line error names the key and
    the unknown name."""
    if isinstance(no_decay, str):
        raise ValueError(f"{key}={no_decay!r} must be a tuple of parameter names, e.g. ('cls_token', 'mask_token')")
    names = {_leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    for name in no_decay:
        if name not in names:
            raise ValueError(f"{key}: {name!r} is not a parameter name of the model (it has {sorted(names)})")
    return tuple(no_decay)


def make_optimizer(optim_config, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    if optim_config.name != "adamw":
        raise ValueError(f"config.optim.name={optim_config.name!r}: pretraining supports 'adamw'")
    tx = optax.adamw(
        schedule,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=optim_config.weight_decay,
        mask=decay_mask(params, check_no_decay(params, optim_config.no_decay)),
    )
    if optim_config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
    return tx
