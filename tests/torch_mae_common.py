"""What the PyTorch references of CRATE-MAE and FAIR's MAE share: MAE's sin-cos table,
patchify, noise-driven random masking, the loss, the patch embedding, the released init of
Linear / LayerNorm, and the randomisation parity tests use. Written from
docs/crate-mae-spec.md; depends only on torch and numpy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


# ---------------------------------------------------------------------------
# 2-D sin-cos position table (MAE's util/pos_embed.py semantics)
# ---------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos*omega), cos(pos*omega)],
    omega_i = 1 / 10000^(i / (embed_dim/2)), i = 0..embed_dim/2-1.

    As in MAE, everything is computed in float32 (float32 positions and omega); the
    2-D table only becomes float64 when the all-zero cls row (float64) is concatenated.
    """
    assert embed_dim % 2 == 0
    half = embed_dim // 2
    omega = np.arange(half, dtype=np.float32)
    omega /= half  # == embed_dim / 2.
    omega = 1.0 / 10000**omega  # stays float32
    pos = np.asarray(pos).reshape(-1)
    out = np.einsum("m,d->md", pos, omega)  # outer product (M, half)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """grid: (2, 1, gs, gs) with grid[0] = column (w) index, grid[1] = row (h) index.
    First half of the channels encodes grid[0] (the column), second half grid[1] (the row)."""
    assert embed_dim % 2 == 0
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # column index
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # row index
    return np.concatenate([emb_a, emb_b], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """(gs*gs, D) or, with ``cls_token``, (1 + gs*gs, D) with an all-zero first row.

    Token order is row-major over the patch grid (token t = row * gs + col), matching
    the ``flatten(2)`` of the patch-embedding conv output. Exactly MAE's function:
    ``np.meshgrid(grid_w, grid_h)`` (w first, 'xy' indexing) so grid[0][r, c] = c.
    """
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first: grid[0][r, c] = c, grid[1][r, c] = r
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


# ---------------------------------------------------------------------------
# Shared MAE helpers
# ---------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); inner order (p_row, p_col, channel): 'nchpwq->nhwpqc'."""
    n, c, hh, ww = imgs.shape
    assert hh == ww and hh % p == 0
    h = w = hh // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); inverse of ``patchify``."""
    n, L, _ = x.shape
    h = w = int(round(L**0.5))
    assert h * w == L
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * p, w * p)


def random_masking(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """MAE per-sample random masking driven by the given ``noise`` (N, L).

    ids_shuffle = argsort(noise) (ascending: small is keep, large is remove),
    ids_restore = argsort(ids_shuffle); keep the first int(L * (1 - mask_ratio)).
    Returns (x_kept (N, len_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L)).

    ``stable=True`` argsort: identical to the release for distinct noise values, and
    equal to ``jnp.argsort`` (stable) when there are ties.
    """
    N, L, D = x.shape
    assert noise.shape == (N, L), (noise.shape, (N, L))
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, dtype=x.dtype, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def _append_mask_tokens_and_unshuffle(
    x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """(N, len_keep, D) visible tokens (no cls) -> (N, L, D) in image order, removed
    positions filled with ``mask_token`` (1, 1, D)."""
    N, len_keep, D = x_kept.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.expand(N, L - len_keep, D)
    x_ = torch.cat([x_kept, mask_tokens], dim=1)
    return torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))


def mae_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix_loss: bool = False
) -> torch.Tensor:
    """Per-patch MSE averaged over removed patches (mask == 1) only.
    With ``norm_pix_loss`` the target is normalised per patch by its mean and UNBIASED
    variance (ddof=1), eps 1e-6 inside the sqrt."""
    target = patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    return (loss * mask).sum() / mask.sum()


class PatchEmbed(nn.Module):
    """timm-style PatchEmbed: Conv2d(in_chans, dim, P, stride P) -> flatten -> (N, L, dim).
    Only parameters: ``proj.weight`` (dim, in_chans, P, P), ``proj.bias`` (dim,)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        assert img_size % patch_size == 0
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.img_size, self.img_size), x.shape
        x = self.proj(x)  # (N, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (N, L, D), row-major token order


def _fixed_table(num_tokens: int, dim: int) -> nn.Parameter:
    # Released layout: nn.Parameter(requires_grad=False) -> in state_dict and in
    # named_parameters(), but never trained.
    return nn.Parameter(torch.zeros(1, num_tokens, dim), requires_grad=False)


def _init_linear_and_ln(m):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# Randomisation for parity tests
# ---------------------------------------------------------------------------
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite EVERY parameter except the fixed sin-cos tables with random normals
    (deterministic given ``seed``), so parity tests exercise all of them:

    * LayerNorm weight: 1 + N(0, 0.1); LayerNorm bias: N(0, 0.1)
    * matrices (Linear / conv / ISTA D / decoder D~, ndim >= 2 except tokens):
      N(0, 1/sqrt(fan_in)) (std 0.125 at d=64, 0.036 at d=768), fan_in = prod(shape[1:])
    * biases (other 1-D params): N(0, 0.1)
    * cls_token / mask_token: N(0, 0.2)
    """
    g = torch.Generator().manual_seed(int(seed))
    ln_params = set()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            ln_params.add(id(m.weight))
    for name, p in model.named_parameters(recurse=True, remove_duplicate=True):
        if name.split(".")[-1] in FIXED_TABLES:
            continue
        z = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if id(p) in ln_params:
            p.copy_(1.0 + 0.1 * z)
        elif name in ("cls_token", "mask_token"):
            p.copy_(0.2 * z)
        elif p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(z / math.sqrt(fan_in))
        else:
            p.copy_(0.1 * z)
    return model


def state_dict_numel(model: nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values())


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
