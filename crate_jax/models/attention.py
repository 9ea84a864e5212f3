"""Softmax attention implementations, one function each, and the `auto` table that picks one.

Every implementation computes the same function, softmax(q kᵀ · scale) v per head, with the
softmax and its statistics in fp32. Layout in and out: (B, N, K, P) (batch, tokens, heads,
head dim). CRATE's MSSA calls `mssa` (q = k = v = u); the ViT baseline calls `attend`.

  "symmetric"    MSSA only: heads-major einsums with the symmetric gradient of
                 `subspace_attention` ((G + Gᵀ) u, one product instead of two); materialises
                 the B×K×N×N probabilities. Fastest on XLA:CPU.
  "autodiff"     the same einsums, gradient by autodiff (for the ViT: its written-out
                 attention, as released).
  "dot_product"  `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"        cuDNN's fused flash attention (`implementation="cudnn"`; CUDA GPUs,
                 bf16/fp16 only): no B×K×N×N tensor in HBM. Tokens are padded with zeros to a
                 multiple of `CUDNN_TOKEN_MULTIPLE` and the padded keys masked through
                 `key_value_seq_lengths` (see `padded_dot_product`); where that adds few
                 rows, the layer stack carries them instead (`stream_tokens`). On a GPU the
                 kernel is first checked at each call shape against XLA (`check_cudnn_kernel`);
                 a shape that fails takes an exact fallback (`_cudnn`).
  "pallas_tpu"   the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu`),
                 padded to `PALLAS_TOKEN_MULTIPLE` with padded keys masked by segment ids,
                 inside `shard_map` over the mesh's batch and head axes (Mosaic kernels are not
                 partitioned automatically). On CPU it runs under
                 `pltpu.force_tpu_interpret_mode()` (tests).
  "auto"         the default: `AUTO` below, by the platform of the mesh the step is traced
                 under (so an ahead-of-time compile for a TPU topology on a CPU host picks the
                 TPU entry) and the compute dtype.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from crate_jax.models.layers import ACT_BATCH, ACT_HEADS, ACT_LENGTH, shard_spec, trace_platform

MSSA_IMPLS = ("auto", "symmetric", "autodiff", "dot_product", "cudnn", "pallas_tpu")
VIT_IMPLS = ("auto", "autodiff", "dot_product", "cudnn", "pallas_tpu")
ATTENTION_IMPLS = MSSA_IMPLS  # every name some model takes

# The default of the models' `cudnn_token_multiple`: 2, the least JAX's cuDNN wrapper takes in
# training (it rejects an odd count: 197 -> 198; the visible-only encoder's 50 unpadded).
# cuDNN's support matrix (9.x, Hopper, forward and backward) sets no multiple on the token
# count, and the partial-tile bug class reported for it (cudnn-frontend#628, pytorch#196678: an
# out-of-range key tile scored 0, NaN gradients when a row's log-sum-exp is below -88.7, only
# for counts of 64 mod 128) cannot be reached here: 198 and 50 are not 64 mod 128, the padded
# key is masked, and MSSA's log-sum-exp is never negative (each row's own logit is |u|²·scale).
# The compiled CRATE-MAE-B step on an H200 moves 112 GB with it, 133 GB with 128 (whole
# 128-token tiles, 197 -> 256, still selectable); untimed on a GPU (README).
CUDNN_TOKEN_MULTIPLE = 2
# Whole 128-token tiles: `_cudnn`'s fallback where the kernel fails its check at the default.
WHOLE_TILE_MULTIPLE = 128
# `stream_tokens`: the layers carry the padding when it adds at most 1/16 of the rows.
STREAM_PAD_MAX_FRACTION = 1 / 16
# The Pallas TPU kernel's blocks are 128 tokens (`BlockSizes.get_default`, MIN_BLOCK_SIZE).
PALLAS_TOKEN_MULTIPLE = 128

# `auto`: (platform, compute dtype) -> implementation, per model. Why each entry:
#   GPU bf16/fp16: cuDNN's fused kernel; the materialised 197×197 softmax and its backward
#     were ~40% of the CRATE-MAE-B step on an H200 (shared/docs/stack-notes.md), and a cuDNN
#     step (tokens padded to 256) ran 1.55x the default's speed there.
#   GPU fp32: cuDNN has no fp32 flash kernel; the symmetric form was the fastest XLA path.
#   TPU: XLA's autodiff form, from the unrolled AOT rooflines (README, TPU table). CRATE-MAE-B
#     on v5e-256: 32.2 GB per chip for autodiff (dot_product the same) against 36.2 for the
#     symmetric form, whose transposed N×N gradient costs more bytes than the product it saves.
#     jax's Pallas flash kernel (`pallas_tpu`) moved more bytes still at these token counts
#     (197, and ViT-MAE's 50 visible): it pads to 128-token blocks and keeps three fp32 row
#     statistics broadcast to 128 lanes in HBM for its backward (4x the bytes of a bf16 query
#     row of head dim 64), re-read per block.
#   CPU: the symmetric form (9.9 ms vs 13.1 / 18.9 ms for autodiff / dot_product, one Base
#     layer forward + backward at batch 4); the ViT keeps its released written-out form.
_HALF = ("bfloat16", "float16")
AUTO = {
    "mssa": {"gpu_half": "cudnn", "gpu": "symmetric", "tpu": "autodiff", "cpu": "symmetric"},
    "vit": {"gpu_half": "cudnn", "gpu": "autodiff", "tpu": "autodiff", "cpu": "autodiff"},
}


def resolve(implementation: str, dtype, model: str = "mssa", on: str | None = None) -> str:
    """The implementation `implementation` names; "auto" looked up in `AUTO` for the platform
    `on` (default: `layers.trace_platform()`) and the compute dtype."""
    names = MSSA_IMPLS if model == "mssa" else VIT_IMPLS
    if implementation not in names:
        raise ValueError(f"model.attention={implementation!r} is not one of {names}")
    if implementation != "auto":
        return implementation
    where = on or trace_platform()
    where = "gpu" if where in ("cuda", "rocm") else where
    if where == "gpu" and jnp.dtype(dtype).name in _HALF:
        where = "gpu_half"
    return AUTO[model].get(where, AUTO[model]["cpu"])


def _softmax_attention(u_BxKxNxP: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """softmax(u uᵀ · scale) in fp32 and its product with u, heads-major."""
    logits = jnp.einsum("bknp,bkmp->bknm", u_BxKxNxP, u_BxKxNxP, preferred_element_type=jnp.float32)
    attn_BxKxNxN = jax.nn.softmax(logits * scale, axis=-1)
    out_BxKxNxP = jnp.einsum("bknm,bkmp->bknp", attn_BxKxNxN.astype(u_BxKxNxP.dtype), u_BxKxNxP)
    return out_BxKxNxP, attn_BxKxNxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def subspace_attention(u_BxKxNxP: jax.Array, scale: float) -> jax.Array:
    """softmax(u uᵀ · scale) u per head, with q = k = v = u.

    The gradient uses the symmetry of u uᵀ: the two products that autodiff would form
    for the logits' operands, G u and Gᵀ u, become one, (G + Gᵀ) u."""
    return _softmax_attention(u_BxKxNxP, scale)[0]


def _subspace_attention_fwd(u_BxKxNxP, scale):
    out, attn = _softmax_attention(u_BxKxNxP, scale)
    return out, (u_BxKxNxP, attn)


def _subspace_attention_bwd(scale, residuals, g_BxKxNxP):
    u, attn = residuals
    g_attn = jnp.einsum("bknp,bkmp->bknm", g_BxKxNxP, u, preferred_element_type=jnp.float32)
    g_logits = attn * (g_attn - jnp.sum(g_attn * attn, axis=-1, keepdims=True)) * scale
    g_sym = (g_logits + jnp.swapaxes(g_logits, -1, -2)).astype(u.dtype)
    g_u = jnp.einsum("bknm,bknp->bkmp", attn.astype(u.dtype), g_BxKxNxP) + jnp.einsum("bknm,bkmp->bknp", g_sym, u)
    return (g_u,)


subspace_attention.defvjp(_subspace_attention_fwd, _subspace_attention_bwd)


def heads_major(x_BxNxKxP: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BxNxKxP.transpose(0, 2, 1, 3), (ACT_BATCH, ACT_HEADS, ACT_LENGTH, None))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_tokens(x: jax.Array, tokens: int, axis: int = 1) -> jax.Array:
    """x with zero rows appended along the token axis up to `tokens`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, tokens - x.shape[axis])
    return jnp.pad(x, pad)


def stream_tokens(tokens: int, multiple: int = CUDNN_TOKEN_MULTIPLE) -> int:
    """How many token rows a stack of layers with cuDNN attention carries (`LayerStack`).

    cuDNN's call needs the tokens padded to a multiple of `multiple`. Padding the residual
    stream once before the first layer (zero rows appended, each layer told the real count,
    the rows sliced off after the last) leaves no pad or slice inside the layers, where padding
    around each call writes three more copies per layer (u padded, the output sliced, its
    gradient padded): the compiled CRATE-MAE-B step on an H200 moves 112 GB against 123 GB at
    197 -> 198 tokens. At 197 -> 256 the layers' 30% more rows would cost more than the copies
    (a measured alternative, padding only the projections' rows to 256 around each MSSA: 135
    against 133 GB), so beyond `STREAM_PAD_MAX_FRACTION` more rows each call pads for itself."""
    padded = _round_up(tokens, multiple)
    return padded if padded - tokens <= tokens * STREAM_PAD_MAX_FRACTION else tokens


def stream_multiple(implementation: str, dtype, model: str, multiple: int) -> int:
    """`LayerStack.token_multiple` for a stack of `model` ("mssa" or "vit") layers whose
    attention is `implementation` (unresolved): cuDNN's multiple where the layers run cuDNN's
    kernel, else 0 (no padding)."""
    return multiple if resolve(implementation, dtype, model) == "cudnn" else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def zero_padded_cotangents(x_BxNxKxP: jax.Array, valid: int) -> jax.Array:
    """The identity; in the backward, the rows past the first `valid` get exactly zero.

    Around a kernel whose padding mask excludes those keys: it need not write their dK and dV
    (flash kernels store only the rows within the sequence lengths they are given), and in a
    stack that carries its padded rows (`stream_tokens`) those rows of dQ + dK + dV flow on
    into LayerNorms, weight gradients and earlier layers. The select also drops a NaN there."""
    return x_BxNxKxP


def _zero_padded_cotangents_fwd(x_BxNxKxP, valid):
    return x_BxNxKxP, None


def _zero_padded_cotangents_bwd(valid, _, g_BxNxKxP):
    real = (jnp.arange(g_BxNxKxP.shape[1]) < valid).reshape((1, -1) + (1,) * (g_BxNxKxP.ndim - 2))
    return (jnp.where(real, g_BxNxKxP, jnp.zeros((), g_BxNxKxP.dtype)),)


zero_padded_cotangents.defvjp(_zero_padded_cotangents_fwd, _zero_padded_cotangents_bwd)


def padded_dot_product(
    q, k, v, scale: float, implementation: str, multiple: int = CUDNN_TOKEN_MULTIPLE, valid: int | None = None
):
    """`jax.nn.dot_product_attention` on tokens padded with zeros to a multiple of `multiple`,
    exact to the unpadded call:

    * only the keys are masked (`key_value_seq_lengths` = N): a padded key's logit becomes
      a large negative number and its probability exactly 0 in the fp32 softmax;
    * the padded queries are not masked (query lengths = the padded count, JAX's default):
      they attend to the real keys, so every output row and every gradient row the kernel
      writes is defined. A kernel told `query_seq_lengths` = N may leave the padded rows of
      O, dQ, dK and dV unwritten; harmless only as long as nothing reads them;
    * padded here (`valid` None): no padded row reaches a LayerNorm, a weight gradient or the
      loss: the output is sliced back, and the slice's transpose feeds zeros back;
    * padded by the caller (`valid`: the first `valid` of the q.shape[1] tokens are real, as in
      a stack that carries its padded rows, `stream_tokens`): the call masks the rest and
      returns every row; the padded rows of dQ, dK and dV are set to exactly zero
      (`zero_padded_cotangents`), so that whatever the kernel leaves there cannot reach a
      weight gradient or a real row through the layers before.

    `implementation="xla"` runs the same masking on any backend (the CPU tests)."""
    b, n = q.shape[:2]
    if valid is not None and valid != n:
        if not 0 < valid < n:
            raise ValueError(f"valid={valid} real tokens of {n}")
        lengths = jnp.full((b,), valid, jnp.int32)
        q, k, v = (zero_padded_cotangents(x, valid) for x in (q, k, v))
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=implementation
        )
    tokens = _round_up(n, multiple)
    if tokens == n:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    lengths = jnp.full((b,), n, jnp.int32)
    q, k, v = (pad_tokens(x, tokens) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=implementation
    )
    return out[:, :n]


# The run-time check of cuDNN's kernel at each call shape a step traces on a GPU (`_cudnn`):
# (tokens the kernel gets, real tokens, heads, head dim, dtype) -> None where the kernel ran
# and matched XLA, else why not. Filled once per process; the benchmark reports it.
CUDNN_CHECKS: dict[tuple[int, int, int, int, str], str | None] = {}
# The check's tolerances, those of the GPU tests: bf16 kernel against fp32 XLA, norm-relative.
CHECK_TOLERANCE = {"out": 2e-2, "grad": 5e-2}


def _on_gpu_devices() -> bool:
    """Whether this process runs on GPUs (not an ahead-of-time compile for one on a CPU host)."""
    return jax.default_backend() == "gpu"


def _relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check_cudnn_kernel(tokens: int, valid: int, heads: int, head_dim: int, dtype) -> str | None:
    """Runs cuDNN's kernel once at one call's shape (batch 2, `tokens` rows of which the first
    `valid` are real keys), forward and gradient, against XLA's attention in fp32 on the same
    inputs. None if it matches within `CHECK_TOLERANCE` and is finite, else the reason. (XLA's
    own bf16 attention is 0.25% off at CRATE-MAE-B's shapes, out and gradient: the tolerances
    leave 8-20x room for a kernel's other rounding.)

    The padded keys get a large key and value, so a kernel that let them through (the partial
    last tile of 198 or 50 tokens computed wrongly, say) is off by O(1), not by bf16 noise."""
    rng = jax.random.split(jax.random.key(0), 4)
    shape = (2, tokens, heads, head_dim)
    q, k, v = (jax.random.normal(r, shape, jnp.float32) for r in rng[:3])
    real = (jnp.arange(tokens) < valid)[None, :, None, None]
    k = jnp.where(real, k, 8.0 / head_dim**0.5)
    v = jnp.where(real, v, 10.0)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    weights = jax.random.normal(rng[3], shape, jnp.float32) * real
    lengths = jnp.full((2,), valid, jnp.int32) if valid < tokens else None  # as `padded_dot_product` calls it

    def loss_and_grads(implementation, q, k, v):
        def loss(q, k, v):
            out = jax.nn.dot_product_attention(
                q, k, v, scale=head_dim**-0.5, key_value_seq_lengths=lengths, implementation=implementation
            )
            return jnp.sum(out.astype(jnp.float32) * weights), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        # Only the real rows: the padded keys' dK and dV need not be written (`zero_padded_cotangents`).
        return out, jnp.concatenate([jnp.where(real, g, 0).ravel() for g in grads])

    try:
        out, grads = loss_and_grads("cudnn", q, k, v)
        with jax.default_matmul_precision("highest"):  # no TF32 in the reference on a GPU
            ref_out, ref_grads = loss_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
        # Inside the try: an error the kernel raises when it runs surfaces when its results are read.
        out_error = _relative_error(jnp.where(real, out, 0), jnp.where(real, ref_out, 0))
        grad_error = _relative_error(grads, ref_grads)
    except Exception as e:  # a shape cuDNN or JAX's wrapper rejects, at trace, compile or run time
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not (out_error < CHECK_TOLERANCE["out"] and grad_error < CHECK_TOLERANCE["grad"]):  # NaN fails too
        return f"differs from XLA's attention: output {out_error:.3g}, gradient {grad_error:.3g} relative"
    return None


def _kernel_fails(tokens: int, valid: int, heads: int, head_dim: int, dtype) -> str | None:
    """`check_cudnn_kernel` once per shape and process, on GPUs only (an ahead-of-time compile
    has no kernel to run); runs eagerly even inside a step's trace."""
    key = (tokens, valid, heads, head_dim, jnp.dtype(dtype).name)
    if key not in CUDNN_CHECKS:
        if not _on_gpu_devices():
            return None
        with jax.ensure_compile_time_eval():
            CUDNN_CHECKS[key] = check_cudnn_kernel(*key)
        if CUDNN_CHECKS[key]:
            logging.warning("cuDNN's attention at %d tokens (%d real), %d heads of %d, %s: %s", *key, CUDNN_CHECKS[key])
    return CUDNN_CHECKS[key]


def _cudnn(q, k, v, scale: float, multiple: int = CUDNN_TOKEN_MULTIPLE, valid: int | None = None):
    """cuDNN's kernel with its token padding (`padded_dot_product`), checked on the GPU at this
    call's shape first (`check_cudnn_kernel`). Where the kernel fails the check, exactly the
    same function by the next path that passes: the real rows padded to whole 128-token tiles
    around the call (the padded stream's extra rows get zeros), else XLA's attention, which
    materialises the probabilities. Each fallback is logged once and kept in `CUDNN_CHECKS`."""
    if jnp.dtype(q.dtype).name not in _HALF:
        raise ValueError(
            f"model.attention='cudnn' needs model.dtype bfloat16 or float16 (cuDNN's fused kernel), got {q.dtype}"
        )
    if (where := trace_platform()) != "gpu":
        raise ValueError(f"model.attention='cudnn' runs on CUDA GPUs only, not on {where!r}")
    rows, heads, head_dim = q.shape[1:]
    real = rows if valid is None else valid
    if not _kernel_fails(_round_up(rows, multiple), real, heads, head_dim, q.dtype):
        return padded_dot_product(q, k, v, scale, "cudnn", multiple, valid)
    q, k, v = (x[:, :real] for x in (q, k, v))
    whole_tiles = _round_up(real, WHOLE_TILE_MULTIPLE)
    if not _kernel_fails(whole_tiles, real, heads, head_dim, q.dtype):
        out = padded_dot_product(q, k, v, scale, "cudnn", WHOLE_TILE_MULTIPLE)
    else:  # the real rows only: nothing to mask
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    return pad_tokens(out, rows)


def _flash_local(q_BxKxNxP, k_BxKxNxP, v_BxKxNxP, scale: float):
    """The Pallas TPU flash kernel on one shard, tokens padded to whole blocks. Padded tokens
    get segment id 0, real ones 1: real queries see only real keys (padded logits masked to
    -0.7·max_f32, probability exactly 0), padded queries only padded keys (zeros in, zeros out)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, _, n, _ = q_BxKxNxP.shape
    tokens = _round_up(n, PALLAS_TOKEN_MULTIPLE)
    segment_ids = None
    if tokens != n:
        q_BxKxNxP, k_BxKxNxP, v_BxKxNxP = (pad_tokens(x, tokens, 2) for x in (q_BxKxNxP, k_BxKxNxP, v_BxKxNxP))
        ids = jnp.broadcast_to((jnp.arange(tokens) < n).astype(jnp.int32), (b, tokens))
        segment_ids = fa.SegmentIds(q=ids, kv=ids)
    out = fa.flash_attention(q_BxKxNxP, k_BxKxNxP, v_BxKxNxP, segment_ids=segment_ids, sm_scale=scale)
    return out[:, :, :n]


def _pallas_tpu(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale: float):
    q, k, v = (heads_major(x) for x in (q_BxNxKxP, k_BxNxKxP, v_BxNxKxP))
    local = functools.partial(_flash_local, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q, k, v)
    else:
        # Batch and heads as the activations are sharded; tokens and head dim whole per shard.
        spec = shard_spec((ACT_BATCH, ACT_HEADS, None, None), mesh, q.shape)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
    return out.transpose(0, 2, 1, 3)


def check_padded(implementation: str, tokens: int, valid: int | None) -> None:
    """A one-line error where `valid` of `tokens` are real but `implementation` (resolved) is
    one that would attend to the padded keys (only "cudnn" masks them)."""
    if valid is not None and valid != tokens and implementation != "cudnn":
        raise ValueError(f"{tokens} tokens of which {valid} real: only attention 'cudnn' masks padded tokens")


def mssa(
    u_BxNxKxP: jax.Array,
    scale: float,
    implementation: str,
    cudnn_multiple: int = CUDNN_TOKEN_MULTIPLE,
    valid: int | None = None,
) -> jax.Array:
    """softmax(u uᵀ · scale) u, (B, N, K, P) -> (B, N, K, P); `implementation` resolved;
    `cudnn_multiple`: the token count cuDNN's kernel gets is padded to a multiple of it;
    `valid`: cuDNN only, the tokens are padded already and the first `valid` are real
    (`padded_dot_product`)."""
    check_padded(implementation, u_BxNxKxP.shape[1], valid)
    if implementation in ("symmetric", "autodiff"):
        u_BxKxNxP = heads_major(u_BxNxKxP)
        if implementation == "symmetric":
            out_BxKxNxP = subspace_attention(u_BxKxNxP, scale)
        else:
            out_BxKxNxP = _softmax_attention(u_BxKxNxP, scale)[0]
        return out_BxKxNxP.transpose(0, 2, 1, 3)
    return attend(u_BxNxKxP, u_BxNxKxP, u_BxNxKxP, scale, implementation, u_BxNxKxP.dtype, cudnn_multiple, valid)


def written_out(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale: float, dtype) -> tuple[jax.Array, jax.Array]:
    """The ViT's released attention: logits of the scaled queries in the compute dtype, softmax
    in fp32, probabilities cast back. Returns (output BxNxKxP, probabilities BxKxNxN fp32)."""
    logits = jnp.einsum("bqkp,bskp->bkqs", q_BxNxKxP * scale, k_BxNxKxP)
    attn_BxKxNxN = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bkqs,bskp->bqkp", attn_BxKxNxN.astype(dtype), v_BxNxKxP), attn_BxKxNxN


def attend(
    q_BxNxKxP,
    k_BxNxKxP,
    v_BxNxKxP,
    scale: float,
    implementation: str,
    dtype,
    cudnn_multiple: int = CUDNN_TOKEN_MULTIPLE,
    valid: int | None = None,
) -> jax.Array:
    """softmax(q kᵀ · scale) v, (B, N, K, P) each -> (B, N, K, P); `implementation` resolved;
    `cudnn_multiple` and `valid` as in `mssa`."""
    check_padded(implementation, q_BxNxKxP.shape[1], valid)
    if implementation == "autodiff":
        return written_out(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale, dtype)[0]
    if implementation == "dot_product":
        return jax.nn.dot_product_attention(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale=scale, implementation="xla")
    if implementation == "cudnn":
        return _cudnn(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale, cudnn_multiple, valid)
    if implementation == "pallas_tpu":
        return _pallas_tpu(q_BxNxKxP, k_BxNxKxP, v_BxNxKxP, scale)
    raise ValueError(f"attention implementation {implementation!r} does not apply here")


def fused_flops(batch: int, heads: int, tokens: int, head_dim: int, implementation: str, forward: bool = True) -> float:
    """FLOPs a fused kernel spends on one attention call at the token count it pads to (what
    XLA's cost analysis cannot see inside a custom call), 2 FLOPs per multiply-add: 2 products
    forward (S = q kᵀ, P v), 5 backward (S recomputed, dP, dV, dQ, dK). `forward=False`:
    the backward only (the Pallas forward kernel carries its own cost estimate, which XLA counts)."""
    n = _round_up(tokens, _multiple(implementation))
    return 2.0 * ((2 if forward else 0) + 5) * batch * heads * n * n * head_dim


def fused_bytes(
    batch: int, heads: int, tokens: int, head_dim: int, itemsize: int, implementation: str, forward: bool = True
) -> float:
    """HBM bytes a fused kernel moves per call at the padded token count. `forward=False`: only
    what XLA's cost analysis cannot see (the Pallas forward kernel's cost estimate counts its
    operands and results once).

    cuDNN: forward q, k, v read and o written; backward q, k, v, dO read by each of two
    kernels, dQ, dK, dV written, fp32 row statistics read by each; blocks re-read across the
    grid not counted (a lower bound). Pallas TPU (jax's `flash_attention`, default 128-token
    blocks), from the operands in its HLO: the backward reads three fp32 row statistics (l, m
    and di = rowsum(o·dO)) broadcast to 128 lanes, (B, K, N, 128) each, and with padding the
    query segment ids as int32 (B, N, 128), read per head; the dK/dV kernel re-reads the query
    side per key block, the dQ kernel the key side per query block, the forward the keys per
    query block."""
    n = _round_up(tokens, _multiple(implementation))
    tile = batch * heads * n * head_dim * itemsize  # q, k, v, o or one of their gradients
    if implementation != "pallas_tpu":
        rows = batch * heads * n * 4
        return float((4 * tile if forward else 0) + 11 * tile + 2 * 3 * rows)
    blocks = n // PALLAS_TOKEN_MULTIPLE
    stats = batch * heads * n * PALLAS_TOKEN_MULTIPLE * 4
    padded = tokens != n
    q_ids = batch * heads * n * PALLAS_TOKEN_MULTIPLE * 4 if padded else 0
    kv_ids = batch * heads * 8 * n * 4 if padded else 0
    dkv = blocks * (2 * tile + 3 * stats + q_ids) + 2 * tile + kv_ids + 2 * tile  # q, dO, stats per key block
    dq = 2 * tile + 3 * stats + q_ids + blocks * (2 * tile + kv_ids) + tile  # k, v per query block
    forward_unseen = (blocks - 1) * (2 * tile + kv_ids)  # k, v re-read beyond the cost estimate
    forward_seen = 4 * tile + 2 * stats + q_ids + kv_ids  # q, k, v, ids read, o, l, m written
    return float(dkv + dq + forward_unseen + (forward_seen if forward else 0))


def _multiple(implementation: str) -> int:
    return PALLAS_TOKEN_MULTIPLE if implementation == "pallas_tpu" else CUDNN_TOKEN_MULTIPLE
