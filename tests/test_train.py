"""The trainer end to end: meshes, device and process counts, resume after kill -9 and
SIGTERM, bad input. Runs `python -m crate_jax.main` in subprocesses, each with its own
number of fake CPU devices, on the embedded dataset built into a temporary data dir."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crate_jax import checkpoint, data, main

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
BASE = [
    "--config=configs/imagenet_mae.py:runlocal",
    "--config.data.name=crate_jax_embedded",
    "--config.data.eval_split=probe_test",
    "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.ensure_built(str(tmp_path_factory.mktemp("tfds")))


def command(workdir, data_dir, *overrides):
    return [
        sys.executable,
        "-m",
        "crate_jax.main",
        *BASE,
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *overrides,
    ]


def environment(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT)
    return env


def run(workdir, data_dir, *overrides, devices=1, check=True, timeout=300):
    proc = subprocess.run(
        command(workdir, data_dir, *overrides), cwd=ROOT, env=environment(devices), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_close(a: dict, b: dict, steps):
    for s in steps:
        assert abs(a[s] - b[s]) <= RTOL * abs(b[s]), f"step {s}: {a[s]} vs {b[s]}"


def params(workdir):
    return checkpoint.load(str(workdir))[1]


def assert_params_close(a, b, rtol=1e-6):
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted 6-step run on a single device."""
    workdir = tmp_path_factory.mktemp("reference")
    run(workdir, data_dir, "--config.total_steps=6", "--config.checkpoint_every_steps=2", "--config.eval_every_steps=6")
    return workdir


def test_reference_run_writes_everything(reference):
    names = {p.name for p in Path(reference).iterdir()}
    assert {"checkpoints", "metrics.jsonl", "config.json", "reconstructions"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"lr", "images_per_sec"} <= r.keys() for r in train_rows)
    assert [r for r in rows if "eval_loss" in r][0]["step"] == 6
    assert (reference / "reconstructions" / "step_0000006.png").stat().st_size > 1000
    meta = checkpoint.read_meta(str(reference))
    assert meta["model"]["name"] == "crate_mae_base" and meta["step"] == 6
    assert meta["provenance"]["libraries"]["jax"]


def test_mesh_2x2x2_matches_one_device(tmp_path, data_dir, reference):
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    run(tmp_path, data_dir, "--config.total_steps=3", *mesh, devices=8)
    assert_close(losses(tmp_path), losses(reference), [1, 2, 3])


def test_kill_9_and_restart_equals_uninterrupted(tmp_path, data_dir):
    overrides = ["--config.total_steps=120", "--config.checkpoint_every_steps=20", "--config.eval_every_steps=1000"]
    full = tmp_path / "full"
    run(full, data_dir, *overrides)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(command(cut, data_dir, *overrides), cwd=ROOT, env=environment(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "40").exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit()]
    assert 0 < max(done) < 120
    run(cut, data_dir, *overrides)
    assert_params_close(params(cut), params(full))
    assert_close(losses(cut), losses(full), [119, 120])


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
    overrides = [
        "--config.total_steps=100000",
        "--config.checkpoint_every_steps=50000",
        "--config.eval_every_steps=100000",
    ]
    proc = subprocess.Popen(command(tmp_path, data_dir, *overrides), cwd=ROOT, env=environment(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3
    last = max(losses(tmp_path))
    assert steps[0] == last
    run(tmp_path, data_dir, f"--config.total_steps={last + 2}", "--config.checkpoint_every_steps=50000")
    assert max(losses(tmp_path)) == last + 2


def test_restore_8_devices_onto_4(tmp_path, data_dir, reference):
    # Three steps on 8 devices (data 4 x fsdp 2), then the same workdir continued on 4. The
    # learning rate of the first three updates does not depend on total_steps (two warmup
    # steps, then the cosine's start), so both legs must follow the one-device reference.
    # With weight-update sharding: the moments are split over data as well (4 ways, then 2),
    # and the update must still be the one-device one.
    overrides = ["--config.checkpoint_every_steps=3", "--config.eval_every_steps=100", "--config.mesh.fsdp=2",
                 "--config.mesh.update_sharding=('data',)"]  # fmt: skip
    run(tmp_path, data_dir, "--config.total_steps=3", *overrides, devices=8)
    proc = run(tmp_path, data_dir, "--config.total_steps=6", *overrides, devices=4)
    assert "resumed from step 3" in proc.stderr
    assert_close(losses(tmp_path), losses(reference), [1, 2, 3, 4, 5, 6])
    # What analysis and export read: the 4-device checkpoint, loaded in this one-device process
    # (Orbax refused it before `checkpoint.load` gave a target device). 1.5e-8 apart, 2026-12-08.
    assert_params_close(params(tmp_path), params(reference))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, data_dir, reference):
    two = tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            command(
                two,
                data_dir,
                "--config.total_steps=3",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=environment(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_close(losses(two), losses(reference), [1, 2, 3])
    assert checkpoint.read_meta(str(two))["process_count"] == 2

    # One process resumes what two wrote: grain's per-process state cannot be used, so the
    # pipeline is re-positioned to the example the run had reached, and the run continues
    # exactly as the uninterrupted reference (the first three learning rates do not depend
    # on total_steps: see test_restore_8_devices_onto_4).
    proc = run(two, data_dir, "--config.total_steps=6", devices=4)
    assert "written by another process count" in proc.stderr
    assert_close(losses(two), losses(reference), [4, 5, 6])


def test_nan_stops_with_the_step_and_last_good_checkpoint(tmp_path, data_dir):
    proc = run(tmp_path, data_dir, "--config.total_steps=20", "--config.checkpoint_every_steps=2",
               "--config.optim.base_lr=1e12", "--config.optim.warmup_steps=1", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "FloatingPointError: loss is nan at step" in proc.stderr or "loss is inf at step" in proc.stderr
    assert "last good checkpoint" in proc.stderr
    # every saved step had a finite loss
    finite = (
        {s for s, v in losses(tmp_path).items() if np.isfinite(v)} if (tmp_path / "metrics.jsonl").exists() else set()
    )
    saved = {int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()}
    assert saved <= finite


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir):
    run(
        tmp_path,
        data_dir,
        "--config.total_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=100",
    )
    for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    proc = run(tmp_path, data_dir, "--config.total_steps=6", "--config.checkpoint_every_steps=2",
               "--config.eval_every_steps=100")  # fmt: skip
    assert "checkpoint step 4" in proc.stderr and "unreadable" in proc.stderr
    assert "resumed from step 2" in proc.stderr
    assert (tmp_path / "checkpoints" / "6").exists()
    assert list((tmp_path / "checkpoints").glob("4.unreadable*")), "the unreadable step is kept aside, not deleted"


def test_bad_config_fails_before_compiling_and_keeps_the_checkpoint(tmp_path, data_dir, reference):
    from crate_jax.config_file import load_config

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = {p: p.stat().st_mtime for p in (workdir / "checkpoints").rglob("*")}
    cases = {
        ("model", "patch_size", 5): "model.image_size=32 is not divisible by model.patch_size=5",
        ("model", "num_heads", 3): "model.num_heads=3 does not divide model.width=64",
        (None, "grad_accum_steps", 3): "config.batch_size=16 is not divisible by the 1 batch-sharding devices",
        ("data", "eval_split", "validation"): "Unknown split 'validation'",
        (None, "completion_split", "held_out"): "Unknown split 'held_out'",
        ("mesh", "data", 3): "config.mesh",
        ("optim", "warmup_steps", 100): "config.optim.warmup_steps=100 must be below config.total_steps=10",
    }
    for (group, key, value), message in cases.items():
        config = load_config(str(ROOT / "configs" / "imagenet_mae.py") + ":runlocal")
        config.data.name, config.data.data_dir, config.data.eval_split = "crate_jax_embedded", data_dir, "probe_test"
        setattr(config[group] if group else config, key, value)
        with pytest.raises(ValueError, match=re.escape(message)):
            main.run(config, str(workdir))
    # An unknown key fails in the command line parser, before anything runs.
    proc = run(workdir, data_dir, "--config.model.nonsense=1", check=False)
    assert proc.returncode != 0 and "nonsense" in proc.stderr
    assert {p: p.stat().st_mtime for p in (workdir / "checkpoints").rglob("*")} == before
