"""Per-example image transforms: encoded bytes in, normalised float32 HxWx3 out.

The crop/resize arithmetic lives in plain functions (`random_resized_crop_box`,
`resize_shorter_side_shape`, `center_crop_box`) so that another backend can share it; the
grain transform classes below only decode, call them, and normalise. All randomness comes
from the `np.random.Generator` grain hands a `RandomMap` for each element (seeded from the
pipeline seed and the element's position in the global stream), so a given seed gives the
same pixels on any number of processes and after a resume.

`finetune_train` adds RandAugment and random erasing (augment.py), configured by options
that `get_transform` passes on (`TRANSFORM_OPTIONS`): train.py reads them from config.data.

Element contract: the input is a dict with `image` (encoded bytes, or None for a padding
element) and optionally `label`; the output is `{"image": float32 (S, S, 3), "label": int32,
"weight": float32}`. An image that cannot be decoded becomes a zeros image with weight 0.0
(and a logged warning) instead of stopping a long run; normal examples have weight 1.0.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from crate_jax.data import augment

# ImageNet statistics in [0, 1] units, as used by MAE and torchvision.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
EVAL_CROP_FRACTION = 0.875  # Resize to size / 0.875 then center-crop size (224 <- 256).
# What geometric RandAugment ops fill uncovered pixels with: the mean in uint8, as timm's img_mean.
MEAN_FILL = tuple(min(255, round(255 * float(m))) for m in IMAGENET_MEAN)

_log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (top, left, height, width), torchvision's order.

# What PIL raises on bytes that are not (or not entirely) an image: UnidentifiedImageError
# and truncation are OSErrors, some plugins raise SyntaxError/ValueError on broken headers.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------- crop arithmetic


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Box:
    """torchvision's `RandomResizedCrop.get_params`: 10 tries, then a center-crop fallback."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter_side_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) with the shorter side set to `shorter`, as torchvision's `Resize(int)`."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def center_crop_box(height: int, width: int, size: int) -> Box:
    """torchvision's `CenterCrop(size)` box (the image must be at least `size` on each side)."""
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return top, left, size, size


def eval_resize_size(size: int) -> int:
    """Shorter side before the eval center crop: 256 for 224, as MAE's `int(size / 0.875)`."""
    return int(size / EVAL_CROP_FRACTION)


# ------------------------------------------------------------------------ decode and normalise


def decode_rgb(data: bytes | None) -> Image.Image | None:
    """Decodes PNG/JPEG/... bytes to an RGB PIL image; None for padding or undecodable bytes."""
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Forces the full decode so that truncated files fail here.
        return image.convert("RGB")  # Grayscale, CMYK and RGBA all become RGB.
    except _DECODE_ERRORS as e:
        _log.warning("Undecodable image (%d bytes) replaced by a weight-0 placeholder: %s", len(data), e)
        return None


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 in [0, 255] -> float32 with the ImageNet mean/std."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _output(image: np.ndarray, element: dict[str, Any], weight: float) -> dict[str, np.ndarray]:
    return {
        "image": image,
        "label": np.int32(element.get("label", 0)),
        "weight": np.float32(weight * element.get("weight", 1.0)),
    }


def _placeholder(size: int, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return _output(np.zeros((size, size, 3), np.float32), element, 0.0)


def random_resized_crop_flip(
    image: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Image.Image:
    """A `random_resized_crop_box` crop of `image` resized to size x size (bicubic), then
    mirrored left-right with probability 1/2 when `flip`."""
    top, left, h, w = random_resized_crop_box(rng, image.height, image.width, scale, ratio)
    # PIL's resize with a box crops and resizes in one pass (antialiased, like torchvision's
    # PIL backend); the box is (left, upper, right, lower).
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


RECOLOUR_GAIN = (0.6, 1.4)
RECOLOUR_OFFSET = (-40.0, 40.0)  # in uint8 levels


def recolour_and_turn(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 HxWx3 -> a random quarter turn, a random channel order, a per-channel gain in
    RECOLOUR_GAIN and offset in RECOLOUR_OFFSET (clipped to [0, 255]), then inverted with
    probability 1/2. For a pretraining set of a few photographs (the embedded demo): without it
    the model memorises each photograph's colours and orientation instead of reading them from
    the visible patches, and completes unseen photographs worse (README, "Masked completion")."""
    pixels = np.rot90(pixels, int(rng.integers(4)))[..., rng.permutation(3)]
    gain, offset = rng.uniform(*RECOLOUR_GAIN, 3), rng.uniform(*RECOLOUR_OFFSET, 3)
    pixels = np.clip(pixels * gain + offset, 0, 255).round().astype(np.uint8)
    return 255 - pixels if rng.random() < 0.5 else np.ascontiguousarray(pixels)


# ---------------------------------------------------------------------------- grain transforms


class RandomResizedCropFlip(grain.transforms.RandomMap):
    """RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip (p=0.5) [+ `recolour_and_turn`]
    + normalise."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        recolour: bool = False,
    ):
        self.size, self.scale, self.ratio, self.flip, self.recolour = size, scale, ratio, flip, recolour

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = decode_rgb(element["image"])
        if image is None:
            return _placeholder(self.size, element)
        pixels = np.asarray(random_resized_crop_flip(image, rng, self.size, self.scale, self.ratio, self.flip))
        if self.recolour:
            pixels = recolour_and_turn(pixels, rng)
        return _output(normalize(pixels), element, 1.0)


class ResizeCenterCrop(grain.transforms.Map):
    """Evaluation: resize the shorter side to size / 0.875 (bicubic), center-crop size, normalise."""

    def __init__(self, size: int):
        self.size = size

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        image = decode_rgb(element["image"])
        if image is None:
            return _placeholder(self.size, element)
        h, w = resize_shorter_side_shape(image.height, image.width, eval_resize_size(self.size))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        top, left, ch, cw = center_crop_box(h, w, self.size)
        pixels = np.asarray(image)[top : top + ch, left : left + cw]
        return _output(normalize(pixels), element, 1.0)


class FinetuneTrain(grain.transforms.RandomMap):
    """FAIR MAE fine-tuning (timm's `create_transform(is_training=True, auto_augment=
    "rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic")`):
    RandomResizedCrop(size, scale 0.08-1, bicubic) + horizontal flip (p=0.5) + RandAugment on
    the uint8 image + normalise + random erasing on the float image."""

    def __init__(self, size: int, randaugment: augment.RandAugment, erasing: augment.RandomErasing):
        self.size, self.randaugment, self.erasing = size, randaugment, erasing

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = decode_rgb(element["image"])
        if image is None:
            return _placeholder(self.size, element)
        image = self.randaugment(random_resized_crop_flip(image, rng, self.size, scale=(0.08, 1.0)), rng)
        return _output(self.erasing(normalize(np.asarray(image)), rng), element, 1.0)


def finetune_train(size: int, *, randaugment: Mapping[str, Any], random_erasing: float) -> FinetuneTrain:
    """`FinetuneTrain` from its options, with one-line errors naming their config keys."""
    key, fields = "config.data.randaugment", ("num_ops", "magnitude", "magnitude_std")
    if set(randaugment) != set(fields):
        raise ValueError(f"{key} has the keys {sorted(randaugment)}; expected {list(fields)}")
    num_ops, magnitude, std = (randaugment[f] for f in fields)
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"{key}.num_ops={num_ops!r} must be an integer >= 0")
    if not 0.0 <= magnitude <= augment.LEVEL_DENOM:
        raise ValueError(f"{key}.magnitude={magnitude} must be in [0, {augment.LEVEL_DENOM:g}]")
    if not 0.0 <= std < math.inf:
        raise ValueError(f"{key}.magnitude_std={std} must be finite and >= 0")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"config.data.random_erasing={random_erasing} must be a probability in [0, 1]")
    return FinetuneTrain(
        size,
        augment.RandAugment(num_ops, float(magnitude), float(std), MEAN_FILL),
        augment.RandomErasing(float(random_erasing)),
    )


Transform = grain.transforms.Map | grain.transforms.RandomMap

# MAE pretraining uses scale (0.2, 1) (MAE main_pretrain.py); FAIR's linear probe and
# fine-tuning use torchvision's default (0.08, 1).
TRANSFORMS: dict[str, Callable[..., Transform]] = {
    "mae_pretrain": lambda size: RandomResizedCropFlip(size, scale=(0.2, 1.0)),
    "mae_pretrain_recolour": lambda size: RandomResizedCropFlip(size, scale=(0.2, 1.0), recolour=True),
    "linprobe_train": lambda size: RandomResizedCropFlip(size, scale=(0.08, 1.0)),
    "finetune_train": finetune_train,
    "eval": ResizeCenterCrop,
}
# The options a transform takes, all required: train.py passes config.data.<option>.
TRANSFORM_OPTIONS: dict[str, tuple[str, ...]] = {"finetune_train": ("randaugment", "random_erasing")}


def get_transform(name: str, image_size: int, **options: Any) -> Transform:
    """The transform called `name` (one of TRANSFORMS) producing image_size x image_size images,
    given exactly the options it takes (TRANSFORM_OPTIONS)."""
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown transform {name!r}; expected one of {sorted(TRANSFORMS)}.")
    expected = TRANSFORM_OPTIONS.get(name, ())
    if set(options) != set(expected):
        raise ValueError(f"Transform {name!r} takes the options {list(expected)}, got {sorted(options)}.")
    return TRANSFORMS[name](image_size, **options)
