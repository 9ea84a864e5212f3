"""Ahead-of-time compiles of the real train step for TPU topologies and NVIDIA GPUs, on this
CPU host.

Topology names are checked without libtpu; the TPU compiles need it (the `tpu` extra), the GPU
compiles JAX's CUDA plugin (the `gpu` extra, several GB, not in CI), and are skipped, saying so,
where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate_jax.tools import topologies

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed: pip install -e ".[tpu]" (libtpu==0.0.42.*) to compile for TPU topologies',
)


def _has_cuda_plugin() -> bool:
    """JAX's CUDA 12 plugin (the `gpu` extra) or CUDA 13 one (jax >= 0.11, the GPU image's)."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


needs_cuda_plugin = pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason='JAX\'s CUDA plugin is not installed: pip install -e ".[gpu]" to compile for GPUs without one',
)


@pytest.mark.parametrize(
    "name, topology_name, chips, hosts, wrap",
    [
        ("v4-128", "v4:4x4x4", 64, 16, (True, True, True)),  # v4 counts TensorCores: 2 per chip
        ("v4-8", "v4:2x2x1", 4, 1, (False, False, False)),
        ("v4-256", "v4:4x4x8", 128, 32, (True, True, True)),
        ("v5p-128", "v5:4x4x4", 64, 16, (True, True, True)),
        ("v5e-256", "v5e:16x16", 256, 64, (True, True, False)),
        ("v5litepod-256", "v5e:16x16", 256, 64, (True, True, False)),
        ("v5litepod-64", "v5e:8x8", 64, 16, (False, False, False)),
        ("v5e-8", "v5e:2x4", 8, 1, (False, False, False)),
        ("v5e-4", "v5e:2x2", 4, 1, (False, False, False)),
        ("v6e-256", "v6e:16x16", 256, 64, (True, True, False)),
        ("v4:4x4x12", "v4:4x4x12", 192, 48, (True, True, True)),
    ],
)
def test_accelerator_types(name, topology_name, chips, hosts, wrap):
    t = topologies.parse(name)
    assert (t.topology_name, t.chips, t.hosts, t.wrap) == (topology_name, chips, hosts, wrap)
    kwargs = t.get_topology_desc_kwargs()
    assert kwargs["platform"] == "tpu" and kwargs["num_slices"] == 1
    assert kwargs["chip_config_name"] == ("megacore" if name.startswith(("v4", "v5p")) else "default")
    assert topologies.parse(name, num_slices=2).chips == 2 * chips


def test_chip_figures():
    gib = 1024**3
    assert {g: (c.hbm_bytes // gib, c.peak_bf16_flops / 1e12) for g, c in topologies.CHIPS.items()} == {
        "v4": (32, 275),
        "v5p": (95, 459),
        "v5e": (16, 197),
        "v6e": (32, 918),
    }


@pytest.mark.parametrize("bad", ["v5e", "v5e-3", "v4-7", "v9-8", "tpu-256", "v5e:2x2x2", "v4-96", "h200-12", "h300"])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        topologies.parse(bad)


@pytest.mark.parametrize(
    "name, accelerator_type, topology_name, gpus, hosts",
    [("h200", "h200-1", "1x1x1", 1, 1), ("h200-8", "h200-8", "1x1x8", 8, 1), ("h100-16", "h100-16", "1x2x8", 16, 2)],
)
def test_gpu_names(name, accelerator_type, topology_name, gpus, hosts):
    t = topologies.parse(name)
    assert (t.accelerator_type, t.topology_name, t.chips, t.hosts, t.platform) == (
        accelerator_type, topology_name, gpus, hosts, "gpu",
    )  # fmt: skip
    config = t.target_config()
    assert f"device_memory_size: {t.chip.hbm_bytes}" in config and "core_count: 132" in config
    assert t.chip.peak_bf16_flops == 989e12 and t.chip.hbm_bytes_per_s == (4.8e12 if name[:4] == "h200" else 3.35e12)
    with pytest.raises(ValueError, match="GPU topologies"):
        topologies.parse(name, num_slices=2)


@pytest.mark.skipif(_has_cuda_plugin(), reason="the CUDA plugin is installed here")
def test_gpu_compile_without_the_cuda_plugin_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gpu\]'"):
        topologies.parse("h200").devices()


def test_deviceless_cudnn_failure_of_newer_jax_gets_a_hint():
    from crate_jax.tools.aot_compile import gpu_compile_hint

    # What jax 0.12.1 + jax-cuda13-plugin 0.12.1 raised here compiling CRATE-MAE for an H200.
    text = (
        "INVALID_ARGUMENT: StreamExecutor is null and deviceless cuDNN compilation is not enabled; "
        "failed to resolve cuDNN support for custom call: __cudnn$fmhaSoftmax\n\nSuspected Python Code Location:"
    )
    hint = gpu_compile_hint(text)
    assert "--config.model.attention=symmetric" in hint and "__cudnn$fmhaSoftmax" in hint
    assert "\n" not in hint  # one line
    assert gpu_compile_hint("RESOURCE_EXHAUSTED: out of memory while trying to allocate") is None
    assert gpu_compile_hint("INTERNAL: cuDNN error CUDNN_STATUS_BAD_PARAM") is None


@needs_libtpu
def test_abstract_devices():
    from crate_jax.tools import aot_compile  # noqa: F401 - sets the environment libtpu needs here

    for name, count, kind in [("v4-128", 64, "TPU v4"), ("v5e-256", 256, "TPU v5 lite"), ("v5p-128", 64, "TPU v5")]:
        devices = topologies.parse(name).devices()
        assert len(devices) == count and devices[0].device_kind == kind
    devices = topologies.parse("v5e-4", num_slices=2).devices()
    assert sorted({d.slice_index for d in devices}) == [0, 1] and len(devices) == 8


def _tiny_config():
    spec = importlib.util.spec_from_file_location("imagenet_mae", ROOT / "configs" / "imagenet_mae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("variant=tiny,runlocal")
    config.lock()
    return config


@needs_libtpu
def test_cli_compiles_the_train_step_for_v5e_4(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.tools.aot_compile", "--config=configs/imagenet_mae.py:variant=tiny,runlocal",
         "--config.model.attention=pallas_tpu", "--config.mesh.update_sharding=('data',)", "--topology=v5e-4",
         f"--out={out}",
         f"--dump_hlo={tmp_path / 'step.hlo'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memory per chip" in proc.stdout and "FLOPs per step" in proc.stdout and "roofline" in proc.stdout
    r = json.loads(out.read_text())
    assert (r["topology"], r["topology_name"], r["chips"], r["hosts"]) == ("v5e-4", "v5e:2x2", 4, 1)
    assert r["device_kind"] == "TPU v5 lite" and r["model"] == "crate_mae_tiny" and r["batch_size"] == 16
    assert r["mesh"] == {"slices": 1, "data": 4, "fsdp": 1, "tensor": 1}
    m = r["memory_per_chip"]
    assert m["fits"] and m["hbm_bytes"] == 16 * 1024**3
    assert 0 < m["arguments_bytes"] and 0 < m["temp_bytes"]
    assert (
        m["total_bytes"]
        == m["arguments_bytes"] + m["outputs_bytes"] - m["aliased_bytes"] + m["temp_bytes"] + m["generated_code_bytes"]
    )
    assert m["aliased_bytes"] > 0  # the donated state is updated in place
    # The runlocal model is unrolled: the compiled program's count agrees with the traced one.
    assert r["flops_per_step"] == pytest.approx(r["compiled_flops_per_chip"] * 4, rel=0.25)
    assert r["step_time_at_peak_s"] == pytest.approx(r["flops_per_step"] / (4 * 197e12))
    assert r["collectives"]["all-reduce"] >= 1  # data parallelism: the gradients
    # Weight-update sharding (the layout: test_sharding.py): the updated parameters are
    # gathered, and on a pure data-parallel mesh nothing else gathers.
    assert r["update_sharding"] == ["data"]
    assert r["collectives"]["all-gather"] >= 1
    # The Pallas TPU kernel (asked for: `auto` picks XLA's attention on TPUs) under a TPU mesh
    # traced on this CPU host: its kernels are in the HLO (forward, dK/dV, dQ per call) and
    # counted analytically.
    fused = r["fused_attention"]
    assert fused["attention"] == ["pallas_tpu"] and fused["kernel_calls_in_hlo"] >= 3
    assert fused["flops_per_chip"] > 0 and fused["bytes_per_chip"] > 0
    hlo = (tmp_path / "step.hlo").read_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    # What `attention.fused_bytes` counts for the backward kernels: fp32 row statistics
    # broadcast to 128 lanes (4 images and 4 heads per chip, 65 tokens padded to 128).
    assert "f32[4,4,128,128]" in hlo
    rl = r["roofline"]
    assert rl["flops_per_chip"] == pytest.approx(r["compiled_flops_per_chip"] + fused["flops_per_chip"])
    assert rl["bytes_per_chip"] == pytest.approx(r["compiled_bytes_accessed_per_chip"] + fused["bytes_per_chip"])
    assert rl["step_s"] == pytest.approx(max(rl["flops_per_chip"] / 197e12, rl["bytes_per_chip"] / 819e9))
    assert rl["complete"]  # runlocal is unrolled
    # The HBM side alone, by source: less than XLA's count, which includes on-chip operands.
    hbm = r["hbm"]
    assert 0 < hbm["bytes_per_chip"] < rl["bytes_per_chip"]
    assert hbm["memory_s"] == pytest.approx(hbm["bytes_per_chip"] / 819e9)
    assert any(g.startswith("encoder/") for g in hbm["bytes_by_source"])
    assert "HBM side alone" in proc.stdout


@needs_libtpu
def test_scanned_layers_two_slices_and_fsdp():
    """Scanned stacks are counted from an unrolled trace; a 2-slice mesh with FSDP gathers weights."""
    from crate_jax.tools import aot_compile

    config = _tiny_config()
    config.model.scan_layers = True
    config.mesh.fsdp = 2
    r = aot_compile.analyze(config, topologies.parse("v5e-4", num_slices=2))
    assert r["chips"] == 8 and r["num_slices"] == 2 and r["hosts"] == 2
    assert r["mesh"] == {"slices": 2, "data": 2, "fsdp": 2, "tensor": 1}
    assert r["collectives"]["all-gather"] >= 1 and r["collectives"]["all-reduce"] >= 1
    unrolled = aot_compile.model_flops_per_step(_tiny_config())
    assert r["flops_per_step"] == pytest.approx(unrolled, rel=1e-6)
    assert r["compiled_flops_per_chip"] * 8 < 0.9 * r["flops_per_step"]  # XLA counts each loop body once


@needs_libtpu
def test_a_config_that_does_not_fit_exits_nonzero_with_the_compilers_message(tmp_path):
    out = tmp_path / "oom.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.tools.aot_compile", "--config=configs/imagenet_mae.py:variant=large",
         "--topology=v5e-4", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "does not fit v5e-4" in proc.stdout and "RESOURCE_EXHAUSTED" in proc.stdout
    r = json.loads(out.read_text())
    assert r["fits"] is False and r["model"] == "crate_mae_large"
    assert r["required_bytes"] > r["available_bytes"] > 0


@needs_cuda_plugin
@pytest.mark.parametrize("attention, fused", [("auto", True), ("symmetric", False)])
def test_cli_compiles_the_train_step_for_an_h200_without_one(tmp_path, attention, fused):
    """bf16 on a GPU: `auto` is cuDNN's fused attention, and no B×K×N×N array is left in the
    compiled program; XLA's symmetric form keeps them (the counter can fail)."""
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.tools.aot_compile", "--config=configs/imagenet_mae.py:variant=tiny,runlocal",
         "--config.model.dtype=bfloat16", f"--config.model.attention={attention}", "--topology=h200", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert (r["topology"], r["device_kind"], r["chips"]) == ("h200-1", "NVIDIA H200", 1)
    assert r["memory_per_chip"]["fits"] and r["memory_per_chip"]["temp_bytes"] > 0
    assert r["fused_attention"]["attention"] == (["cudnn"] if fused else ["symmetric"])
    assert (r["fused_attention"]["cudnn_calls_in_hlo"] > 0) == fused
    assert (r["attention_matrices_in_hlo"] == 0) == fused
    # No cost analysis from XLA:GPU without a device: the roofline counts model FLOPs and HLO bytes.
    rl = r["roofline"]
    assert rl["flops_per_chip"] == r["flops_per_step"] and rl["bytes_per_chip"] == r["hbm"]["bytes_per_chip"] > 0
    assert rl["step_s"] == pytest.approx(max(rl["flops_per_chip"] / 989e12, rl["bytes_per_chip"] / 4.8e12))


def _base_step_on_an_h200(tmp_path, name: str, flag: str) -> tuple[float, str]:
    """CRATE-MAE-B at batch 64, bf16, unrolled, compiled for an H200 without one with one more
    config flag: (HBM bytes per step by the HLO count, the optimised HLO's text)."""
    out, hlo = tmp_path / f"{name}.json", tmp_path / f"{name}.hlo"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.tools.aot_compile", "--config=configs/imagenet_mae.py:variant=base",
         "--config.batch_size=64", "--config.model.scan_layers=False", "--config.model.dtype=bfloat16", flag,
         "--topology=h200", f"--out={out}", f"--dump_hlo={hlo}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())["hbm"]["bytes_per_chip"], hlo.read_text()


@needs_cuda_plugin
def test_saved_stats_layer_norms_move_fewer_hbm_bytes_on_an_h200(tmp_path):
    """`auto` LayerNorms on a GPU (saved statistics) against autodiff, CRATE-MAE-B at batch 64
    compiled for an H200: fewer bytes by the HLO count (README: 150 -> 133 GB at batch 256).
    At toy sizes (`runlocal`) the count goes the other way, so this compiles Base. The Pallas
    forward (`pallas_gpu`) compiles to a Triton kernel and fewer bytes again (README: 109.3
    against 112.3 GB at batch 256)."""
    hbm, hlo = {}, {}
    for form in ("autodiff", "auto", "pallas_gpu"):
        hbm[form], hlo[form] = _base_step_on_an_h200(tmp_path, form, f"--config.model.layer_norm_form={form}")
    assert hbm["auto"] < 0.95 * hbm["autodiff"], hbm
    assert hbm["pallas_gpu"] < hbm["auto"], hbm
    triton = "__gpu$xla.gpu.triton"
    assert triton in hlo["pallas_gpu"] and triton not in hlo["auto"]


@needs_cuda_plugin
def test_cudnn_rows_carried_by_the_layers_move_fewer_bytes_on_an_h200(tmp_path):
    """cuDNN's token padding on CRATE-MAE-B at batch 64 compiled for an H200: `auto` (197 -> 198,
    the zero row carried through each layer stack) against whole 128-token tiles (197 -> 256,
    padded around each kernel call), fewer HBM bytes (README: 112 against 133 GB at batch 256)."""
    hbm, hlo = {}, {}
    for multiple in (2, 128):
        flag = f"--config.model.cudnn_token_multiple={multiple}"
        hbm[multiple], hlo[multiple] = _base_step_on_an_h200(tmp_path, str(multiple), flag)
    assert hbm[2] < 0.95 * hbm[128], hbm
    # The kernel sees 198 tokens, and the projections run on the padded rows: 64 x 198 of them.
    assert "bf16[64,12,198,64]" in hlo[2] and "bf16[12672,768]" in hlo[2]
    assert "bf16[64,12,256,64]" in hlo[128]
