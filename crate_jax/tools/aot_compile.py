r"""Compile the real train step for a Cloud TPU slice on this (CPU-only) host, ahead of time.

    python -m crate_jax.tools.aot_compile --config=configs/imagenet_mae.py --topology=v5e-256
    python -m crate_jax.tools.aot_compile --config=configs/imagenet_mae.py:variant=large \
        --topology=v4-128 --num_slices=2 --out=/tmp/aot.json

Needs libtpu (`pip install -e ".[tpu]"`); no TPU. The step is built exactly as `train.fit`
builds it (the task's step from `crate_jax/pretrain.py`, `step.abstract_state_from`, `jax.jit`
with the state's shardings and the state donated) on a mesh from `config.mesh` over the
abstract devices of the topology (`jax.experimental.topologies`); nothing is read or allocated.
Prints per-chip memory against the chip's HBM, FLOPs per step, the collectives in the compiled
program, the step time the chip's bf16 peak would allow, and a roofline step time: the larger of
FLOPs / bf16 peak and bytes accessed / HBM bandwidth, per chip, from the compiled program.
XLA's "bytes accessed" also counts the operands the TPU compiler keeps in on-chip memory, so
the report adds the HBM side alone, from the memory spaces of the optimised HLO, with its
largest sources (`crate_jax/tools/hlo_bytes.py`). A config that does not fit exits 1 with the
compiler's message. `--dump_hlo=PATH` writes the optimised HLO.

NVIDIA GPUs (`--topology=h200`, `h100-8`; tools/topologies.py) compile the same way without a
GPU through JAX's CUDA plugin (`pip install -e ".[gpu]"`). XLA:GPU compiled so gives no cost
analysis: the roofline takes the model FLOPs per GPU and the HBM bytes of the HLO's kernels
(every kernel reads its operands from and writes its result to HBM), a count that leaves out
L2 hits and what a kernel re-reads inside.

XLA's cost analysis sees a Pallas kernel (a `tpu_custom_call`) as almost free, so the FLOPs and
HBM bytes of the fused attention kernels are counted analytically (`fused_attention_cost`) and
added to the compiled program's. It also counts a scanned loop body once: the roofline is
complete only for unrolled layers (`--config.model.scan_layers=False`); the report says which.

FLOPs: XLA's cost analysis counts a scanned layer stack's loop body once, so the FLOPs per
step are counted on the same step traced with the layers unrolled and without remat (the
model FLOPs that MFU divides by); the compiled program's own per-chip figure is reported too.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU JAX for everything concrete; TPU only as a compile target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened, so no lockfile
# GPU targets: JAX's CUDA plugin checks its CUDA libraries against a GPU's driver when it loads
# (lazily, at the first backend or topology); compile-only, there may be no GPU to check against.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from crate_jax import models, sharding, step, train  # noqa: E402
from crate_jax.models import attention  # noqa: E402
from crate_jax.tools import hlo_bytes, topologies  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


from crate_jax.main import TASKS  # noqa: E402  (config.task -> Task factory: the entry point's table)


class DoesNotFit(Exception):
    """The compiled step needs more memory per chip than the chip has."""


class CannotCompileHere(Exception):
    """The step cannot be compiled for this topology on this host (the message says what to do)."""


def gpu_compile_hint(error_text: str) -> str | None:
    """What to do when compiling for a GPU without one fails in a known way; None otherwise.

    From jax 0.12, XLA compiles cuDNN's fused attention without a GPU only in its "deviceless
    cuDNN" mode, and that needs NVIDIA's driver library (libcuda) on the host: seen with jax
    0.12.1 and jax-cuda13-plugin 0.12.1 on a CPU host (2026-12-07). jax 0.10.2 and 0.11.2
    compile it here without either."""
    if "cudnn" not in error_text.lower() or "deviceless" not in error_text.lower():
        return None
    first = error_text.strip().splitlines()[0]
    return (
        f"jax {jax.__version__} cannot compile cuDNN's fused attention for a GPU on a host without one "
        "(JAX's CUDA plugin then needs NVIDIA's driver library and "
        "--xla_gpu_cudnn_deviceless_compilation_mode); compile on a GPU host, with jax 0.11.2 or 0.10.2, "
        f"or for XLA's attention with --config.model.attention=symmetric. The compiler said: {first}"
    )


def abstract_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
    """What `sharding.global_batch` makes of one batch of the input pipeline."""
    b, s = config.batch_size, config.model.image_size
    return {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32),
        "weight": jax.ShapeDtypeStruct((b,), jnp.float32),
    }


def lower_train_step(config, mesh):
    """The train step exactly as `train.fit` jits it (the task's step, the state's shardings,
    the state donated), lowered for `mesh`; abstract devices allowed."""
    task = TASKS[config.task](config)
    rules = sharding.axis_rules(config)
    abstract, shardings, tx = step.abstract_state_from(
        task.init_variables, task.make_optimizer, mesh, rules, sharding.update_axes(config)
    )
    train_step = step.jit_train_step(task.make_step(tx), shardings, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return train_step.lower(abstract, abstract_batch(config)), abstract


def oom_numbers(message: str) -> dict[str, float]:
    """The required and available bytes of XLA's out-of-memory message, where it states them."""
    m = re.search(r"\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)", message)
    if not m:
        return {}
    unit = {"G": 1024**3, "M": 1024**2, "K": 1024}
    return {
        "required_bytes": float(m.group(1)) * unit[m.group(2)],
        "available_bytes": float(m.group(3)) * unit[m.group(4)],
    }


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in the compiled HLO, by kind (each loop body counted once)."""
    counts = collections.Counter(m.group(1) for m in _COLLECTIVE_RE.finditer(hlo_text))
    return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


def attention_calls(config) -> list[tuple[int, int, int, str]]:
    """Every attention call of one forward pass of the config's model (`models.attention_calls`)."""
    overrides = {k: v for k, v in config.model.items() if k != "name"}
    return models.attention_calls(models.build(config.model.name, **overrides))


def attention_matrices(hlo_text: str, config) -> int:
    """Instructions of the compiled step's entry computation whose result is shaped [..., N, N]
    for an attention call's token count N: B×K×N×N probabilities, logits or their gradients in
    HBM. Zero where every attention call runs fused (the fused kernels' padded counts are left
    out: the Pallas kernel's row statistics, (B, K, 128, 128) at 128 tokens, would match)."""
    counts = {tokens for tokens, *_ in attention_calls(config)}
    square = re.compile(r"\[(?:\d+,)+(" + "|".join(map(str, sorted(counts))) + r"),\1\]")
    results = (hlo_bytes.instruction_result(line) for line in hlo_bytes.entry_lines(hlo_text)[1:])
    return sum(1 for result in results if result and square.search(result))


def fused_attention_cost(config, mesh, platform: str = "tpu") -> dict:
    """FLOPs and HBM bytes per chip that XLA's cost analysis leaves out of the Pallas attention
    kernels in one train step (`attention.fused_flops` / `fused_bytes` with forward=False: the
    backward kernels and the forward's block re-reads; the forward kernel's cost estimate, which
    XLA counts, covers the rest), at the padded token count. Zero without Pallas kernels."""
    batch_shards = mesh.shape["slices"] * mesh.shape["data"] * mesh.shape["fsdp"]
    batch = config.batch_size // batch_shards
    itemsize = jnp.dtype(config.model.dtype).itemsize
    flops = bytes_ = 0.0
    impls = set()
    for tokens, heads, head_dim, kind in attention_calls(config):
        impl = attention.resolve(config.model.attention, config.model.dtype, kind, on=platform)
        impls.add(impl)
        if impl not in ("pallas_tpu",):
            continue
        local_heads = max(heads // mesh.shape["tensor"], 1)
        # The forward kernel carries a cost estimate that XLA counts; the two backward ones none.
        flops += attention.fused_flops(batch, local_heads, tokens, head_dim, impl, forward=False)
        bytes_ += attention.fused_bytes(batch, local_heads, tokens, head_dim, itemsize, impl, forward=False)
    return {"attention": sorted(impls), "flops_per_chip": flops, "bytes_per_chip": bytes_}


def _memory(compiled, hbm_bytes: int) -> dict[str, float]:
    m = compiled.memory_analysis()
    arguments, outputs = m.argument_size_in_bytes, m.output_size_in_bytes
    aliased, temp, code = m.alias_size_in_bytes, m.temp_size_in_bytes, m.generated_code_size_in_bytes
    total = arguments + outputs - aliased + temp + code  # donated outputs live in their arguments' buffers
    return {
        "arguments_bytes": arguments,
        "outputs_bytes": outputs,
        "aliased_bytes": aliased,
        "temp_bytes": temp,
        "generated_code_bytes": code,
        "total_bytes": total,
        "hbm_bytes": hbm_bytes,
        "fits": total <= hbm_bytes,
    }


def model_flops_per_step(config, platform: str = "tpu") -> float:
    """Global FLOPs of one step: XLA's cost analysis of the step traced for one CPU device with
    unrolled layers, no remat and no gradient-accumulation loop (so no loop body is counted
    once and no recomputation is counted), i.e. the model FLOPs that MFU divides by."""
    config = config.copy_and_resolve_references()
    config.grad_accum_steps = 1
    config.model.scan_layers, config.model.remat = False, "none"
    # The attention form the accelerator's step runs, or XLA's autodiff form (the same products)
    # in place of a fused kernel, which would not lower on this CPU host.
    kind = attention_calls(config)[0][3]  # "mssa" or "vit"
    picked = attention.resolve(config.model.attention, config.model.dtype, kind, on=platform)
    config.model.attention = "autodiff" if picked in ("pallas_tpu", "cudnn") else picked
    one_device = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)
    lowered, _ = lower_train_step(config, one_device)
    return float(lowered.cost_analysis()["flops"])


def analyze(config, topology: topologies.Topology, count_flops: bool = True, dump_hlo: str | None = None) -> dict:
    """Compile the train step for `topology`; raise DoesNotFit with the compiler's message."""
    config = config.copy_and_resolve_references()
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: the ahead-of-time compile knows {sorted(TASKS)}")
    if config.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    if topology.num_slices > 1 and config.mesh.slices == 1:
        config.mesh.slices = topology.num_slices  # data parallelism across slices over DCN
    devices = topology.devices()
    train.validate_config(config, len(devices), topology.hosts)  # one process per host
    mesh = sharding.make_mesh(config.mesh, devices)
    chip = topology.chip

    t0 = time.perf_counter()
    lowered, abstract = lower_train_step(config, mesh)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; its text holds the numbers
        if "RESOURCE_EXHAUSTED" in str(e) or ("exceeds" in str(e) and "HBM" in str(e)):
            raise DoesNotFit(str(e)) from e
        if topology.platform == "gpu" and (hint := gpu_compile_hint(str(e))):
            raise CannotCompileHere(hint) from e
        raise
    compile_s = time.perf_counter() - t0

    memory = _memory(compiled, chip.hbm_bytes)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0]
    compiled_flops = float(cost.get("flops", 0.0))
    compiled_bytes = float(cost.get("bytes accessed", 0.0))
    flops = model_flops_per_step(config, topology.platform) if count_flops else compiled_flops * len(devices)
    step_s = flops / (len(devices) * chip.peak_bf16_flops)
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    hlo = compiled.as_text()
    if dump_hlo:
        epath.Path(dump_hlo).write_text(hlo)
    fused = fused_attention_cost(config, mesh, topology.platform)
    fused["kernel_calls_in_hlo"] = hlo.count('custom_call_target="tpu_custom_call"')
    fused["cudnn_calls_in_hlo"] = hlo.count('custom_call_target="__cudnn$fmha')
    # XLA's "bytes accessed" counts every operand, also those the TPU compiler keeps on chip
    # (layout S(1)); the HLO's memory spaces give the HBM side alone (tools/hlo_bytes.py).
    by_source = hlo_bytes.totals(hlo_bytes.bytes_by_source(hlo))
    hbm_bytes = sum(by_source.values()) + fused["bytes_per_chip"]
    if compiled_bytes:
        roofline_flops = compiled_flops + fused["flops_per_chip"]
        roofline_bytes = compiled_bytes + fused["bytes_per_chip"]
        counted_from = "XLA cost analysis (+ Pallas kernels counted analytically)"
    else:  # XLA:GPU compiled without a device gives no cost analysis: model FLOPs, the HLO's bytes
        roofline_flops, roofline_bytes = flops / len(devices), hbm_bytes
        counted_from = "model FLOPs per chip; HBM bytes of the HLO's kernels (tools/hlo_bytes.py)"
    compute_s, memory_s = roofline_flops / chip.peak_bf16_flops, roofline_bytes / chip.hbm_bytes_per_s
    return {
        "topology": topology.accelerator_type,
        "topology_name": topology.topology_name,
        "num_slices": topology.num_slices,
        "chips": len(devices),
        "hosts": topology.hosts,
        "device_kind": devices[0].device_kind,
        "model": config.model.name,
        "params": int(params),
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "mesh": dict(mesh.shape),
        "scan_layers": bool(config.model.scan_layers),
        "remat": config.model.remat,
        "dtype": config.model.dtype,
        "memory_per_chip": memory,
        "flops_per_step": flops,
        "flops_per_step_counted_from": "unrolled trace" if count_flops else "compiled program x chips",
        "compiled_flops_per_chip": compiled_flops,
        "peak_flops_per_chip": chip.peak_bf16_flops,
        "step_time_at_peak_s": step_s,
        "images_per_sec_at_peak": config.batch_size / step_s if step_s else None,
        "collectives": count_collectives(hlo),
        "attention_matrices_in_hlo": attention_matrices(hlo, config),
        "compile_s": compile_s,
        "compiled_bytes_accessed_per_chip": compiled_bytes,
        "fused_attention": fused,
        "roofline": {
            "flops_per_chip": roofline_flops,
            "bytes_per_chip": roofline_bytes,
            "hbm_bytes_per_s": chip.hbm_bytes_per_s,
            "compute_s": compute_s,
            "memory_s": memory_s,
            "step_s": max(compute_s, memory_s),
            "bound": "memory" if memory_s > compute_s else "compute",
            "counted_from": counted_from,
            # XLA's cost analysis counts a loop body once: complete only for unrolled layers.
            "complete": not config.model.scan_layers and config.grad_accum_steps == 1,
        },
        "update_sharding": list(sharding.update_axes(config)),
        "hbm": {
            "bytes_per_chip": hbm_bytes,
            "memory_s": hbm_bytes / chip.hbm_bytes_per_s,
            "bytes_by_source": dict(list(by_source.items())[:8]),
        },
    }


def format_report(r: dict) -> str:
    gib = 1024**3
    m, rl = r["memory_per_chip"], r["roofline"]
    spare = f"fits, {(m['hbm_bytes'] - m['total_bytes']) / gib:.2f} GiB spare" if m["fits"] else "DOES NOT FIT"
    return "\n".join(
        [
            f"{r['model']} ({r['params'] / 1e6:.2f}M params), batch {r['batch_size']} on {r['topology']} "
            f"({r['topology_name']}, {r['num_slices']} slice(s), {r['chips']} chips, {r['hosts']} hosts), "
            f"mesh {r['mesh']}, remat {r['remat']}",
            f"  memory per chip: arguments {m['arguments_bytes'] / gib:.2f} GiB, temporaries "
            f"{m['temp_bytes'] / gib:.2f} GiB, total {m['total_bytes'] / gib:.2f} GiB of "
            f"{m['hbm_bytes'] / gib:.0f} GiB HBM ({spare})",
            f"  FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_step_counted_from']}); compiled program "
            f"{r['compiled_flops_per_chip']:.4g} per chip (scanned layer bodies counted once)",
            f"  step time at the bf16 peak ({r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip): "
            f"{r['step_time_at_peak_s'] * 1e3:.3g} ms ({r['images_per_sec_at_peak']:.0f} images/s)",
            "  collectives in the compiled program: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
            f"  B×K×N×N attention arrays in HBM: {r['attention_matrices_in_hlo']} instructions; cuDNN attention calls: "
            f"{r['fused_attention']['cudnn_calls_in_hlo']}",
            f"  attention {'/'.join(r['fused_attention']['attention'])}: {r['fused_attention']['kernel_calls_in_hlo']} "
            f"Pallas kernel calls in the HLO, counted analytically as {r['fused_attention']['flops_per_chip']:.4g} "
            f"FLOPs and {r['fused_attention']['bytes_per_chip'] / 1e9:.3g} GB per chip",
            f"  roofline per chip: {rl['flops_per_chip']:.4g} FLOPs, {rl['bytes_per_chip'] / 1e9:.3g} GB accessed "
            f"({rl['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM) -> step {rl['step_s'] * 1e3:.3g} ms, {rl['bound']}-bound"
            + ("" if rl["complete"] else " (scanned layers: loop bodies counted once, a lower bound)"),
            f"  HBM side alone (arrays the compiler keeps on chip left out, tools/hlo_bytes.py): "
            f"{r['hbm']['bytes_per_chip'] / 1e9:.3g} GB per chip -> {r['hbm']['memory_s'] * 1e3:.3g} ms; largest: "
            + ", ".join(f"{g} {b / 1e9:.2g} GB" for g, b in list(r["hbm"]["bytes_by_source"].items())[:4]),
            f"  compiled in {r['compile_s']:.1f} s",
        ]
    )


FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    topology = topologies.parse(FLAGS.topology, FLAGS.num_slices)
    try:
        report = analyze(FLAGS.config, topology, count_flops=FLAGS.count_flops, dump_hlo=FLAGS.dump_hlo)
    except DoesNotFit as e:
        print(
            f"does not fit {topology.accelerator_type} ({topology.chip.hbm_bytes / 1024**3:.0f} GiB HBM per chip):\n{e}"
        )
        if FLAGS.out:
            result = {"topology": topology.accelerator_type, "model": FLAGS.config.model.name, "fits": False}
            epath.Path(FLAGS.out).write_text(json.dumps(result | oom_numbers(str(e)) | {"error": str(e)}, indent=2))
        sys.exit(1)
    except CannotCompileHere as e:
        sys.exit(f"error: {e}")
    print(format_report(report))
    if FLAGS.out:
        epath.Path(FLAGS.out).write_text(json.dumps(report, indent=2))
    if not report["memory_per_chip"]["fits"]:
        sys.exit(1)


def define_flags() -> None:
    # Defined when run as a program, not at import: importing several tools in one process
    # (tests) would otherwise define --config twice.
    config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
    flags.DEFINE_string(
        "topology",
        None,
        "Cloud TPU accelerator type (v5e-256, v4-128, v5p-128, v6e-256), v5e:16x16, or GPUs (h200, h100-8; "
        "compiled for without one, needs the gpu extra).",
    )
    flags.DEFINE_integer("num_slices", 1, "Number of slices (multislice over DCN).")
    flags.DEFINE_string("out", None, "Write the report as JSON here (local or gs://).")
    flags.DEFINE_bool("count_flops", True, "Count FLOPs on an unrolled trace (slower for deep models).")
    flags.DEFINE_string("dump_hlo", None, "Write the optimised HLO of the compiled step here (local or gs://).")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    define_flags()
    logging.getLogger("jax").setLevel(logging.WARNING)
    app.run(main)
