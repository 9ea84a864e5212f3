"""Host-side RandAugment and random erasing (numpy/PIL) with timm's semantics.

FAIR MAE fine-tunes with timm's `create_transform(auto_augment="rand-m9-mstd0.5-inc1",
re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic")`. What that means here:

RandAugment (`RandAugment`, on the uint8 PIL image after crop and flip): `num_ops` ops per
image, each drawn uniformly (with replacement) from `OPS`, timm's `_RAND_INCREASING_TRANSFORMS`
("inc1"); each is applied with probability 1/2 at a magnitude drawn from N(magnitude,
magnitude_std) clipped to [0, 10] ("m9-mstd0.5"), mapped to the op's argument by the
"increasing" level functions below, negated with probability 1/2 for the signed ops.
Geometric ops resample bicubically and fill with the ImageNet mean colour.

Random erasing (`RandomErasing`, on the normalised float image): with probability p, one
rectangle of area 2%-33% of the image and log-uniform aspect ratio in [0.3, 1/0.3] (10
tries to fit one) is replaced by standard-normal noise per pixel and channel ("pixel" mode).

All randomness comes from the `np.random.Generator` passed in (grain's per-element rng).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitudes are out of 10 (timm's _LEVEL_DENOM)
OP_PROB = 0.5  # each chosen op is applied with this probability
ERASE_AREA = (0.02, 1 / 3)  # of the image
ERASE_ASPECT = (0.3, 1 / 0.3)  # height / width, sampled log-uniformly
ERASE_ATTEMPTS = 10

Fill = tuple[int, int, int]

# ------------------------------------------------------------------- magnitude -> argument
# timm's "increasing" level functions: a larger magnitude is always a stronger op. The signed
# ones return the positive argument, which RandAugment negates with probability 1/2.


def rotate_level(magnitude: float) -> float:
    """Degrees, signed: 0-30."""
    return (magnitude / LEVEL_DENOM) * 30.0


def shear_level(magnitude: float) -> float:
    """Shear factor, signed: 0-0.3."""
    return (magnitude / LEVEL_DENOM) * 0.3


def translate_level(magnitude: float) -> float:
    """Fraction of the image side, signed: 0-0.45."""
    return (magnitude / LEVEL_DENOM) * 0.45


def enhance_level(magnitude: float) -> float:
    """Distance of the enhance factor from 1, signed: 0-0.9 (factor max(0.1, 1 +- this))."""
    return (magnitude / LEVEL_DENOM) * 0.9


def posterize_level(magnitude: float) -> int:
    """Bits kept per channel: 4 down to 0 (0 gives a black image)."""
    return 4 - int((magnitude / LEVEL_DENOM) * 4)


def solarize_level(magnitude: float) -> int:
    """Threshold above which (inclusive) pixels are inverted: 256 (none) down to 0 (all)."""
    return 256 - int((magnitude / LEVEL_DENOM) * 256)


def solarize_add_level(magnitude: float) -> int:
    """Added to pixels below 128 (clipped at 255): 0-110."""
    return int((magnitude / LEVEL_DENOM) * 110)


# ---------------------------------------------------------------------------------- ops


def _affine(image: Image.Image, coefficients: tuple[float, ...], fill: Fill) -> Image.Image:
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC, fillcolor=fill)


def _posterize(image: Image.Image, bits: float) -> Image.Image:
    # Keeps the top `bits` bits; 0 bits gives black (today's ImageOps.posterize refuses 0).
    mask = 0xFF & ~(2 ** (8 - int(bits)) - 1)
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


def _solarize_add(image: Image.Image, add: float) -> Image.Image:
    values = np.arange(256)
    lut = np.where(values < 128, np.minimum(values + int(add), 255), values)
    return image.point(lut.tolist() * len(image.getbands()))


def _enhance(enhancer: Callable[[Image.Image], Any]) -> Callable[[Image.Image, float, Fill], Image.Image]:
    """An op blending towards (factor < 1) or away from (> 1) ImageEnhance's degenerate image."""
    return lambda image, delta, fill: enhancer(image).enhance(max(0.1, 1.0 + delta))


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # timm's name
    apply: Callable[[Image.Image, float, Fill], Image.Image]  # (image, argument, fill colour) -> image
    level: Callable[[float], float] | None = None  # magnitude -> argument; None: the op takes none
    signed: bool = False  # the argument is negated with probability 1/2


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS: tuple[Op, ...] = (
    Op("AutoContrast", lambda image, _, fill: ImageOps.autocontrast(image)),
    Op("Equalize", lambda image, _, fill: ImageOps.equalize(image)),
    Op("Invert", lambda image, _, fill: ImageOps.invert(image)),
    Op(
        "Rotate",
        lambda image, degrees, fill: image.rotate(degrees, Image.Resampling.BICUBIC, fillcolor=fill),
        rotate_level,
        signed=True,
    ),
    Op("PosterizeIncreasing", lambda image, bits, fill: _posterize(image, bits), posterize_level),
    Op("SolarizeIncreasing", lambda image, threshold, fill: ImageOps.solarize(image, threshold), solarize_level),
    Op("SolarizeAdd", lambda image, add, fill: _solarize_add(image, add), solarize_add_level),
    Op("ColorIncreasing", _enhance(ImageEnhance.Color), enhance_level, signed=True),
    Op("ContrastIncreasing", _enhance(ImageEnhance.Contrast), enhance_level, signed=True),
    Op("BrightnessIncreasing", _enhance(ImageEnhance.Brightness), enhance_level, signed=True),
    Op("SharpnessIncreasing", _enhance(ImageEnhance.Sharpness), enhance_level, signed=True),
    Op("ShearX", lambda image, s, fill: _affine(image, (1, s, 0, 0, 1, 0), fill), shear_level, signed=True),
    Op("ShearY", lambda image, s, fill: _affine(image, (1, 0, 0, s, 1, 0), fill), shear_level, signed=True),
    Op(
        "TranslateXRel",
        lambda image, t, fill: _affine(image, (1, 0, t * image.width, 0, 1, 0), fill),
        translate_level,
        signed=True,
    ),
    Op(
        "TranslateYRel",
        lambda image, t, fill: _affine(image, (1, 0, 0, 0, 1, t * image.height), fill),
        translate_level,
        signed=True,
    ),
)
OPS_BY_NAME = {op.name: op for op in OPS}


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """`num_ops` random ops per image at magnitude ~ N(magnitude, magnitude_std) in [0, 10]."""

    num_ops: int
    magnitude: float
    magnitude_std: float
    fill: Fill  # RGB of the area a geometric op uncovers

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for _ in range(self.num_ops):
            op = OPS[int(rng.integers(len(OPS)))]
            if rng.random() < OP_PROB:
                image = op.apply(image, self.argument(op, rng), self.fill)
        return image

    def argument(self, op: Op, rng: np.random.Generator) -> float:
        """The op's argument at a freshly drawn magnitude (0 for ops that take none)."""
        magnitude = self.magnitude
        if self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        magnitude = min(max(float(magnitude), 0.0), LEVEL_DENOM)
        if op.level is None:
            return 0.0
        value = op.level(magnitude)
        return -value if op.signed and rng.random() < 0.5 else value


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """With probability `probability`, one rectangle of the float HxWxC image becomes N(0, 1) noise."""

    probability: float

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A copy of `image` with the rectangle erased, or `image` itself."""
        if rng.random() >= self.probability:
            return image
        height, width, channels = image.shape
        log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
        for _ in range(ERASE_ATTEMPTS):
            area = rng.uniform(*ERASE_AREA) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                out = image.copy()
                out[top : top + h, left : left + w] = rng.standard_normal((h, w, channels), dtype=np.float32)
                return out
        return image
