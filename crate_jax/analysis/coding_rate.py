"""Compression and sparsity of CRATE's representations (shared/docs/crate-mae-spec.md,
"White-box diagnostics"), as pure jnp functions.

Coding rate of the tokens against the subspaces U_1..U_K of a layer's MSSA:

    R^c = 1/2 sum_k logdet(I_n + p/(n eps^2) X_k X_k^T),   X_k = U_k^T LN1(Z), each row unit l2

with n tokens (cls included), head dim p and eps^2 = 0.01. X_k X_k^T is n x n but has rank
<= p, and Sylvester's identity det(I_n + c X X^T) = det(I_p + c X^T X) gives the same number
from a p x p matrix: `coding_rate` uses that form, `coding_rate_tokens` the literal one.

Shapes in names: L layers, B images, N tokens, D width, K heads, P head dim; `...` is any
leading batch shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS_SQ = 0.01  # The CRATE papers' quantisation error eps^2.

# Gram matrices and logdets at full fp32: TPUs and GPUs would otherwise multiply in bf16/tf32,
# which moves R^c in its third digit.
_HIGHEST = jax.lax.Precision.HIGHEST


def head_features(u_xNxD: jax.Array, num_heads: int) -> jax.Array:
    """(..., N, D) MSSA features U^T LN1(Z) -> (..., K, N, P), each token's per-head vector
    scaled to unit l2 norm (head k is columns [k*P, (k+1)*P), as MSSA splits them)."""
    *lead, n, d = u_xNxD.shape
    if d % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the feature width {d}")
    x = u_xNxD.astype(jnp.float32).reshape(*lead, n, num_heads, d // num_heads)
    x = jnp.moveaxis(x, -2, -3)  # (..., K, N, P)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    # A token that is exactly zero in a head stays zero rather than becoming NaN.
    return x / jnp.where(norm > 0, norm, 1.0)


def _logdet_spd(m: jax.Array) -> jax.Array:
    """logdet of symmetric positive-definite matrices (..., M, M); here all eigenvalues are >= 1.

    The product of the pivots of Gaussian elimination (no pivoting is needed for SPD
    matrices; the pivots are the squared diagonal of the Cholesky factor), in plain XLA ops.
    Not `jnp.linalg.cholesky`: on CPU that is jaxlib's LAPACK kernel, which (jaxlib 0.10/0.11)
    splits a batch over XLA's intra-op thread pool and blocks its pool thread until the
    pieces finish; with several CPU devices every device's program can block a pool thread
    that way at once, leaving no thread to run the pieces, and the evaluation hangs."""
    size = m.shape[-1]
    index = jnp.arange(size)

    def eliminate(j, carry):
        a, logdet = carry
        column = jnp.take(a, j, axis=-1)  # (..., M): column j of the remaining Schur complement
        pivot = jnp.take(column, j, axis=-1)  # (...,)
        below = jnp.where(index > j, column, 0.0)
        a = a - below[..., :, None] * below[..., None, :] / pivot[..., None, None]
        return a, logdet + jnp.log(pivot)

    m = m.astype(jnp.float32)
    _, logdet = jax.lax.fori_loop(0, size, eliminate, (m, jnp.zeros(m.shape[:-2], jnp.float32)))
    return logdet


def coding_rate(x_xKxNxP: jax.Array, eps_sq: float = EPS_SQ) -> jax.Array:
    """R^c (...,) of per-head features (..., K, N, P), through the p x p form
    logdet(I_p + p/(n eps^2) X_k^T X_k), identical to the n x n one by Sylvester's identity."""
    n, p = x_xKxNxP.shape[-2:]
    gram_xKxPxP = jnp.einsum("...knp,...knq->...kpq", x_xKxNxP, x_xKxNxP, precision=_HIGHEST)
    scale = p / (n * eps_sq)
    logdets_xK = _logdet_spd(jnp.eye(p, dtype=gram_xKxPxP.dtype) + scale * gram_xKxPxP)
    return 0.5 * logdets_xK.sum(axis=-1)


def coding_rate_tokens(x_xKxNxP: jax.Array, eps_sq: float = EPS_SQ) -> jax.Array:
    """R^c exactly as the papers write it, with the n x n matrix I_n + p/(n eps^2) X_k X_k^T.

    Costs O(n^3) per head instead of O(p^3); kept to check `coding_rate` against."""
    n, p = x_xKxNxP.shape[-2:]
    gram_xKxNxN = jnp.einsum("...knp,...kmp->...knm", x_xKxNxP, x_xKxNxP, precision=_HIGHEST)
    scale = p / (n * eps_sq)
    logdets_xK = _logdet_spd(jnp.eye(n, dtype=gram_xKxNxN.dtype) + scale * gram_xKxNxN)
    return 0.5 * logdets_xK.sum(axis=-1)


def layer_coding_rates(qkv_LxBxNxD: jax.Array, num_heads: int, eps_sq: float = EPS_SQ) -> jax.Array:
    """(L, B): R^c of every image at every layer, from the captured `qkv` intermediates."""
    return coding_rate(head_features(qkv_LxBxNxD, num_heads), eps_sq)


def sparsity(z_xNxD: jax.Array) -> jax.Array:
    """(...,): fraction of exactly-zero entries over the last two axes (N*D per image).

    The papers plot the fraction of non-zeros, 1 - this."""
    return jnp.mean((z_xNxD == 0).astype(jnp.float32), axis=(-2, -1))
