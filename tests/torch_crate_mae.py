"""PyTorch reference of the released CRATE-MAE (Ma-Lab-Berkeley/CRATE, `model/crate_ae/`),
written from docs/crate-mae-spec.md with the release's exact state_dict layout: the encoder
sees ALL tokens (mask tokens in embedding space), MSSA + ISTA encoder layers,
approximate-inverse decoder layers (linear map, then minus MSSA). Masking is driven by an
explicit `noise` argument so that JAX can be fed the very same noise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.torch_mae_common import (
    PatchEmbed,
    _append_mask_tokens_and_unshuffle,
    _fixed_table,
    _init_linear_and_ln,
    get_2d_sincos_pos_embed,
    mae_loss,
    patchify,
    random_masking,
    unpatchify,
)


# ---------------------------------------------------------------------------
# CRATE-MAE (released model)
# ---------------------------------------------------------------------------
class PreNorm(nn.Module):
    """``norm`` (LayerNorm, PyTorch default eps 1e-5) then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class MSSA(nn.Module):
    """Multi-head subspace self-attention: one bias-free projection gives q = k = v.

    Keys: ``qkv.weight`` (K*p, d); ``to_out.0.{weight,bias}`` (d, K*p) / (d,) -- absent
    (identity) when heads == 1 and p == d, as in the release.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, inner, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        # nn.Sequential so the key is ``to_out.0.*`` (index 1 was a Dropout in the release)
        self.to_out = nn.Sequential(nn.Linear(inner, dim)) if project_out else nn.Identity()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """U^T x per head: (N, n, d) -> (N, K, n, p)."""
        N, n, _ = x.shape
        return self.qkv(x).reshape(N, n, self.heads, self.dim_head).permute(0, 2, 1, 3)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        w = self.project(x)
        return torch.softmax((w @ w.transpose(-1, -2)) * self.scale, dim=-1)  # (N, K, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, n, _ = x.shape
        w = self.project(x)
        attn = torch.softmax((w @ w.transpose(-1, -2)) * self.scale, dim=-1)
        out = attn @ w  # (N, K, n, p)
        out = out.permute(0, 2, 1, 3).reshape(N, n, self.heads * self.dim_head)
        return self.to_out(out)


class ISTA(nn.Module):
    """One ISTA step on the (normalised) input, key ``weight`` = D (d, d).

    Release (crate_encoder.FeedForward.forward), with F.linear(x, W) = x W^T:
        x1     = F.linear(x, D)        = x D^T
        grad_1 = F.linear(x1, D^T)     = x D^T D
        grad_2 = F.linear(x, D^T)      = x D
        out    = relu(x + eta * (grad_2 - grad_1) - eta * lambda)
    i.e. in row-vector form  Z = ReLU(Y + eta (Y D - (Y D^T) D) - eta lambda).
    """

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)  # a=0, fan_in=d: U(-sqrt(6/d), sqrt(6/d))
        self.step_size = step_size
        self.lambd = lambd

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        D = self.weight
        yD = y @ D  # == F.linear(y, D.t())
        yDtD = (y @ D.t()) @ D  # == F.linear(F.linear(y, D), D.t())
        return F.relu(y + self.step_size * (yD - yDtD) - self.step_size * self.lambd)


class DecoderLinear(nn.Module):
    """Decoder's d x d linear map, key ``weight`` (no bias): F.linear(x, W) = x W^T."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight)


class CrateEncoderBlock(nn.Module):
    """Keys: layers.0.0.{norm,fn.qkv,fn.to_out.0}, layers.0.1.{norm,fn.weight}.
    Z_half = Z + MSSA(LN1(Z)); Z_next = ISTA(LN2(Z_half))."""

    def __init__(self, dim, heads, dim_head, ista_step=0.1, ista_lambda=0.5):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, MSSA(dim, heads, dim_head)),
                        PreNorm(dim, ISTA(dim, ista_step, ista_lambda)),
                    ]
                )
            ]
        )

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x) + x)
        return x


class CrateDecoderBlock(nn.Module):
    """Keys: layers.0.0.{norm,fn.weight}, layers.0.1.{norm,fn.qkv,fn.to_out.0}.
    Z_half = LN1(Z) W^T; Z_next = Z_half - MSSA(LN2(Z_half)). No skip from Z."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, DecoderLinear(dim)),
                        PreNorm(dim, MSSA(dim, heads, dim_head)),
                    ]
                )
            ]
        )

    def forward(self, x):
        for ff, attn in self.layers:
            h = ff(x)
            x = h - attn(h)
        return x


class CrateMAE(nn.Module):
    """Released CRATE-MAE (Ma-Lab-Berkeley/CRATE ``model/crate_ae``), masking driven by
    an explicit ``noise`` argument. Encoder and decoder share width ``dim`` and head
    count ``heads`` (as in every released preset)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        dim=768,
        depth=12,
        heads=12,
        decoder_depth=12,
        ista_step=0.1,
        ista_lambda=0.5,
        norm_pix_loss=False,
    ):
        super().__init__()
        assert dim % heads == 0
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.dim = dim
        self.heads = heads
        self.norm_pix_loss = norm_pix_loss
        dim_head = dim // heads

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        L = self.patch_embed.num_patches
        self.num_patches = L
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = _fixed_table(L + 1, dim)  # stored, never used in forward
        self.blocks = nn.ModuleList(
            [CrateEncoderBlock(dim, heads, dim_head, ista_step, ista_lambda) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

        self.decoder_embed = nn.Linear(dim, dim, bias=True)  # stored, never used in forward
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = _fixed_table(L + 1, dim)  # the table the forward adds
        self.decoder_blocks = nn.ModuleList([CrateDecoderBlock(dim, heads, dim_head) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # -- init (as released) ------------------------------------------------
    def initialize_weights(self):
        gs = self.patch_embed.grid_size
        for table in (self.pos_embed, self.decoder_pos_embed):
            t = get_2d_sincos_pos_embed(table.shape[-1], gs, cls_token=True)
            table.data.copy_(torch.from_numpy(t).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_ln)
        # ISTA D / decoder D~ keep their kaiming_uniform_ init (they are not nn.Linear).

    # -- pieces ---------------------------------------------------------------
    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.in_chans)

    def embed_tokens(self, imgs, noise, mask_ratio):
        """Patch embed, mask, fill mask tokens, unshuffle, prepend cls, add the table once.
        Returns (tokens (N, L+1, d), mask, ids_restore)."""
        x = self.patch_embed(imgs)
        x_kept, mask, ids_restore = random_masking(x, noise, mask_ratio)
        x = _append_mask_tokens_and_unshuffle(x_kept, self.mask_token, ids_restore)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.decoder_pos_embed  # the release adds decoder_pos_embed (not pos_embed)
        return x, mask, ids_restore

    def forward_encoder(self, imgs, noise, mask_ratio=0.75, return_layers=False):
        x, mask, ids_restore = self.embed_tokens(imgs, noise, mask_ratio)
        layers = [x]
        for blk in self.blocks:
            x = blk(x)
            layers.append(x)
        x = self.norm(x)
        if return_layers:
            return x, mask, ids_restore, layers
        return x, mask, ids_restore

    def forward_decoder(self, latent, return_layers=False):
        x = latent
        layers = [x]
        for blk in self.decoder_blocks:
            x = blk(x)
            layers.append(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        x = x[:, 1:, :]
        if return_layers:
            return x, layers
        return x

    def forward_loss(self, imgs, pred, mask):
        return mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs, noise, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent)
        loss = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "pred": pred, "mask": mask, "latent": latent}


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------
def crate_mae_tiny(**kw):
    return CrateMAE(patch_size=16, dim=384, depth=12, heads=6, decoder_depth=12, **kw)


def crate_mae_small(**kw):
    return CrateMAE(patch_size=16, dim=576, depth=12, heads=12, decoder_depth=12, **kw)


def crate_mae_base(**kw):
    return CrateMAE(patch_size=16, dim=768, depth=12, heads=12, decoder_depth=12, **kw)


def crate_mae_large(**kw):
    return CrateMAE(patch_size=16, dim=1024, depth=24, heads=16, decoder_depth=24, **kw)
