"""Preemption without a per-step host sync (issue 12): two processes under jax.distributed,
SIGTERM sent to only one of them; JAX's preemption service agrees on a step, both save that
step and exit 0, and the next start resumes from it. The loop runs under
`jax.transfer_guard("disallow")` between log steps (log_every_steps=5 here), so a per-step
device collective or implicit transfer would fail these runs."""

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from crate_jax import data
from tests.test_train import ROOT, command, environment, losses

OVERRIDES = [
    "--config.checkpoint_every_steps=100000",
    "--config.eval_every_steps=100000",
    "--config.optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.ensure_built(str(tmp_path_factory.mktemp("tfds")))


def start_two(
    workdir: Path, data_dir: str, total_steps: int, logs: Path, log_every: int = 5
) -> list[tuple[subprocess.Popen, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = []
    for i in range(2):
        log = logs / f"process_{i}.log"
        with open(log, "w") as stderr:
            cmd = command(workdir, data_dir, *OVERRIDES, f"--config.total_steps={total_steps}",
                          f"--config.log_every_steps={log_every}", f"--coordinator_address={address}",
                          "--num_processes=2", f"--process_id={i}")  # fmt: skip
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=environment(2), stdout=subprocess.DEVNULL,
                                           stderr=stderr), log))  # fmt: skip
    return procs


def finish(procs, timeout: float = 900) -> list[str]:
    errs = []
    try:
        for p, log in procs:
            p.wait(timeout=timeout)
            errs.append(log.read_text())
            assert p.returncode == 0, f"exit {p.returncode}:\n{errs[-1][-4000:]}"
    finally:
        for p, _ in procs:
            p.kill()
    return errs


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, data_dir):
    workdir, logs = tmp_path / "run", tmp_path
    procs = start_two(workdir, data_dir, 100000, logs)
    deadline = time.monotonic() + 900
    while not (workdir / "metrics.jsonl").exists() or max(losses(workdir), default=0) < 5:
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "training did not start"
        time.sleep(0.5)
    procs[1][0].send_signal(signal.SIGTERM)  # process 1 only
    errs = finish(procs)

    saved = [int(m.group(1)) for e in errs for m in re.finditer(r"preempted: saved step (\d+)", e)]
    assert len(saved) == 2 and saved[0] == saved[1], saved
    step = saved[0]
    assert 5 <= step < 100000
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    assert "start-up: explicit flags" in errs[0] and "process 1 of 2" in errs[1]

    # every step logged on resume: the saved step is wherever the signal landed, not a multiple of 5
    errs = finish(start_two(workdir, data_dir, step + 2, logs, log_every=1))
    assert all(f"resumed from step {step}" in e for e in errs)
    assert {step + 1, step + 2} <= set(losses(workdir))
