"""Frozen features of a whole split, once: the input for k-NN and the logistic probe.

Batches go through the same mesh as training (global arrays, batch axes sharded,
parameters replicated), `api.encode` gives the cls or mean-pooled feature after the
encoder's final norm (or `pool="pixels"`: the normalised pixels themselves, a baseline;
a model without a cls token gives the mean for "cls", `pool_used`), and every process ends
up with the whole split's features in host memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from crate_jax import api, sharding, train, watchdog

POOLS = ("cls", "mean", "pixels")


def check_pool(pool: str, key: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"{key}={pool!r} is not one of {POOLS}")


def pool_used(model, pool: str) -> str:
    """What `encode_batches` computes for `pool` (the results record it)."""
    check_pool(pool, "pool")
    return pool if pool == "pixels" else api.feature_pool(model, pool)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def encode_batches(model, params, batches: Iterable[dict[str, Any]], pool: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of the examples with weight > 0.

    `batches` yield {"image", "label", "weight"}, as global arrays (e.g. `train.eval_batches`)
    or host arrays on one process."""
    check_pool(pool, "pool")
    features, labels = [], []
    for batch in batches:
        images = batch["image"]
        feats = images.reshape(images.shape[0], -1) if pool == "pixels" else api.encode(model, params, images, pool)
        feats, label, weight = (_to_host(x) for x in (feats, batch["label"], batch["weight"]))
        keep = weight > 0
        features.append(feats[keep].astype(np.float32))
        labels.append(label[keep])
        watchdog.beat(f"extracting features: batch {len(features)}")
    if not features:
        raise ValueError("no batch to encode")
    return np.concatenate(features), np.concatenate(labels)


def split_batches(config, mesh, split: str, transform: str, batch_size: int):
    """One pass over `split` (unshuffled, the last batch padded) as global batches on `mesh`."""
    it = train.iterator(
        config, split=split, transform=transform, batch_size=batch_size, shuffle=False, num_epochs=1,
        drop_remainder=False,
    )  # fmt: skip
    for local in it:
        yield sharding.global_batch(local, mesh)


def extract(config, model, params, split: str, transform: str, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a whole split of config.data, on the config's mesh."""
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config)):
        params = jax.device_put(params, sharding.replicated(mesh))
        return encode_batches(model, params, split_batches(config, mesh, split, transform, config.batch_size), pool)
