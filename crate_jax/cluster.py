"""Pod start-up: one process per host joins `jax.distributed` wherever JAX's own cluster
detection applies, and a single-process environment does not initialise at all.

JAX's detection (`jax._src.clusters`, what `jax.distributed.initialize()` without arguments
consults) knows Cloud TPU VMs (GCE and GKE, multi-slice included), SLURM, Open MPI, Kubernetes
and mpi4py (opt-in). `initialize` asks it which environment this is and how many processes
it has: more than one means `jax.distributed.initialize()` with no arguments (JAX fills in the
coordinator, the process count and index); one (a one-task SLURM job, a single-host TPU VM)
means nothing to join. Explicit `--coordinator_address/--num_processes/--process_id` win.
"""

from __future__ import annotations

import logging

import jax


def detect() -> tuple[str | None, int]:
    """(the cluster environment JAX detects, e.g. "SlurmCluster", and its process count), or
    (None, 1) where JAX detects none. Opt-in methods (mpi4py) are not tried, as in JAX."""
    from jax._src import clusters  # JAX's cluster detection; no public API lists it

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return env.__name__, int(env.get_process_count())
    return None, 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:  # fmt: skip
    """Join `jax.distributed` if this is one process of several; returns what was detected
    (also logged, with the process index and count)."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        found = f"explicit flags (coordinator {coordinator_address})"
    else:
        name, count = detect()
        if count > 1:
            jax.distributed.initialize()
            found = f"{name}, {count} processes (jax.distributed initialised)"
        else:
            found = f"{name}, one process (not initialising jax.distributed)" if name else "a single process"
    logging.info(
        "start-up: %s; process %d of %d, %d local devices of %d",
        found, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    if jax.process_count() > 1 and jax.default_backend() == "cpu" and cached_cpu_collectives_hang():
        jax.config.update("jax_enable_compilation_cache", False)
        logging.warning("jax %s: no persistent compilation cache in this multi-process CPU run", jax.__version__)
    return found


def cached_cpu_collectives_hang(version: str = jax.__version__) -> bool:
    """Whether this JAX hangs in a multi-process CPU run's executables loaded from the persistent
    compilation cache: with jax 0.12.1 (2026-12-07) two processes on 127.0.0.1 that loaded their
    train or eval step from a cache an earlier identical run had written both waited forever at
    its first collective, where the same run compiling afresh passed; jax 0.10.2 and 0.11.2 do not.
    Such runs (tests, simulated pods) then compile instead."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (0, 12)
