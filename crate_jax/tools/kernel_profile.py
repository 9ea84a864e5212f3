"""Where a jitted step's time goes: trace a few steps with the JAX profiler and sum the trace's
device kernels (or, on a CPU backend, XLA's ops) by name (`tools/benchmark.py --profile=DIR`)."""

from __future__ import annotations

import glob
import gzip
import json

import jax

_HOST_EVENTS = (
    "ThunkExecutor::Execute",
    "PjitFunction(jit(step))",
    "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice",
)


def profile_steps(step_fn, state, log_dir: str, steps: int = 3, top: int = 15):
    """Run `steps` more steps under the JAX profiler (a trace in `log_dir`, with a Perfetto
    trace beside it) and sum the trace's op / kernel events by name: the `top` longest."""
    jax.block_until_ready(state)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = step_fn(state)
        jax.block_until_ready((state, metrics))
    totals: dict[str, float] = {}
    for path in glob.glob(f"{log_dir}/**/*.trace.json.gz", recursive=True):
        with gzip.open(path, "rt") as f:
            trace = json.load(f)
        events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
        names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("name") == "process_name"}
        timed = {e.get("pid") for e in events if e.get("ph") == "X" and "dur" in e}
        # Device planes that ran kernels: a plane with none (an idle TPU client that an ahead-of-
        # time compile loaded into this process, say) must not hide the CPU backend's ops.
        device = {p for p, n in names.items() if "/device:" in n and p in timed}
        for e in events:
            if e.get("ph") != "X" or "dur" not in e or (device and e.get("pid") not in device):
                continue
            if not device and (e["name"].startswith("$") or e["name"].split()[0] in _HOST_EVENTS):
                continue  # CPU backend: keep XLA's ops, drop Python frames and executor wrappers
            totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"] * 1e-6 / steps
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    print(f"top {len(ranked)} by time per step in {log_dir}:")
    for name, secs in ranked:
        print(f"  {secs * 1e3:10.3f} ms  {name[:100]}")
    return state, [{"name": n, "s_per_step": t} for n, t in ranked]
