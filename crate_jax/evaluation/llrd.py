"""Layer-wise learning-rate decay (BEiT, FAIR MAE `util/lr_decay.py`).

Layer ids as FAIR's `get_layer_id_for_vit`: the patch embedding, cls token and position
table are layer 0,
encoder layer i is layer i + 1, everything after the encoder (final norm, head) is layer
depth + 1. A parameter of layer id l gets lr x decay^(depth + 1 - l), and its weight decay
is scaled alike (the multiplier applies to AdamW's whole decoupled update, as a per-group
lr does in PyTorch). Works on both layer layouts: `encoder/layer_{i}` (unrolled) and
`encoder/layers` with a leading layer axis (scanned), where the multiplier is a (depth, 1,
...) array.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

EMBEDDING_KEYS = ("patch_embed", "cls_token", "mask_token", "pos_embed")  # pos_embed: a learned table


def _key(entry) -> str:
    return str(getattr(entry, "key", entry))


def layer_ids(params, depth: int) -> Any:
    """A tree like `params` of layer ids: ints, or int arrays (depth, 1, ...) for scanned leaves."""

    def layer_id(path, leaf):
        top = _key(path[0])
        if top in EMBEDDING_KEYS:
            return 0
        if top == "encoder":
            block = _key(path[1])
            if block == "layers":
                return np.arange(1, depth + 1).reshape((depth,) + (1,) * (len(leaf.shape) - 1))
            if block.startswith("layer_"):
                return int(block[len("layer_") :]) + 1
            raise ValueError(f"unexpected encoder parameter {jax.tree_util.keystr(path)}")
        return depth + 1

    return jax.tree_util.tree_map_with_path(layer_id, params)


def lr_multipliers(params, depth: int, decay: float) -> Any:
    """decay^(depth + 1 - layer id) per parameter (float32 scalars or (depth, 1, ...) arrays)."""
    return jax.tree.map(lambda i: np.float32(decay) ** (depth + 1 - np.asarray(i)).astype(np.float32),
                        layer_ids(params, depth))  # fmt: skip


class _Empty(NamedTuple):
    pass


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its (broadcastable) multiplier: constants, no state."""

    def init(params):
        del params
        return _Empty()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * np.asarray(m, np.float32).astype(u.dtype), updates, multipliers), state

    return optax.GradientTransformation(init, update)
