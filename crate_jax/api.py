"""The notebook API: load a checkpoint, encode images.

    import crate_jax
    model, params = crate_jax.load("/tmp/crate_demo")           # a workdir or import_torch output
    features = crate_jax.encode(model, params, images)           # (B, width), cls token
    features = crate_jax.encode(model, params, images, pool="mean")  # mean of the patch tokens

A model without a cls token (`cls_token=False`, the `crate_mae_paper_*` presets) has only the
mean of its tokens: `pool="cls"` gives that mean too (`feature_pool`).

`images` are NHWC float32, ImageNet-normalised (as the input pipeline and
`crate_jax.data.transforms` produce them), at the model's image_size or at any other size
of whole patches: there the position table is the model's own resampled DINO style
(bicubic, +0.1 on the scale factor; see `models.mae`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from crate_jax import checkpoint

POOLS = ("cls", "mean")


def load(path: str, **overrides) -> tuple[Any, Any]:
    """(model, params) rebuilt from a checkpoint directory alone; `overrides` change
    non-structural model fields, e.g. `scan_layers=False`. For a linear-probe or fine-tune
    workdir: (classifier, variables), batch statistics included."""
    if "classifier" in checkpoint.read_meta(path)["model"]:
        from crate_jax.evaluation.classifier import load_classifier

        return load_classifier(path, **overrides)
    return checkpoint.load(path, **overrides)


def feature_pool(model, pool: str) -> str:
    """The pool `encode` applies for `pool`: "mean" where the model has no cls token."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}")
    return "mean" if pool == "cls" and model.num_prefix_tokens == 0 else pool


@functools.partial(jax.jit, static_argnames=("model", "pool"))
def _encode(model, params, images: jax.Array, pool: str) -> jax.Array:
    # Zero noise keeps the tokens in image order (argsort is stable); with mask_ratio 0 nothing is masked.
    rows, cols = model.patch_grid(images.shape, interpolate_pos=True)
    noise = jnp.zeros((images.shape[0], rows * cols), jnp.float32)
    # (B, prefix + L, D), after the final norm; at the model's own size the table is not resampled.
    latent = model.apply({"params": params}, images, noise=noise, interpolate_pos=True).latent
    return latent[:, 0] if pool == "cls" else latent[:, model.num_prefix_tokens :].mean(axis=1)


def encode(model, params, images, pool: str = "cls") -> jax.Array:
    """(B, width) encoder features of un-masked images: the cls token or the mean patch token
    (the mean for a model without a cls token, whatever `pool` says)."""
    pool = feature_pool(model, pool)
    # A mask_ratio 0 clone: the encoder sees every patch (compiled once per model, pool and image shape).
    return _encode(model.clone(mask_ratio=0.0), params, jnp.asarray(images, jnp.float32), pool)
