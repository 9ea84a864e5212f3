"""gs:// end to end against a real local GCS emulator process (tests/gcs_emulator.py).

Every command runs as a subprocess through `tests.offline` (Python's network limited to
loopback, native clients given a closed loopback proxy), with only STORAGE_EMULATOR_HOST
set, as a user would: the demo config trains into gs://, is killed with -9 and resumes from
the bucket with the losses of an uninterrupted local run; a corrupt latest checkpoint in the
bucket falls back to the previous one; analyze, export_torch and import_torch read from the
bucket and write to it; an image folder in the bucket trains. The tfrecord backend keeps
TensorFlow's own GCS client, which cannot reach an emulator: it is not tested here.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crate_jax import checkpoint, data
from tests.gcs_emulator import Emulator
from tests.offline import offline_env

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6
TOTAL = 16
DEMO = [
    "--config=configs/demo.py",
    f"--config.total_steps={TOTAL}",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=8",
    "--config.eval_steps=1",
    "--config.optim.warmup_steps=2",
    # shrunk so a run compiles and trains in seconds; evaluation stays on (one device)
    "--config.model.width=32",
    "--config.model.depth=1",
    "--config.model.decoder_depth=1",
    "--config.model.num_heads=2",
    "--config.model.decoder_num_heads=2",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.num_reconstructions=2",
    "--config.knn_split=",
]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    kind = os.environ.get("CRATE_JAX_TEST_EMULATOR", "fake-gcs-server")
    emu = Emulator(kind, tmp_path_factory.mktemp("emulator") / "server.log")
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.ensure_built(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def network_log(tmp_path_factory):
    return tmp_path_factory.mktemp("network") / "refused.log"


def environment(emulator, network_log) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORSTORE_", "GOOGLE_", "EPATH_", "GCSFS_"))}
    env = offline_env(env) | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    env["CRATE_JAX_NETWORK_LOG"] = str(network_log)
    if emulator is not None:
        env["STORAGE_EMULATOR_HOST"] = emulator.url  # the only storage setting a user gives
    return env


def command(module, *args):
    return [sys.executable, "-m", "tests.offline", module, *args]


def run(env, module, *args, check=True, timeout=1800):  # generous: a loaded 2-core machine
    proc = subprocess.run(command(module, *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def last_losses(text: str) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs again the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data_dir, network_log):
    workdir = tmp_path_factory.mktemp("local") / "run"
    run(environment(None, network_log), "crate_jax.main", *DEMO, f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}")  # fmt: skip
    return workdir


@pytest.fixture(scope="module")
def bucket_run(emulator, data_dir, network_log, local_run):
    """The demo trained into gs://BUCKET/run, killed with -9 after a checkpoint, restarted."""
    env = environment(emulator, network_log)
    args = command("crate_jax.main", *DEMO, f"--config.data.data_dir={data_dir}", f"--workdir={emulator.gs('run')}")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1800
    while not emulator.exists("run/checkpoints/4/commit_success.txt"):
        assert proc.poll() is None, "the run ended before its first checkpoint was seen"
        assert time.time() < deadline, "no checkpoint in the bucket after 1800 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = emulator.read("run/metrics.jsonl").decode()
    assert not emulator.exists(f"run/checkpoints/{TOTAL}/commit_success.txt"), "killed too late to test a resume"
    restarted = run(
        env, "crate_jax.main", *DEMO, f"--config.data.data_dir={data_dir}", f"--workdir={emulator.gs('run')}"
    )
    return {"first_rows": first, "stderr": restarted.stderr}


def test_emulator_contract_derived_from_one_variable(network_log):
    code = "import os, json, crate_jax; print(json.dumps(dict(os.environ)))"
    env = environment(None, network_log) | {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}
    seen = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    assert seen["STORAGE_EMULATOR_HOST"] == seen["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
    assert seen["EPATH_USE_TF"] == "false" and seen["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
    env.pop("STORAGE_EMULATOR_HOST")
    seen = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    assert "TENSORSTORE_GCS_HTTP_URL" not in seen and "GOOGLE_AUTH_TOKEN_FOR_TESTING" not in seen  # real GCS


def test_killed_run_resumes_from_the_bucket_with_uninterrupted_losses(bucket_run, local_run, emulator, network_log):
    resumed = [line for line in bucket_run["stderr"].splitlines() if "resumed from step" in line]
    assert resumed, bucket_run["stderr"][-3000:]
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert 4 <= step < TOTAL
    rows = emulator.read("run/metrics.jsonl").decode()
    assert rows.startswith(bucket_run["first_rows"]), "metrics.jsonl lost the rows of the killed run"
    ours, reference = last_losses(rows), last_losses((local_run / "metrics.jsonl").read_text())
    assert sorted(ours) == list(range(1, TOTAL + 1))
    for s in range(1, TOTAL + 1):
        assert abs(ours[s] - reference[s]) <= RTOL * abs(reference[s]), f"step {s}: {ours[s]} vs {reference[s]}"
    names = emulator.names("run/")
    assert "run/config.json" in names
    assert any(n.startswith("run/events.out.tfevents") for n in names), "TensorBoard events were not copied"
    assert {f"run/reconstructions/step_{s:07d}.png" for s in (8, TOTAL)} <= set(names)
    png = Image.open(io.BytesIO(emulator.read(f"run/reconstructions/step_{TOTAL:07d}.png")))
    assert png.size[0] > 100
    assert not network_log.exists(), network_log.read_text()


MIRROR_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from crate_jax.metrics import MetricsLog
workdir = sys.argv[1]
log = MetricsLog(workdir)
jax.profiler.start_trace(str(log.local_dir))  # what clu's Profile hook does with train.py's logdir
jnp.ones(8).sum().block_until_ready()
jax.profiler.stop_trace()
log.scalars(int(sys.argv[2]), {"loss": float(sys.argv[2])})
log.flush()
"""


def test_profiles_events_and_metrics_rows_reach_the_bucket(emulator, network_log):
    env = environment(emulator, network_log)
    for step in (1, 2):  # two processes writing one workdir, as a run and its resume
        subprocess.run([sys.executable, "-c", MIRROR_SCRIPT, emulator.gs("mirror"), str(step)], env=env, check=True,
                       capture_output=True, timeout=600)  # fmt: skip
    names = emulator.names("mirror/")
    assert any(n.startswith("mirror/plugins/profile/") for n in names), names
    assert sum(n.startswith("mirror/events.out.tfevents") for n in names) == 2, names
    rows = [json.loads(line) for line in emulator.read("mirror/metrics.jsonl").decode().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_analyze_reads_the_bucket_and_writes_its_summary_there(bucket_run, local_run, emulator, network_log, tmp_path):
    rng = np.random.default_rng(0)
    local_images = tmp_path / "images"
    local_images.mkdir()
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        emulator.write(f"analysis_images/{i}.png", buf.getvalue())
        (local_images / f"{i}.png").write_bytes(buf.getvalue())
    what = "--what=reconstruction,attention,coding_rate,sparsity,pca"
    env = environment(emulator, network_log)
    run(env, "crate_jax.analyze", f"--init_from={emulator.gs('run')}", f"--out={emulator.gs('analysis')}",
        f"--images={emulator.gs('analysis_images')}", what)  # fmt: skip
    run(env, "crate_jax.analyze", f"--init_from={local_run}", f"--out={tmp_path / 'analysis'}",
        f"--images={local_images}", what)  # fmt: skip
    ours = json.loads(emulator.read("analysis/summary.json"))
    reference = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert ours["image_files"] == ["0.png", "1.png", "2.png", "3.png"] and ours["checkpoint"] == emulator.gs("run")
    for key in ("coding_rate", "sparsity"):
        np.testing.assert_allclose(_numbers(ours[key]), _numbers(reference[key]), rtol=1e-5)
    pngs = {n for n in emulator.names("analysis/") if n.endswith(".png")}
    assert len(pngs) == len(list((tmp_path / "analysis").glob("*.png"))) >= 4
    assert not network_log.exists(), network_log.read_text()


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)]


def test_export_and_import_torch_through_the_bucket(bucket_run, local_run, emulator, network_log, tmp_path):
    torch = pytest.importorskip("torch")
    from crate_jax.tools import export_torch

    env = environment(emulator, network_log)
    run(
        env,
        "crate_jax.tools.export_torch",
        f"--init_from={emulator.gs('run')}",
        f"--out={emulator.gs('export/model.pth')}",
    )
    ours = torch.load(io.BytesIO(emulator.read("export/model.pth")), weights_only=True)["model"]
    meta = checkpoint.read_meta(str(local_run))
    _, params = checkpoint.load(str(local_run))
    reference = export_torch.export(params, meta["model"]["name"], **meta["model"]["overrides"])
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(ours[key].numpy(), value, rtol=RTOL, atol=1e-7, err_msg=key)

    local_pth = tmp_path / "model.pth"
    local_pth.write_bytes(emulator.read("export/model.pth"))
    overrides = [f"--override={k}={v}" for k, v in meta["model"]["overrides"].items() if "dtype" not in k]
    run(env, "crate_jax.tools.import_torch", f"--checkpoint={local_pth}", f"--model={meta['model']['name']}",
        f"--out={emulator.gs('imported')}", *overrides)  # fmt: skip
    assert any(n.startswith("imported/checkpoints/0/params/") for n in emulator.names("imported/"))
    run(env, "crate_jax.tools.export_torch", f"--init_from={emulator.gs('imported')}",
        f"--out={emulator.gs('export/roundtrip.pth')}")  # fmt: skip
    back = torch.load(io.BytesIO(emulator.read("export/roundtrip.pth")), weights_only=True)["model"]
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    assert not network_log.exists(), network_log.read_text()


def test_image_folder_in_the_bucket_trains(emulator, network_log):
    rng = np.random.default_rng(1)
    for split, count in (("train", 8), ("val", 4)):
        for cls in ("a", "b"):
            for i in range(count):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(buf, format="PNG")
                emulator.write(f"folder/{split}/{cls}/{i}.png", buf.getvalue())
    run(environment(emulator, network_log), "crate_jax.main", "--config=configs/demo.py",
        "--config.data.backend=image_folder", f"--config.data.data_dir={emulator.gs('folder')}",
        "--config.data.split=train", "--config.data.eval_split=val", "--config.knn_split=",
        "--config.completion_split=",  # the demo's completion split belongs to the embedded set, not this folder
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.total_steps=3", "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=3", "--config.log_every_steps=1", "--config.eval_steps=1",
        "--config.optim.warmup_steps=1",
        f"--workdir={emulator.gs('folder_run')}")  # fmt: skip
    rows = [json.loads(line) for line in emulator.read("folder_run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)
    assert emulator.exists("folder_run/checkpoints/3/commit_success.txt")
    assert not network_log.exists(), network_log.read_text()


def test_grain_on_gs_says_to_mount_with_gcsfuse():
    with pytest.raises(ValueError, match="gcsfuse"):
        data.num_examples("crate_jax_embedded", "train", "gs://bucket/tfds")


def test_unreachable_emulator_and_missing_bucket_are_one_line_errors(emulator, data_dir, network_log):
    args = [*DEMO, f"--config.data.data_dir={data_dir}"]
    env = environment(emulator, network_log)
    proc = run(env, "crate_jax.main", *args, "--workdir=gs://no-such-bucket/run", check=False, timeout=120)
    assert (
        proc.returncode != 0
        and "bucket 'no-such-bucket'" in proc.stderr
        and "not on the storage emulator" in proc.stderr
    )
    with socket_closed() as port:
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        proc = run(env, "crate_jax.main", *args, f"--workdir={emulator.gs('down')}", check=False, timeout=120)
    assert proc.returncode != 0 and "is not reachable" in proc.stderr, proc.stderr[-2000:]
    assert not network_log.exists(), network_log.read_text()


class socket_closed:
    """A loopback port with nothing listening (bound and closed again)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_corrupt_latest_checkpoint_in_the_bucket_falls_back(bucket_run, emulator, data_dir, network_log):
    """Runs last: it moves the shared run's newest step aside."""
    latest = f"run/checkpoints/{TOTAL}/"
    for name in emulator.names(latest + "params/"):
        emulator.write(name, b"garbage")
    proc = run(environment(emulator, network_log), "crate_jax.main", *DEMO, f"--config.total_steps={TOTAL + 4}",
               f"--config.data.data_dir={data_dir}", f"--workdir={emulator.gs('run')}")  # fmt: skip
    assert f"checkpoint step {TOTAL}" in proc.stderr and "unreadable" in proc.stderr
    assert f"resumed from step {TOTAL - 4}" in proc.stderr
    names = emulator.names("run/checkpoints/")
    aside = [n for n in names if n.startswith(f"run/checkpoints/{TOTAL}.unreadable-")]
    assert any(n.endswith("/commit_success.txt") for n in aside), "the unreadable step was not kept aside"
    assert f"run/checkpoints/{TOTAL + 4}/commit_success.txt" in names
    assert f"run/checkpoints/{TOTAL}/commit_success.txt" in names  # saved again after the fallback
    assert not network_log.exists(), network_log.read_text()
