"""Model invariants: parameter table, masking, jit, gradients, layouts, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from crate_jax import models
from crate_jax.models.crate import EncoderLayer, drop_path
from crate_jax.models.layers import interpolate_table, patchify, sincos_table_2d, unpatchify
from crate_jax.models.stack import LayerStack, drop_path_schedule
from crate_jax.models.vit import ViTBlock

TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)

# The spec's table (shared/docs/crate-mae-spec.md), millions, counted over every
# state_dict entry of the release as the papers count.
PAPER_TABLE = {
    ("crate_mae_tiny", ()): 11.56,
    ("crate_mae_small", ()): 25.41,
    ("crate_mae_base", ()): 44.64,
    ("crate_mae_large", ()): 154.27,
    ("mae_vit_small", ()): 47.58,
    ("mae_vit_base", ()): 111.91,
    ("mae_vit_base", (("decoder_width", 768),)): 143.84,
    ("mae_vit_large", ()): 329.54,
    ("mae_vit_huge", ()): 657.07,
}


@pytest.mark.parametrize("name,overrides", list(PAPER_TABLE))
def test_parameter_counts_match_the_paper_table(name, overrides):
    counts = models.count_params(name, **dict(overrides))
    released, trained = counts["as_released"] / 1e6, counts["trainable"] / 1e6
    print(f"{name} {dict(overrides)}: {released:.2f}M as released, {trained:.2f}M trained here")
    assert abs(counts["as_released"] / 1e6 - PAPER_TABLE[(name, overrides)]) < 0.01
    assert counts["trainable"] < counts["as_released"]


def test_crate_base_trainable_in_release():
    # The release trains everything but the two fixed tables (44.34M); we also drop the
    # unused decoder_embed Linear(768, 768).
    counts = models.count_params("crate_mae_base")
    assert abs((counts["as_released"] - 2 * 197 * 768) / 1e6 - 44.34) < 0.01
    assert counts["trainable"] == counts["as_released"] - 2 * 197 * 768 - (768 * 768 + 768)


@pytest.fixture(scope="module")
def tiny():
    model = models.build("crate_mae_tiny", **TINY)
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    params = model.init(jax.random.key(0), images)["params"]
    return model, nn.unbox(params), images


def test_mask_ratio_exact_per_sample_and_noise_determines_mask(tiny):
    model, params, images = tiny
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    a = model.apply({"params": params}, images, noise=noise)
    b = model.apply({"params": params}, images, noise=noise)
    np.testing.assert_array_equal(a.mask.sum(1), np.full(8, 64 - int(64 * 0.25)))
    np.testing.assert_array_equal(a.mask, b.mask)
    # MAE: the removed patches are those with the largest noise.
    order = np.argsort(np.asarray(noise), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(a.mask), order[:, :16], 1), 0)
    c = model.apply({"params": params}, images, rngs={"mask": jax.random.key(3)})
    d = model.apply({"params": params}, images, rngs={"mask": jax.random.key(4)})
    assert not np.array_equal(c.mask, d.mask)


def test_jit_equals_no_jit_and_gradients_finite(tiny):
    model, params, images = tiny
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    eager = model.apply({"params": params}, images, noise=noise)
    jitted = jax.jit(lambda p: model.apply({"params": p}, images, noise=noise))(params)
    np.testing.assert_allclose(eager.loss, jitted.loss, rtol=1e-6)
    assert float(jnp.linalg.norm(eager.pred - jitted.pred) / jnp.linalg.norm(eager.pred)) < 1e-5
    grads = jax.grad(lambda p: model.apply({"params": p}, images, noise=noise).loss)(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_visible_and_all_encoders_share_parameters(tiny):
    model, params, images = tiny
    visible = models.build("crate_mae_tiny", encoder_tokens="visible", **TINY)
    vparams = nn.unbox(visible.init(jax.random.key(0), images)["params"])
    assert jax.tree.structure(vparams) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, vparams) == jax.tree.map(jnp.shape, params)
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    out = visible.apply({"params": params}, images, noise=noise)  # a checkpoint of one loads into the other
    assert out.latent.shape == (8, 17, 64) and out.pred.shape == (8, 64, 48)


def test_scan_and_unrolled_layouts_convert_and_agree(tiny):
    model, params, images = tiny
    scanned = models.build("crate_mae_tiny", scan_layers=True, **TINY)
    sparams = models.to_layout(params, scan=True)
    assert sparams["encoder"]["layers"]["ista"]["D"].shape == (2, 64, 64)
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    a = model.apply({"params": params}, images, noise=noise)
    b = scanned.apply({"params": sparams}, images, noise=noise)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
    back = models.to_layout(sparams, scan=False)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back, params))


def test_capture_returns_per_layer_intermediates(tiny):
    model, params, images = tiny
    out = model.apply({"params": params}, images, noise=jnp.zeros((8, 64)), capture=True)
    enc, dec = out.intermediates["encoder"], out.intermediates["decoder"]
    assert enc["attn"].shape == (2, 8, 4, 65, 65) and enc["ista"].shape == (2, 8, 65, 64)
    assert enc["qkv"].shape == (2, 8, 65, 64) and dec["out"].shape == (2, 8, 65, 64)
    np.testing.assert_allclose(enc["attn"].sum(-1), 1.0, rtol=1e-5)
    assert float(enc["ista"].min()) >= 0.0  # ISTA outputs are non-negative
    assert model.apply({"params": params}, images, noise=jnp.zeros((8, 64))).intermediates == {}


def test_drop_path_drops_at_the_rate_and_rescales():
    x = jax.random.normal(jax.random.key(0), (20000, 2, 3))
    jitted = jax.jit(drop_path)  # the rate traced, as in a scanned layer
    np.testing.assert_array_equal(jitted(x, 0.0, jax.random.key(1)), x)  # exactly the identity
    out = np.asarray(jitted(x, 0.3, jax.random.key(1)))
    dropped = np.all(out == 0, axis=(1, 2))
    assert abs(dropped.mean() - 0.3) < 0.02  # binomial std 0.003
    np.testing.assert_allclose(out[~dropped], np.asarray(x)[~dropped] / 0.7, rtol=1e-6)
    assert drop_path(x.astype(jnp.bfloat16), 0.1, jax.random.key(1)).dtype == jnp.bfloat16


class _RateProbe(nn.Module):
    """A stack layer that reports the rate it is given and which of 4096 examples it drops."""

    capture: bool = True

    @nn.compact
    def __call__(self, x, drop_path_rate=None):
        kept = drop_path(jnp.ones((4096, 1, 1)), drop_path_rate, self.make_rng("dropout"))[:, 0, 0] > 0
        return x, {"rate": jnp.asarray(drop_path_rate, jnp.float32), "kept": kept}


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (False, "full"), (True, "full")])
def test_stack_gives_each_layer_its_linear_drop_path_rate(scan, remat):
    np.testing.assert_allclose(drop_path_schedule(0.3, 4), [0.0, 0.1, 0.2, 0.3], atol=1e-7)
    stack = LayerStack(_RateProbe, {}, 4, scan=scan, remat=remat, capture=True, drop_path_rate=0.3)
    _, aux = stack.apply({}, jnp.zeros(2), rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(aux["rate"], drop_path_schedule(0.3, 4))
    np.testing.assert_allclose(1 - aux["kept"].mean(axis=1), [0.0, 0.1, 0.2, 0.3], atol=0.025)
    assert not np.array_equal(aux["kept"][2], aux["kept"][3])  # each layer draws its own mask


DROP_PATH_LAYERS = [
    (EncoderLayer, dict(width=64, num_heads=4)),
    (ViTBlock, dict(width=64, num_heads=4, mlp_ratio=2.0)),
]


@pytest.mark.parametrize("layer_cls,kwargs", DROP_PATH_LAYERS, ids=["crate", "vit"])
def test_drop_path_stacks_scanned_and_unrolled(layer_cls, kwargs):
    x = jax.random.normal(jax.random.key(0), (8, 5, 64))

    def run(scan, train, rate, remat="none", params=None):
        stack = LayerStack(layer_cls, dict(kwargs, deterministic=not train), 3, scan, remat, drop_path_rate=rate)
        if params is None:
            params = nn.unbox(stack.init(jax.random.key(1), x)["params"])
        else:
            params = models.to_layout({"encoder": params}, scan)["encoder"]
        apply = jax.jit(lambda p: stack.apply({"params": p}, x, rngs={"dropout": jax.random.key(2)})[0])
        return apply(params), params

    unrolled, params = run(False, False, 0.0)
    for train, rate in ((False, 0.3), (True, 0.0)):  # no drop-path: the same function either way
        np.testing.assert_allclose(run(True, train, rate, params=params)[0], unrolled, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(run(False, train, rate, params=params)[0], unrolled)
    for scan in (False, True):
        trained = run(scan, True, 0.3, remat="full", params=params)[0]
        assert np.all(np.isfinite(trained)) and not np.allclose(trained, unrolled, atol=1e-3)
    # At rate 1 every residual branch is dropped: a ViT block is the identity, a CRATE layer ISTA(LN2(Z)).
    layer = layer_cls(**kwargs, deterministic=False)
    layer_params = params["layer_0"]
    out, _ = layer.apply({"params": layer_params}, x, 1.0, rngs={"dropout": jax.random.key(3)})
    if layer_cls is ViTBlock:
        np.testing.assert_array_equal(out, x)
    else:
        no_mssa = jax.tree_util.tree_map_with_path(
            lambda path, v: v * 0 if "to_out" in jax.tree_util.keystr(path) else v, layer_params
        )
        np.testing.assert_allclose(out, layer.apply({"params": no_mssa}, x)[0], rtol=1e-6, atol=1e-6)


def test_every_parameter_has_logical_axis_names():
    for name, extra in (("crate_mae_tiny", {}), ("mae_vit_base", dict(decoder_width=32, decoder_num_heads=4))):
        for scan in (False, True):
            model = models.build(name, scan_layers=scan, **TINY, **extra)
            boxed = models.abstract_params(model, boxed=True)
            flat = traverse_util.flatten_dict(
                boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned)
            )
            for path, leaf in flat.items():
                assert isinstance(leaf, nn.LogicallyPartitioned), path
                assert len(leaf.names) == len(leaf.value.shape), path
                assert any(leaf.names), path
                if scan and "/layers/" in path:
                    assert leaf.names[0] == "layers", path


def test_bf16_compute_keeps_fp32_params_and_loss(tiny):
    _, params, images = tiny
    model = models.build("crate_mae_tiny", dtype="bfloat16", **TINY)
    out = model.apply({"params": params}, images, noise=jnp.zeros((8, 64)), capture=True)
    assert out.loss.dtype == jnp.float32 and out.pred.dtype == jnp.bfloat16
    assert out.intermediates["encoder"]["attn"].dtype == jnp.float32  # softmax in fp32
    assert jnp.isfinite(out.loss)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(models.abstract_params(model)))


def test_example_weight_zero_removes_an_example(tiny):
    model, params, images = tiny
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    weight = jnp.array([1.0] * 7 + [0.0])
    weighted = model.apply({"params": params}, images, noise=noise, example_weight=weight)
    first7 = model.apply({"params": params}, images[:7], noise=noise[:7])
    np.testing.assert_allclose(weighted.loss, first7.loss, rtol=1e-5)


def test_build_errors_name_the_key():
    with pytest.raises(ValueError, match="model.name"):
        models.build("crate_mae_huge")
    with pytest.raises(ValueError, match="model.image_size=30 is not divisible by model.patch_size=4"):
        models.build("crate_mae_tiny", image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="model.num_heads=5 does not divide model.width=64"):
        models.build("crate_mae_tiny", width=64, num_heads=5)
    with pytest.raises(ValueError, match="model.decoder_width does not apply to crate_mae_tiny"):
        models.build("crate_mae_tiny", decoder_width=64)
    with pytest.raises(ValueError, match="model.remat"):
        models.build("crate_mae_tiny", remat="sometimes")
    with pytest.raises(ValueError, match="model.dtype"):
        models.build("crate_mae_tiny", dtype="float77")
    model = models.build("crate_mae_tiny", **TINY)
    with pytest.raises(ValueError, match=r"images must be \(batch, 32, 32, 3\)"):
        model.init(jax.random.key(0), jnp.ones((1, 3, 32, 32)))


def test_patchify_roundtrip_and_order():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # patch (row 0, col 1) starts at pixel (0, 4); within a patch: (p, q, c) row-major
    np.testing.assert_array_equal(p[0, 1, :3], x[0, 0, 4])
    np.testing.assert_array_equal(p[0, 1, 3:6], x[0, 0, 5])
    np.testing.assert_array_equal(p[0, 1, 12:15], x[0, 1, 4])
    np.testing.assert_array_equal(unpatchify(p, 4), x)


def test_sincos_table_and_interpolation():
    t = sincos_table_2d(16, 3, 5)
    assert t.shape == (16, 16) and not t[0].any()
    # column index in the first half of the channels: rows of the same column agree there
    np.testing.assert_array_equal(t[1 + 0 * 5 + 2, :8], t[1 + 2 * 5 + 2, :8])
    np.testing.assert_array_equal(t[1 + 1 * 5 + 0, 8:], t[1 + 1 * 5 + 4, 8:])
    np.testing.assert_array_equal(interpolate_table(t, (3, 5), (3, 5)), t)
    assert interpolate_table(t, (3, 5), (6, 10)).shape == (61, 16)


def test_interpolation_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    t = sincos_table_2d(32, 4, 4)
    new = interpolate_table(t, (4, 4), (7, 7))
    grid = torch.from_numpy(t[1:].reshape(1, 4, 4, 32)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, scale_factor=(7.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 32).numpy()
    np.testing.assert_allclose(new[1:], ref, atol=1e-5)


@pytest.mark.parametrize("name", ["crate_mae_tiny", "mae_vit_small"])
def test_whole_image_loss_averages_every_patch(name):
    model = models.build(name, **TINY, decoder_depth=1, decoder_num_heads=4)
    whole = model.clone(loss_patches="all")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, model.num_patches))
    params = model.init(jax.random.key(2), images)["params"]
    out = model.apply({"params": params}, images, noise=noise)
    out_all = whole.apply({"params": params}, images, noise=noise)
    per_patch = np.mean((np.asarray(out.pred) - np.asarray(patchify(images, 4))) ** 2, axis=-1)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(out.loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(out_all.loss, per_patch.mean(), rtol=1e-5)
    assert float(out_all.loss_weight) == per_patch.size
    with pytest.raises(ValueError, match=r"^model.loss_patches='visible' is not one of \('masked', 'all'\)$"):
        models.build(name, loss_patches="visible")
