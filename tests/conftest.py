"""Tests run on the CPU, even where libtpu (the `tpu` extra) is installed.

Every `python -m crate_jax.main` a test starts compiles the same few tiny programs; a JAX
compilation cache shared by the whole test session (the pytest-xdist workers and the
subprocesses they start inherit this environment) lets later runs load them instead. It lives
in a fresh directory per session, removed at the end, so no run reads another session's
entries. A cached executable is the one XLA compiled, so results do not change.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    # Runs in the controller before it starts the workers, which inherit os.environ.
    if hasattr(config, "workerinput") or _CACHE_ENV in os.environ:
        return
    config._crate_jax_cache = tempfile.mkdtemp(prefix="crate_jax_jit_cache_")
    os.environ[_CACHE_ENV] = config._crate_jax_cache
    # The tiny test programs compile in well under JAX's default 1 s threshold.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    cache = getattr(config, "_crate_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
