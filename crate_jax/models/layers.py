"""Building blocks shared by CRATE-MAE and ViT-MAE: patches, position tables, initialisers,
the platform a step is traced for.

Patches are flattened row-major as (p, q, channel), exactly like MAE's `patchify`
(`nchpwq->nhwpqc`), so that the patch embedding is a Dense on those vectors and the
reconstruction target uses the same order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis names. Parameters use the first group, activations the second; the
# trainer's config maps both onto mesh axes (see crate_jax/sharding.py).
EMBED, HEADS, MLP, PATCH, LAYERS = "embed", "heads", "mlp", "patch", "layers"
ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS = "act_batch", "act_length", "act_embed", "act_heads"

xavier_uniform = nn.initializers.xavier_uniform()
# PyTorch's default Linear/Conv init `kaiming_uniform_(a=0)` is U(+-sqrt(6 / fan_in)).
torch_kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
token_init = nn.initializers.normal(0.02)


def trace_platform() -> str:
    """The platform the current trace targets: the context mesh's devices (`jax.set_mesh`;
    abstract devices in an ahead-of-time compile), else JAX's default backend. "cuda" and
    "rocm" are reported as "gpu"."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    where = device.platform if device is not None and getattr(device, "platform", None) else jax.default_backend()
    return "gpu" if where in ("gpu", "cuda", "rocm") else where


def _dividing_axes(axes, mesh, size: int):
    """A PartitionSpec entry: the mesh axes this mesh has, or None (replicated) where they do
    not divide the dimension (e.g. the one-image batch `model.init` traces)."""
    if axes is None:
        return None
    kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in mesh.axis_names)
    shards = 1
    for a in kept:
        shards *= mesh.shape[a]
    return kept if kept and size % shards == 0 else None


def shard_spec(logical_axes: tuple, mesh, shape: tuple[int, ...]) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an array with these logical axes (the current axis rules) on
    `mesh`, each dimension split only where its mesh axes divide it: for `shard_map` around a
    kernel XLA cannot partition (Pallas, Triton)."""
    axes = nn.logical_to_mesh_axes(logical_axes)
    return jax.sharding.PartitionSpec(*(_dividing_axes(a, mesh, n) for a, n in zip(axes, shape, strict=True)))


def uniform_bias(fan_in: int):
    """PyTorch's default conv/linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/P * W/P, P*P*C), each patch flattened as (p, q, c)."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = jnp.einsum("bhpwqc->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
    """Inverse of `patchify` for a square grid."""
    b, n, _ = patches.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"unpatchify needs a square grid, got {n} patches")
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels)
    x = jnp.einsum("bhwpqc->bhpwqc", x)
    return x.reshape(b, g * p, g * p, channels)


class PatchEmbed(nn.Module):
    """P x P stride-P convolution with bias, written as a Dense on flattened patches."""

    patch_size: int
    width: int
    in_channels: int = 3
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """NHWC images, or patches (B, L, P*P*C) already flattened by `patchify` (the paper's
        pixel-space mask token replaces some of them before the embedding)."""
        x_BxLxF = patchify(images, self.patch_size) if images.ndim == 4 else images
        fan_in = self.patch_size * self.patch_size * self.in_channels
        return nn.Dense(
            self.width,
            dot_general=dense_dot_general,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(xavier_uniform, (PATCH, EMBED)),
            bias_init=nn.with_logical_partitioning(uniform_bias(fan_in), (EMBED,)),
            name="proj",
        )(x_BxLxF)


def sincos_table_2d(width: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed`: (1 + gh*gw, width) with a zero cls row.

    The first half of the channels encodes the column index, the second half the row.
    """
    if width % 4:
        raise ValueError(f"sin-cos position table needs width divisible by 4, got {width}")
    omega = np.arange(width // 4, dtype=np.float64) / (width / 4.0)
    omega = 1.0 / 10000**omega

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    table = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
    if cls_token:
        table = np.concatenate([np.zeros((1, width), np.float32), table], axis=0)
    return table


def _torch_bicubic_weights(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out, in) matrix of PyTorch's bicubic (a = -0.75, align_corners=False) resampling."""
    a = -0.75

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        t = src - base
        for k in range(-1, 3):
            idx = min(max(base + k, 0), in_size - 1)
            weights[i, idx] += cubic(k - t)
    return weights


def interpolate_table(table: np.ndarray, grid: tuple[int, int], new_grid: tuple[int, int]) -> np.ndarray:
    """Resample a (1 + gh*gw, d) table with a cls row to another patch grid.

    Follows DINO's `interpolate_pos_encoding`: bicubic with the scale factor
    (new + 0.1) / old, so attention maps at other resolutions match the reference code.
    """
    (gh, gw), (nh, nw) = grid, new_grid
    if (gh, gw) == (nh, nw):
        return table
    cls_row, patch = table[:1], table[1:].reshape(gh, gw, -1).astype(np.float64)
    wh = _torch_bicubic_weights(gh, nh, (nh + 0.1) / gh)
    ww = _torch_bicubic_weights(gw, nw, (nw + 0.1) / gw)
    out = np.einsum("ih,jw,hwd->ijd", wh, ww, patch).reshape(nh * nw, -1)
    return np.concatenate([cls_row, out.astype(table.dtype)], axis=0)


def position_table(width: int, grid_size: int, new_grid: tuple[int, int] | None = None) -> np.ndarray:
    """The models' fixed sin-cos table (1 + g*g, width) for their own g x g grid, or that same
    table resampled to `new_grid` (rows, cols) by `interpolate_table`, as DINO resamples a
    learned table; not a fresh sin-cos table of the new grid. A numpy constant for tracing."""
    table = sincos_table_2d(width, grid_size, grid_size)
    return table if new_grid is None else interpolate_table(table, (grid_size, grid_size), tuple(new_grid))


POSITION_TABLES = ("sincos", "learned")


def resample_rows(table: jax.Array, num_prefix: int, grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """`interpolate_table` for a traced (learned) table: (num_prefix + gh*gw, d) ->
    (num_prefix + nh*nw, d), the first `num_prefix` rows (a cls row, or none) kept as they are."""
    (gh, gw), (nh, nw) = grid, new_grid
    if (gh, gw) == (nh, nw):
        return table
    wh = jnp.asarray(_torch_bicubic_weights(gh, nh, (nh + 0.1) / gh), jnp.float32)
    ww = jnp.asarray(_torch_bicubic_weights(gw, nw, (nw + 0.1) / gw), jnp.float32)
    patch = table[num_prefix:].reshape(gh, gw, -1).astype(jnp.float32)
    out = jnp.einsum("ih,jw,hwd->ijd", wh, ww, patch, precision=jax.lax.Precision.HIGHEST).reshape(nh * nw, -1)
    return jnp.concatenate([table[:num_prefix], out.astype(table.dtype)], axis=0)


def position_rows(
    module: nn.Module, kind: str, width: int, grid_size: int, grid: tuple[int, int], num_prefix: int, param_dtype
):
    """The position table added to the tokens, (num_prefix + rows*cols, width), for `grid`.

    kind="sincos": the fixed table (a numpy constant); its zero cls row only if num_prefix is 1.
    kind="learned": the paper's trainable table, a parameter `pos_embed` (1, num_prefix + g*g,
    width) of `module` for its own g x g grid (init N(0, 0.02), as timm's ViT), resampled to
    `grid` as DINO does when that differs. Call it inside `module`'s compact method."""
    if kind == "sincos":
        return position_table(width, grid_size, grid)[1 - num_prefix :]
    if kind != "learned":
        raise ValueError(f"model.position_table={kind!r} is not one of {POSITION_TABLES}")
    table = module.param(
        "pos_embed",
        nn.with_logical_partitioning(token_init, (None, None, EMBED)),
        (1, num_prefix + grid_size * grid_size, width),
        param_dtype,
    )[0]
    return resample_rows(table, num_prefix, (grid_size, grid_size), grid)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w over x's last axis, with the weight gradient taken as one 2-D product.

    Autodiff leaves XLA:CPU a dot that contracts the leading (batch x tokens) axes of both
    operands, plus copies around it; this writes it as (rows, in)ᵀ · (rows, out)."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    g_x = (g @ w.T.astype(g.dtype)).astype(x.dtype)
    g_w = jnp.einsum("ri,ro->io", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])).astype(w.dtype)
    return g_x, g_w


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`dot_general` for `nn.Dense(dot_general=...)`: its contraction through `matmul`."""
    (contract_lhs, contract_rhs), (batch_lhs, _) = dimension_numbers
    if tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and not batch_lhs and rhs.ndim == 2:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)
