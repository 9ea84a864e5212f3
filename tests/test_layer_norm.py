"""The LayerNorm forms compute the same function and gradient; `auto` follows the platform."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.models import layer_norm as ln
from crate_jax.models import layers

SAVED = ("saved_stats", "saved_stats_pinned", "pallas_gpu")  # the custom_vjp forms, each against autodiff


def _inputs(dtype, shape=(3, 5, 64)):
    rng = np.random.default_rng(0)
    # An offset mean per token and a spread of scales, so the statistics matter.
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[:-1] + (1,)) + rng.normal(size=shape[:-1] + (1,))
    scale = 1.0 + 0.1 * rng.normal(size=shape[-1])
    bias = 0.1 * rng.normal(size=shape[-1])
    weight = rng.normal(size=shape)  # a fixed cotangent through a linear loss
    return (jnp.asarray(x, dtype), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32), jnp.asarray(weight))


def _value_and_grads(form, x, scale, bias, weight, dtype):
    def loss(x, scale, bias):
        return jnp.sum(ln.layer_norm(x, scale, bias, 1e-5, dtype, form).astype(jnp.float32) * weight)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, scale, bias)


def test_forward_matches_float64_numpy():
    x, scale, bias, _ = _inputs(jnp.float32)
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(-1, keepdims=True)
    ref = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(scale) + np.asarray(
        bias
    )
    for form in ("autodiff", *SAVED):
        out = ln.layer_norm(x, scale, bias, 1e-5, jnp.float32, form)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5, err_msg=form)


@pytest.mark.parametrize("form", SAVED)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_saved_stats_gradient_is_autodiffs(dtype, form):
    """Same loss and gradients for x, scale and bias as autodiff (fp32 to rounding; bf16 to
    its rounding of dx), and against LayerNorm's analytic gradient in float64 numpy."""
    x, scale, bias, weight = _inputs(dtype)
    loss_a, grads_a = _value_and_grads("autodiff", x, scale, bias, weight, dtype)
    loss_s, grads_s = _value_and_grads(form, x, scale, bias, weight, dtype)
    np.testing.assert_allclose(float(loss_s), float(loss_a), rtol=1e-5)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, s in zip(("x", "scale", "bias"), grads_a, grads_s, strict=True):
        assert s.dtype == a.dtype, name
        np.testing.assert_allclose(
            np.asarray(s, np.float32), np.asarray(a, np.float32), rtol=tol, atol=tol, err_msg=name
        )

    # Reference in float64: dx = rstd (g - mean(g) - x̂ mean(g x̂)), g = dy·scale.
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    dy = np.asarray(weight.astype(dtype).astype(jnp.float32), np.float64)  # the cotangent reaches it in `dtype`
    mean = x64.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (x64 - mean) * rstd
    g = dy * np.asarray(scale, np.float64)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(grads_s[0], np.float64), dx, rtol=tol, atol=tol * np.abs(dx).max())
    np.testing.assert_allclose(np.asarray(grads_s[1]), (dy * xhat).sum((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads_s[2]), dy.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_auto_follows_the_traced_platform():
    """`auto` is saved_stats_pinned when the trace is for a GPU (an ahead-of-time compile on a
    CPU host sees the mesh's abstract GPU devices), saved_stats for a TPU or the CPU."""
    auto = (jax.sharding.AxisType.Auto,)
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    cpu = jax.sharding.AbstractDevice(device_kind="cpu", num_cores=None, platform="cpu")
    expected = {"gpu": "saved_stats_pinned", "tpu": "saved_stats", "cpu": "saved_stats"}
    assert ln.resolve("auto") == expected.get(jax.default_backend(), "saved_stats")  # no mesh
    for platform, device in (("gpu", gpu), ("tpu", tpu), ("cpu", cpu)):
        mesh = jax.sharding.AbstractMesh((1,), ("data",), auto, abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            assert layers.trace_platform() == platform and ln.resolve("auto") == expected[platform], platform
        assert "custom_vjp_call" in _jaxpr(mesh, "auto"), platform
        # The pinned form's barrier is in its forward rule, which the gradient's trace runs.
        assert ("optimization_barrier" in _jaxpr(mesh, "auto", grad=True)) == (platform == "gpu"), platform
    assert "custom_vjp_call" not in _jaxpr(None, "autodiff")
    for form in ln.FORMS[1:]:
        assert ln.resolve(form) == form


def _jaxpr(mesh, form: str, grad: bool = False) -> str:
    """The jaxpr of one LayerNorm (`grad`: of its gradient) traced under `mesh` (None: no mesh)."""
    x, scale, bias, _ = _inputs(jnp.float32)
    fn = lambda x: ln.layer_norm(x, scale, bias, 1e-5, jnp.float32, form).sum()  # noqa: E731
    fn = jax.grad(fn) if grad else fn
    with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh):
        return str(jax.make_jaxpr(fn)(x))


def test_bad_form_is_named():
    with pytest.raises(ValueError, match="layer_norm_form='fused'"):
        ln.resolve("fused")
    wide = jnp.ones((2, ln.PALLAS_MAX_WIDTH + 1))
    with pytest.raises(ValueError, match=f"layer_norm_form='pallas_gpu' takes at most {ln.PALLAS_MAX_WIDTH} features"):
        ln.layer_norm(wide, wide[0], wide[0], 1e-5, jnp.float32, "pallas_gpu")
    with pytest.raises(ValueError, match="model.layer_norm_form='fused'"):
        models.build("crate_mae_tiny", layer_norm_form="fused")


@pytest.mark.parametrize("form", SAVED)
@pytest.mark.parametrize("name", ["crate_mae_tiny", "mae_vit_small"])
def test_model_step_is_the_same_with_either_form(name, form):
    """The whole model's loss and gradients, fp32 on the CPU: the form reaches every LayerNorm
    (one more custom_vjp call per LayerNorm in the saved-statistics model's trace) and changes
    nothing the step computes."""
    size = dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, decoder_depth=1)
    if name.startswith("mae_vit"):
        size |= dict(decoder_width=32, decoder_num_heads=2)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 16)), jnp.float32)
    results, calls = {}, {}
    for each in ("autodiff", form):
        model = models.build(name, **size, layer_norm_form=each)
        params = nn.unbox(model.init(jax.random.key(0), images)["params"])

        def loss(p, model=model):
            return model.apply({"params": p}, images, noise=noise).loss

        calls[each] = str(jax.make_jaxpr(loss)(params)).count("custom_vjp_call")
        with jax.default_matmul_precision("highest"):  # no TF32 on a GPU: the forms, not the products
            results[each] = jax.jit(jax.value_and_grad(loss))(params)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    norms = sum(path.endswith("['scale']") for path in paths)
    assert norms >= 6 and calls[form] - calls["autodiff"] == norms, (norms, calls)
    (la, ga), (ls, gs) = results["autodiff"], results[form]
    np.testing.assert_allclose(float(ls), float(la), rtol=1e-6)
    for path, a, b in zip(paths, jax.tree.leaves(ga), jax.tree.leaves(gs), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=path)


_SHARDED_SCRIPT = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from crate_jax.models import layer_norm as ln
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rules = (("act_batch", "data"), ("act_length", None))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 6, 64)) * 2 + 1, jnp.float32)
scale, bias = jnp.asarray(1 + 0.1 * rng.normal(size=64), jnp.float32), jnp.asarray(rng.normal(size=64), jnp.float32)
w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
def grads(form):
    f = lambda x, s, b: jnp.sum(ln.layer_norm(x, s, b, 1e-5, jnp.float32, form) * w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert "shard_map" in str(jax.make_jaxpr(grads("pallas_gpu"))(x, scale, bias))
    (la, ga), (lp, gp) = grads("autodiff")(x, scale, bias), grads("pallas_gpu")(x, scale, bias)
np.testing.assert_allclose(float(lp), float(la), rtol=1e-5)
for a, p in zip(ga, gp):
    np.testing.assert_allclose(np.asarray(p), np.asarray(a), rtol=1e-4, atol=1e-5)
x2 = jax.device_put(x[:, 0], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    f2 = jax.jit(lambda form: ln.layer_norm(x2, scale, bias, 1e-5, jnp.float32, form), static_argnums=0)
    np.testing.assert_allclose(np.asarray(f2("pallas_gpu")), np.asarray(f2("autodiff")), rtol=1e-5, atol=1e-5)
print("ok", len(jax.devices()))
"""


def test_pallas_gpu_form_inside_shard_map_on_four_devices():
    """On a data × tensor mesh the Pallas forward runs per shard of the batch (shard_map: a
    Triton call is not partitioned by XLA) and the step equals autodiff's (interpreted here)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok 4" in proc.stdout, proc.stderr[-3000:]
