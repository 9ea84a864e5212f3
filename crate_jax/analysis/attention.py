"""Attention maps of the cls query over the patches, per head, DINO style.

As in DINO's `visualize_attention.py`: the cls row of the softmax attention without its own
(cls) column, reshaped to the patch grid, upsampled to pixels by nearest-neighbour repetition
of each patch, one map per head, each map min-max scaled for display. A model without a cls
token (`cls_token=False`, the paper's CRATE-MAE) has no cls query: its maps are the mean over
all queries of the attention each patch receives (`query_attention`).

Maps at another resolution, as DINO draws them: the images are prepared at that size (a
multiple of the patch size; `analyze --image_size`) and the model is called with
`interpolate_pos=True`, which resamples its own position table to the larger or smaller patch
grid (`models.layers.position_table`: DINO's bicubic with the +0.1 offset on the scale factor).
The functions here take the grid size of the maps they are given, whatever it is.
"""

from __future__ import annotations

import jax
import matplotlib
import numpy as np

ATTENTION_COLORMAP = "inferno"


def cls_attention(attn_xKxNxN: jax.Array) -> jax.Array:
    """(..., K, N, N) attention probabilities, cls token first -> (..., K, N-1): what the cls
    query attends to among the patch tokens (the rows are not renormalised)."""
    return attn_xKxNxN[..., 0, 1:]


def mean_query_attention(attn_xKxNxN: jax.Array) -> jax.Array:
    """(..., K, N, N) attention probabilities over patch tokens only -> (..., K, N): the
    attention each patch receives, averaged over all queries (a model without a cls token)."""
    return attn_xKxNxN.mean(axis=-2)


def query_attention(attn_xKxNxN: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """(..., K, N, N) -> (..., K, L) maps over the L patches: the cls query's row
    (`cls_attention`) when the tokens start with a cls token, else the mean over queries."""
    if num_prefix_tokens not in (0, 1):
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens}: attention maps know 0 (no cls token) or 1")
    return cls_attention(attn_xKxNxN) if num_prefix_tokens else mean_query_attention(attn_xKxNxN)


def to_patch_grid(maps_xL: np.ndarray, grid_size: int) -> np.ndarray:
    """(..., L) per-patch values in raster order -> (..., grid, grid)."""
    maps_xL = np.asarray(maps_xL)
    if maps_xL.shape[-1] != grid_size**2:
        raise ValueError(f"{maps_xL.shape[-1]} patch values do not fill a {grid_size}x{grid_size} grid")
    return maps_xL.reshape(*maps_xL.shape[:-1], grid_size, grid_size)


def upsample(maps_xGxG: np.ndarray, patch_size: int) -> np.ndarray:
    """Each patch value repeated over its patch_size x patch_size pixels (DINO's nearest)."""
    return np.repeat(np.repeat(maps_xGxG, patch_size, axis=-2), patch_size, axis=-1)


def colorize(maps_xHxW: np.ndarray, colormap: str = ATTENTION_COLORMAP) -> np.ndarray:
    """(..., H, W) -> (..., H, W, 3) uint8, every map min-max scaled on its own (a flat map is
    drawn at the colormap's bottom), as plt.imsave does for DINO's figures."""
    maps = np.asarray(maps_xHxW, np.float64)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    scaled = (maps - lo) / np.where(span > 0, span, 1.0)
    rgba = matplotlib.colormaps[colormap](scaled)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def attention_grid(images_BxHxWx3: np.ndarray, maps_BxKxGxG: np.ndarray, patch_size: int) -> np.ndarray:
    """(B*H, (1+K)*W, 3) uint8: one row per image, the image then its K head maps."""
    images = np.asarray(images_BxHxWx3)
    heads = colorize(upsample(np.asarray(maps_BxKxGxG), patch_size))  # (B, K, H, W, 3)
    if heads.shape[2:4] != images.shape[1:3]:
        raise ValueError(f"attention maps of {heads.shape[2:4]} pixels do not match images of {images.shape[1:3]}")
    row = np.concatenate([images[:, None], heads], axis=1)  # (B, 1+K, H, W, 3)
    b, c, h, w, _ = row.shape
    return row.transpose(0, 2, 1, 3, 4).reshape(b * h, c * w, 3)
