"""RandAugment and random erasing (crate_jax/data/augment.py) and the finetune_train transform."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from crate_jax import train
from crate_jax.config_file import load_config
from crate_jax.data import augment, embedded, transforms

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
FINETUNE_OPTIONS = {"randaugment": {"num_ops": 2, "magnitude": 9.0, "magnitude_std": 0.5}, "random_erasing": 0.25}
NO_AUGMENT = {"randaugment": {"num_ops": 0, "magnitude": 9.0, "magnitude_std": 0.5}, "random_erasing": 0.0}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo_like(size: int = 32) -> Image.Image:
    """Smooth gradients plus noise in [40, 200]: low contrast, so every colour op has work to do."""
    y, x = np.mgrid[0:size, 0:size] / size
    noise = np.random.default_rng(0).uniform(-20, 20, (size, size, 3))
    rgb = np.stack([60 + 100 * x, 60 + 100 * y, 120 - 60 * x * y], axis=-1) + noise
    return Image.fromarray(np.clip(rgb, 40, 200).astype(np.uint8))


def test_randaugment_ops_are_timms_increasing_list_with_its_levels_at_magnitude_9():
    assert [op.name for op in augment.OPS] == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
        "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
        "TranslateXRel", "TranslateYRel",
    ]  # fmt: skip
    assert augment.rotate_level(9) == pytest.approx(27.0)  # 30 x 9/10 degrees
    assert augment.shear_level(9) == pytest.approx(0.27)
    assert augment.translate_level(9) == pytest.approx(0.405)  # of the image side
    assert augment.enhance_level(9) == pytest.approx(0.81)  # factor 1 +- 0.81
    assert [augment.posterize_level(m) for m in (0, 9, 10)] == [4, 1, 0]  # 4 - int(4 m/10) bits kept
    assert [augment.solarize_level(m) for m in (0, 9, 10)] == [256, 26, 0]  # 256 - int(256 m/10)
    assert [augment.solarize_add_level(m) for m in (0, 9, 10)] == [0, 99, 110]  # int(110 m/10)
    assert transforms.MEAN_FILL == (124, 116, 104)
    signed = {op.name for op in augment.OPS if op.signed}
    assert signed == {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"} | {
        f"{n}Increasing" for n in ("Color", "Contrast", "Brightness", "Sharpness")
    }


@pytest.mark.parametrize("op", augment.OPS, ids=lambda op: op.name)
def test_each_randaugment_op_changes_the_image_and_keeps_uint8(op):
    image = _photo_like()
    pixels = np.asarray(image)
    for sign in (1, -1) if op.signed else (1,):
        argument = 0.0 if op.level is None else sign * op.level(9.0)
        out = np.asarray(op.apply(image, argument, transforms.MEAN_FILL))
        assert out.shape == pixels.shape and out.dtype == np.uint8
        assert np.mean(out != pixels) > 0.3, (op.name, sign)
    if op.level is not None and op.name != "PosterizeIncreasing":  # magnitude 0: no change (4 bits are kept)
        np.testing.assert_array_equal(np.asarray(op.apply(image, op.level(0.0), transforms.MEAN_FILL)), pixels)


def test_colour_op_identities_and_extremes():
    full_range = np.array(_photo_like())
    full_range[0, 0], full_range[0, 1] = 0, 255
    ops = augment.OPS_BY_NAME
    same = ops["AutoContrast"].apply(Image.fromarray(full_range), 0.0, transforms.MEAN_FILL)
    np.testing.assert_array_equal(np.asarray(same), full_range)  # already spans [0, 255]
    image = _photo_like()
    assert not np.any(np.asarray(ops["PosterizeIncreasing"].apply(image, 0, transforms.MEAN_FILL)))  # 0 bits: black
    inverted = 255 - np.asarray(image)
    np.testing.assert_array_equal(np.asarray(ops["SolarizeIncreasing"].apply(image, 0, transforms.MEAN_FILL)), inverted)
    np.testing.assert_array_equal(np.asarray(ops["Invert"].apply(image, 0.0, transforms.MEAN_FILL)), inverted)
    shifted = np.asarray(ops["TranslateXRel"].apply(image, 0.5, transforms.MEAN_FILL))
    assert np.all(shifted[:, -8:] == transforms.MEAN_FILL)  # what the shift uncovers has the fill colour


def test_randaugment_is_a_function_of_the_rng_and_draws_clipped_signed_magnitudes():
    image = _photo_like()
    ra = augment.RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5, fill=transforms.MEAN_FILL)
    a, b = (np.asarray(ra(image, np.random.default_rng(3))) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    outs = [np.asarray(ra(image, np.random.default_rng(s))) for s in range(8)]
    assert len({o.tobytes() for o in outs}) > 4  # ops, probabilities, magnitudes and signs all vary
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    rotate, rng = augment.OPS_BY_NAME["Rotate"], np.random.default_rng(0)
    angles = np.array([ra.argument(rotate, rng) for _ in range(400)])
    assert np.all(np.abs(angles) <= 30.0) and 20 < np.median(np.abs(angles)) < 30  # 30 x N(9, 0.5) / 10
    assert 0.4 < np.mean(angles > 0) < 0.6
    top = augment.RandAugment(num_ops=2, magnitude=10.0, magnitude_std=0.5, fill=transforms.MEAN_FILL)
    assert max(abs(top.argument(rotate, rng)) for _ in range(100)) == 30.0  # clipped at magnitude 10
    exact = augment.RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.0, fill=transforms.MEAN_FILL)
    assert all(abs(exact.argument(rotate, rng)) == pytest.approx(27.0) for _ in range(20))


@pytest.mark.parametrize("seed", range(5))
def test_random_erasing_replaces_one_rectangle_within_the_area_bounds(seed):
    image = np.zeros((40, 60, 3), np.float32)
    out = augment.RandomErasing(1.0)(image, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.float32 and not np.any(image)  # the input is untouched
    changed = np.any(out != 0, axis=-1)
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert box.all() and changed.sum() == box.size  # one filled rectangle
    area = image.shape[0] * image.shape[1]
    assert 0.8 * 0.02 * area <= box.size <= 1.1 * area / 3  # 2-33% of the area, up to rounding of h, w
    assert 0.5 < out[changed].std() < 1.5  # standard-normal noise per pixel and channel
    same = augment.RandomErasing(0.0)(image + 1, np.random.default_rng(seed))
    np.testing.assert_array_equal(same, image + 1)


def test_finetune_transform_without_augmentation_is_linprobe_train():
    element = {"image": _png(np.asarray(_photo_like(48))), "label": 1}
    plain = transforms.get_transform("linprobe_train", 24)
    quiet = transforms.get_transform("finetune_train", 24, **NO_AUGMENT)
    full = transforms.get_transform("finetune_train", 24, **FINETUNE_OPTIONS)
    for seed in range(3):
        expected = plain.random_map(element, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(quiet.random_map(element, np.random.default_rng(seed))["image"], expected)
    outs = [full.random_map(element, np.random.default_rng(seed))["image"] for seed in (7, 7, 8)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"randaugment": {"num_ops": 2, "magnitude": 11.0, "magnitude_std": 0.5}}, r"randaugment\.magnitude=11.0 "),
        ({"randaugment": {"num_ops": -1, "magnitude": 9.0, "magnitude_std": 0.5}}, r"randaugment\.num_ops=-1 "),
        ({"randaugment": {"num_ops": 2, "magnitude": 9.0, "magnitude_std": -1.0}}, r"randaugment\.magnitude_std=-1"),
        ({"randaugment": {"num_ops": 2, "magnitude": 9.0}}, r"config\.data\.randaugment has the keys"),
        ({"random_erasing": 1.5}, r"config\.data\.random_erasing=1.5 must be a probability"),
    ],
)
def test_bad_finetune_options_are_one_line_errors_naming_the_config_key(change, message):
    with pytest.raises(ValueError, match=message) as error:
        transforms.get_transform("finetune_train", 32, **(FINETUNE_OPTIONS | change))
    assert "\n" not in str(error.value) and "config.data." in str(error.value)


def test_transform_options_must_match_the_transform():
    with pytest.raises(ValueError, match=r"'finetune_train' takes the options \['randaugment', 'random_erasing'\]"):
        transforms.get_transform("finetune_train", 32)
    with pytest.raises(ValueError, match=r"'eval' takes the options \[\], got \['random_erasing'\]"):
        transforms.get_transform("eval", 32, random_erasing=0.25)


def test_finetune_config_transform_through_the_grain_pipeline_on_the_embedded_set(tmp_path):
    fair = load_config(f"{CONFIGS}/finetune.py:dataset=imagenet2012")
    assert fair.data.transform == "finetune_train" and fair.data.random_erasing == 0.25
    assert fair.data.randaugment.to_dict() == FINETUNE_OPTIONS["randaugment"]
    config = load_config(f"{CONFIGS}/finetune.py:dataset=embedded,runlocal")
    assert config.data.randaugment.num_ops == 0 and config.data.random_erasing == 0.0  # off at 32 px
    with config.unlocked():
        config.data.data_dir = str(tmp_path)
        config.data.randaugment.num_ops, config.data.random_erasing = 2, 0.25
    embedded.ensure_built(str(tmp_path))
    kwargs = dict(split=config.data.split, transform=config.data.transform, batch_size=8, shuffle=True)
    batch = next(train.iterator(config, **kwargs))
    size = config.model.image_size
    assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.float32
    assert np.all(np.isfinite(batch["image"])) and np.all(batch["weight"] == 1.0)
    np.testing.assert_array_equal(batch["image"], next(train.iterator(config, **kwargs))["image"])
    with config.unlocked():
        config.data.randaugment.magnitude = 12.0
    with pytest.raises(ValueError, match=r"^config\.data\.randaugment\.magnitude=12.0 must be in \[0, 10\]$"):
        train.iterator(config, **kwargs)
