"""LayerNorm over the last axis in fp32 (biased variance, as PyTorch), in four exact forms.

All compute the same two-pass statistics and the same output; they differ in what the
backward pass reads (and, for "pallas_gpu", in who writes the forward), which decides how
XLA fuses them:

  "autodiff"            the forward written out, gradient by autodiff: the LayerNorms as
                        they were before the other two forms.
  "saved_stats"         a `custom_vjp` whose backward reads the input, the row mean and
                        1/std (fp32, one value per token) and dy: dx in one row-wise pass,
                        the scale's and the bias's gradients as two column sums. XLA
                        decides where the statistics live. On CPU and TPU: on XLA:CPU the
                        CRATE-MAE-Tiny@32 train step (batch 32, fp32) ran 37.6 img/s against
                        36.1 with autodiff (means of six 30-step medians, the two forms
                        interleaved in three processes; README, CPU); on TPUs it moves a
                        little fewer bytes than autodiff by the ahead-of-time compile
                        (CRATE-MAE-B, batch 4096: 31.8 against 32.0 GB per chip on v5e-256,
                        101 against 103 on v4-128; ViT-MAE-B 21.8 both).
  "saved_stats_pinned"  the same backward, for XLA:GPU: the statistics kept behind an
                        optimisation barrier (otherwise XLA:GPU recomputes them inside the
                        backward, which makes the scale's gradient a row-reduction fusion that
                        writes x̂·dy in fp32 at full size for a separate column reduction) and
                        both column sums in one variadic reduction (dy read once for the two).
                        Per CRATE-MAE-B encoder layer (batch 256, compiled for an H200 without
                        a GPU, tools/hlo_bytes.py) the two LayerNorms' kernels move 1.79 GB with
                        autodiff and 1.33 GB here; the step 150 GB against 133 ("saved_stats":
                        150; the barrier alone: 137). XLA:CPU runs the variadic reduction
                        slowly (the Tiny step above: 36.7 and 36.6 img/s against 38.7 and
                        36.5 for autodiff in the same runs), and TPUs move more bytes with
                        this form (CRATE-MAE-B on v5e-256: 37.4 GB per chip).
  "pallas_gpu"          the pinned form's backward after a Pallas (Triton) forward kernel that
                        reads each row once (one token's row per program, held in registers):
                        statistics, normalised output and the saved mean and 1/std in one pass,
                        where XLA:GPU's forward reads the input three times (mean, variance,
                        normalise). Rows up to `PALLAS_MAX_WIDTH` features. Runs inside
                        `shard_map` over the activations' batch and token axes (a Triton call
                        is not partitioned automatically); elsewhere than on a GPU, Pallas's
                        interpreter runs it (tests). Not in `auto`: compiled for an H200 without
                        one, the CRATE-MAE-B step (batch 256) moves 109.3 GB against 112.3 with
                        the pinned form (129.9 against 132.9 with cuDNN's whole-tile padding),
                        since XLA no longer fuses the residual add and ISTA's ReLU into the
                        LayerNorm's forward; no GPU timing yet.

"auto" (the models' `layer_norm_form` default) picks one from `FORM` by the platform the
step is traced for (`layers.trace_platform`, so an ahead-of-time compile for a GPU on a CPU host
takes the GPU entry).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models.layers import ACT_BATCH, ACT_LENGTH, shard_spec, trace_platform

FORMS = ("auto", "autodiff", "saved_stats", "saved_stats_pinned", "pallas_gpu")
# "auto": by the traced platform. Why each entry: see the module docstring.
FORM = {"gpu": "saved_stats_pinned", "cpu": "saved_stats", "tpu": "saved_stats"}


def _statistics(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    return mean, jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def _normalise(x32, mean, rstd, scale, bias, dtype) -> jax.Array:
    return ((x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def _autodiff(x, scale, bias, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32, eps)
    return _normalise(x32, mean, rstd, scale, bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _saved_stats(x, scale, bias, eps: float, dtype, pinned: bool) -> jax.Array:
    return _autodiff(x, scale, bias, eps, dtype)


def _saved_stats_fwd(x, scale, bias, eps, dtype, pinned):
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32, eps)
    y = _normalise(x32, mean, rstd, scale, bias, dtype)
    if pinned:  # kept for the backward, not recomputed there (see the module docstring)
        mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    return y, (x, scale, bias, mean, rstd)


def _saved_stats_bwd(eps, dtype, pinned, residuals, dy):
    del eps, dtype
    x, scale, bias, mean, rstd = residuals
    dy32 = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    rows = tuple(range(x.ndim - 1))
    if pinned:  # one variadic reduction for both column sums: dy is read once for the two
        d_scale, d_bias = jax.lax.reduce(
            (dy32 * xhat, dy32), (jnp.float32(0), jnp.float32(0)), lambda a, b: (a[0] + b[0], a[1] + b[1]), rows
        )
    else:
        d_scale, d_bias = jnp.sum(dy32 * xhat, axis=rows), jnp.sum(dy32, axis=rows)
    g = dy32 * scale.astype(jnp.float32)
    # d/dx of (x - mean) * rstd, applied to g: the row means of g and g·x̂ removed.
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_saved_stats.defvjp(_saved_stats_fwd, _saved_stats_bwd)

PALLAS_MAX_WIDTH = 8192  # one row per program, in registers: Triton blocks are powers of two


def _row_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps: float, block: int):
    """One row: two-pass fp32 statistics over the values already loaded, then the output."""
    from jax.experimental.pallas import triton as plgpu

    n = x_ref.shape[0]
    cols = jnp.arange(block)
    valid = cols < n
    x32 = plgpu.load(x_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x32) / n
    centred = jnp.where(valid, x32 - mean, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred) / n + eps)
    scale = plgpu.load(scale_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref.at[cols], mask=valid, other=0.0).astype(jnp.float32)
    plgpu.store(y_ref.at[cols], (centred * rstd * scale + bias).astype(y_ref.dtype), mask=valid)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _pallas_rows(x, scale, bias, eps: float, dtype, interpret: bool):
    """(..., n) -> output (..., n) in `dtype`, mean and 1/std (..., 1) in fp32."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n = x.shape[-1]
    if n > PALLAS_MAX_WIDTH:
        raise ValueError(f"model.layer_norm_form='pallas_gpu' takes at most {PALLAS_MAX_WIDTH} features, not {n}")
    block = max(pl.next_power_of_2(n), 32)
    row = pl.pallas_call(
        functools.partial(_row_kernel, eps=eps, block=block),
        out_shape=(
            jax.ShapeDtypeStruct((n,), dtype),
            jax.ShapeDtypeStruct((), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=min(max(block // 256, 1), 8)),
        interpret=interpret,
        name="layer_norm_rows",
    )
    y, mean, rstd = jax.vmap(row, in_axes=(0, None, None))(x.reshape(-1, n), scale, bias)  # a grid over rows
    return y.reshape(x.shape), mean.reshape(*x.shape[:-1], 1), rstd.reshape(*x.shape[:-1], 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_gpu(x, scale, bias, eps: float, dtype) -> jax.Array:
    return _pallas_gpu_fwd(x, scale, bias, eps, dtype)[0]


def _pallas_gpu_fwd(x, scale, bias, eps, dtype):
    local = functools.partial(_pallas_rows, eps=eps, dtype=dtype, interpret=trace_platform() != "gpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        y, mean, rstd = local(x, scale, bias)
    else:  # batch (and tokens) sharded as the activations are; each shard's rows whole
        logical = (ACT_BATCH, ACT_LENGTH, None) if x.ndim == 3 else (ACT_BATCH,) + (None,) * (x.ndim - 1)
        spec = shard_spec(logical, mesh, x.shape)
        replicated = jax.sharding.PartitionSpec()
        y, mean, rstd = jax.shard_map(
            local, mesh=mesh, in_specs=(spec, replicated, replicated), out_specs=(spec,) * 3, check_vma=False
        )(x, scale, bias)
    return y, (x, scale, bias, mean, rstd)


def _pallas_gpu_bwd(eps, dtype, residuals, dy):
    return _saved_stats_bwd(eps, dtype, True, residuals, dy)


_pallas_gpu.defvjp(_pallas_gpu_fwd, _pallas_gpu_bwd)


def resolve(form: str) -> str:
    """The form `form` names; "auto" looked up in `FORM` for the traced platform."""
    if form not in FORMS:
        raise ValueError(f"model.layer_norm_form={form!r} is not one of {FORMS}")
    return FORM.get(trace_platform(), "autodiff") if form == "auto" else form


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype, form: str = "auto") -> jax.Array:
    """LayerNorm of `x` over its last axis, output in `dtype`, in the form `form` (`FORMS`)."""
    form = resolve(form)
    if form == "autodiff":
        return _autodiff(x, scale, bias, eps, dtype)
    if form == "pallas_gpu":
        return _pallas_gpu(x, scale, bias, eps, jnp.dtype(dtype))
    return _saved_stats(x, scale, bias, eps, dtype, form == "saved_stats_pinned")


class LayerNorm(nn.Module):
    """`nn.LayerNorm` with the same parameters (`scale`, `bias`), through `layer_norm`."""

    epsilon: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    form: str = "auto"  # FORMS: how the backward is written, not what it computes

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        dtype = jnp.dtype(self.dtype or jnp.result_type(x, scale))
        return layer_norm(x, scale, bias, self.epsilon, dtype, self.form)
