"""Independent plain-PyTorch reference implementations for parity tests: one module that
re-exports the models (the benchmark's `--torch_module` default imports it).

Written from docs/crate-mae-spec.md (and checked against the public originals), with the
exact PyTorch ``state_dict`` key layout of the released code, one file per model:

* ``CrateMAE``  (tests/torch_crate_mae.py) -- the released CRATE-MAE (Ma-Lab-Berkeley/CRATE,
  ``model/crate_ae/``): the encoder sees ALL tokens (mask tokens in embedding space), MSSA +
  ISTA encoder layers, approximate-inverse decoder layers (linear map then minus MSSA).
* ``FairMAE``   (tests/torch_fair_mae.py) -- FAIR's ``MaskedAutoencoderViT``
  (facebookresearch/mae ``models_mae.py``).
* what both share (tests/torch_mae_common.py): sin-cos table, patchify, masking, loss,
  ``randomize_``; FAIR's training loops and classifiers are in tests/torch_fair_loops.py.

Both models take the masking noise as an argument (instead of drawing ``torch.rand``) so
that a JAX implementation can be fed the very same noise, and return a dict
``{"loss", "pred", "mask", "latent"}``.

Everything is fp32 / CPU friendly, and depends only on ``torch`` and ``numpy``
(no timm, no einops).

Run ``python -m tests.torch_reference`` for a self-check (shapes, key list,
parameter counts of the released presets).
"""

from __future__ import annotations

import math  # noqa: F401  (re-exported, as before the split)

import numpy as np
import torch
import torch.nn as nn  # noqa: F401
import torch.nn.functional as F

from tests.torch_crate_mae import (  # noqa: F401
    ISTA,
    MSSA,
    CrateDecoderBlock,
    CrateEncoderBlock,
    CrateMAE,
    DecoderLinear,
    PreNorm,
    crate_mae_base,
    crate_mae_large,
    crate_mae_small,
    crate_mae_tiny,
)
from tests.torch_fair_mae import Attention, Block, FairMAE, Mlp, mae_vit_base, mae_vit_huge, mae_vit_large  # noqa: F401
from tests.torch_mae_common import (  # noqa: F401
    FIXED_TABLES,
    PatchEmbed,
    _append_mask_tokens_and_unshuffle,
    _fixed_table,
    _init_linear_and_ln,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    get_2d_sincos_pos_embed_from_grid,
    mae_loss,
    patchify,
    random_masking,
    randomize_,
    state_dict_numel,
    trainable_numel,
    unpatchify,
)

__all__ = [
    "get_2d_sincos_pos_embed",
    "get_2d_sincos_pos_embed_from_grid",
    "get_1d_sincos_pos_embed_from_grid",
    "patchify",
    "unpatchify",
    "random_masking",
    "mae_loss",
    "CrateMAE",
    "FairMAE",
    "randomize_",
    "crate_mae_tiny",
    "crate_mae_small",
    "crate_mae_base",
    "crate_mae_large",
    "mae_vit_base",
    "mae_vit_large",
    "mae_vit_huge",
]


# ---------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------
def _self_check():
    torch.manual_seed(0)
    N, img, P = 2, 32, 4
    L = (img // P) ** 2
    imgs = torch.randn(N, 3, img, img)
    noise = torch.rand(N, L)

    # --- sin-cos table sanity: first half = column, second half = row, cls row zero
    t = get_2d_sincos_pos_embed(8, 3, cls_token=True)
    assert t.shape == (10, 8) and np.all(t[0] == 0)
    # token 1 = (row 0, col 1): first-half sin(1*omega_0) = sin(1), second half sin(0) = 0
    assert np.isclose(t[1 + 1, 0], np.sin(1.0)) and np.isclose(t[1 + 1, 4], 0.0)
    # token 3 = (row 1, col 0)
    assert np.isclose(t[1 + 3, 0], 0.0) and np.isclose(t[1 + 3, 4], np.sin(1.0))

    # --- tiny CRATE-MAE
    crate = CrateMAE(img_size=img, patch_size=P, dim=64, depth=2, heads=4, decoder_depth=2)
    before = {k: v.clone() for k, v in crate.state_dict().items()}
    randomize_(crate, seed=1)
    for k, v in crate.state_dict().items():  # every parameter changed, fixed tables untouched
        assert torch.equal(v, before[k]) == (k in FIXED_TABLES), k
    with torch.no_grad():
        out = crate(imgs, noise, mask_ratio=0.75)
        # token assembly: visible positions hold their patch embedding, removed ones the
        # mask token, cls first; the table is added once to all L+1 rows
        tok, mask, _ = crate.embed_tokens(imgs, noise, 0.75)
        emb = crate.patch_embed(imgs)
        exp = torch.where(mask.bool().unsqueeze(-1), crate.mask_token.expand_as(emb), emb)
        exp = torch.cat([crate.cls_token.expand(N, 1, 64), exp], 1) + crate.decoder_pos_embed
        assert torch.allclose(tok, exp)
        assert torch.equal(mask, (noise > noise.sort(1).values[:, int(L * 0.25) - 1 : int(L * 0.25)]).float())
    print("CrateMAE tiny:", {k: tuple(v.shape) for k, v in out.items()}, "loss", out["loss"].item())
    assert out["pred"].shape == (N, L, P * P * 3)
    assert out["mask"].shape == (N, L) and int(out["mask"].sum()) == N * (L - int(L * 0.25))
    assert out["latent"].shape == (N, L + 1, 64)
    assert torch.isfinite(out["loss"])
    print("CrateMAE tiny state_dict keys:")
    for k, v in crate.state_dict().items():
        print(f"  {k} {tuple(v.shape)}")

    # ISTA convention self-check against the release's F.linear formulation
    ista = crate.blocks[0].layers[0][1].fn
    y = torch.randn(3, 5, 64)
    W = ista.weight
    x1 = F.linear(y, W)
    grad_1 = F.linear(x1, W.t())
    grad_2 = F.linear(y, W.t())
    ref = F.relu(y + ista.step_size * (grad_2 - grad_1) - ista.step_size * ista.lambd)
    assert torch.allclose(ista(y), ref, atol=1e-5)

    # heads == 1: to_out is identity (no keys)
    c1 = CrateMAE(img_size=img, patch_size=P, dim=16, depth=1, heads=1, decoder_depth=1)
    assert not any("to_out" in k for k in c1.state_dict())

    # --- tiny FAIR MAE
    fair = FairMAE(
        img_size=img,
        patch_size=P,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    randomize_(fair, seed=2)
    with torch.no_grad():
        out = fair(imgs, noise, mask_ratio=0.75)
    print("FairMAE tiny:", {k: tuple(v.shape) for k, v in out.items()}, "loss", out["loss"].item())
    assert out["latent"].shape == (N, 1 + int(L * 0.25), 64)
    assert out["pred"].shape == (N, L, P * P * 3)
    print("FairMAE tiny state_dict keys:")
    for k, v in fair.state_dict().items():
        print(f"  {k} {tuple(v.shape)}")

    fair_np = FairMAE(
        img_size=img,
        patch_size=P,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=True,
    )
    assert torch.isfinite(fair_np(imgs, noise)["loss"])

    # --- parameter counts of the presets (all state_dict entries, fixed tables included)
    expected = {
        "crate_mae_tiny": (crate_mae_tiny, 11.56),
        "crate_mae_small": (crate_mae_small, 25.41),
        "crate_mae_base": (crate_mae_base, 44.64),
        "crate_mae_large": (crate_mae_large, 154.27),
        "mae_vit_base": (mae_vit_base, 111.91),
        "mae_vit_large": (mae_vit_large, 329.54),
    }
    for name, (fn, exp) in expected.items():
        m = fn()
        total, train = state_dict_numel(m), trainable_numel(m)
        print(
            f"{name}: state_dict numel {total} ({total / 1e6:.2f}M), trainable {train} ({train / 1e6:.2f}M)"
            f"; spec {exp}M"
        )
        assert round(total / 1e6, 2) == exp, (name, total, exp)
        if name == "crate_mae_base":
            assert round(train / 1e6, 2) == 44.34, train
        del m
    print("self-check OK")


if __name__ == "__main__":
    _self_check()
