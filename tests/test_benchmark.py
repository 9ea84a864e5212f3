"""The benchmark harness and the analytic FLOP counts; gradients of the speed rewrites.

No timing is asserted: the harness runs at a tiny size for one step and its JSON is checked
for shape; FLOP counts are checked against the spec and against XLA's cost analysis.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.models import crate, layers
from crate_jax.tools import benchmark, flops

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("imagenet_mae", os.path.join(CONFIGS, "imagenet_mae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_flops_match_the_spec():
    # shared/docs/crate-mae-spec.md: CRATE-MAE-B 12.6 GMACs forward at 224 (24 layers, all tokens),
    # about 6.7 with the visible-only encoder; ours add the patch embedding and the pixel head.
    full = flops.for_model(models.build("crate_mae_base", ista_fused=False)).forward(1) / 2
    visible = flops.for_model(models.build("crate_mae_base", ista_fused=False, encoder_tokens="visible"))
    assert abs(full / 12.6e9 - 1) < 0.03
    assert abs(visible.forward(1) / 2 / 6.7e9 - 1) < 0.05
    d, released = 768, flops.for_model(models.build("crate_mae_base", ista_fused=False))
    fused = flops.for_model(models.build("crate_mae_base"))
    # 788 tokens: Y (I + eta (D - D^T D)), one product per token plus D^T D once per layer and step.
    assert fused.forward(4) - released.forward(4) == 2 * 12 * (d**3 - 2 * 788 * d * d)
    assert fused.train_step(4) - released.train_step(4) == 2 * 12 * (2 * d**3 - 6 * 788 * d * d)
    # 4 x 50 visible tokens: (Y - Y D^T) D, two products per token and no d^3 term.
    visible_fused = flops.for_model(models.build("crate_mae_base", encoder_tokens="visible"))
    assert visible.train_step(4) - visible_fused.train_step(4) == 2 * 12 * 3 * 200 * d * d
    assert crate.ista_form(788, d) == "gram" and crate.ista_form(200, d) == "factored"


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("crate_mae_tiny", dict(ista_fused=True)),
        ("crate_mae_tiny", dict(ista_fused=False)),
        ("crate_mae_tiny", dict(encoder_tokens="visible")),
        ("crate_mae_tiny", dict(encoder_tokens="visible", mask_ratio=0.9375)),  # 8 x 5 rows: factored ISTA
        ("mae_vit_base", dict(decoder_width=128)),
    ],
)
def test_analytic_flops_match_xla_cost_analysis(name, overrides):
    # Wide enough that matrix products dominate what XLA counts (it adds norms, softmax, loss).
    model = models.build(
        name, image_size=32, patch_size=4, width=128, num_heads=4, depth=2, decoder_depth=2, decoder_num_heads=4,
        **overrides,
    )  # fmt: skip
    batch = 8
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), models.abstract_params(model))
    images = jnp.zeros((batch, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(0), (batch, model.num_patches))
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, noise=noise).loss))
    xla = benchmark._xla_flops(grad.lower(params).compile().cost_analysis())
    analytic = flops.for_model(model).train_step(batch)
    assert abs(xla / analytic - 1) < 0.10, (xla, analytic)


@pytest.mark.parametrize("rows", [3, 40])  # 3 x 2 and 3 x 40 tokens of width 16: factored and gram
def test_ista_rewrites_match_the_release_with_gradients(rows):
    y = jax.random.normal(jax.random.key(0), (3, rows, 16))
    r = jax.random.normal(jax.random.key(1), (3, rows, 16))
    fused, released = crate.ISTA(16, fused=True), crate.ISTA(16, fused=False)
    params = released.init(jax.random.key(2), y)
    loss = lambda m: lambda p, y: jnp.sum(m.apply(p, y) * r)  # noqa: E731
    np.testing.assert_allclose(fused.apply(params, y), released.apply(params, y), rtol=1e-5, atol=1e-6)
    ours, ref = jax.grad(loss(fused), (0, 1))(params, y), jax.grad(loss(released), (0, 1))(params, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, ref)


def test_attention_implementations_give_the_same_train_gradients():
    model = models.build("crate_mae_tiny", image_size=16, patch_size=4, width=32, num_heads=4, depth=1)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, model.num_patches))
    params = model.init(jax.random.key(2), images)["params"]

    def grads(attention):
        m = model.clone(attention=attention)
        return jax.grad(lambda p: m.apply({"params": p}, images, noise=noise).loss)(params)

    ref = grads("autodiff")
    for attention in ("symmetric", "dot_product"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads(attention), ref)
    with pytest.raises(ValueError, match=r"^model.attention='flash' is not one of"):
        models.build("crate_mae_tiny", attention="flash")


def test_subspace_attention_gradient_matches_autodiff():
    u = jax.random.normal(jax.random.key(0), (2, 3, 7, 5))
    r = jax.random.normal(jax.random.key(1), (2, 3, 7, 5))
    ours = jax.grad(lambda u: jnp.sum(crate.subspace_attention(u, 0.4) * r))(u)
    ref = jax.grad(lambda u: jnp.sum(crate._softmax_attention(u, 0.4)[0] * r))(u)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_matmul_gradient_matches_autodiff():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    w = jax.random.normal(jax.random.key(1), (6, 4))
    r = jax.random.normal(jax.random.key(2), (2, 5, 4))
    ours = jax.grad(lambda x, w: jnp.sum(layers.matmul(x, w) * r), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum((x @ w) * r), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_variant_names_are_checked():
    assert benchmark.variant_overrides("visible+bf16") == {"encoder_tokens": "visible", "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="visibel"):
        benchmark.variant_overrides("visibel")


def test_harness_writes_well_formed_results(tmp_path):
    config = load_config("runlocal")
    config.batch_size = 4
    variants = ["default", "visible+scan"]
    torch_module = "tests.torch_reference" if importlib.util.find_spec("torch") else None
    torch_variants = ("torch_eager", "torch_sdpa")
    seen = []
    results = benchmark.run(
        config,
        variants,
        steps=1,
        warmup=0,
        torch_module=torch_module,
        torch_variants=torch_variants,
        on_row=lambda rows: seen.append([r["variant"] for r in rows]),
    )
    # After each row, the rows so far (PyTorch's first: they run before JAX starts a backend).
    torch_names = list(torch_variants) if torch_module else []
    assert seen == [torch_names[:i] for i in range(1, len(torch_names) + 1)] + [
        variants[:i] + torch_names for i in range(1, len(variants) + 1)
    ]
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(results))
    results = json.loads(out.read_text())
    expected = variants + (list(torch_variants) if torch_module else [])
    assert [r["variant"] for r in results] == expected
    for r in results:
        for key in (
            "images_per_sec", "mfu", "flops_per_image", "peak_flops", "step_s", "compile_s",
            "model_flops_per_step", "measured_matmul_peak_flops", "peak_memory_bytes",
        ):  # fmt: skip
            assert isinstance(r[key], float) and r[key] > 0, (r["variant"], key)
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_s"] / r["peak_flops"])
        assert r["peak_flops_source"].startswith("measured fp32 matmul")  # CPU: no spec peak
        assert "ista_fused" in r and "environment" in r and "ista_form" in r
    # MFU counts the released computation: ISTA as three products, for JAX and PyTorch rows alike.
    assert results[0]["model_flops_per_step"] > results[0]["flops_per_step"]
    assert results[0]["attention"] == "symmetric"  # auto on CPU
    assert results[0]["cudnn_checks"] is None  # no cuDNN kernel to check
    if torch_module:
        eager, sdpa = results[-2], results[-1]
        assert eager["attention_modules_on_sdpa"] == 0 and sdpa["attention_modules_on_sdpa"] == 4
        assert eager["model_flops_per_step"] == sdpa["model_flops_per_step"] == results[0]["model_flops_per_step"]
    default, visible = results[0], results[1]
    assert default["compile_s"] > 0 and default["memory_per_device"]["temp_bytes"] > 0
    assert default["ista_fused"] is True and default["encoder_tokens"] == "all"
    assert default["ista_form"] in ("gram", "factored")
    if torch_module:
        assert results[-1]["ista_form"] == "released"
        assert "JAX default / PyTorch sdpa" in benchmark.format_table(results)
    assert visible["encoder_tokens"] == "visible" and visible["scan_layers"] is True
    assert visible["flops_per_image"] < default["flops_per_image"]
    # XLA counts a scanned layer once; the unrolled twin's count is reported beside it.
    assert visible["xla_flops_per_step_unrolled"] > visible["xla_flops_per_step"]
    assert abs(visible["xla_flops_per_step_unrolled"] / visible["flops_per_step"] - 1) < 0.15
    assert "JAX default / PyTorch eager" in benchmark.format_table(results) or not torch_module
    if torch_module:
        assert {r["torch_device"] for r in results[-2:]} == {"cpu"}


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_baselines_follow_jax_platforms():
    """The baselines pick their device before JAX starts a backend; a platform JAX did not
    take is an error, not a comparison across devices."""
    assert benchmark.torch_device("cpu") == "cpu"
    assert benchmark.torch_device("tpu,cpu") == "cpu"
    benchmark.check_same_device([{"variant": "torch_eager", "torch_device": "cpu"}])  # JAX runs on the CPU here
    with pytest.raises(RuntimeError, match="torch_sdpa ran on 'cuda' but JAX on 'cpu'"):
        benchmark.check_same_device([{"variant": "torch_sdpa", "torch_device": "cuda"}])


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
@pytest.mark.parametrize("name", ["crate_mae_tiny", "mae_vit_base"])
def test_torch_sdpa_baseline_computes_the_released_model(name):
    """The SDPA swap changes the attention's kernel, not the function: same loss as eager."""
    import torch

    from crate_jax.tools import torch_baselines
    from tests import torch_reference

    size = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2, decoder_depth=2)
    if name == "mae_vit_base":
        size |= dict(decoder_width=32, decoder_num_heads=4)
    model = models.build(name, **size)
    eager = torch_baselines.build(torch_reference, model)
    sdpa = torch_baselines.build(torch_reference, model)
    sdpa.load_state_dict(eager.state_dict())
    assert torch_baselines.use_sdpa(torch_reference, sdpa) == 4
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        a, b = eager(images, noise)["loss"], sdpa(images, noise)["loss"]
    assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_compile_baseline_trains_as_eager():
    """torch_compile (compile + SDPA) runs the same train step as eager: the loss after one
    AdamW update agrees. On CPU Inductor compiles C++ (about 20 s here), so a GPU lease
    does not discover a compile failure of the baseline."""
    config = load_config("runlocal")
    config.batch_size = 4
    rows = {  # each in its own process, as the benchmark runs them
        v: benchmark.measure_torch_subprocess(config, "tests.torch_reference", v, steps=1, warmup=1)
        for v in ("torch_eager", "torch_compile")
    }
    eager, compiled = rows["torch_eager"], rows["torch_compile"]
    assert compiled["attention_modules_on_sdpa"] == 4 and eager["attention_modules_on_sdpa"] == 0
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["compile_s"] > eager["compile_s"]  # the compilation happened in the warm-up


def test_kernel_profile_ranks_the_traced_steps_ops(tmp_path):
    """`--profile`: a trace of a few steps is written and its XLA ops come back ranked by time."""
    import glob

    from crate_jax.tools import kernel_profile

    step = jax.jit(lambda x: (jnp.tanh(x @ x), {"loss": jnp.sum(x)}))
    state, top = kernel_profile.profile_steps(step, jnp.ones((256, 256)), str(tmp_path), steps=2, top=5)
    assert state.shape == (256, 256)
    assert glob.glob(f"{tmp_path}/**/*.trace.json.gz", recursive=True)
    assert 0 < len(top) <= 5 and all(t["s_per_step"] > 0 for t in top)
    assert [t["s_per_step"] for t in top] == sorted((t["s_per_step"] for t in top), reverse=True)
    assert not any(t["name"].startswith("$") for t in top)  # Python frames are left out on CPU


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the tpu extra)")
def test_kernel_profile_on_cpu_after_a_tpu_topology_was_loaded(tmp_path):
    """An ahead-of-time TPU compile earlier in the process leaves an idle TPU plane in every
    later trace; the CPU backend's ops must still be ranked (they were dropped before)."""
    from crate_jax.tools import aot_compile, kernel_profile, topologies  # noqa: F401 - libtpu's environment

    assert topologies.parse("v5e-4").devices()
    step = jax.jit(lambda x: (jnp.tanh(x @ x), {"loss": jnp.sum(x)}))
    _, top = kernel_profile.profile_steps(step, jnp.ones((256, 256)), str(tmp_path), steps=2, top=5)
    assert 0 < len(top) <= 5 and not any(t["name"].startswith("$") for t in top)
