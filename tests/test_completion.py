"""Masked completion (analysis/completion.py, analyze --what=completion): every number in
summary.json recomputed from completion.npz by code that shares nothing with the module (PSNR
by loops, SSIM from its formula with scipy's box filter, biharmonic re-run), the masks checked
against the model's own masking, and the norm_pix_loss variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import uniform_filter
from skimage.restoration import inpaint_biharmonic

from crate_jax import analyze, checkpoint, models
from crate_jax.analysis import completion
from crate_jax.data import embedded

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)
DISPLAY = 4 * 32  # analyze enlarges 32-pixel images 4x in its figures
NUM_IMAGES = 8


def _save(path, **overrides) -> str:
    model = models.build("crate_mae_tiny", **overrides)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))["params"])
    checkpoint.save_params(path, params, {"model": checkpoint.model_spec("crate_mae_tiny", overrides), "step": 0})
    return str(path)


def independent_psnr(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> float:
    values = []
    for a, b, m in zip(original, completed, mask, strict=True):
        hidden_a = a[m].astype(np.float64) / 255.0  # (hidden pixels, 3)
        hidden_b = b[m].astype(np.float64) / 255.0
        values.append(-10.0 * np.log10(np.mean((hidden_a - hidden_b) ** 2)))
    return float(np.mean(values))


def independent_ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM's formula per channel: 7x7 box means, sample covariances, K1 = 0.01, K2 = 0.03, L = 1."""
    out = np.empty(a.shape)
    n = 49
    c1, c2 = 0.01**2, 0.03**2
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        mx, my = uniform_filter(x, 7), uniform_filter(y, 7)
        vx = (uniform_filter(x * x, 7) - mx * mx) * n / (n - 1)
        vy = (uniform_filter(y * y, 7) - my * my) * n / (n - 1)
        cxy = (uniform_filter(x * y, 7) - mx * my) * n / (n - 1)
        out[..., ch] = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return out


def independent_ssim(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> float:
    values = []
    for a, b, m in zip(original, completed, mask, strict=True):
        full = independent_ssim_map(a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0)
        values.append(full[m].mean())
    return float(np.mean(values))


@pytest.fixture(scope="module")
def completion_run(tmp_path_factory):
    ckpt = _save(tmp_path_factory.mktemp("crate"), **TINY)
    out = tmp_path_factory.mktemp("completion")
    summary = analyze.run(ckpt, "completion", str(out), num_images=NUM_IMAGES, num_show=4, seed=5)
    return ckpt, out, summary


def test_summary_is_recomputed_from_the_npz(completion_run):
    _, out, summary = completion_run
    assert json.loads((out / "summary.json").read_text()) == summary
    block = summary["completion"]
    methods = ("model", "random_init", "mean_fill", "biharmonic")
    assert set(block) == {*methods, "mask_ratio", "num_images", "seed", "split"}
    assert block["mask_ratio"] == 0.75 and block["num_images"] == NUM_IMAGES and block["seed"] == 5
    assert block["split"] == embedded.COMPLETION_SPLIT
    with np.load(out / "completion.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    assert set(arrays) == {"images", "mask", *methods}
    images, mask = arrays["images"], arrays["mask"]
    assert images.dtype == np.uint8 and images.shape == (NUM_IMAGES, 32, 32, 3)
    assert mask.dtype == np.bool_ and mask.shape == (NUM_IMAGES, 32, 32)
    for method in methods:
        got = arrays[method]
        assert got.dtype == np.uint8 and got.shape == images.shape, method
        np.testing.assert_array_equal(got[~mask], images[~mask], err_msg=f"{method} changed visible pixels")
        assert set(block[method]) == {"psnr", "ssim"}
        np.testing.assert_allclose(block[method]["psnr"], independent_psnr(images, got, mask), rtol=1e-9)
        np.testing.assert_allclose(block[method]["ssim"], independent_ssim(images, got, mask), rtol=1e-9, atol=1e-12)
    # 75% of the 64 patches of every image hidden, whole 4x4 patches.
    patches = mask.reshape(NUM_IMAGES, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(NUM_IMAGES, 64, 16)
    assert np.all(patches.all(-1) | ~patches.any(-1)) and np.all(patches[..., 0].sum(-1) == 48)
    # The baselines again, here: biharmonic on the stored images and masks, and the visible mean colour.
    for image, hidden, stored_fill in zip(images, mask, arrays["biharmonic"], strict=True):
        again = np.clip(inpaint_biharmonic(image / 255.0, hidden, channel_axis=-1), 0, 1)
        np.testing.assert_array_equal((again * 255).round().astype(np.uint8), stored_fill)
    for image, hidden, stored_fill in zip(images, mask, arrays["mean_fill"], strict=True):
        colour = (image[~hidden].astype(np.float64) / 255.0).mean(axis=0)
        np.testing.assert_array_equal(stored_fill[hidden], np.broadcast_to((colour * 255).round(), (hidden.sum(), 3)))
    grid = np.asarray(Image.open(out / "completion.png").convert("RGB"))
    assert grid.shape[:2] == (4 * DISPLAY, 4 * DISPLAY) and grid.std() > 10
    assert "completion.npz" in summary["files"] and "completion.png" in summary["files"]


def test_model_column_is_the_models_prediction_under_the_seeds_masks(completion_run):
    """The model's completion equals model.apply with noise uniform(key(seed)), pasted into the
    hidden patches: the masks come from the seed, at the model's own ratio."""
    ckpt, out, summary = completion_run
    model, params = checkpoint.load(ckpt)
    with np.load(out / "completion.npz") as stored:
        images, mask, got = stored["images"], stored["mask"], stored["model"]
    noise = jax.random.uniform(jax.random.key(5), (NUM_IMAGES, model.num_patches))
    x = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    output = model.apply({"params": params}, jnp.asarray(x, jnp.float32), noise=noise)
    pixel_mask = np.repeat(np.repeat(np.asarray(output.mask).reshape(-1, 8, 8), 4, 1), 4, 2) > 0
    np.testing.assert_array_equal(pixel_mask, mask)
    pred = np.asarray(output.pred).reshape(NUM_IMAGES, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    pred = pred.reshape(NUM_IMAGES, 32, 32, 3) * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
    expected = np.where(mask[..., None], (np.clip(pred, 0, 1) * 255).round(), images)
    assert np.mean(np.abs(expected - got.astype(np.float64)) > 1) < 0.001  # float32 rounding at .5 edges only
    # A different seed gives different masks; the same seed the same completions.
    other = completion.evaluate(model, params, images, seed=6)["arrays"]
    same = completion.evaluate(model, params, images, seed=5)
    assert not np.array_equal(other["mask"], mask)
    np.testing.assert_array_equal(same["arrays"]["model"], got)
    assert same["model"] == summary["completion"]["model"]


def test_norm_pix_loss_uses_the_true_patch_statistics(tmp_path):
    model = models.build("crate_mae_tiny", **TINY, norm_pix_loss=True)
    params = completion.random_init_params(model, 0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    result = completion.evaluate(model, params, images, seed=1)
    assert result["uses_true_patch_stats"] is True
    arrays = result["arrays"]
    mask = arrays["mask"]
    # Mean fill: each hidden 4x4 patch painted with its own true mean colour.
    blocks = images.reshape(4, 8, 4, 8, 4, 3).astype(np.float64).mean(axis=(2, 4)) / 255.0
    expected = np.repeat(np.repeat((blocks * 255).round(), 4, 1), 4, 2)
    diff = np.abs(arrays["mean_fill"][mask].astype(np.float64) - expected[mask])
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.05  # ties at .5 may round either way
    # The model's prediction, in per-patch normalised units, un-normalised with each patch's
    # true mean and (unbiased) std of the normalised pixels, as norm_pix_loss defines its target.
    noise = jax.random.uniform(jax.random.key(1), (4, model.num_patches))
    x = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    pred = np.asarray(model.apply({"params": params}, jnp.asarray(x, jnp.float32), noise=noise).pred, np.float64)
    patches = x.reshape(4, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 64, 48)
    mean, std = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    pixels = (pred * std + mean).reshape(4, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(4, 32, 32, 3)
    pixels = pixels * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])
    expected = (np.clip(pixels, 0, 1) * 255).round()
    diff = np.abs(expected[mask] - arrays["model"][mask].astype(np.float64))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    plain = models.build("crate_mae_tiny", **TINY)
    assert "uses_true_patch_stats" not in completion.evaluate(plain, params, images, seed=1)


def test_wrong_image_shape_is_named():
    model = models.build("crate_mae_tiny", **TINY)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        completion.evaluate(model, None, np.zeros((2, 16, 16, 3), np.uint8))


def test_pretraining_logs_completion_psnr_with_baselines_once(tmp_path, monkeypatch):
    """A 2-step pretraining run, evaluated twice: completion_psnr (the model on the
    held-out split) at both eval steps, the baselines computed once and logged with each."""
    data_dir = embedded.ensure_built(str(tmp_path / "tfds"))
    calls = []
    real_biharmonic = completion.biharmonic
    monkeypatch.setattr(completion, "biharmonic", lambda *a: calls.append(1) or real_biharmonic(*a))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT)
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "crate_jax.main", "--config=configs/imagenet_mae.py:runlocal",
               f"--workdir={workdir}", "--config.data.name=crate_jax_embedded", f"--config.data.data_dir={data_dir}",
               "--config.data.eval_split=probe_test", "--config.completion_split=completion",
               "--config.completion_images=8", "--config.total_steps=2", "--config.eval_every_steps=1",
               "--config.optim.warmup_steps=1",
               "--config.model.patch_size=8", "--config.model.width=32", "--config.model.depth=1",
               "--config.model.decoder_depth=1"]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    keys = ("completion_psnr", "completion_psnr/mean_fill", "completion_psnr/biharmonic")
    for row in evals:
        assert all(np.isfinite(row[k]) and 0 < row[k] < 60 for k in keys), row
    assert evals[0]["completion_psnr/biharmonic"] == evals[1]["completion_psnr/biharmonic"]
    assert evals[0]["completion_psnr"] != evals[1]["completion_psnr"]  # the model changed between them
    # The same numbers from the module directly, on the checkpoint of step 2 (8 images, config seed 0).
    model, params = checkpoint.load(str(workdir))
    pixels = completion.load_split(embedded.NAME, "completion", data_dir, 32, 8)
    metric = completion.TrainingMetric(_Config(data_dir), model)
    again = metric(params)
    np.testing.assert_allclose([again[k] for k in keys], [evals[1][k] for k in keys], rtol=1e-6)
    metric(params)
    assert len(calls) == 1, "biharmonic inpainting ran more than once per run"
    np.testing.assert_array_equal(metric.pixels, pixels)


class _Config:
    """The config keys TrainingMetric reads, as the runlocal config above sets them."""

    def __init__(self, data_dir: str):
        self.seed, self.completion_split, self.completion_images = 0, "completion", 8
        self.data = type("Data", (), {"name": embedded.NAME, "data_dir": data_dir})()
