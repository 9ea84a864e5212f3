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
import os
from collections.abc import Sequence

import jax

# `config.cpu_devices=0` splits a CPU host into at most this many devices: the gain was measured
# on 2 cores only (README, "Performance"), and on an accelerator host the CPU devices go unused.
MAX_AUTO_CPU_DEVICES = 8


def detect() -> tuple[str | None, int]:
    """(the cluster environment JAX detects, e.g. "SlurmCluster", and its process count), or
    (None, 1) where JAX detects none. Opt-in methods (mpi4py) are not tried, as in JAX."""
    from jax._src import clusters  # JAX's cluster detection; no public API lists it

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return env.__name__, int(env.get_process_count())
    return None, 1


def split_cpu_host(cpu_devices: int, batch_sizes: Sequence[int], multi_process: bool) -> int | None:
    """Before JAX starts: how many devices JAX's CPU backend makes of this host, set through
    `jax_num_cpu_devices` (the count set, or None where JAX's own choice stands).

    XLA:CPU runs a batched matrix product (the per-head attention products) one small product
    after another on one thread, so with one device most of a CRATE step's attention leaves the
    other cores idle; one device per core runs the step data parallel over them. 0: one per core
    this process may use (at most MAX_AUTO_CPU_DEVICES), lowered to the largest count that
    divides every one of `batch_sizes`; 1: JAX's default, one device. A device count the user
    set (XLA_FLAGS' --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) wins, and
    a multi-process run (whose processes may share a host) keeps JAX's default. Harmless on GPU/TPU
    hosts: JAX then runs on the accelerator and the CPU devices go unused."""
    count = cpu_device_count(cpu_devices, len(os.sched_getaffinity(0)), batch_sizes)
    user_set = "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if count == 1 or multi_process or user_set or jax.config.jax_num_cpu_devices != -1:
        return None
    jax.config.update("jax_num_cpu_devices", count)
    return count


def cpu_device_count(cpu_devices: int, cores: int, batch_sizes: Sequence[int]) -> int:
    """config.cpu_devices resolved on a host with `cores` usable cores (see `split_cpu_host`)."""
    if cpu_devices < 0:
        raise ValueError(f"config.cpu_devices={cpu_devices} must be >= 0 (0: one per core)")
    if cpu_devices:
        return cpu_devices
    most = max(1, min(cores, MAX_AUTO_CPU_DEVICES))
    return max(d for d in range(1, most + 1) if all(b % d == 0 for b in batch_sizes))


def split_cpu_host_for(config, coordinator_address: str | None = None) -> int | None:
    """`split_cpu_host` with config.cpu_devices and the global batches a run splits over its
    devices: the train batch of one accumulation step and the eval batch, where the task has them."""
    batch_sizes = [config.batch_size // config.get("grad_accum_steps", 1)]
    if "eval_batch_size" in config:
        batch_sizes.append(config.eval_batch_size)
    several = bool(coordinator_address) or detect()[1] > 1
    count = split_cpu_host(config.cpu_devices, batch_sizes, multi_process=several)
    if count:
        logging.info("JAX's CPU backend: %d devices on this host (config.cpu_devices=%d)", count, config.cpu_devices)
    return count


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
