"""Masked autoencoders: MAE's random masking and loss, CRATE-MAE and FAIR's ViT-MAE.

Both models share one call signature and one output type:

    out = model.apply({"params": params}, images, noise=None, rngs=None, capture=False)
    out.loss, out.pred, out.mask, out.latent, out.intermediates

`images` are NHWC float32 as the input pipeline yields them (ImageNet-normalised).
If `noise` (B, num_patches) is given, the mask follows from it exactly as MAE's
`random_masking`; otherwise it is drawn from the "mask" RNG stream.

Images are (B, image_size, image_size, 3) unless the call passes `interpolate_pos=True`
(analysis at other resolutions): then any height and width of whole patches is accepted,
`model.patch_grid(images.shape, True)` gives the patch grid (rows, cols) that `noise`,
`pred` and `mask` follow, and the position tables are the model's own resampled to that
grid as DINO does (`layers.position_table`: bicubic, +0.1 on the scale factor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models.attention import CUDNN_TOKEN_MULTIPLE, stream_multiple
from crate_jax.models.crate import DecoderLayer, EncoderLayer, layer_norm
from crate_jax.models.layers import (
    EMBED,
    MLP,
    PATCH,
    POSITION_TABLES,
    PatchEmbed,
    dense_dot_general,
    patchify,
    position_rows,
    position_table,
    token_init,
    xavier_uniform,
)
from crate_jax.models.stack import LayerStack
from crate_jax.models.vit import ViTBlock

# Final norms of encoders and decoders (`norm`, `decoder_norm`) in both releases.
FINAL_NORM_EPS = 1e-6
ENCODER_TOKENS = ("all", "visible")
# Where CRATE-MAE's encoder gets its stand-in for a hidden patch (see CrateMAE).
MASK_TOKEN_SPACES = ("embedding", "pixel", "zeros")
# CrateMAE's fields as released; other values are the paper's variants, which the released
# PyTorch layout (tools/torch_layout.py) cannot hold.
RELEASE_LAYOUT = dict(
    cls_token=True, mask_token_space="embedding", position_table="sincos", subtract_position_table=False
)


def check_crate_options(fields: dict[str, Any]) -> None:
    """One-line errors for CrateMAE's token / table options and their combinations."""
    space = fields.get("mask_token_space", "embedding")
    if space not in MASK_TOKEN_SPACES:
        raise ValueError(f"model.mask_token_space={space!r} is not one of {MASK_TOKEN_SPACES}")
    table = fields.get("position_table", "sincos")
    if table not in POSITION_TABLES:
        raise ValueError(f"model.position_table={table!r} is not one of {POSITION_TABLES}")
    tokens = fields.get("encoder_tokens", "all")
    if tokens not in ENCODER_TOKENS:
        raise ValueError(f"model.encoder_tokens={tokens!r} is not one of {ENCODER_TOKENS}")
    if space == "pixel" and tokens != "all":
        raise ValueError(
            "model.mask_token_space='pixel' replaces hidden patches before the embedding, so the encoder must see "
            f"them: it needs model.encoder_tokens='all', not {tokens!r}"
        )
    for key in ("cls_token", "subtract_position_table"):
        if not isinstance(fields.get(key, False), bool):
            raise ValueError(f"model.{key}={fields[key]!r} must be True or False")


@flax.struct.dataclass
class MAEOutput:
    loss: jax.Array  # scalar: MSE over removed patches, weighted by example_weight
    pred: jax.Array  # (B, L, P*P*3) predicted patches, (p, q, c) order
    mask: jax.Array  # (B, L), 1 = removed
    latent: jax.Array  # encoder output after its final norm, cls first
    loss_weight: jax.Array  # scalar: the loss's denominator, for exact gradient accumulation
    intermediates: dict[str, Any]  # per-layer arrays stacked over layers when capture=True


LOSS_PATCHES = ("masked", "all")


def random_masking(noise: jax.Array, mask_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's per-sample masking. Returns (mask (B, L) with 1 = removed, ids_keep, ids_restore)."""
    _, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = (jnp.arange(length)[None, :] >= len_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return mask, ids_keep, ids_restore


def reconstruction_loss(
    images: jax.Array,
    pred: jax.Array,
    mask: jax.Array,
    patch_size: int,
    norm_pix_loss: bool,
    example_weight: jax.Array | None = None,
    loss_patches: str = "masked",
) -> tuple[jax.Array, jax.Array]:
    """Per-patch MSE averaged over removed patches (`loss_patches="all"`: over every patch,
    the paper's whole-image variant) and example weights, in fp32.

    Returns (loss, denominator)."""
    if loss_patches not in LOSS_PATCHES:
        raise ValueError(f"model.loss_patches={loss_patches!r} is not one of {LOSS_PATCHES}")
    if loss_patches == "all":
        mask = jnp.ones_like(mask)
    target = patchify(images.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)  # PyTorch's unbiased .var()
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    weight = mask if example_weight is None else mask * example_weight[:, None].astype(jnp.float32)
    denom = weight.sum()
    return (per_patch * weight).sum() / jnp.maximum(denom, 1e-12), denom


class _MAEBase(nn.Module):
    """Fields and helpers common to both autoencoders."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    loss_patches: str = "masked"  # "masked" (released, MAE) or "all" (the paper's whole-image loss)
    scan_layers: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    cudnn_token_multiple: int = CUDNN_TOKEN_MULTIPLE  # cuDNN attention's token padding (models/attention.py)
    layer_norm_form: str = "auto"  # how each LayerNorm's backward is written (models/layer_norm.py)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in `latent` and the captured intermediates: 1 (cls)
        or 0 (CrateMAE with cls_token=False, whose features are the mean token)."""
        return 1

    def patch_grid(self, shape: Sequence[int], interpolate_pos: bool = False) -> tuple[int, int]:
        """(rows, cols) of patches of NHWC images of `shape`, checked: the model's own grid,
        or with `interpolate_pos` that of any height and width of whole patches."""
        size, p = self.image_size, self.patch_size
        if size % p:
            raise ValueError(f"model.image_size={size} is not divisible by model.patch_size={p}")
        shape = tuple(shape)
        if not interpolate_pos:
            if len(shape) != 4 or shape[1:] != (size, size, 3):
                raise ValueError(f"images must be (batch, {size}, {size}, 3) NHWC, got {shape}")
            return self.grid_size, self.grid_size
        if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < p or shape[1] % p or shape[2] % p:
            raise ValueError(
                f"images must be (batch, H, W, 3) NHWC with H and W positive multiples of patch_size={p} "
                f"(interpolate_pos=True), got {shape}"
            )
        return shape[1] // p, shape[2] // p

    def _pos_table(self, width: int, grid: tuple[int, int]) -> np.ndarray:
        """(1 + rows*cols, width): the own grid's sin-cos table, resampled to `grid` if it differs."""
        return position_table(width, self.grid_size, grid)

    def _noise(self, batch: int, num_patches: int, noise: jax.Array | None) -> jax.Array:
        if noise is not None:
            if noise.shape != (batch, num_patches):
                raise ValueError(f"noise must have shape {(batch, num_patches)}, got {noise.shape}")
            return noise
        # `model.init(key, images)` provides only the params stream.
        key = self.make_rng("mask") if self.has_rng("mask") or not self.is_initializing() else self.make_rng("params")
        return jax.random.uniform(key, (batch, num_patches))

    def _token(self, name: str, width: int) -> jax.Array:
        return self.param(
            name, nn.with_logical_partitioning(token_init, (None, None, EMBED)), (1, 1, width), self.param_dtype
        )

    def _stack(self, layer_cls, layer_kwargs: dict, depth: int, capture: bool, name: str) -> LayerStack:
        # cuDNN attention: the stack carries the kernel's zero rows (stack.py), unless capturing.
        multiple = stream_multiple(self.attention, self.dtype, self.attention_kind, self.cudnn_token_multiple)
        return LayerStack(
            layer_cls,
            flax.core.FrozenDict(layer_kwargs, dtype=self.dtype, param_dtype=self.param_dtype),
            depth,
            scan=self.scan_layers,
            remat=self.remat,
            capture=capture,
            token_multiple=0 if capture else multiple,
            name=name,
        )

    def _predict(self, x: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """decoder_norm -> (minus `table`, the paper's g^post) -> Dense to pixels -> drop the cls token."""
        x = layer_norm(FINAL_NORM_EPS, self.dtype, self.param_dtype, "decoder_norm", self.layer_norm_form)(x)
        if table is not None:
            x = x - table.astype(x.dtype)
        features = self.patch_size * self.patch_size * 3
        x = nn.Dense(
            features,
            dot_general=dense_dot_general,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(xavier_uniform, (EMBED, PATCH)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (PATCH,)),
            name="decoder_pred",
        )(x)
        return x[:, self.num_prefix_tokens :]

    def _output(self, images, pred, mask, latent, example_weight, intermediates) -> MAEOutput:
        loss, denom = reconstruction_loss(
            images, pred, mask, self.patch_size, self.norm_pix_loss, example_weight, self.loss_patches
        )
        return MAEOutput(loss=loss, pred=pred, mask=mask, latent=latent, loss_weight=denom, intermediates=intermediates)


class CrateMAE(_MAEBase):
    """CRATE-MAE as released: the encoder sees every token, masked ones replaced by a
    learned mask token; `encoder_tokens="visible"` runs it on cls + visible tokens only.

    The paper's variants (Pai et al., ICLR 2024, sec. 3-4; the `crate_mae_paper_*` presets):
      cls_token=False          no cls token: the tokens are the L patches only, and features
                               for probes, k-NN and PCA are their mean (`api.encode`).
      mask_token_space         where a hidden patch's stand-in lives: "embedding" (released: a
                               learned d-vector replaces its embedded token), "pixel" (the
                               paper: a learned P*P*3 patch replaces its pixels before the
                               embedding, x_i <- m, then z_i = W_pre x_i + b + E_i), "zeros"
                               (the book: its embedded token is set to 0, then E_i added).
      position_table           "sincos" (released: fixed, added once) or "learned" (the
                               paper's trainable E^pos, a parameter `pos_embed`).
      subtract_position_table  the paper's g^post: the table is subtracted from the decoder's
                               normalised output right before the output projection,
                               X_hat = W_post (LN(Z~) - E^pos) + b.
    """

    decoder_depth: int = 12
    decoder_num_heads: int = 12
    ista_step: float = 0.1
    ista_lambda: float = 0.5
    ista_fused: bool = True
    encoder_tokens: str = "all"
    attention: str = "auto"  # MSSA's implementation (models.attention.MSSA_IMPLS)
    attention_kind: ClassVar[str] = "mssa"  # its attention's model for models.attention.resolve
    cls_token: bool = True
    mask_token_space: str = "embedding"  # embedding | pixel | zeros
    position_table: str = "sincos"  # sincos | learned
    subtract_position_table: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token)

    def release_layout_differences(self) -> dict[str, Any]:
        """The fields that differ from the released model's layout (empty for the releases)."""
        return {k: getattr(self, k) for k, v in RELEASE_LAYOUT.items() if getattr(self, k) != v}

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        noise: jax.Array | None = None,
        capture: bool = False,
        example_weight: jax.Array | None = None,
        interpolate_pos: bool = False,
    ) -> MAEOutput:
        grid = self.patch_grid(images.shape, interpolate_pos)
        num_patches = grid[0] * grid[1]
        check_crate_options({f: getattr(self, f) for f in ("encoder_tokens", *RELEASE_LAYOUT)})
        batch, prefix, space = images.shape[0], self.num_prefix_tokens, self.mask_token_space
        patch_embed = PatchEmbed(
            self.patch_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed"
        )
        cls_token = self._token("cls_token", self.width) if self.cls_token else None
        mask_token = None
        if space == "embedding":
            mask_token = self._token("mask_token", self.width).astype(self.dtype)
        elif space == "pixel":
            pixels = self.patch_size * self.patch_size * 3
            mask_token = self.param(
                "mask_token", nn.with_logical_partitioning(token_init, (None, None, PATCH)), (1, 1, pixels),
                self.param_dtype,
            )  # fmt: skip
        mask, ids_keep, ids_restore = random_masking(self._noise(batch, num_patches, noise), self.mask_ratio)
        # (prefix + L, d). The release stores its sin-cos table as `decoder_pos_embed` and adds it once, to all tokens.
        pos = jnp.asarray(
            position_rows(self, self.position_table, self.width, self.grid_size, grid, prefix, self.param_dtype),
            self.dtype,
        )

        patches = patchify(images, self.patch_size)
        if space == "pixel":  # the paper: the hidden patches' pixels become the learned token
            patches = jnp.where(mask[..., None] > 0, mask_token.astype(patches.dtype), patches)
        x = patch_embed(patches)
        if self.encoder_tokens == "all":
            if space != "pixel":
                fill = mask_token if space == "embedding" else jnp.zeros((), x.dtype)
                x = jnp.where(mask[..., None] > 0, fill, x)
            x = x + pos[prefix:]
        else:
            x = jnp.take_along_axis(x + pos[prefix:], ids_keep[..., None], axis=1)
        if self.cls_token:
            cls = jnp.broadcast_to(cls_token.astype(x.dtype), (batch, 1, self.width)) + pos[:1]
            x = jnp.concatenate([cls, x], axis=1)

        attention = dict(
            attention=self.attention,
            cudnn_token_multiple=self.cudnn_token_multiple,
            layer_norm_form=self.layer_norm_form,
        )
        layer = dict(width=self.width, num_heads=self.num_heads, **attention)
        z, enc_aux = self._stack(
            EncoderLayer,
            dict(layer, ista_step=self.ista_step, ista_lambda=self.ista_lambda, ista_fused=self.ista_fused),
            self.depth,
            capture,
            "encoder",
        )(x)
        latent = layer_norm(FINAL_NORM_EPS, self.dtype, self.param_dtype, "norm", self.layer_norm_form)(z)

        z = latent
        if self.encoder_tokens == "visible":
            # Mask tokens (zeros for "zeros") join after the encoder, each with its own position row.
            pad = jnp.zeros((batch, num_patches - ids_keep.shape[1], self.width), latent.dtype)
            visible = jnp.concatenate([latent[:, prefix:], pad], axis=1)
            patches = jnp.take_along_axis(visible, ids_restore[..., None], axis=1)
            fill = (mask_token if space == "embedding" else 0.0) + pos[None, prefix:]
            patches = jnp.where(mask[..., None] > 0, fill, patches)
            z = jnp.concatenate([latent[:, :prefix], patches], axis=1)

        decoder_num_heads = self.decoder_num_heads or self.num_heads
        y, dec_aux = self._stack(
            DecoderLayer,
            dict(width=self.width, num_heads=decoder_num_heads, **attention),
            self.decoder_depth,
            capture,
            "decoder",
        )(z)
        pred = self._predict(y, pos if self.subtract_position_table else None)
        intermediates = {"encoder": enc_aux, "decoder": dec_aux} if capture else {}
        return self._output(images, pred, mask, latent, example_weight, intermediates)


class ViTMAE(_MAEBase):
    """FAIR's MAE (`models_mae.py`): encoder on cls + visible tokens, a projection to the
    decoder width, the decoder's own mask token and position table."""

    decoder_width: int = 512
    mlp_ratio: float = 4.0
    attention: str = "auto"  # the attention's implementation (models.attention.VIT_IMPLS)
    attention_kind: ClassVar[str] = "vit"  # its attention's model for models.attention.resolve

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        noise: jax.Array | None = None,
        capture: bool = False,
        example_weight: jax.Array | None = None,
        interpolate_pos: bool = False,
    ) -> MAEOutput:
        grid = self.patch_grid(images.shape, interpolate_pos)
        num_patches = grid[0] * grid[1]
        batch = images.shape[0]
        x = PatchEmbed(self.patch_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed")(
            images
        )
        pos = jnp.asarray(self._pos_table(self.width, grid), x.dtype)
        mask, ids_keep, ids_restore = random_masking(self._noise(batch, num_patches, noise), self.mask_ratio)
        x = jnp.take_along_axis(x + pos[1:], ids_keep[..., None], axis=1)
        cls = jnp.broadcast_to(self._token("cls_token", self.width).astype(x.dtype) + pos[:1], (batch, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        block = dict(
            mlp_ratio=self.mlp_ratio,
            attention=self.attention,
            cudnn_token_multiple=self.cudnn_token_multiple,
            layer_norm_form=self.layer_norm_form,
        )
        z, enc_aux = self._stack(
            ViTBlock, dict(block, width=self.width, num_heads=self.num_heads), self.depth, capture, "encoder"
        )(x)
        latent = layer_norm(FINAL_NORM_EPS, self.dtype, self.param_dtype, "norm", self.layer_norm_form)(z)

        y = nn.Dense(
            self.decoder_width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(xavier_uniform, (EMBED, MLP)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (MLP,)),
            name="decoder_embed",
        )(latent)
        mask_token = self._token("mask_token", self.decoder_width).astype(y.dtype)
        len_keep = ids_keep.shape[1]
        fill = jnp.broadcast_to(mask_token, (batch, num_patches - len_keep, self.decoder_width))
        patches = jnp.take_along_axis(jnp.concatenate([y[:, 1:], fill], axis=1), ids_restore[..., None], axis=1)
        y = jnp.concatenate([y[:, :1], patches], axis=1)
        y = y + jnp.asarray(self._pos_table(self.decoder_width, grid), y.dtype)
        y, dec_aux = self._stack(
            ViTBlock,
            dict(block, width=self.decoder_width, num_heads=self.decoder_num_heads),
            self.decoder_depth,
            capture,
            "decoder",
        )(y)
        pred = self._predict(y)
        intermediates = {"encoder": enc_aux, "decoder": dec_aux} if capture else {}
        return self._output(images, pred, mask, latent, example_weight, intermediates)


def attention_calls(model: CrateMAE | ViTMAE) -> list[tuple[int, int, int, str]]:
    """Every attention call of one forward pass, encoder then decoder: (tokens, heads, head
    dim, "mssa" | "vit"), for the kernel choice (`attention.resolve`) and analytic costs."""
    cls = int(getattr(model, "cls_token", True))
    patches = model.num_patches
    visible = cls + int(patches * (1 - model.mask_ratio))  # random_masking keeps this many
    if isinstance(model, CrateMAE):
        encoder = patches + cls if model.encoder_tokens == "all" else visible
        heads = model.decoder_num_heads or model.num_heads
        return [(encoder, model.num_heads, model.width // model.num_heads, "mssa")] * model.depth + [
            (patches + cls, heads, model.width // heads, "mssa")
        ] * model.decoder_depth
    return [(visible, model.num_heads, model.width // model.num_heads, "vit")] * model.depth + [
        (patches + cls, model.decoder_num_heads, model.decoder_width // model.decoder_num_heads, "vit")
    ] * model.decoder_depth
