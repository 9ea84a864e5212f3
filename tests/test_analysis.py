"""White-box diagnostics: R^c and sparsity against direct formulas, the analyze CLI end to end, the API."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from absl import flags
from PIL import Image

from crate_jax import analyze, api, checkpoint, models
from crate_jax.analysis import attention, coding_rate, pca
from crate_jax.models import layers

TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)  # decoder: 2 layers, 4 heads
VIT_TINY = dict(TINY, decoder_width=32, decoder_depth=1, decoder_num_heads=4)  # decoder table unlike the encoder's
TINY_MODELS = {"crate_mae_tiny": TINY, "mae_vit_small": VIT_TINY}
HEADS, HEAD_DIM, TOKENS = 4, 16, 65  # 8x8 patches + cls
DISPLAY = 4 * 32  # analyze enlarges 32-pixel images 4x in its figures
# Jitted: one compile per shape instead of one per primitive in eager mode.
layer_coding_rates = jax.jit(coding_rate.layer_coding_rates, static_argnums=1)


def numpy_coding_rate(u_BxNxD: np.ndarray, num_heads: int, eps_sq: float = 0.01) -> np.ndarray:
    """The papers' R^c literally, in float64: 1/2 sum_k logdet(I_n + p/(n eps^2) X_k X_k^T) per image."""
    rates = []
    for u in np.asarray(u_BxNxD, np.float64):
        n, d = u.shape
        p = d // num_heads
        total = 0.0
        for k in range(num_heads):
            x = u[:, k * p : (k + 1) * p]
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            total += 0.5 * np.linalg.slogdet(np.eye(n) + p / (n * eps_sq) * x @ x.T)[1]
        rates.append(total)
    return np.array(rates)


def test_coding_rate_matches_the_papers_formula():
    u = jax.random.normal(jax.random.key(0), (3, 8, TOKENS, HEADS * HEAD_DIM))  # (layers, images, N, D)
    got = layer_coding_rates(u, HEADS)
    assert got.shape == (3, 8)
    for layer in range(3):
        np.testing.assert_allclose(got[layer], numpy_coding_rate(u[layer], HEADS), rtol=1e-5)


@pytest.mark.parametrize("tokens,head_dim", [(65, 16), (10, 32)])  # n > p and n < p
def test_feature_gram_equals_token_gram(tokens, head_dim):
    # Sylvester: det(I_n + c X X^T) = det(I_p + c X^T X).
    u = jax.random.normal(jax.random.key(1), (4, tokens, 2 * head_dim))
    both = jax.jit(
        lambda u: [
            f(coding_rate.head_features(u, 2)) for f in (coding_rate.coding_rate, coding_rate.coding_rate_tokens)
        ]
    )
    by_features, by_tokens = both(u)
    np.testing.assert_allclose(by_features, by_tokens, rtol=1e-5)


def test_coding_rate_calls_no_lapack_kernel():
    # jaxlib's CPU LAPACK kernels block an XLA pool thread per call; with several CPU devices
    # the evaluation's coding rate deadlocked in `lapack_spotrf` (issue 12). The program must
    # stay in plain XLA ops, and its logdet must still be the exact one.
    u = jax.random.normal(jax.random.key(3), (2, 4, TOKENS, HEADS * HEAD_DIM))
    hlo = jax.jit(coding_rate.layer_coding_rates, static_argnums=1).lower(u, HEADS).as_text()
    assert "custom_call" not in hlo, [line for line in hlo.splitlines() if "custom_call" in line][:3]
    x = np.asarray(coding_rate.head_features(u[0], HEADS))
    spd = np.eye(HEAD_DIM) + 10.0 * np.einsum("...np,...nq->...pq", x, x)
    np.testing.assert_allclose(coding_rate._logdet_spd(spd.astype(np.float32)), np.linalg.slogdet(spd)[1], rtol=1e-6)


def test_identical_tokens_compress_below_random_tokens():
    random = jax.random.normal(jax.random.key(2), (2, TOKENS, HEADS * HEAD_DIM))
    same = jnp.broadcast_to(random[:, :1], random.shape)
    r_same = layer_coding_rates(same, HEADS)
    r_random = layer_coding_rates(random, HEADS)
    assert np.all(r_same < r_random)
    # One direction per head: X X^T = 1 1^T, so each head gives 1/2 log(1 + p / eps^2).
    # fp32 Cholesky of I + 1600·(rank one): jax 0.12.1's CPU numerics land 1.5e-5 off, 0.10.2's closer.
    np.testing.assert_allclose(r_same, 0.5 * HEADS * np.log1p(HEAD_DIM / 0.01), rtol=5e-5)


def test_sparsity_counts_exact_zeros():
    z = np.full((3, 5, 4), 1e-30, np.float32)  # tiny but non-zero: not sparse
    z[0, :, :2] = 0.0  # half the entries
    z[1, 0, 0] = 0.0  # one of 20
    np.testing.assert_allclose(coding_rate.sparsity(z), [0.5, 0.05, 0.0])


def test_cls_attention_is_in_raster_order():
    attn = np.zeros((1, 2, 17, 17), np.float32)  # (B, K, N, N) with a 4x4 grid
    attn[0, :, 0, 1:] = np.arange(16)
    grid = attention.to_patch_grid(attention.cls_attention(attn), 4)
    np.testing.assert_array_equal(grid[0, 1], np.arange(16).reshape(4, 4))


def test_pca_rgb_is_min_max_scaled_per_image():
    features = np.random.default_rng(0).normal(size=(3, 16, 8))
    rgb = pca.pca_rgb(features, 4)
    assert rgb.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(rgb.min(axis=(1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(rgb.max(axis=(1, 2)), 1.0)


def test_importing_the_cli_defines_no_flags():
    assert "init_from" not in flags.FLAGS


def _build(name: str, **overrides):
    model = models.build(name, **overrides)
    return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])


def _save(path, name: str, **overrides) -> str:
    _, params = _build(name, **overrides)
    checkpoint.save_params(path, params, {"model": checkpoint.model_spec(name, overrides), "step": 0})
    return str(path)


@pytest.fixture(scope="module")
def crate_ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("crate"), "crate_mae_tiny", **TINY)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image, and not an image file name either")
    return folder


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def full_run(crate_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return out, analyze.run(crate_ckpt, analyze.WHAT, str(out), num_images=8, batch_size=8, attention_all_layers=True)


def test_analyze_end_to_end_on_the_embedded_dataset(full_run):
    out, summary = full_run
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["num_images"] == 8 and summary["model"] == "crate_mae_tiny"
    assert summary["image_size"] == summary["model_image_size"] == 32
    for key, depth in [("encoder", 2), ("decoder", 2)]:
        for stat in ("coding_rate", "coding_rate_std"):
            assert len(summary[stat][key]) == depth and np.all(np.isfinite(summary[stat][key]))
    assert np.all(np.asarray(summary["coding_rate"]["encoder"]) > 0)
    zeros = np.asarray(summary["sparsity"]["encoder"])
    assert zeros.shape == (2,) and np.all((zeros >= 0) & (zeros <= 1))
    assert np.isfinite(summary["reconstruction_loss"]) and summary["reconstruction_loss"] > 0
    assert summary["attention_layer"] == 1

    sizes = {  # (height, width): 8 rows of images; columns image + 4 heads, 4 reconstruction panels, image + PCA
        "reconstruction.png": (8 * DISPLAY, 4 * DISPLAY),
        "attention_layer0.png": (8 * DISPLAY, 5 * DISPLAY),
        "attention_layer1.png": (8 * DISPLAY, 5 * DISPLAY),
        "pca.png": (8 * DISPLAY, 2 * DISPLAY),
    }
    for name, shape in sizes.items():
        pixels = _png(out / name)
        assert pixels.shape[:2] == shape, name
        assert pixels.std() > 10, f"{name} is flat"
    for name in ("depth.png", "attention_layers.png"):
        assert _png(out / name).std() > 10
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".npz"))
    assert summary["completion"]["split"] == "completion"  # the held-out photographs (tests/test_completion.py)


def test_analyze_numbers_do_not_depend_on_the_batch_size(crate_ckpt, full_run, tmp_path):
    _, whole = full_run
    padded = analyze.run(crate_ckpt, analyze.WHAT, str(tmp_path), num_images=8, batch_size=5)  # 5 + 3 (padded)
    for key in ("coding_rate", "coding_rate_std", "sparsity"):
        for part in whole[key]:
            np.testing.assert_allclose(padded[key][part], whole[key][part], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded["reconstruction_loss"], whole["reconstruction_loss"], rtol=1e-5)
    np.testing.assert_array_equal(_png(tmp_path / "reconstruction.png"), _png(full_run[0] / "reconstruction.png"))


def test_analyze_image_folder(crate_ckpt, image_dir, tmp_path):
    summary = analyze.run(crate_ckpt, "coding_rate,attention,pca", str(tmp_path), images=str(image_dir), layer=0)
    assert summary["image_files"] == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert summary["num_images"] == 3 and summary["attention_layer"] == 0
    assert "sparsity" not in summary and "reconstruction_loss" not in summary
    assert _png(tmp_path / "attention_layer0.png").shape[:2] == (3 * DISPLAY, 5 * DISPLAY)
    assert _png(tmp_path / "pca.png").shape[:2] == (3 * DISPLAY, 2 * DISPLAY)


def test_corrupt_image_file_is_named(crate_ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skimage.data.coffee()).save(folder / "a_good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    with pytest.raises(ValueError, match=r"--images: .*broken\.jpg is not a readable image"):
        analyze.run(crate_ckpt, "coding_rate", str(tmp_path / "out"), images=str(folder))


def test_bad_arguments_name_the_flag(crate_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--what=coding_rate,entropy"):
        analyze.run(crate_ckpt, "coding_rate,entropy", str(tmp_path))
    with pytest.raises(ValueError, match="--layer=2"):
        analyze.run(crate_ckpt, "attention", str(tmp_path), layer=2)
    with pytest.raises(FileNotFoundError, match="--images="):
        analyze.run(crate_ckpt, "attention", str(tmp_path), images=str(tmp_path / "missing"))
    for size in (30, -4):
        with pytest.raises(ValueError, match=rf"^--image_size={size} must be .*patch size 4$"):
            analyze.run(crate_ckpt, "attention", str(tmp_path), image_size=size)


def test_vit_checkpoint(image_dir, tmp_path):
    vit = dict(TINY, decoder_width=64, decoder_depth=1, decoder_num_heads=4)
    ckpt = _save(tmp_path / "vit", "mae_vit_small", **vit)
    with pytest.raises(ValueError, match="--what=sparsity needs CRATE-MAE's ISTA outputs.*mae_vit_small"):
        analyze.run(ckpt, "attention,sparsity", str(tmp_path / "out"))
    # Attention maps (like reconstructions) need nothing CRATE-specific.
    summary = analyze.run(ckpt, "attention", str(tmp_path / "out"), images=str(image_dir))
    assert summary["attention_layer"] == 1
    assert _png(tmp_path / "out" / "attention_layer1.png").shape[:2] == (3 * DISPLAY, 5 * DISPLAY)


def test_encode(crate_ckpt):
    model, params = api.load(crate_ckpt)
    images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
    forward = jax.jit(lambda p, x: model.clone(mask_ratio=0.0).apply({"params": p}, x, noise=jnp.zeros((4, 64))))
    latent = forward(params, images).latent
    cls, mean = api.encode(model, params, images), api.encode(model, params, images, pool="mean")
    assert cls.shape == mean.shape == (4, 64)
    np.testing.assert_allclose(cls, latent[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, latent[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool='max'"):
        api.encode(model, params, images, pool="max")


def _forward(model, params, images, noise, interpolate_pos):
    """The model's output and, intercepted, what its submodules built: patch_embed / decoder_embed
    outputs and the encoder / decoder stacks' inputs."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.module.name
        if context.method_name == "__call__" and name in ("patch_embed", "decoder_embed"):
            seen[name] = out
        if context.method_name == "__call__" and name in ("encoder", "decoder"):
            seen[name] = args[0]
        return out

    def forward(params, images, noise):
        with nn.intercept_methods(record):
            out = model.apply({"params": params}, images, noise=noise, capture=True, interpolate_pos=interpolate_pos)
        return out, dict(seen)

    return jax.jit(forward)(params, images, noise)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_interpolate_pos_at_the_own_size_changes_nothing(name):
    model, params = _build(name, **TINY_MODELS[name])
    images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(5), (2, 64))  # the model's mask ratio: masked tokens too
    old, _ = _forward(model, params, images, noise, interpolate_pos=False)
    new, _ = _forward(model, params, images, noise, interpolate_pos=True)
    jax.tree.map(np.testing.assert_array_equal, new, old)
    with pytest.raises(ValueError, match=r"images must be \(batch, 32, 32, 3\) NHWC, got \(2, 48, 48, 3\)"):
        model.apply({"params": params}, jnp.zeros((2, 48, 48, 3)))  # other sizes only when asked for
    with pytest.raises(ValueError, match=r"multiples of patch_size=4 \(interpolate_pos=True\), got \(2, 30, 32, 3\)"):
        model.apply({"params": params}, jnp.zeros((2, 30, 32, 3)), interpolate_pos=True)


def test_position_table_is_the_own_table_resampled():
    own = layers.sincos_table_2d(64, 8, 8)
    np.testing.assert_array_equal(layers.position_table(64, 8), own)
    np.testing.assert_array_equal(layers.position_table(64, 8, (8, 8)), own)
    table = layers.position_table(64, 8, (12, 12))
    np.testing.assert_array_equal(table, layers.interpolate_table(own, (8, 8), (12, 12)))
    assert table.shape == (1 + 144, 64) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)  # the cls row is kept
    assert np.abs(table - layers.sincos_table_2d(64, 12, 12)).max() > 0.1  # not a fresh 12x12 table


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_other_sizes_add_the_resampled_table(name):
    """At 48 px (grid 8 -> 12) the tokens entering the encoder (and ViT-MAE's decoder) carry
    `position_table(width, 8, (12, 12))`, and every output follows the 12x12 grid."""
    model, params = _build(name, **TINY_MODELS[name], mask_ratio=0.0)
    images = jax.random.normal(jax.random.key(6), (2, 48, 48, 3))
    assert model.patch_grid(images.shape, interpolate_pos=True) == (12, 12)
    out, seen = _forward(model, params, images, jnp.zeros((2, 144)), interpolate_pos=True)
    cls = jnp.broadcast_to(params["cls_token"], (2, 1, 64))
    added = seen["encoder"] - jnp.concatenate([cls, seen["patch_embed"]], axis=1)
    np.testing.assert_allclose(added, np.broadcast_to(layers.position_table(64, 8, (12, 12)), added.shape), atol=1e-6)
    if name == "mae_vit_small":  # the decoder's own table, resampled likewise
        added = seen["decoder"] - seen["decoder_embed"]
        want = layers.position_table(32, 8, (12, 12))
        np.testing.assert_allclose(added, np.broadcast_to(want, added.shape), atol=1e-6)
    assert out.pred.shape == (2, 144, 48) and out.mask.shape == (2, 144) and out.latent.shape == (2, 145, 64)
    maps = attention.cls_attention(out.intermediates["encoder"]["attn"])
    assert maps.shape == (2, 2, 4, 144)  # (layers, images, heads, patches of the 12x12 grid)
    assert attention.to_patch_grid(maps, 12).shape == (2, 2, 4, 12, 12)


def test_analyze_at_another_image_size(crate_ckpt, image_dir, tmp_path):
    summary = analyze.run(crate_ckpt, analyze.WHAT, str(tmp_path), images=str(image_dir), image_size=48)
    assert summary["image_size"] == 48 and summary["model_image_size"] == 32
    for stat, part in [("coding_rate", "encoder"), ("coding_rate", "decoder"), ("sparsity", "encoder")]:
        assert len(summary[stat][part]) == 2 and np.all(np.isfinite(summary[stat][part]))
    assert np.isfinite(summary["reconstruction_loss"])
    display = 3 * 48  # enlarged 3x to reach 128 pixels
    sizes = {"attention_layer1.png": 5, "pca.png": 2, "reconstruction.png": 4}  # panels per row
    for name, panels in sizes.items():
        pixels = _png(tmp_path / name)
        assert pixels.shape[:2] == (3 * display, panels * display), name
        assert pixels.std() > 10, f"{name} is flat"


def test_encode_at_another_size(crate_ckpt):
    model, params = api.load(crate_ckpt)
    images = jax.random.normal(jax.random.key(7), (2, 48, 48, 3))
    out, _ = _forward(model.clone(mask_ratio=0.0), params, images, jnp.zeros((2, 144)), interpolate_pos=True)
    np.testing.assert_allclose(api.encode(model, params, images), out.latent[:, 0], rtol=1e-5, atol=1e-6)
