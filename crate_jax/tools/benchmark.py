r"""Train-step benchmark: throughput, compile time, memory, FLOPs and MFU, optionally against PyTorch.

    python -m crate_jax.tools.benchmark --config=configs/imagenet_mae.py:variant=base \
        --config.batch_size=4 --config.model.dtype=float32 \
        --variants=default,visible,scan --torch --steps=5 --out=/tmp/bench.json

Any training config works: the step is the trainer's own (`step.make_train_step` on the
config's mesh, state born sharded and donated), fed synthetic in-memory batches of the
config's shape, so no dataset is needed. Per variant it reports images/s (median of the
timed steps, each blocked on), compile time, the compiled memory analysis, FLOPs per image
(analytic, `crate_jax/tools/flops.py`, of the computation as executed) beside XLA's
`cost_analysis`, and MFU against the fp32 matmul rate of this machine measured in the same
run (a large jnp matmul, best of several).

A variant is the config as given ("default") or `+`-joined overrides of its model, e.g.
`visible+bf16` (names in `VARIANTS`). `--torch` adds the PyTorch eager reference (the
released CRATE-MAE or FAIR's MAE from `--torch_module`, default `tests.torch_reference`,
importable from the repository root) trained with AdamW at the same batch and resolution.
"""

from __future__ import annotations

import importlib
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

from crate_jax.host_memory import keep_freed_memory

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
    "attn_symmetric": {"attention": "symmetric"},
    "attn_autodiff": {"attention": "autodiff"},
    "attn_dot_product": {"attention": "dot_product"},
}

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


def measure_peak_flops(size: int = PEAK_SIZE, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of a size x size matmul: on one device (all its threads) and, with
    several local devices, one matmul per device at once; the larger of the two."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    with jax.default_matmul_precision("highest"):
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
        model, lambda p: optim.make_optimizer(config.optim, schedule, p), mesh, rules
    )
    if init:
        state = step.init_state(model, tx, config.seed, shardings, mesh, rules)
    else:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in ("image", "label", "weight")}
    fn = step.make_train_step(
        model, tx, schedule, seed=config.seed, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps
    )
    jitted = jax.jit(
        fn,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return jitted, state, mesh, rules


def measure_variant(config, variant: str, *, steps: int, warmup: int, peak_flops: float) -> dict[str, Any]:
    import flax.linen as nn

    from crate_jax import models
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
    xla_flops = _xla_flops(compiled.cost_analysis()) * mesh.size
    return {
        "variant": variant,
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
        "mfu": flops_per_step / step_s / peak_flops,
        "peak_flops": peak_flops,
        "flops_per_image": flops_per_step / batch_size,
        "flops_per_step": flops_per_step,
        "flops_counting": FLOPS_COUNTING,
        "xla_flops_per_step": xla_flops,
        "xla_flops_per_step_unrolled": xla_unrolled,
        "compile_s": compile_s,
        "lower_s": lower_s,
        "memory_per_device": _memory(compiled),
        "loss": loss,
    }


def measure_torch(config, module_name: str, *, steps: int, warmup: int, peak_flops: float) -> dict[str, Any]:
    """AdamW steps of the PyTorch eager reference at the config's batch and resolution."""
    import torch

    from crate_jax import models
    from crate_jax.tools import flops

    ref = importlib.import_module(module_name)
    torch.set_num_threads(os.cpu_count() or 1)
    # XLA:CPU flushes denormals to zero; so does PyTorch with this (CRATE's q = k = v attention
    # puts many denormals into the softmax, which otherwise slow PyTorch down up to 10x).
    flush_denormal = torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = models.build(config.model.name, **_model_overrides(config.model, {}))
    if jnp.dtype(model.dtype) != jnp.float32:
        logging.warning("the PyTorch reference runs in fp32 (config.model.dtype=%s)", config.model.dtype)
    if isinstance(model, models.CrateMAE):
        if model.decoder_num_heads != model.num_heads:
            raise ValueError("the PyTorch CrateMAE has one head count for encoder and decoder")
        tmodel = ref.CrateMAE(
            img_size=model.image_size,
            patch_size=model.patch_size,
            dim=model.width,
            depth=model.depth,
            heads=model.num_heads,
            decoder_depth=model.decoder_depth,
            ista_step=model.ista_step,
            ista_lambda=model.ista_lambda,
            norm_pix_loss=model.norm_pix_loss,
        )
        # The release: every token through the encoder, ISTA as three products.
        count = flops.for_model(model.clone(encoder_tokens="all", ista_fused=False))
    else:
        tmodel = ref.FairMAE(
            img_size=model.image_size,
            patch_size=model.patch_size,
            embed_dim=model.width,
            depth=model.depth,
            num_heads=model.num_heads,
            decoder_embed_dim=model.decoder_width,
            decoder_depth=model.decoder_depth,
            decoder_num_heads=model.decoder_num_heads,
            mlp_ratio=model.mlp_ratio,
            norm_pix_loss=model.norm_pix_loss,
        )
        count = flops.for_model(model)
    params = [p for p in tmodel.parameters() if p.requires_grad]
    decay = [p for n, p in tmodel.named_parameters() if p.requires_grad and p.ndim >= 2 and "token" not in n]
    no_decay = [p for p in params if all(p is not q for q in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(config.optim.b1, config.optim.b2),
        eps=config.optim.eps,
    )
    batch = config.batch_size
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    times, cpu_times, faults = [], [], []
    for i in range(warmup + steps):
        usage, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
        noise = torch.rand(batch, model.num_patches)
        loss = tmodel(images, noise, mask_ratio=model.mask_ratio)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt)
    step_s = statistics.median(times)
    flops_per_step = count.train_step(batch)
    return {
        "variant": "torch_eager",
        "model": config.model.name,
        "batch_size": batch,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "dtype": "float32",
        "encoder_tokens": "all" if isinstance(model, models.CrateMAE) else "visible",
        "ista_fused": False if isinstance(model, models.CrateMAE) else None,
        "ista_form": count.ista_form(batch),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_flush_denormal": flush_denormal,
        "images_per_sec": batch / step_s,
        "step_s": step_s,
        "step_times_s": times,
        "cpu_s_per_step": statistics.median(cpu_times),
        "page_faults_per_step": statistics.median(faults),
        "mfu": flops_per_step / step_s / peak_flops,
        "peak_flops": peak_flops,
        "torch_peak_flops": _torch_peak_flops(torch),
        "flops_per_image": flops_per_step / batch,
        "flops_per_step": flops_per_step,
        "loss": loss.item(),
    }


def measure_torch_subprocess(config, module_name: str, **kwargs) -> dict[str, Any]:
    """`measure_torch` in a fresh process: PyTorch gets the allocator and threads it has by
    default, whatever this process did for JAX (`keep_freed_memory` slows PyTorch's
    allocations down several times over)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_torch_child, (config.to_json(), module_name, kwargs))


def _measure_torch_child(config_json: str, module_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    import sys

    import ml_collections

    sys.path.insert(0, os.getcwd())  # the repository root, for `tests.torch_reference`
    config = ml_collections.ConfigDict(json.loads(config_json))
    return measure_torch(config, module_name, **kwargs)


def _torch_peak_flops(torch, size: int = PEAK_SIZE, repeats: int = 8) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


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
            f"fp32 matmul peak measured here: {peak / 1e9:.1f} GFLOP/s; {env['devices']} {env['backend']} "
            f"device(s); load average {env['load_average'][0]:.1f} -> {env['load_average_end'][0]:.1f}"
        )
    by_name = {r["variant"]: r for r in results}
    if "default" in by_name and "torch_eager" in by_name:
        ratio = by_name["default"]["images_per_sec"] / by_name["torch_eager"]["images_per_sec"]
        lines.append(f"JAX default / PyTorch eager: {ratio:.2f}x")
    if "visible" in by_name and "default" in by_name and by_name["default"]["encoder_tokens"] == "all":
        ratio = by_name["visible"]["images_per_sec"] / by_name["default"]["images_per_sec"]
        lines.append(f"visible-only / all-token encoder: {ratio:.2f}x")
    return "\n".join(lines)


def run(
    config, variants: list[str], *, steps: int, warmup: int, torch_module: str | None, kept_freed_memory: bool = False
) -> list[dict[str, Any]]:
    for v in variants:
        variant_overrides(v)  # fail on a typo before compiling anything
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    env = environment(kept_freed_memory)
    peak = measure_peak_flops()
    logging.info("measured fp32 matmul peak: %.1f GFLOP/s", peak / 1e9)
    results = []
    for v in variants:
        results.append(measure_variant(config, v, steps=steps, warmup=warmup, peak_flops=peak))
        logging.info("%s: %.2f images/s", v, results[-1]["images_per_sec"])
    if torch_module:
        results.append(measure_torch_subprocess(config, torch_module, steps=steps, warmup=warmup, peak_flops=peak))
    # The matmul rate again at the end: the machine may have been busier at the start.
    peak = max(peak, measure_peak_flops())
    env["load_average_end"] = os.getloadavg()
    for r in results:
        r["mfu"] *= r["peak_flops"] / peak
        r["peak_flops"] = peak
        r["environment"] = env
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    kept = keep_freed_memory() if FLAGS.keep_freed_memory else False
    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    results = run(
        FLAGS.config,
        FLAGS.variants,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        torch_module=FLAGS.torch_module if FLAGS.torch else None,
        kept_freed_memory=kept,
    )
    print(format_table(results))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


def define_flags() -> None:
    # Defined when run as a program, not at import: importing several tools in one process
    # (tests) would otherwise define --config twice.
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_list("variants", ["default"], "Comma-separated variants; '+' joins overrides (e.g. visible+bf16).")
    flags.DEFINE_integer("steps", 5, "Timed train steps per variant (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
    flags.DEFINE_bool("torch", False, "Also time a PyTorch eager AdamW step of the reference model.")
    flags.DEFINE_string("torch_module", "tests.torch_reference", "Module holding the PyTorch CrateMAE / FairMAE.")
    flags.DEFINE_integer("cpu_devices", 0, "On CPU: split the host into this many JAX devices (0: JAX's default).")
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
