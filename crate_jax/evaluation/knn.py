"""Weighted k-nearest-neighbour classification on frozen features, as DINO's `eval_knn.py`.

Features are L2-normalised; each query takes its k most cosine-similar bank features, and
each neighbour votes for its label with weight exp(similarity / temperature); the class with
the largest total wins (k = 20, temperature 0.07). The bank is the training split, the
queries the eval split, both through the evaluation transform.

    python -m crate_jax.main --config=configs/knn.py:dataset=embedded --config.init_from=DIR --workdir=OUT

writes `knn_accuracy` (and top-5) to WORKDIR/metrics.jsonl and WORKDIR/knn.json.

During pretraining, `knn_accuracy(model, state.params, bank_batches, query_batches)` gives
the same number from global batches (see the function).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from crate_jax.evaluation import backbone, features
from crate_jax.metrics import MetricsLog

QUERY_CHUNK = 1024  # queries scored at once: a (chunk, bank size) similarity matrix


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_scores(bank_NxD, bank_labels_N, queries_QxD, *, num_classes: int, k: int, temperature: float) -> jax.Array:
    """(Q, num_classes) summed votes exp(cos / temperature) of each query's k nearest bank rows."""
    k = min(k, bank_NxD.shape[0])
    similarity_QxN = _normalise(queries_QxD.astype(jnp.float32)) @ _normalise(bank_NxD.astype(jnp.float32)).T
    top_sim_QxK, top_idx_QxK = jax.lax.top_k(similarity_QxN, k)
    votes_QxK = jnp.exp(top_sim_QxK / temperature)
    neighbours_QxKxC = jax.nn.one_hot(bank_labels_N[top_idx_QxK], num_classes, dtype=jnp.float32)
    return jnp.einsum("qkc,qk->qc", neighbours_QxKxC, votes_QxK)


def classify(bank, bank_labels, queries, *, num_classes: int, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """(Q, num_classes) scores, the queries in chunks of QUERY_CHUNK."""
    bank, bank_labels = jnp.asarray(bank), jnp.asarray(bank_labels)
    chunks = [
        np.asarray(knn_scores(bank, bank_labels, jnp.asarray(queries[i : i + QUERY_CHUNK]), num_classes=num_classes,
                              k=k, temperature=temperature))
        for i in range(0, len(queries), QUERY_CHUNK)
    ]  # fmt: skip
    return np.concatenate(chunks)


def accuracies(scores_QxC: np.ndarray, labels_Q: np.ndarray) -> dict[str, float]:
    """Top-1 and top-5 accuracy; a tie goes to the lowest class index."""
    order = np.argsort(-scores_QxC, axis=1, kind="stable")
    top5 = min(5, scores_QxC.shape[1])
    return {
        "top1": float(np.mean(order[:, 0] == labels_Q)),
        "top5": float(np.mean(np.any(order[:, :top5] == labels_Q[:, None], axis=1))),
    }


def knn_accuracy(
    model,
    params,
    bank_batches: Iterable[dict[str, Any]],
    query_batches: Iterable[dict[str, Any]],
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "cls",
    num_classes: int | None = None,
) -> float:
    """Top-1 k-NN accuracy of `model`'s (a CrateMAE / ViTMAE) frozen features.

    Batches are {"image", "label", "weight"} dicts (global arrays, e.g. from
    `train.eval_batches`-style iterators, or host arrays); weight-0 rows are left out.
    `num_classes` defaults to the largest label seen + 1."""
    bank, bank_labels = features.encode_batches(model, params, bank_batches, pool)
    queries, labels = features.encode_batches(model, params, query_batches, pool)
    num_classes = num_classes or int(max(bank_labels.max(), labels.max())) + 1
    scores = classify(bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature)
    return accuracies(scores, labels)["top1"]


def run(config, workdir: str) -> dict[str, float]:
    """The `knn` task: features of config.data.split (bank) and eval_split (queries)."""
    features.check_pool(config.knn.pool, "config.knn.pool")
    if config.knn.k < 1 or config.knn.temperature <= 0:
        raise ValueError(f"config.knn.k={config.knn.k} must be >= 1, config.knn.temperature > 0")
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    model, params, step = backbone.load(config)
    bank, bank_labels = features.extract(config, model, params, config.data.split, config.data.transform,
                                         config.knn.pool)  # fmt: skip
    queries, labels = features.extract(config, model, params, config.data.eval_split, config.data.eval_transform,
                                       config.knn.pool)  # fmt: skip
    scores = classify(bank, bank_labels, queries, num_classes=config.num_classes, k=config.knn.k,
                      temperature=config.knn.temperature)  # fmt: skip
    acc = accuracies(scores, labels)
    metrics = {"knn_accuracy": acc["top1"], "knn_top5_accuracy": acc["top5"]}
    result = {
        **metrics, "k": config.knn.k, "temperature": config.knn.temperature,
        "pool": features.pool_used(model, config.knn.pool),
        "bank": f"{config.data.name}/{config.data.split}", "bank_size": len(bank),
        "queries": f"{config.data.name}/{config.data.eval_split}", "num_queries": len(queries),
        "init_from": config.init_from, "random_init": config.random_init, "checkpoint_step": step,
    }  # fmt: skip
    logging.info("k-NN: %s", result)
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(str(out))
    log.scalars(step, metrics)
    log.close()
    if jax.process_index() == 0:
        (out / "knn.json").write_text(json.dumps(result, indent=2))
    return metrics
