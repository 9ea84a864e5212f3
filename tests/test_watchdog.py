"""The hang watchdog (crate_jax/watchdog.py): no progress for hang_timeout_s -> every thread's
Python stack on stderr and exit code 3; progress keeps it quiet. The induced hang is a real
one: two processes under jax.distributed, and one of them never joins a collective."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crate_jax import watchdog

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *, env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)) | (env or {})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def test_no_progress_dumps_every_stack_and_exits_non_zero():
    proc = python("""
        import threading, time
        from crate_jax import watchdog

        def worker_waits_forever():
            threading.Event().wait()

        threading.Thread(target=worker_waits_forever, name="worker", daemon=True).start()
        with watchdog.Watchdog(1.0):
            for i in range(3):
                time.sleep(0.3)
                watchdog.beat(f"step {i}")
            time.sleep(60)  # the hang
        print("not reached")
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == watchdog.EXIT_CODE, err
    assert "not reached" not in out
    assert "HANG: no progress for" in err and "last progress: 'step 2'" in err
    assert "in worker_waits_forever" in err and "<string>" in err  # both threads' stacks


def test_progress_keeps_it_quiet_and_it_stops_cleanly():
    with watchdog.Watchdog(0.5, poll_s=0.05):
        for i in range(12):
            time.sleep(0.1)
            watchdog.beat(f"step {i}")
    assert watchdog._active is None
    with watchdog.Watchdog(0.0):  # disabled
        assert watchdog._active is None


def test_a_collective_one_process_never_joins():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    code = f"""
        import sys, time
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import multihost_utils
        from crate_jax import cluster, watchdog

        pid = int(sys.argv[1])
        cluster.initialize("{address}", 2, pid)
        with watchdog.Watchdog(8.0):
            multihost_utils.sync_global_devices("both here")  # both join this one
            watchdog.beat("joined the first barrier")
            if pid == 1:
                time.sleep(120)  # alive, but never joins the next collective
            total = multihost_utils.process_allgather(np.ones(1), tiled=True)
            print("not reached", total)
    """
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(pid)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        out, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == watchdog.EXIT_CODE, err[-3000:]
        assert "not reached" not in out
        assert "last progress: 'joined the first barrier'" in err
        assert "process_allgather" in err  # the stack names where it hung
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("config", ["imagenet_mae.py", "finetune.py", "linear_probe.py", "knn.py", "demo.py"])
def test_every_config_has_a_hang_timeout(config):
    from crate_jax.config_file import load_config

    assert load_config(str(ROOT / "configs" / config)).hang_timeout_s == 1800.0
