"""Masked completion, measured: the model's completion of hidden patches against baselines
that need no training.

On the same images and the same masks (drawn from `seed` at the model's mask ratio):
  model        the model's prediction in the hidden patches, the visible patches kept
  random_init  the same architecture at random init (initialised from `seed`)
  mean_fill    each hidden pixel = the mean of the image's visible pixels, per channel
  biharmonic   `skimage.restoration.inpaint_biharmonic` on the [0, 1] image, clipped to [0, 1]
Every completion is rounded to uint8, and every number is computed from those uint8 values
/ 255: PSNR over the hidden pixels and channels of each image (10 log10(1 / MSE), the MSE
floored at 1e-10), then the mean over images; SSIM as the map of
`structural_similarity(data_range=1, channel_axis=-1, win_size=7, full=True)` averaged over
the hidden pixels (and channels) of each image, then over images.

A model trained with `norm_pix_loss` predicts each patch in its own normalised units; it is
mapped back with the hidden patch's true mean and std (as MAE's figures do), and mean fill
then fills each hidden patch with its true mean colour, so that both see the same side
information; the result says `"uses_true_patch_stats": True`.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from skimage.metrics import structural_similarity
from skimage.restoration import inpaint_biharmonic

from crate_jax import data
from crate_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from crate_jax.models import mae
from crate_jax.models.layers import patchify, unpatchify

METHODS = ("model", "random_init", "mean_fill", "biharmonic")
MSE_FLOOR = 1e-10  # a perfect completion scores 100 dB instead of infinity
NORM_PIX_EPS = 1e-6  # as in the loss (models.mae.reconstruction_loss)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """ImageNet-normalised floats (or uint8, returned as they are) -> uint8 NHWC."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    x = images.astype(np.float32) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> ImageNet-normalised float32, the model's input."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def draw_masks(model, num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noise (n, patches) for `model.apply(noise=...)`, pixel mask (n, H, W) bool, True = hidden)."""
    noise = np.asarray(jax.random.uniform(jax.random.key(seed), (num_images, model.num_patches)))
    patch_mask, _, _ = mae.random_masking(jnp.asarray(noise), model.mask_ratio)
    p = model.patch_size
    per_pixel = jnp.broadcast_to(patch_mask[..., None], (*patch_mask.shape, p * p * 3))
    mask = np.asarray(unpatchify(per_pixel, p))[..., 0] > 0.5
    return noise, mask


@functools.cache
def _predict(model):
    """Jitted (params, images, noise) -> pred (B, patches, p*p*3), in the loss's units."""

    def predict(params, images, noise):
        return model.apply({"params": params}, images, noise=noise).pred

    return jax.jit(predict)


def _true_patch_stats(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch mean and std of the normalised image, as norm_pix_loss computes its target."""
    target = np.asarray(patchify(jnp.asarray(normalise(pixels)), patch_size), np.float64)
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
    return mean, std


def model_completion(
    model, params, pixels: np.ndarray, noise: np.ndarray, mask: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """uint8 completions: the model's prediction where `mask` is True, the original elsewhere."""
    predict = _predict(model)
    n, preds = len(pixels), []
    for i in range(0, n, batch_size):
        chunk, chunk_noise = normalise(pixels[i : i + batch_size]), noise[i : i + batch_size]
        if len(chunk) < batch_size:  # one shape for every batch: one compile
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            chunk_noise = np.concatenate([chunk_noise, np.zeros((pad, chunk_noise.shape[1]), chunk_noise.dtype)])
        preds.append(np.asarray(jax.device_get(predict(params, chunk, chunk_noise)), np.float64)[: n - i])
    pred = np.concatenate(preds)
    if model.norm_pix_loss:
        mean, std = _true_patch_stats(pixels, model.patch_size)
        pred = pred * std + mean
    predicted = to_uint8(np.asarray(unpatchify(jnp.asarray(pred, jnp.float32), model.patch_size)))
    return np.where(mask[..., None], predicted, pixels)


def mean_fill(pixels: np.ndarray, mask: np.ndarray, patch_size: int | None = None) -> np.ndarray:
    """Hidden pixels = the mean colour of the image's visible pixels; with `patch_size`, the
    true mean colour of each hidden patch instead (the norm_pix_loss comparison)."""
    x = pixels.astype(np.float64) / 255.0
    if patch_size is None:
        visible = (~mask)[..., None]
        fill = (x * visible).sum(axis=(1, 2), keepdims=True) / np.maximum(visible.sum(axis=(1, 2), keepdims=True), 1)
        fill = np.broadcast_to(fill, x.shape)
    else:
        n, h, w, c = x.shape
        p = patch_size
        blocks = x.reshape(n, h // p, p, w // p, p, c).mean(axis=(2, 4), keepdims=True)
        fill = np.broadcast_to(blocks, (n, h // p, p, w // p, p, c)).reshape(x.shape)
    filled = np.where(mask[..., None], fill, x)
    return (np.clip(filled, 0.0, 1.0) * 255).round().astype(np.uint8)


def biharmonic(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`inpaint_biharmonic` of each [0, 1] image, clipped to [0, 1], as uint8."""
    out = []
    for image, hidden in zip(pixels, mask, strict=True):
        filled = inpaint_biharmonic(image.astype(np.float64) / 255.0, hidden, channel_axis=-1)
        out.append((np.clip(filled, 0.0, 1.0) * 255).round().astype(np.uint8))
    return np.stack(out)


def psnr(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) over the hidden pixels and channels, from uint8 / 255."""
    diff = (original.astype(np.float64) - completed.astype(np.float64)) / 255.0
    hidden = mask[..., None].astype(np.float64)
    mse = (diff**2 * hidden).sum(axis=(1, 2, 3)) / (hidden.sum(axis=(1, 2, 3)) * original.shape[-1])
    return 10.0 * np.log10(1.0 / np.maximum(mse, MSE_FLOOR))


def ssim(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image SSIM map (7x7 window) averaged over the hidden pixels and channels."""
    out = []
    for a, b, hidden in zip(original, completed, mask, strict=True):
        _, full = structural_similarity(
            a.astype(np.float64) / 255.0,
            b.astype(np.float64) / 255.0,
            data_range=1.0,
            channel_axis=-1,
            win_size=7,
            full=True,
        )
        out.append(float(full[hidden].mean()))
    return np.asarray(out)


def scores(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "psnr": float(psnr(original, completed, mask).mean()),
        "ssim": float(ssim(original, completed, mask).mean()),
    }


def random_init_params(model, seed: int):
    """The architecture's parameters at random init (flax's initialisers, key `seed`)."""
    dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, dummy))(jax.random.key(seed))
    return nn.unbox(variables["params"])  # drop the logical-axis boxes


def evaluate(model, params, images, *, seed: int = 0, batch_size: int = 64) -> dict:
    """Completion quality of `model` on `images` (ImageNet-normalised floats or uint8 NHWC at
    the model's size) against random init, mean fill and biharmonic inpainting.

    Returns `{"model": {"psnr", "ssim"}, "random_init": ..., "mean_fill": ..., "biharmonic":
    ..., "mask_ratio", "num_images", "seed"}` (plus `"uses_true_patch_stats": True` for a
    norm_pix_loss model) and, under "arrays", the uint8 images, the bool pixel mask and each
    method's uint8 completions, what `completion.npz` stores."""
    pixels = to_uint8(images)
    if pixels.ndim != 4 or pixels.shape[1:] != (model.image_size, model.image_size, 3):
        raise ValueError(
            f"completion images have shape {pixels.shape}; expected (N, {model.image_size}, {model.image_size}, 3)"
        )
    noise, mask = draw_masks(model, len(pixels), seed)
    arrays = {
        "images": pixels,
        "mask": mask,
        "model": model_completion(model, params, pixels, noise, mask, batch_size),
        "random_init": model_completion(model, random_init_params(model, seed), pixels, noise, mask, batch_size),
        "mean_fill": mean_fill(pixels, mask, model.patch_size if model.norm_pix_loss else None),
        "biharmonic": biharmonic(pixels, mask),
    }
    result: dict = {method: scores(pixels, arrays[method], mask) for method in METHODS}
    result |= {"mask_ratio": float(model.mask_ratio), "num_images": len(pixels), "seed": seed}
    if model.norm_pix_loss:
        result["uses_true_patch_stats"] = True
    return result | {"arrays": arrays}


def grid(arrays: dict[str, np.ndarray], num_show: int) -> np.ndarray:
    """(rows*H, 4*W, 3) uint8: original | masked (hidden pixels grey) | model | biharmonic."""
    images, mask = arrays["images"][:num_show], arrays["mask"][:num_show, ..., None]
    columns = [
        images,
        np.where(mask, np.uint8(96), images),
        arrays["model"][:num_show],
        arrays["biharmonic"][:num_show],
    ]
    rows = np.concatenate(columns, axis=2)
    return rows.reshape(-1, rows.shape[2], 3)


def load_split(
    name: str, split: str, data_dir: str | None, image_size: int, num_images: int, batch_size: int = 64
) -> np.ndarray:
    """The first `num_images` examples of `name`/`split` through the eval transform, as uint8,
    read whole by this process (every process gets the same images)."""
    return to_uint8(data.first_images(name, split, data_dir, image_size, num_images, batch_size))


@contextlib.contextmanager
def on_this_host(params):
    """Yields `params` as this process can run the model on them. Parameters sharded over
    several processes (a multi-host mesh) are gathered (a collective every process must join)
    onto this process's first device, and the model runs there under a one-device mesh with the
    training mesh's axis names (its sharding constraints name them): a jitted function of the
    sharded parameters would return arrays this process cannot read."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params) if isinstance(x, jax.Array)):
        yield params
        return
    device = jax.local_devices()[0]
    gathered = jax.device_put(multihost_utils.process_allgather(params, tiled=True), device)
    names = jax.sharding.get_abstract_mesh().axis_names
    if not names:
        yield gathered
        return
    with jax.set_mesh(jax.sharding.Mesh(np.asarray([device]).reshape((1,) * len(names)), names)):
        yield gathered


class TrainingMetric:
    """`completion_psnr` at pretraining eval steps: the model on the held-out completion split
    (`config.completion_split`, its first `config.completion_images` images), masks from
    `config.seed`; the baselines `completion_psnr/mean_fill` and `completion_psnr/biharmonic`
    are computed on the first call only (they do not change during a run), on process 0."""

    def __init__(self, config, model):
        self.config, self.model = config, model
        self.pixels = self.mask = self.noise = None
        self.baselines: dict[str, float] | None = None

    def __call__(self, params) -> dict[str, float]:
        config, model = self.config, self.model
        if self.pixels is None:
            self.pixels = load_split(
                config.data.name,
                config.completion_split,
                config.data.data_dir or None,
                model.image_size,
                config.completion_images,
            )
            self.noise, self.mask = draw_masks(model, len(self.pixels), config.seed)
        with on_this_host(params) as local_params:
            completed = model_completion(model, local_params, self.pixels, self.noise, self.mask)
        metrics = {"completion_psnr": float(psnr(self.pixels, completed, self.mask).mean())}
        if jax.process_index() == 0:
            if self.baselines is None:
                fill = mean_fill(self.pixels, self.mask, model.patch_size if model.norm_pix_loss else None)
                self.baselines = {
                    "completion_psnr/mean_fill": float(psnr(self.pixels, fill, self.mask).mean()),
                    "completion_psnr/biharmonic": float(
                        psnr(self.pixels, biharmonic(self.pixels, self.mask), self.mask).mean()
                    ),
                }
            metrics |= self.baselines
        return metrics
