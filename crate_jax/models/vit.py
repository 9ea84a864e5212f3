"""The ViT block of FAIR's MAE (timm `Block`): pre-norm, qkv with bias, MLP with exact GELU.

Drop-path as in timm: on both the attention and the MLP residual, at the rate LayerStack's
linear schedule gives the block (FAIR fine-tunes ViT-B with 0.1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import attention as attention_impls
from crate_jax.models.crate import constrain, drop_path, layer_norm
from crate_jax.models.layers import ACT_BATCH, ACT_HEADS, ACT_LENGTH, EMBED, HEADS, MLP, xavier_uniform

# FAIR's MAE builds its blocks with `partial(nn.LayerNorm, eps=1e-6)`.
VIT_NORM_EPS = 1e-6


def dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(xavier_uniform, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head self-attention. PyTorch's fused `qkv` Linear is split into three Dense
    layers here so each can be sharded over heads; the importer splits the weight.

    `attention` picks the implementation (`crate_jax/models/attention.py`, `VIT_IMPLS`):
    "autodiff" is the released written-out form; XLA's "dot_product" and the fused ones
    ("cudnn", "pallas_tpu") compute the same function without returning probabilities, so
    the probabilities are recomputed beside them for capture=True (unused otherwise: XLA
    drops them)."""

    width: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    cudnn_token_multiple: int = attention_impls.CUDNN_TOKEN_MULTIPLE  # cuDNN's token padding
    # The real tokens when the input carries zero rows for cuDNN after them (LayerStack); None: all.
    valid_tokens: int | None = None

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide width={self.width}")
        b, n, _ = x_BxNxD.shape
        head_dim = self.width // self.num_heads

        def project(name):
            y = dense(self.width, (EMBED, HEADS), self.dtype, self.param_dtype, name)(x_BxNxD)
            y = y.reshape(b, n, self.num_heads, head_dim)
            return nn.with_logical_constraint(y, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))

        q, k, v = project("query"), project("key"), project("value")
        implementation = attention_impls.resolve(self.attention, self.dtype, "vit")
        attention_impls.check_padded(implementation, n, self.valid_tokens)
        scale = head_dim**-0.5
        out, attn_BxKxNxN = attention_impls.written_out(q, k, v, scale, self.dtype)
        if implementation != "autodiff":
            multiple, valid = self.cudnn_token_multiple, self.valid_tokens
            out = attention_impls.attend(q, k, v, scale, implementation, self.dtype, multiple, valid)
            attn_BxKxNxN = jax.lax.stop_gradient(attn_BxKxNxN)  # for capture only; unused, XLA drops it
        out = out.reshape(b, n, self.width)
        out = dense(self.width, (HEADS, EMBED), self.dtype, self.param_dtype, "proj")(out)
        return out, attn_BxKxNxN


class ViTBlock(nn.Module):
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    attention: str = "auto"  # the attention's implementation (models.attention.VIT_IMPLS)
    cudnn_token_multiple: int = attention_impls.CUDNN_TOKEN_MULTIPLE
    valid_tokens: int | None = None  # set by LayerStack when the stream carries cuDNN's zero rows
    layer_norm_form: str = "auto"  # models/layer_norm.py FORMS
    capture: bool = False
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, drop_path_rate: float | jax.Array | None = None) -> tuple[jax.Array, dict]:
        x_BxNxD = constrain(x_BxNxD)
        ln = lambda name: layer_norm(VIT_NORM_EPS, self.dtype, self.param_dtype, name, self.layer_norm_form)  # noqa: E731

        def residual(branch: jax.Array) -> jax.Array:  # each branch gets its own draw, as in timm
            if drop_path_rate is None or self.deterministic:
                return branch
            return drop_path(branch, drop_path_rate, self.make_rng("dropout"))

        attention = Attention(
            self.width,
            self.num_heads,
            self.dtype,
            self.param_dtype,
            self.attention,
            cudnn_token_multiple=self.cudnn_token_multiple,
            valid_tokens=self.valid_tokens,
            name="attn",
        )
        attn_out, attn = attention(ln("norm1")(x_BxNxD))
        x_BxNxD = x_BxNxD + residual(attn_out)
        hidden = int(self.width * self.mlp_ratio)
        h = dense(hidden, (EMBED, MLP), self.dtype, self.param_dtype, "fc1")(ln("norm2")(x_BxNxD))
        h = jax.nn.gelu(h, approximate=False)
        mlp_out = dense(self.width, (MLP, EMBED), self.dtype, self.param_dtype, "fc2")(h)
        x_BxNxD = constrain(x_BxNxD + residual(mlp_out))
        aux = {"attn": attn, "out": x_BxNxD} if self.capture else {}
        return x_BxNxD, aux
