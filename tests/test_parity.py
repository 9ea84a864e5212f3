"""Parity with a PyTorch model written from the spec in the released state_dict layout.

Random weights -> `convert` -> the same images and noise -> loss, pred and latent agree
to relative error <= 1e-5 in fp32.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crate_jax import models  # noqa: E402
from crate_jax.models import crate  # noqa: E402
from crate_jax.tools.import_torch import convert  # noqa: E402
from tests import torch_reference  # noqa: E402

TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)
RTOL = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_crate(size=TINY, **kw):
    m = torch_reference.CrateMAE(
        img_size=size["image_size"], patch_size=size["patch_size"], dim=size["width"], depth=size["depth"],
        heads=size["num_heads"], decoder_depth=size.get("decoder_depth", size["depth"]), **kw,
    )  # fmt: skip
    return torch_reference.randomize_(m, seed=0).eval()


def inputs(batch, image_size, num_patches, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    noise = rng.uniform(size=(batch, num_patches)).astype(np.float32)
    return images, noise


def compare(tmodel, name, overrides, batch=4, mask_ratio=0.75):
    model = models.build(name, mask_ratio=mask_ratio, **overrides)
    params = convert(tmodel.state_dict(), name, mask_ratio=mask_ratio, **overrides)
    images, noise = inputs(batch, model.image_size, model.num_patches)
    out = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(params, images, noise)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(noise), mask_ratio=mask_ratio)
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"].numpy())
    for key in ("loss", "pred", "latent"):
        err = rel(getattr(out, key), ref[key].numpy())
        assert err <= RTOL, f"{name} {key}: relative error {err:.2e}"
    return out, ref


@pytest.mark.parametrize("ista_lambda", [0.5, 5.0])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_crate_mae_matches_torch(ista_lambda, norm_pix_loss):
    tmodel = torch_crate(ista_lambda=ista_lambda, norm_pix_loss=norm_pix_loss)
    compare(tmodel, "crate_mae_tiny", dict(TINY, ista_lambda=ista_lambda, norm_pix_loss=norm_pix_loss))


def test_crate_mae_unfused_ista_and_scan_match_torch():
    tmodel = torch_crate()
    compare(tmodel, "crate_mae_tiny", dict(TINY, ista_fused=False))
    compare(tmodel, "crate_mae_tiny", dict(TINY, scan_layers=True, remat="full"))


def test_crate_mae_factored_ista_matches_torch():
    # 2 images x 17 tokens of width 64: few enough rows that ISTA runs as (Y - Y D^T) D.
    size = dict(TINY, image_size=16)
    assert crate.ista_form(2 * 17, 64) == "factored"
    compare(torch_crate(size), "crate_mae_tiny", size, batch=2)


@pytest.mark.parametrize("attention", ["symmetric", "autodiff", "dot_product", "pallas_tpu"])
def test_crate_mae_attention_implementations_match_torch(attention):
    # pallas_tpu: the TPU kernel itself, run by Pallas's TPU interpreter on CPU.
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode() if attention == "pallas_tpu" else contextlib.nullcontext():
        compare(torch_crate(), "crate_mae_tiny", dict(TINY, attention=attention))


def test_crate_mae_single_head_uses_identity_output():
    size = dict(TINY, num_heads=1)
    tmodel = torch_crate(size)
    assert not any("to_out" in k for k in tmodel.state_dict())
    compare(tmodel, "crate_mae_tiny", size)


@pytest.mark.parametrize(
    "norm_pix_loss, attention",
    [(False, "auto"), (True, "auto"), (False, "dot_product"), (False, "pallas_tpu")],
)
def test_fair_mae_matches_torch(norm_pix_loss, attention):
    from jax.experimental.pallas import tpu as pltpu

    tmodel = torch_reference.FairMAE(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
        decoder_depth=2, decoder_num_heads=4, norm_pix_loss=norm_pix_loss,
    )  # fmt: skip
    tmodel = torch_reference.randomize_(tmodel, seed=1).eval()
    overrides = dict(TINY, decoder_width=32, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=norm_pix_loss)
    with pltpu.force_tpu_interpret_mode() if attention == "pallas_tpu" else contextlib.nullcontext():
        compare(tmodel, "mae_vit_base", dict(overrides, attention=attention))


def test_crate_mae_tiny_preset_shapes_at_224():
    tmodel = torch_reference.randomize_(torch_reference.CrateMAE(dim=384, heads=6), seed=2).eval()
    out, _ = compare(tmodel, "crate_mae_tiny", {}, batch=1)
    assert out.pred.shape == (1, 196, 768)


def test_visible_encoder_loads_the_same_weights_but_differs():
    tmodel = torch_crate()
    params = convert(tmodel.state_dict(), "crate_mae_tiny", **TINY)
    visible = models.build("crate_mae_tiny", encoder_tokens="visible", **TINY)
    full = models.build("crate_mae_tiny", **TINY)
    images, noise = inputs(2, 32, 64)
    a = visible.apply({"params": params}, images, noise=noise)
    b = full.apply({"params": params}, images, noise=noise)
    assert a.latent.shape == (2, 17, 64) and b.latent.shape == (2, 65, 64)
    assert jnp.isfinite(a.loss) and rel(a.pred, b.pred) > 1e-3
