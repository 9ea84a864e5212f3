"""CRATE layers: MSSA, ISTA, the encoder layer and its approximate inverse, the decoder layer.

Exact to the released PyTorch model (Ma-Lab-Berkeley/CRATE `model/crate_ae/`); see
`shared/docs/crate-mae-spec.md`. Shapes in names: B batch, N tokens, D width, K heads,
P head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import attention
from crate_jax.models.attention import CUDNN_TOKEN_MULTIPLE
from crate_jax.models.layer_norm import LayerNorm
from crate_jax.models.layers import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_LENGTH,
    EMBED,
    HEADS,
    MLP,
    dense_dot_general,
    matmul,
    torch_kaiming_uniform,
    xavier_uniform,
)

# The released model uses PyTorch's LayerNorm default inside its layers.
LAYER_NORM_EPS = 1e-5


def layer_norm(eps: float, dtype, param_dtype, name: str, form: str = "auto") -> nn.Module:
    return LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        form=form,
        name=name,
    )


def constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


# Re-exported: the attention implementations live in their own file.
ATTENTION_IMPLS = attention.MSSA_IMPLS
subspace_attention = attention.subspace_attention
_softmax_attention = attention._softmax_attention


class MSSA(nn.Module):
    """Multi-head subspace self-attention: one bias-free projection U gives q = k = v.

    Returns (output, attention probabilities BxKxNxN, projected features BxNxD). `attention`
    picks the implementation of softmax(u uᵀ / √p) u, all the same function
    (`crate_jax/models/attention.py`): auto (the default: by platform and dtype, `attention.AUTO`),
    symmetric, autodiff, dot_product (XLA), cudnn (fused, GPUs, bf16/fp16), pallas_tpu (fused).
    The probabilities are only materialised for analysis (capture=True): unused, XLA drops them.
    """

    width: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    cudnn_token_multiple: int = CUDNN_TOKEN_MULTIPLE  # cuDNN's token padding (models/attention.py)
    # The real tokens when the input carries zero rows for cuDNN after them (LayerStack); None: all.
    valid_tokens: int | None = None

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide width={self.width}")
        head_dim = self.width // self.num_heads
        u_BxNxD = nn.Dense(
            self.width,
            dot_general=dense_dot_general,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(xavier_uniform, (EMBED, HEADS)),
            name="qkv",
        )(x_BxNxD)
        implementation = attention.resolve(self.attention, self.dtype, "mssa")
        b, n, _ = u_BxNxD.shape
        u_BxNxKxP = nn.with_logical_constraint(
            u_BxNxD.reshape(b, n, self.num_heads, head_dim), (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None)
        )
        scale = head_dim**-0.5
        out_BxNxD = attention.mssa(u_BxNxKxP, scale, implementation, self.cudnn_token_multiple, self.valid_tokens)
        out_BxNxD = out_BxNxD.reshape(b, n, self.width)
        # Only for analysis (capture=True, which never pads the stream); unused, XLA drops it.
        attn_BxKxNxN = jax.lax.stop_gradient(_softmax_attention(attention.heads_major(u_BxNxKxP), scale)[1])
        if self.num_heads > 1:  # the release uses the identity when K = 1
            out_BxNxD = nn.Dense(
                self.width,
                dot_general=dense_dot_general,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(xavier_uniform, (HEADS, EMBED)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                name="to_out",
            )(out_BxNxD)
        return out_BxNxD, attn_BxKxNxN, u_BxNxD


def ista_form(rows: int, width: int) -> str:
    """Which exact rewrite of the ISTA residual Y·D − (Y·Dᵀ)·D costs fewer multiply-adds in
    a train step (forward + backward) over `rows` tokens of width d:

      "gram"      Y·(I + η(D − DᵀD)): one d×d product per token plus DᵀD once per call,
                  3·rows·d² + 2·d³ (the skip folded into the matrix);
      "factored"  Y + η·(Y − Y·Dᵀ)·D: two d×d products per token, 6·rows·d², no d³ term.

    The d³ term is paid once per step whatever the batch, so "gram" wins for many tokens
    (CRATE-MAE-B at 224, batch 4, all 788 tokens) and "factored" for few (the visible-only
    encoder's 200). `rows` is the global count of the jitted shape."""
    return "gram" if 3 * rows > 2 * width else "factored"


class ISTA(nn.Module):
    """One ISTA step towards a sparse code: ReLU(Y + eta (Y D - Y D^T D) - eta lambda).

    D is stored as the release stores it (PyTorch's `fn.weight`). `fused=True` computes the
    same function through whichever exact rewrite of the residual is cheaper for the
    number of tokens (`ista_form`), instead of the release's three d x d products per token.
    """

    width: int
    step: float = 0.1
    lam: float = 0.5
    fused: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y_BxNxD: jax.Array) -> jax.Array:
        d_DxD = self.param(
            "D",
            nn.with_logical_partitioning(torch_kaiming_uniform, (EMBED, MLP)),
            (self.width, self.width),
            self.param_dtype,
        )
        y = y_BxNxD.astype(self.dtype)
        threshold = self.step * self.lam
        if not self.fused:
            d = d_DxD.astype(self.dtype)
            residual = y @ d - (y @ d.T) @ d
            return jax.nn.relu(y + self.step * residual - threshold)
        if ista_form(math.prod(y.shape[:-1]), self.width) == "gram":
            step_DxD = self.step * (d_DxD - d_DxD.T @ d_DxD) + jnp.eye(self.width, dtype=d_DxD.dtype)
            return jax.nn.relu(matmul(y, step_DxD.astype(self.dtype)) - threshold)
        d = d_DxD.astype(self.dtype)
        return jax.nn.relu(y + self.step * matmul(y - matmul(y, d.T), d) - threshold)


def drop_path(x_BxNxD: jax.Array, rate: float | jax.Array, key: jax.Array) -> jax.Array:
    """Stochastic depth: zero the branch of each example with probability `rate` and scale
    the kept ones by 1 / (1 - rate). `rate` may be traced (a scanned layer's); rate 0 is
    exactly the identity (every scale is 1.0)."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    kept_Bx1x1 = jax.random.bernoulli(key, keep, (x_BxNxD.shape[0], 1, 1))
    # At rate 1 nothing is kept, so the where never picks 1 / keep = inf.
    scale_Bx1x1 = jnp.where(kept_Bx1x1, 1.0 / keep, 0.0)
    return (x_BxNxD * scale_Bx1x1).astype(x_BxNxD.dtype)  # scaled in fp32: 1 / 0.9 is far from exact in bf16


def _mssa(layer: EncoderLayer | DecoderLayer) -> MSSA:
    """The layer's MSSA from the layer's own fields (called inside its compact `__call__`)."""
    fields = (layer.width, layer.num_heads, layer.dtype, layer.param_dtype, layer.attention)
    padding = dict(cudnn_token_multiple=layer.cudnn_token_multiple, valid_tokens=layer.valid_tokens)
    return MSSA(*fields, **padding, name="mssa")


class EncoderLayer(nn.Module):
    """Z + MSSA(LN1(Z)), then an ISTA step on LN2 of that (the skip is from the normalised Y).

    A `drop_path_rate` argument (this layer's, from LayerStack's linear schedule: 0 in the
    first layer up to the stack's rate in the last) with `deterministic=False` drops the MSSA
    branch per example (stochastic depth, kept branches scaled by 1 / (1 - rate), the
    "dropout" RNG); the ISTA step has no identity branch to drop (see the spec,
    "Regularisation").
    """

    width: int
    num_heads: int
    ista_step: float = 0.1
    ista_lambda: float = 0.5
    ista_fused: bool = True
    attention: str = "auto"  # MSSA's implementation (ATTENTION_IMPLS)
    cudnn_token_multiple: int = CUDNN_TOKEN_MULTIPLE
    valid_tokens: int | None = None  # set by LayerStack when the stream carries cuDNN's zero rows
    layer_norm_form: str = "auto"  # models/layer_norm.py FORMS
    capture: bool = False
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BxNxD: jax.Array, drop_path_rate: float | jax.Array | None = None) -> tuple[jax.Array, dict]:
        z_BxNxD = constrain(z_BxNxD)
        ln = lambda name: layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype, name, self.layer_norm_form)  # noqa: E731
        mssa = _mssa(self)
        attn_out, attn, qkv = mssa(ln("norm1")(z_BxNxD))
        if drop_path_rate is not None and not self.deterministic:
            attn_out = drop_path(attn_out, drop_path_rate, self.make_rng("dropout"))
        z_half = z_BxNxD + attn_out
        z_next = ISTA(
            self.width,
            self.ista_step,
            self.ista_lambda,
            self.ista_fused,
            self.dtype,
            self.param_dtype,
            name="ista",
        )(ln("norm2")(z_half))
        z_next = constrain(z_next)
        aux = {"attn": attn, "qkv": qkv, "ista": z_next} if self.capture else {}
        return z_next, aux


class DecoderLayer(nn.Module):
    """The approximate inverse: Z_half = LN1(Z) D~^T, then Z_half - MSSA(LN2(Z_half)); no skip."""

    width: int
    num_heads: int
    attention: str = "auto"  # MSSA's implementation (ATTENTION_IMPLS)
    cudnn_token_multiple: int = CUDNN_TOKEN_MULTIPLE
    valid_tokens: int | None = None  # set by LayerStack when the stream carries cuDNN's zero rows
    layer_norm_form: str = "auto"  # models/layer_norm.py FORMS
    capture: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BxNxD: jax.Array, _=None) -> tuple[jax.Array, dict]:
        z_BxNxD = constrain(z_BxNxD)
        ln = lambda name: layer_norm(LAYER_NORM_EPS, self.dtype, self.param_dtype, name, self.layer_norm_form)  # noqa: E731
        # Dense kernel = D~^T, so x @ kernel = F.linear(x, D~) as released.
        z_half = nn.Dense(
            self.width,
            dot_general=dense_dot_general,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(torch_kaiming_uniform, (MLP, EMBED)),
            name="linear",
        )(ln("norm1")(z_BxNxD))
        mssa = _mssa(self)
        attn_out, attn, qkv = mssa(ln("norm2")(z_half))
        z_next = constrain(z_half - attn_out)
        aux = {"attn": attn, "qkv": qkv, "out": z_next} if self.capture else {}
        return z_next, aux
