"""Classification heads on a pooled feature (B, D) -> logits (B, num_classes).

  ProbeHead     FAIR's linear probe: BatchNorm without affine (eps 1e-6, PyTorch's running
                variance) + Dense (init std 0.01)
  FinetuneHead  FAIR's fine-tuning head: LayerNorm (`fc_norm`, eps 1e-6) + Dense (init std 2e-5)

Both name their Dense `fc`; the classifier holds a head under `head`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models.layers import EMBED

HEAD_NORM_EPS = 1e-6


def _dense(num_classes: int, init_std: float, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), (EMBED, None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name="fc",
    )


class BatchNormNoAffine(nn.Module):
    """PyTorch's `BatchNorm1d(affine=False)` in training and eval mode.

    Training normalises by the batch mean and biased variance and moves the running
    statistics (`batch_stats` "mean" / "var", as flax's BatchNorm names them) towards the
    batch mean and the UNBIASED batch variance (n / (n - 1)), as PyTorch does; flax's own
    BatchNorm keeps the biased one, which drifts from FAIR's probe by n / (n - 1).
    `momentum` is flax's (the weight of the running average): 0.9 = PyTorch's 0.1. `mask`
    (B,) leaves padding and undecodable examples out of the statistics."""

    momentum: float = 0.9
    epsilon: float = HEAD_NORM_EPS

    @nn.compact
    def __call__(self, x_BxD: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        d = x_BxD.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((d,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((d,), jnp.float32))
        if not train:
            mean, var = ra_mean.value, ra_var.value
        else:
            w_Bx1 = jnp.ones((x_BxD.shape[0], 1), jnp.float32) if mask is None else mask.astype(jnp.float32)[:, None]
            n = jnp.maximum(jnp.sum(w_Bx1), 1.0)
            mean = jnp.sum(w_Bx1 * x_BxD, axis=0) / n
            var = jnp.sum(w_Bx1 * jnp.square(x_BxD - mean), axis=0) / n
            if not self.is_initializing():
                unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return (x_BxD - mean) * jax.lax.rsqrt(var + self.epsilon)


class ProbeHead(nn.Module):
    """BatchNorm1d(affine=False, eps=1e-6) then Linear, as FAIR's `main_linprobe.py`
    (`BatchNormNoAffine`, named `bn`). `mask` (B,) leaves padding and undecodable examples
    out of the statistics."""

    num_classes: int
    init_std: float = 0.01
    momentum: float = 0.9
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        x_BxD = BatchNormNoAffine(self.momentum, name="bn")(x_BxD.astype(jnp.float32), train, mask)
        return _dense(self.num_classes, self.init_std, self.dtype, self.param_dtype)(x_BxD)


class FinetuneHead(nn.Module):
    """LayerNorm then Linear (FAIR `models_vit.py` with global_pool: `fc_norm`, `head`);
    `norm=False` for a cls feature, which has been through the encoder's final norm."""

    num_classes: int
    init_std: float = 2e-5
    norm: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        del train, mask  # no batch statistics
        if not self.norm:
            return _dense(self.num_classes, self.init_std, self.dtype, self.param_dtype)(x_BxD)
        x_BxD = nn.LayerNorm(
            epsilon=HEAD_NORM_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
            name="fc_norm",
        )(x_BxD)
        return _dense(self.num_classes, self.init_std, self.dtype, self.param_dtype)(x_BxD)


HEADS = {"probe": ProbeHead, "finetune": FinetuneHead}
