"""crate-jax: CRATE / CRATE-MAE in JAX and Flax.

model, params = crate_jax.load(DIR)            # a training workdir or an imported checkpoint
features = crate_jax.encode(model, params, images)
"""

from crate_jax import platforms, storage

platforms.skip_absent_tpu()  # before any backend starts: no libtpu error where there is no TPU
storage.configure()  # before etils, gcsfs or tensorstore read their gs:// settings (crate_jax/storage.py)

from crate_jax.api import encode, load  # noqa: E402

__all__ = ["encode", "load"]
