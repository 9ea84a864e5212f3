"""Keep libtpu quiet where there is no TPU.

With libtpu installed (the `tpu` extra, for ahead-of-time compiles) JAX tries the TPU backend
on every start-up, and on a machine without TPU chips libtpu logs an `INVALID_ARGUMENT ...
TPU_WORKER_HOSTNAMES` error before JAX falls back to the CPU. Where JAX's own hardware check
finds no TPU chip (PCI vendor and device ids, as `jax._src.hardware_utils` reads them) and the
user chose no platforms (JAX_PLATFORMS unset, JAX_FORCE_TPU_INIT unset), the TPU backend is
not tried. Ahead-of-time compiles load libtpu for topologies by another route
(`jax.experimental.topologies`), unaffected.
"""

from __future__ import annotations

import os


def skip_absent_tpu() -> bool:
    """Must run before JAX initialises its backends; returns whether the TPU backend was dropped."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    try:
        from jax._src import hardware_utils, xla_bridge
    except ImportError:  # JAX moved its internals: then libtpu may log, nothing worse
        return False
    registration = getattr(xla_bridge, "_backend_factories", {}).get("tpu")
    if registration is None or xla_bridge.backends_are_initialized():
        return False
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return False
    # Re-registered rather than removed: "tpu" stays a known platform (lowering rules name it).
    xla_bridge.register_backend_factory("tpu", _no_tpu_chip, priority=registration.priority, fail_quietly=True)
    return True


def _no_tpu_chip():
    raise RuntimeError("no TPU chip on this machine (crate_jax.platforms); libtpu not started")
