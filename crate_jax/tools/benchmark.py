r"""Train-step benchmark: throughput, compile time, memory, FLOPs and MFU, optionally against PyTorch.

    python -m crate_jax.tools.benchmark --config=configs/imagenet_mae.py:variant=base \
        --config.batch_size=4 --config.model.dtype=float32 \
        --variants=default,visible,scan --torch --steps=5 --out=/tmp/bench.json

Any training config works: the step is the trainer's own (`step.make_train_step` on the
config's mesh, state born sharded and donated), fed synthetic in-memory batches of the
config's shape, so no dataset is needed; on a CPU host it splits the host into
`config.cpu_devices` JAX devices as the trainer does (`cluster.split_cpu_host`). Per variant
it reports images/s (median of the timed steps, each blocked on), compile time, the
compiled memory analysis, FLOPs per image (analytic, `crate_jax/tools/flops.py`, of the
computation as executed) beside XLA's `cost_analysis`, and MFU against the fp32 matmul rate
of this machine measured in the same run (a large jnp matmul, best of several).

A variant is the config as given ("default") or `+`-joined overrides of its model, e.g.
`visible+bf16` (names in `VARIANTS`). `--torch` adds the PyTorch baselines of the released
models (`crate_jax/tools/torch_baselines.py`: `torch_eager`, `torch_sdpa`, `torch_compile`; the
models from `--torch_module`, default `tests.torch_reference`, importable from the repository
root), each in a fresh process, trained with AdamW at the same batch and resolution on the same
device (CUDA with bf16 autocast and fused AdamW when JAX runs on a GPU).

MFU: `model_flops_per_step` counts each model's released computation (CRATE-MAE: its encoder's
tokens, ISTA as the release's three products; flops.py) for every row alike, divided by the
step time and `peak_flops`: the device's spec dense bf16 peak on GPUs and TPUs
(`SPEC_BF16_PEAK`, named in `peak_flops_source`), the measured fp32 matmul rate on CPU.
`measured_matmul_peak_flops` is a large matmul timed here (bf16 8192³ on accelerators, fp32
2048³ on CPU). `peak_memory_bytes`: the compiled step's arguments + outputs + temporaries per
device for JAX, `torch.cuda.max_memory_allocated` (or the process's peak RSS on CPU) for PyTorch.
`--profile=DIR` traces a few steps of each variant (a TensorBoard / Perfetto trace in DIR) and
prints the kernels that took the most time (`tools/kernel_profile.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from crate_jax import cluster
from crate_jax.host_memory import keep_freed_memory
from crate_jax.tools import kernel_profile

FLAGS = flags.FLAGS

# Variant name -> model overrides; "a+b" applies both.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "all": {"encoder_tokens": "all"},
    "visible": {"encoder_tokens": "visible"},
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "scan": {"scan_layers": True},
    "unroll": {"scan_layers": False},
    "remat_none": {"remat": "none"},
    "remat_full": {"remat": "full"},
    "remat_dots": {"remat": "dots"},
    "remat_dots_all": {"remat": "dots_all"},
    "ista_fused": {"ista_fused": True},
    "ista_unfused": {"ista_fused": False},
    "attn_auto": {"attention": "auto"},
    "attn_symmetric": {"attention": "symmetric"},
    "attn_autodiff": {"attention": "autodiff"},
    "attn_dot_product": {"attention": "dot_product"},
    "attn_cudnn": {"attention": "cudnn"},
    "attn_cudnn_128": {"attention": "cudnn", "cudnn_token_multiple": 128},  # 197 -> 256 tokens, not 198
    "attn_pallas_tpu": {"attention": "pallas_tpu"},
    "ln_autodiff": {"layer_norm_form": "autodiff"},  # models/layer_norm.py
    "ln_saved_stats": {"layer_norm_form": "saved_stats"},
    "ln_saved_stats_pinned": {"layer_norm_form": "saved_stats_pinned"},
    "ln_pallas_gpu": {"layer_norm_form": "pallas_gpu"},  # the Pallas (Triton) forward kernel
}

# Dense bf16 peak per chip from the vendors' data sheets, by a substring of JAX's device_kind
# (first match wins). TPUs: tools/topologies.py's figures.
SPEC_BF16_PEAK = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v5 lite", 197e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def spec_peak_flops(device_kind: str) -> float | None:
    for name, peak in SPEC_BF16_PEAK:
        if name in device_kind:
            return peak
    return None


PEAK_SIZE = 2048  # the matmul that measures the machine's fp32 rate
FLOPS_COUNTING = (
    "analytic (crate_jax/tools/flops.py): matrix products of the model as executed (ista_form: "
    "gram = Y(I + eta(D - D^T D)), factored = Y + eta(Y - Y D^T) D, released = the three products; "
    "encoder_tokens), forward + backward, no remat recomputation; "
    "xla_flops_per_step is XLA's cost_analysis of the compiled step (all ops, recomputation included; "
    "a scanned layer stack counted once, so xla_flops_per_step_unrolled counts the unrolled twin)"
)


def variant_overrides(variant: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise ValueError(f"--variants: {part!r} is not one of {sorted(VARIANTS)} (join several with '+')")
        out |= VARIANTS[part]
    return out


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peak_flops(size: int = PEAK_SIZE, repeats: int = 8, dtype=jnp.float32) -> float:
    """Best FLOP/s of a size x size matmul: on one device (all its threads) and, with
    several local devices, one matmul per device at once; the larger of the two."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
        matmul = jax.jit(lambda x, y: x @ y)
        matmul(a, b).block_until_ready()
        rates = [2 * size**3 / _best_time(lambda: matmul(a, b), repeats)]
        devices = jax.local_devices()
        if len(devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
            spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
            stack = lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices), size, size)), spec)  # noqa: E731
            sa, sb = stack(a), stack(b)
            batched = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=spec)
            batched(sa, sb).block_until_ready()
            rates.append(len(devices) * 2 * size**3 / _best_time(lambda: batched(sa, sb), repeats))
    return max(rates)


def device_peaks() -> dict[str, Any]:
    """The MFU denominator and the matmul rate measured here: on accelerators the spec bf16
    peak and a bf16 8192³ matmul; on CPU the measured fp32 2048³ matmul for both."""
    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        measured = measure_peak_flops()
        return {"peak_flops": measured, "peak_flops_source": "measured fp32 matmul (CPU)", "measured": measured}
    measured = measure_peak_flops(8192, dtype=jnp.bfloat16)
    spec = spec_peak_flops(kind)
    if spec is None:
        logging.warning("no spec bf16 peak for %r: MFU against the measured bf16 matmul", kind)
        return {"peak_flops": measured, "peak_flops_source": f"measured bf16 matmul ({kind})", "measured": measured}
    return {"peak_flops": spec, "peak_flops_source": f"spec dense bf16 ({kind})", "measured": measured}


def _model_overrides(model_config, overrides: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in model_config.items() if k != "name"}
    return fields | overrides


def _synthetic_batch(config, mesh) -> dict[str, jax.Array]:
    from crate_jax import sharding

    rows = config.batch_size // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    size = config.model.image_size
    local = {
        "image": rng.standard_normal((rows, size, size, 3), np.float32),
        "label": np.zeros((rows,), np.int32),
        "weight": np.ones((rows,), np.float32),
    }
    return sharding.global_batch(local, mesh)


def _memory(compiled) -> dict[str, float]:
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{f}_bytes": float(getattr(memory, f"{f}_size_in_bytes", 0)) for f in fields}
    out["peak_bytes_estimate"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def _xla_flops(cost) -> float:
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _train_step(config, model, init: bool = True):
    """(jitted step, state, mesh, rules) exactly as `crate_jax.train` builds them; with
    `init=False` the state is abstract (enough to lower the step)."""
    from crate_jax import optim, sharding, step

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config)
    schedule = optim.learning_rate(config.optim, config.batch_size, config.total_steps)
    abstract, shardings, tx = step.abstract_state(
        model, lambda p: optim.make_optimizer(config.optim, schedule, p), mesh, rules, sharding.update_axes(config)
    )
    if init:
        state = step.init_state(model, tx, config.seed, shardings, mesh, rules)
    else:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    fn = step.make_train_step(
        model, tx, schedule, seed=config.seed, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps
    )
    return step.jit_train_step(fn, shardings, mesh), state, mesh, rules


def released_flops(model):
    """The FLOP count of a model's released computation (MFU's numerator for every row): for
    CRATE-MAE its own encoder tokens with ISTA as the release's three products."""
    from crate_jax import models
    from crate_jax.tools import flops

    return flops.for_model(model.clone(ista_fused=False) if isinstance(model, models.CrateMAE) else model)


def measure_variant(
    config, variant: str, *, steps: int, warmup: int, peak_flops: float, profile_dir: str | None = None
) -> dict[str, Any]:
    import flax.linen as nn

    from crate_jax import models
    from crate_jax.models import attention
    from crate_jax.tools import flops

    overrides = _model_overrides(config.model, variant_overrides(variant))
    model = models.build(config.model.name, **overrides)
    jitted, state, mesh, rules = _train_step(config, model)
    batch = _synthetic_batch(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        lowered = jitted.lower(state, batch)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        times, cpu_times, faults = [], [], []
        for i in range(warmup + steps):
            usage, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt)
        loss = float(metrics["loss"])
        top_kernels = None
        if profile_dir:
            step_fn = lambda s: compiled(s, batch)  # noqa: E731
            state, top_kernels = kernel_profile.profile_steps(step_fn, state, f"{profile_dir}/{variant}")
        kind = "mssa" if isinstance(model, models.CrateMAE) else "vit"
        resolved = attention.resolve(model.attention, model.dtype, kind)
    xla_unrolled = None
    if model.scan_layers:  # XLA counts a scanned loop's body once: count the unrolled twin
        twin = models.build(config.model.name, **dict(overrides, scan_layers=False))
        twin_step, twin_state, _, _ = _train_step(config, twin, init=False)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            xla_unrolled = _xla_flops(twin_step.lower(twin_state, batch).cost_analysis())  # global

    count = flops.for_model(model)
    step_s = statistics.median(times)
    batch_size = config.batch_size
    flops_per_step = count.train_step(batch_size)
    model_flops = released_flops(model).train_step(batch_size)
    xla_flops = _xla_flops(compiled.cost_analysis()) * mesh.size
    memory = _memory(compiled)
    return {
        "variant": variant,
        "attention": resolved,
        # cuDNN's kernel checked on the GPU at each call shape (`attention.check_cudnn_kernel`):
        # "ok", or why the step took the whole-tile or XLA path there instead.
        "cudnn_checks": [
            dict(zip(("tokens", "real_tokens", "heads", "head_dim", "dtype"), key, strict=True), result=why or "ok")
            for key, why in attention.CUDNN_CHECKS.items()
        ]
        if resolved == "cudnn"
        else None,
        "model": config.model.name,
        "batch_size": batch_size,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "dtype": jnp.dtype(model.dtype).name,
        "scan_layers": model.scan_layers,
        "remat": model.remat,
        "encoder_tokens": getattr(model, "encoder_tokens", "visible"),
        "ista_fused": getattr(model, "ista_fused", None),
        "ista_form": count.ista_form(batch_size),
        "devices": mesh.size,
        "images_per_sec": batch_size / step_s,
        "step_s": step_s,
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(cpu_times),  # process CPU time: all threads
        "page_faults_per_step": statistics.median(faults),
        "model_flops_per_step": model_flops,
        "mfu": model_flops / step_s / peak_flops,
        "peak_flops": peak_flops,
        "flops_per_image": flops_per_step / batch_size,
        "flops_per_step": flops_per_step,
        "flops_counting": FLOPS_COUNTING,
        "xla_flops_per_step": xla_flops,
        "xla_flops_per_step_unrolled": xla_unrolled,
        "compile_s": compile_s,
        "lower_s": lower_s,
        "memory_per_device": memory,
        "peak_memory_bytes": memory.get("peak_bytes_estimate"),
        "peak_memory_source": "compiled step: arguments + outputs + temporaries - aliased, per device",
        "device_peak_bytes_in_use": _device_peak_bytes(),  # the process's peak so far (all variants)
        "top_kernels": top_kernels,
        "loss": loss,
    }


def _device_peak_bytes() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def torch_device(platforms: str) -> str:
    """Where the PyTorch baselines run, decided in their own process before this one starts a
    JAX backend: CUDA where PyTorch sees a GPU and `jax_platforms` (JAX_PLATFORMS) leaves JAX
    free to take it too. The JAX rows then check that JAX did (`check_same_device`)."""
    import torch

    names = {p.strip() for p in platforms.split(",") if p.strip()}
    jax_may_use_gpu = not names or bool(names & {"cuda", "gpu"})
    return "cuda" if jax_may_use_gpu and torch.cuda.is_available() else "cpu"


def check_same_device(torch_rows: list[dict[str, Any]]) -> None:
    """The baselines ran on the platform JAX ran on (CUDA for a JAX GPU backend, else CPU)."""
    expected = "cuda" if jax.default_backend() == "gpu" else "cpu"
    for row in torch_rows:
        if row["torch_device"] != expected:
            raise RuntimeError(
                f"{row['variant']} ran on {row['torch_device']!r} but JAX on {jax.default_backend()!r}: "
                "set JAX_PLATFORMS so that both run on the same device"
            )


def measure_torch_subprocess(config, module_name: str, variant: str, *, steps: int, warmup: int) -> dict[str, Any]:
    """One PyTorch baseline (torch_baselines.TORCH_VARIANTS) in a fresh process: PyTorch gets
    the allocator and threads it has by default, whatever this process did for JAX
    (`keep_freed_memory` slows PyTorch's allocations down several times over), and each
    baseline its own peak memory. `run` times the baselines before JAX starts a backend here:
    on a GPU JAX then holds 75% of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION), too little
    left for an eager baseline at batch 256. `mfu` is filled in by `run`."""
    import multiprocessing

    from crate_jax import models

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        row = pool.apply(
            _measure_torch_child,
            (config.to_json(), module_name, variant, dict(steps=steps, warmup=warmup), jax.config.jax_platforms or ""),
        )
    model = models.build(config.model.name, **_model_overrides(config.model, {}))
    # The release: every token through the CRATE encoder, ISTA as three products.
    released = released_flops(model.clone(encoder_tokens="all") if isinstance(model, models.CrateMAE) else model)
    model_flops = released.train_step(config.batch_size)
    row.update(
        model_flops_per_step=model_flops,
        flops_per_step=model_flops,
        flops_per_image=model_flops / config.batch_size,
        ista_form=released.ista_form(config.batch_size),
    )
    return row


def _measure_torch_child(
    config_json: str, module_name: str, variant: str, kwargs: dict[str, Any], jax_platforms: str
) -> dict[str, Any]:
    import sys

    import ml_collections

    from crate_jax.tools import torch_baselines

    sys.path.insert(0, os.getcwd())  # the repository root, for `tests.torch_reference`
    config = ml_collections.ConfigDict(json.loads(config_json))
    device = torch_device(jax_platforms)
    row = torch_baselines.measure(config, module_name, variant, device=device, **kwargs)
    accelerator = device != "cpu"
    row["torch_matmul_peak_flops"] = torch_baselines.matmul_peak_flops(
        device, 8192 if accelerator else PEAK_SIZE, "bfloat16" if accelerator else "float32"
    )
    return row


ENV_VARS = ("XLA_FLAGS", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "JAX_PLATFORMS")


def environment(kept_freed_memory: bool = False) -> dict[str, Any]:
    """What the numbers depend on besides the code: versions, devices, allocator, load."""
    return {
        "keep_freed_memory": kept_freed_memory,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "load_average": os.getloadavg(),
    }


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<22} {'img/s':>8} {'step ms':>9} {'cpu ms':>8} {'MFU':>6} {'GFLOP/img':>10} "
        f"{'compile s':>9} {'temp MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:<22} failed: {r['error'][:200]}")
            continue
        temp = r.get("memory_per_device", {}).get("temp_bytes")
        lines.append(
            f"{r['variant']:<22} {r['images_per_sec']:>8.2f} {1e3 * r['step_s']:>9.1f} "
            f"{1e3 * r['cpu_s_per_step']:>8.0f} {r['mfu']:>6.1%} "
            f"{r['flops_per_image'] / 1e9:>10.2f} {r.get('compile_s', float('nan')):>9.1f} "
            f"{(temp or float('nan')) / 2**20:>9.1f}"
        )
    if results:
        peak, env = results[0]["peak_flops"], results[0]["environment"]
        lines.append(
            f"MFU against {peak / 1e12:.4g} TFLOP/s ({results[0]['peak_flops_source']}); matmul measured here "
            f"{results[0]['measured_matmul_peak_flops'] / 1e12:.4g} TFLOP/s; {env['devices']} {env['backend']} "
            f"device(s); load average {env['load_average'][0]:.1f} -> {env['load_average_end'][0]:.1f}"
        )
    by_name = {r["variant"]: r for r in results if "error" not in r}
    for torch_variant in ("torch_eager", "torch_sdpa", "torch_compile"):
        if "default" in by_name and torch_variant in by_name:
            ratio = by_name["default"]["images_per_sec"] / by_name[torch_variant]["images_per_sec"]
            lines.append(f"JAX default / PyTorch {torch_variant[len('torch_') :]}: {ratio:.2f}x")
    if "visible" in by_name and "default" in by_name and by_name["default"]["encoder_tokens"] == "all":
        ratio = by_name["visible"]["images_per_sec"] / by_name["default"]["images_per_sec"]
        lines.append(f"visible-only / all-token encoder: {ratio:.2f}x")
    return "\n".join(lines)


def _measured(variant: str, measure) -> dict[str, Any]:
    """`measure()`'s row, or where it raised a row that says so: one variant that fails (a
    kernel this GPU does not take, say) leaves the others' figures standing."""
    try:
        row = measure()
    except Exception as e:  # noqa: BLE001 - reported in the row and by the exit status
        logging.exception("%s failed", variant)
        return {"variant": variant, "error": f"{type(e).__name__}: {e}"}
    logging.info("%s: %.2f images/s", variant, row["images_per_sec"])
    return row


def run(
    config,
    variants: list[str],
    *,
    steps: int,
    warmup: int,
    torch_module: str | None,
    kept_freed_memory: bool = False,
    torch_variants: tuple[str, ...] = ("torch_eager",),
    profile_dir: str | None = None,
    on_row=None,
) -> list[dict[str, Any]]:
    """The rows of `variants` (and of the PyTorch baselines, timed first), MFU filled in at the
    end. `on_row(rows)`, if given, gets the rows measured so far after each one (without MFU),
    so that a run cut short by a lease or a timeout still leaves figures behind."""
    from crate_jax.tools.torch_baselines import TORCH_VARIANTS

    for v in variants:
        variant_overrides(v)  # fail on a typo before compiling anything
    for v in torch_variants if torch_module else ():
        if v not in TORCH_VARIANTS:
            raise ValueError(f"--torch_variants: {v!r} is not one of {TORCH_VARIANTS}")
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    load_at_start = os.getloadavg()
    torch_rows = []  # first: before this process starts a JAX backend (measure_torch_subprocess)
    for v in torch_variants if torch_module else ():
        measure = functools.partial(measure_torch_subprocess, config, torch_module, v, steps=steps, warmup=warmup)
        torch_rows.append(_measured(v, measure))
        if on_row:
            on_row(list(torch_rows))
    env = environment(kept_freed_memory) | {"load_average": load_at_start}
    check_same_device([r for r in torch_rows if "error" not in r])
    peaks = device_peaks()
    peak = peaks["peak_flops"]
    logging.info("MFU against %.4g TFLOP/s (%s)", peak / 1e12, peaks["peak_flops_source"])
    results = []
    for v in variants:
        measure = functools.partial(
            measure_variant, config, v, steps=steps, warmup=warmup, peak_flops=peak, profile_dir=profile_dir
        )
        results.append(_measured(v, measure))
        if on_row:
            on_row(results + torch_rows)
    results += torch_rows
    # On CPU the matmul rate again at the end: the machine may have been busier at the start.
    if jax.default_backend() == "cpu":
        again = device_peaks()
        peaks["measured"] = max(peaks["measured"], again["measured"])
        peak = peaks["peak_flops"] = max(peak, again["peak_flops"])
    env["load_average_end"] = os.getloadavg()
    for r in results:
        if "error" not in r:
            r["mfu"] = r["model_flops_per_step"] / r["step_s"] / peak
        r["peak_flops"] = peak
        r["peak_flops_source"] = peaks["peak_flops_source"]
        r["measured_matmul_peak_flops"] = peaks["measured"]
        r["environment"] = env
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    kept = keep_freed_memory() if FLAGS.keep_freed_memory else False

    def write(rows):
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(rows, f, indent=2)

    cluster.split_cpu_host_for(FLAGS.config)  # as the trainer: config.cpu_devices
    results = run(
        FLAGS.config,
        FLAGS.variants,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        torch_module=FLAGS.torch_module if FLAGS.torch else None,
        kept_freed_memory=kept,
        torch_variants=tuple(FLAGS.torch_variants),
        profile_dir=FLAGS.profile or None,
        on_row=lambda rows: write([dict(r, partial=True) for r in rows]),
    )
    print(format_table(results))
    write(results)
    if failed := [r["variant"] for r in results if "error" in r]:
        raise SystemExit(f"failed: {', '.join(failed)} (the others' rows are in the table and --out)")


def define_flags() -> None:
    # Defined when run as a program, not at import: importing several tools in one process
    # (tests) would otherwise define --config twice.
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_list("variants", ["default"], "Comma-separated variants; '+' joins overrides (e.g. visible+bf16).")
    flags.DEFINE_integer("steps", 5, "Timed train steps per variant (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_bool("torch", False, "Also time PyTorch AdamW steps of the released models (--torch_variants).")
    flags.DEFINE_list(
        "torch_variants",
        ["torch_eager", "torch_sdpa", "torch_compile"],
        "PyTorch baselines with --torch: torch_eager (attention written out), torch_sdpa, torch_compile (+ SDPA).",
    )
    flags.DEFINE_string("profile", "", "Trace a few steps of each JAX variant into this directory; print top kernels.")
    flags.DEFINE_string("torch_module", "tests.torch_reference", "Module holding the PyTorch CrateMAE / FairMAE.")
    flags.DEFINE_bool(
        "keep_freed_memory",
        True,
        "glibc: keep freed memory in the process (see `keep_freed_memory`), for JAX and PyTorch.",
    )
    flags.DEFINE_string("out", "", "Write the results here as JSON (a list of objects).")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
