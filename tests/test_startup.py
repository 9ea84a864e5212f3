"""Start-up (issue 12): JAX's own cluster detection decides whether to join jax.distributed
(a one-task SLURM job does not, a multi-task one or an Open MPI job of several ranks would),
one log line names what was found; and with libtpu installed but no TPU, an ordinary run
prints no libtpu error even without JAX_PLATFORMS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate_jax import cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_VARS = ("SLURM_", "OMPI_", "TPU_", "KUBERNETES_SERVICE_HOST", "MEGASCALE_")


def slurm(ntasks: int) -> dict[str, str]:
    return {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0"}  # fmt: skip


@pytest.fixture
def no_cluster(monkeypatch):
    for key in list(os.environ):
        if key.startswith(CLUSTER_VARS):
            monkeypatch.delenv(key)
    return monkeypatch


def test_nothing_detected_on_a_plain_machine(no_cluster):
    assert cluster.detect() == (None, 1)


def test_slurm_and_open_mpi_are_detected_with_their_process_counts(no_cluster):
    for key, value in slurm(4).items():
        no_cluster.setenv(key, value)
    assert cluster.detect() == ("SlurmCluster", 4)
    for key in slurm(4):
        no_cluster.delenv(key)
    no_cluster.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.0.0.1:34911")
    no_cluster.setenv("OMPI_COMM_WORLD_SIZE", "8")
    no_cluster.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert cluster.detect() == ("OmpiCluster", 8)


def test_explicit_coordinator_needs_the_process_count_and_index():
    with pytest.raises(ValueError, match="--num_processes and --process_id"):
        cluster.initialize("127.0.0.1:1234", None, 0)


def test_one_slurm_task_runs_alone_and_libtpu_stays_quiet(tmp_path):
    # The real entry point in a fake one-task SLURM job, JAX_PLATFORMS unset; it fails on
    # purpose after start-up (an unknown task), before any training.
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS) and k != "JAX_PLATFORMS"}
    env |= slurm(1) | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.main", "--config=configs/imagenet_mae.py:runlocal",
         "--config.task=nonsense", f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode != 0 and "config.task='nonsense' is not one of" in proc.stderr, proc.stderr[-3000:]
    assert "start-up: SlurmCluster, one process (not initialising jax.distributed); process 0 of 1" in proc.stderr
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "INVALID_ARGUMENT" not in proc.stderr, proc.stderr[-3000:]


def test_without_the_fix_libtpu_would_speak():
    # Guards the test above: where libtpu is installed and JAX itself starts backends, the
    # error appears, so its absence above is crate_jax's doing.
    pytest.importorskip("libtpu")
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        pytest.skip("a TPU is here: libtpu starts without an error")
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS) and k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert "TPU_WORKER_HOSTNAMES" in proc.stderr


def test_multi_process_cpu_runs_skip_the_compilation_cache_only_where_it_hangs():
    from crate_jax.cluster import cached_cpu_collectives_hang

    assert not cached_cpu_collectives_hang("0.10.2") and not cached_cpu_collectives_hang("0.11.2")
    assert cached_cpu_collectives_hang("0.12.1") and cached_cpu_collectives_hang("0.12.0.1")
    assert cached_cpu_collectives_hang("1.0.0.dev20270101")


def test_cpu_device_count_is_one_per_core_that_divides_the_batches():
    assert cluster.cpu_device_count(0, 2, [32, 64]) == 2
    assert cluster.cpu_device_count(0, 3, [32, 64]) == 2  # 3 does not divide 32
    assert cluster.cpu_device_count(0, 6, [24, 36]) == 6
    assert cluster.cpu_device_count(0, 64, [4096, 1024]) == cluster.MAX_AUTO_CPU_DEVICES
    assert cluster.cpu_device_count(0, 2, [33]) == 1
    assert cluster.cpu_device_count(0, 0, [32]) == 1
    assert cluster.cpu_device_count(3, 2, [32]) == 3  # explicit: the trainer's batch check names the mismatch
    with pytest.raises(ValueError, match=r"config.cpu_devices=-1 must be >= 0"):
        cluster.cpu_device_count(-1, 2, [32])


SPLIT = """
import jax
from crate_jax import cluster
print(cluster.split_cpu_host({cpu_devices}, [32, 64], multi_process={multi}), jax.device_count())
"""


AUTO = cluster.cpu_device_count(0, len(os.sched_getaffinity(0)), [32, 64])


@pytest.mark.parametrize(
    "cpu_devices, multi, xla_flags, expected",
    [
        (0, False, "", f"{AUTO if AUTO > 1 else None} {AUTO}"),
        (3, False, "", "3 3"),
        (1, False, "", "None 1"),
        (3, True, "", "None 1"),  # multi-process runs (which may share a host) keep JAX's default
        (3, False, "--xla_force_host_platform_device_count=5", "None 5"),  # the user's count wins
    ],
)
def test_split_cpu_host_sets_jax_devices_before_start(cpu_devices, multi, xla_flags, expected):
    # A fresh process each: JAX takes the device count once, when its backend starts.
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env |= {"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    code = SPLIT.format(cpu_devices=cpu_devices, multi=multi)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == expected
