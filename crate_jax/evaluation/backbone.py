"""The pretrained model an evaluation starts from.

`config.init_from` (a pretraining workdir, a checkpoint directory or an `import_torch`
output) names the model: its stored spec (preset name and overrides) rebuilds it, and
`config.model`'s keys other than `name` (image_size, dtype, scan_layers, remat: nothing that
changes a parameter's shape) go on top. The linear probe and fine-tuning (`classify`) also
accept a classifier checkpoint (a probe / fine-tune run, or `import_torch` of FAIR's
classifier checkpoints): its backbone spec names the model. Without `init_from`, `config.model.name` is the
preset. `config.random_init=True` keeps the architecture and draws fresh weights: the
baseline a pretrained encoder should beat.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax import checkpoint, models


def spec(config, allow_classifier: bool = False) -> dict[str, Any]:
    """{"name", "overrides"} of the backbone, JSON-friendly (what checkpoints store)."""
    overrides = {k: v for k, v in config.model.items() if k != "name"}
    if not config.init_from:
        return checkpoint.model_spec(config.model.name, overrides)
    stored = checkpoint.read_meta(config.init_from)["model"]
    if "classifier" in stored and not allow_classifier:
        raise ValueError(
            f"config.init_from={config.init_from} holds a classifier (a linear-probe or fine-tuning run); "
            "point it at a pretraining checkpoint"
        )
    if stored["name"] != config.model.name:
        logging.info("config.init_from holds %s; config.model.name=%s is not used", stored["name"], config.model.name)
    return checkpoint.model_spec(stored["name"], dict(stored["overrides"], **overrides))


def build(model_spec: dict[str, Any]):
    return models.build(model_spec["name"], **model_spec["overrides"])


def pretrained(config) -> bool:
    return bool(config.init_from) and not config.random_init


def load(config) -> tuple[Any, Any, int]:
    """(autoencoder, params, pretraining step): the weights of `init_from`, or fresh ones
    (seeded by config.seed) without it or with `random_init`."""
    if pretrained(config):
        spec(config)  # refuses a classifier checkpoint
        meta = checkpoint.read_meta(config.init_from)
        model, params = checkpoint.load(config.init_from, **{k: v for k, v in config.model.items() if k != "name"})
        return model, params, int(meta.get("step", 0))
    model = build(spec(config))
    logging.warning("no pretrained weights (init_from=%r, random_init=%s): a random encoder", config.init_from,
                    config.random_init)  # fmt: skip
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    params = jax.jit(lambda k: nn.unbox(model.init(k, images)["params"]))(jax.random.key(config.seed))
    return model, params, 0
