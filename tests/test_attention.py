"""Attention implementations (crate_jax/models/attention.py): the same function, exactly.

The fused kernels' padding is checked where it runs here: the cuDNN path's pad + mask through
`jax.nn.dot_product_attention(implementation="xla")` with the same arguments, the Pallas TPU
kernel in interpret mode. The cuDNN kernel itself is tested on GPUs only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.models import attention, layers

TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _u(batch=2, tokens=197, heads=2, head_dim=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, tokens, heads, head_dim)).astype(np.float32))


def _loss(fn):
    # A loss that weights every output row differently, so a wrong gradient row shows.
    return lambda u: jnp.sum(fn(u) * jnp.arange(u.shape[1], dtype=u.dtype)[None, :, None, None] ** 0.5)


@pytest.mark.parametrize("tokens, multiple", [(197, 128), (50, 128), (128, 128), (197, 2)])
def test_padded_keys_are_masked_exactly(tokens, multiple):
    """The cuDNN path's padding (zeros to a multiple of 128 or 2, `key_value_seq_lengths` = N, query
    rows unmasked, sliced after) through XLA's implementation: output and gradient agree with
    the unpadded attention to fp32 rounding, and the padding really happened."""
    u = _u(tokens=tokens)
    padded = lambda x: attention.padded_dot_product(x, x, x, 0.25, "xla", multiple)  # noqa: E731
    plain = lambda x: attention.mssa(x, 0.25, "symmetric")  # noqa: E731
    assert rel(padded(u), plain(u)) < 1e-6
    assert rel(jax.grad(_loss(padded))(u), jax.grad(_loss(plain))(u)) < 1e-6
    lowered = jax.jit(padded).lower(u).as_text()
    padded_to = -(-tokens // multiple) * multiple
    assert f"{padded_to}x" in lowered


def test_padding_without_the_key_mask_would_be_wrong():
    """The check above can fail: zero-padded keys left unmasked change the softmax."""
    u = _u(tokens=50)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 78), (0, 0), (0, 0)))  # noqa: E731
    unmasked = jax.nn.dot_product_attention(pad(u), pad(u), pad(u), scale=0.25, implementation="xla")[:, :50]
    assert rel(unmasked, attention.mssa(u, 0.25, "symmetric")) > 1e-2


@pytest.mark.parametrize("implementation", ["autodiff", "dot_product"])
def test_mssa_implementations_agree(implementation):
    u = _u(tokens=37)
    fn = lambda x: attention.mssa(x, 0.25, implementation)  # noqa: E731
    ref = lambda x: attention.mssa(x, 0.25, "symmetric")  # noqa: E731
    assert rel(fn(u), ref(u)) < 1e-6
    assert rel(jax.grad(_loss(fn))(u), jax.grad(_loss(ref))(u)) < 1e-6


def test_pallas_tpu_kernel_in_interpret_mode():
    """The Pallas TPU flash kernel (segment ids mask the padding), forward and backward, on CPU."""
    from jax.experimental.pallas import tpu as pltpu

    u = _u(batch=1, tokens=37, heads=2)
    fn = lambda x: attention.mssa(x, 0.25, "pallas_tpu")  # noqa: E731
    ref = lambda x: attention.mssa(x, 0.25, "symmetric")  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out, grad = fn(u), jax.grad(_loss(fn))(u)
    assert rel(out, ref(u)) < 1e-6
    assert rel(grad, jax.grad(_loss(ref))(u)) < 1e-5


def test_pallas_tpu_kernel_inside_shard_map_on_a_mesh():
    """Under a mesh the kernel runs per shard of batch and heads (shard_map), as on a TPU slice."""
    import flax.linen as nn
    from jax.experimental.pallas import tpu as pltpu

    mesh = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("act_batch", "data"), ("act_heads", "tensor"), ("act_length", None))
    q, k, v = (_u(batch=1, tokens=20, seed=s) for s in range(3))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), pltpu.force_tpu_interpret_mode():
        jitted = jax.jit(lambda q, k, v: attention.attend(q, k, v, 0.25, "pallas_tpu", jnp.float32))
        assert "shard_map" in str(jax.make_jaxpr(jitted)(q, k, v))
        out = jitted(q, k, v)
    ref = attention.written_out(q, k, v, 0.25, jnp.float32)[0]
    assert rel(out, ref) < 1e-6


@pytest.mark.parametrize(
    "on, dtype, mssa, vit",
    [
        ("cpu", jnp.float32, "symmetric", "autodiff"),
        ("cpu", jnp.bfloat16, "symmetric", "autodiff"),
        ("gpu", jnp.bfloat16, "cudnn", "cudnn"),
        ("gpu", jnp.float16, "cudnn", "cudnn"),
        ("gpu", jnp.float32, "symmetric", "autodiff"),
        ("tpu", jnp.bfloat16, "autodiff", "autodiff"),  # README, TPU table: fewest bytes per chip
        ("tpu", jnp.float32, "autodiff", "autodiff"),
    ],
)
def test_auto_table(on, dtype, mssa, vit):
    assert attention.resolve("auto", dtype, "mssa", on=on) == mssa
    assert attention.resolve("auto", dtype, "vit", on=on) == vit
    assert attention.resolve("dot_product", dtype, "mssa", on=on) == "dot_product"  # explicit names stay


def test_attention_calls_are_the_models_token_counts():
    """`models.attention_calls` (the AOT report's analytic kernel costs) against the attention
    maps the model itself returns."""
    images = jnp.zeros((1, 64, 64, 3))
    for name, extra in [
        ("mae_vit_base", dict(decoder_width=32, decoder_depth=2, decoder_num_heads=4)),
        ("crate_mae_tiny", dict(encoder_tokens="visible")),
        ("crate_mae_paper_tiny", {}),  # no cls token
    ]:
        model = models.build(name, **dict(TINY, image_size=64, **extra))
        noise = jnp.zeros((1, model.num_patches))
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), images)["params"])
        out = jax.eval_shape(lambda p, n, m=model: m.apply({"params": p}, images, noise=n, capture=True), params, noise)
        stacked = [out.intermediates[part]["attn"].shape for part in ("encoder", "decoder")]  # (layers, B, K, N, N)
        maps = [shape[1:] for shape in stacked for _ in range(shape[0])]
        calls = models.attention_calls(model)
        assert [(1, heads, n, n) for n, heads, _, _ in calls] == maps, name
        assert calls[0][0] < calls[-1][0] or name == "crate_mae_paper_tiny", name  # visible-only encoders


def test_auto_follows_the_mesh_platform():
    """An ahead-of-time compile for a TPU topology traces on a CPU host: `auto` must see the
    mesh's (abstract) TPU devices, not the host's backend."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    auto = (jax.sharding.AxisType.Auto,)  # as sharding.make_mesh's meshes (AbstractMesh's default changes after 0.11.0)
    tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), auto, abstract_device=device)
    assert layers.trace_platform() == "cpu"
    with jax.sharding.use_abstract_mesh(tpu_mesh):
        assert layers.trace_platform() == "tpu"
        assert attention.resolve("auto", jnp.bfloat16, "mssa") == "autodiff"
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert layers.trace_platform() == "cpu"
        assert attention.resolve("auto", jnp.bfloat16, "mssa") == "symmetric"


def test_auto_is_the_default_and_on_cpu_is_the_symmetric_form():
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(2, 64)).astype(np.float32)
    auto = models.build("crate_mae_tiny", **TINY)
    assert auto.attention == "auto" and models.build("mae_vit_base").attention == "auto"
    params = auto.init(jax.random.key(0), images)["params"]
    loss = lambda m: jax.value_and_grad(lambda p: m.apply({"params": p}, images, noise=noise).loss)(params)  # noqa: E731
    (a, ga), (s, gs) = loss(auto), loss(auto.clone(attention="symmetric"))
    assert float(a) == float(s)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gs), strict=True))


def test_bad_names_fail_with_the_config_key():
    with pytest.raises(ValueError, match="model.attention='symmetric'.*mae_vit_base"):
        models.build("mae_vit_base", attention="symmetric")  # q != k in a ViT
    with pytest.raises(ValueError, match="model.attention='flash'"):
        models.build("crate_mae_tiny", attention="flash")
    with pytest.raises(ValueError, match="model.cudnn_token_multiple=0 must be a positive integer"):
        models.build("mae_vit_base", cudnn_token_multiple=0)
    model = models.build("crate_mae_tiny", attention="cudnn", **TINY)  # fp32: cuDNN has no fp32 kernel
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype bfloat16"):
        model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))


def _cudnn_through_xla(monkeypatch, nan_in_masked_key_gradients=False):
    """Run the "cudnn" implementation's code path on CPU with the kernel call answered by XLA's
    implementation with the same arguments (only the `implementation` string differs).

    `nan_in_masked_key_gradients`: the stand-in kernel's backward writes NaN into the rows of
    dK and dV past `key_value_seq_lengths`, as a flash kernel that never stores them could leave
    them: the model must not read them."""
    real = jax.nn.dot_product_attention
    calls = []

    def recorded(*args, implementation=None, **kwargs):
        calls.append((implementation, args[0].shape, kwargs.get("key_value_seq_lengths") is not None))
        answered_by = "xla" if implementation == "cudnn" else implementation
        lengths = kwargs.pop("key_value_seq_lengths", None)
        # Every array an argument: the custom_vjp below must not close over a tracer (scan).
        xla = lambda q, k, v, n: real(q, k, v, key_value_seq_lengths=n, implementation=answered_by, **kwargs)  # noqa: E731
        if not nan_in_masked_key_gradients or lengths is None:
            return xla(*args, lengths)

        @jax.custom_vjp
        def kernel(q, k, v, lengths):
            return xla(q, k, v, lengths)

        def kernel_fwd(q, k, v, lengths):
            out, vjp = jax.vjp(lambda q, k, v: xla(q, k, v, lengths), q, k, v)
            return out, (vjp, lengths)

        def kernel_bwd(residuals, g):
            vjp, lengths = residuals
            dq, dk, dv = vjp(g)
            masked = (jnp.arange(dk.shape[1])[None, :] >= lengths[:, None])[:, :, None, None]
            return dq, jnp.where(masked, jnp.nan, dk), jnp.where(masked, jnp.nan, dv), None

        kernel.defvjp(kernel_fwd, kernel_bwd)
        return kernel(*args, lengths)

    monkeypatch.setattr(attention, "trace_platform", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    # No run-time kernel check (it runs on GPUs): the same calls on every machine.
    monkeypatch.setattr(attention, "_on_gpu_devices", lambda: False)
    return calls


def test_stream_tokens():
    """Where the zero rows for cuDNN are added: to the layer stack's stream when they are few
    (197 -> 198), around each kernel call when many (197 -> 256)."""
    assert attention.CUDNN_TOKEN_MULTIPLE == 2
    assert attention.stream_tokens(197, 2) == 198
    assert attention.stream_tokens(17, 2) == 18  # 1/17 of the rows: still under 1/16
    assert attention.stream_tokens(15, 2) == 15  # 1/15: over, each call pads
    assert attention.stream_tokens(50, 2) == 50  # even: no padding at all
    assert attention.stream_tokens(197, 128) == 197


def test_capture_never_pads_the_stream():
    from crate_jax.models.crate import EncoderLayer
    from crate_jax.models.stack import LayerStack

    stack = LayerStack(EncoderLayer, {"width": 8, "num_heads": 2}, 1, capture=True, token_multiple=2)
    with pytest.raises(ValueError, match="capture=True keeps the token count"):
        stack.init(jax.random.key(0), jnp.zeros((1, 17, 8)))  # 17 -> 18 rows


def test_zero_padded_cotangents():
    """The identity forward; backward, the padded rows' cotangents are zero even where they
    were NaN, the real rows' pass unchanged."""
    x = _u(tokens=5)
    out, vjp = jax.vjp(lambda y: attention.zero_padded_cotangents(y, 3), x)
    assert out is x or bool(jnp.all(out == x))
    g = jnp.ones_like(x).at[:, 3:].set(jnp.nan)
    (dx,) = vjp(g)
    assert bool(jnp.all(dx[:, :3] == 1)) and bool(jnp.all(dx[:, 3:] == 0))


def test_padded_tokens_need_the_masking_implementation():
    u = _u(tokens=6)
    with pytest.raises(ValueError, match="6 tokens of which 5 real: only attention 'cudnn' masks padded tokens"):
        attention.mssa(u, 0.25, "symmetric", valid=5)
    with pytest.raises(ValueError, match="only attention 'cudnn'"):
        attention.attend(u, u, u, 0.25, "dot_product", jnp.float32, valid=5)


@pytest.mark.parametrize("name, scan", [("crate_mae_tiny", False), ("crate_mae_tiny", True), ("mae_vit_base", False)])
def test_the_stream_carrying_padded_rows_is_exact(monkeypatch, name, scan):
    """The cuDNN path with its zero rows carried through the layer stacks (65 -> 66 tokens, and
    the ViT's 17 visible -> 18), run in fp32 with XLA answering the kernel call and leaving NaN
    in the padded keys' gradient rows: loss and every gradient equal the unpadded default's to
    fp32 rounding, so no padded row reaches the loss or a weight gradient (biases and LayerNorms
    make the padded rows nonzero after one layer). Analysis (capture=True) sees 65 tokens."""
    size = dict(TINY, decoder_width=32, decoder_depth=2, decoder_num_heads=4) if name == "mae_vit_base" else TINY
    size = dict(size, scan_layers=scan)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(4, 64)).astype(np.float32)
    ref_model = models.build(name, **size)
    params = ref_model.init(jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)  # nonzero biases everywhere

    def loss_and_grad(model):
        fn = lambda p: model.apply({"params": p}, images, noise=noise).loss  # noqa: E731
        with jax.default_matmul_precision("highest"):  # no TF32 on a GPU: the padding, not the products
            return jax.value_and_grad(fn)(params)

    ref_loss, ref_grad = loss_and_grad(ref_model)
    calls = _cudnn_through_xla(monkeypatch, nan_in_masked_key_gradients=True)
    monkeypatch.setattr(attention, "_HALF", ("bfloat16", "float16", "float32"))  # the kernel is XLA's here
    model = models.build(name, attention="cudnn", cudnn_token_multiple=2, **size)
    loss, grad = loss_and_grad(model)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, images, noise=noise).loss)(params))
    padded_inputs = ["f32[4,18,64]", "f32[4,66,32]"] if name == "mae_vit_base" else ["f32[4,66,64]"]
    assert all(shape in jaxpr for shape in padded_inputs)  # the stacks' streams, padded
    assert calls and all(c[1][1] % 2 == 0 and c[2] for c in calls)
    assert rel(loss, ref_loss) < 1e-6
    captured = model.apply({"params": params}, images, noise=noise, capture=True).intermediates
    assert captured["decoder"]["attn"].shape[-2:] == (65, 65)  # capture never pads the stream
    _assert_gradients_match(grad, ref_grad)


def _assert_gradients_match(grad, ref_grad):
    """Per leaf, within 1e-5 of the leaf's norm or of a thousandth of the whole gradient's (a key
    bias's gradient is zero up to rounding: softmax does not see a shift shared by every key)."""
    floor = 1e-3 * float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ref_grad))))
    paths = jax.tree_util.tree_leaves_with_path(grad)
    for (path, g), ref_g in zip(paths, jax.tree.leaves(ref_grad), strict=True):
        error = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(ref_g, np.float64))
        assert error < 1e-5 * max(np.linalg.norm(ref_g), floor), jax.tree_util.keystr(path)


def test_the_classifiers_stream_carries_padded_rows_exactly(monkeypatch):
    """Fine-tuning's classifier takes the autoencoder's attention and padding: its encoder
    stack carries cuDNN's zero row too (65 -> 66 tokens), with the same logits (fp32, XLA
    answering the kernel call)."""
    import flax.linen as nn

    from crate_jax.evaluation import classifier

    mae = models.build("crate_mae_tiny", **TINY)
    build = lambda m: classifier.from_autoencoder(m, num_classes=10, head="finetune", pool="cls", head_init_std=0.1)  # noqa: E731
    ref_model = build(mae)
    variables = nn.unbox(classifier.init_variables(ref_model)(jax.random.key(0)))
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    highest = jax.default_matmul_precision("highest")  # no TF32 on a GPU: the padding, not the products
    with highest:
        ref = ref_model.apply(variables, images)
    calls = _cudnn_through_xla(monkeypatch)
    monkeypatch.setattr(attention, "_HALF", ("bfloat16", "float16", "float32"))  # the kernel is XLA's here
    model = build(mae.clone(attention="cudnn"))
    assert model.layer_kwargs["attention"] == "cudnn" and model.layer_kwargs["cudnn_token_multiple"] == 2
    with highest:
        out = model.apply(variables, images)
    assert "f32[4,66,64]" in str(jax.make_jaxpr(lambda v: model.apply(v, images))(variables))
    assert calls and all(c[1][1] == 66 and c[2] for c in calls)
    assert rel(out, ref) < 1e-6


@pytest.mark.parametrize("name, multiple", [("crate_mae_tiny", 128), ("mae_vit_base", 128), ("crate_mae_tiny", 2)])
def test_cudnn_path_in_bf16_against_fp32(monkeypatch, name, multiple):
    """The cuDNN implementation's whole path (bf16, padding, masks) within the GPU test's
    tolerances of the fp32 default: loss 1e-2 relative, predictions 5e-2."""
    size = dict(TINY, decoder_width=32, decoder_depth=2, decoder_num_heads=4) if name == "mae_vit_base" else TINY
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(4, 64)).astype(np.float32)
    ref_model = models.build(name, **size)
    params = ref_model.init(jax.random.key(0), images)["params"]
    ref = ref_model.apply({"params": params}, images, noise=noise)
    calls = _cudnn_through_xla(monkeypatch)
    model = models.build(name, attention="auto", dtype="bfloat16", cudnn_token_multiple=multiple, **size)
    out = model.apply({"params": params}, images, noise=noise)
    # 65 tokens: padded to 128, or to 66 with multiple 2 (the padded keys masked either way)
    assert calls and all(c[0] == "cudnn" and c[1][1] == -(-65 // multiple) * multiple and c[2] for c in calls)
    assert rel(out.loss, ref.loss) < 1e-2
    assert rel(out.pred, ref.pred) < 5e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a CUDA GPU")
@pytest.mark.parametrize("tokens, multiple, prepadded", [(197, 2, True), (197, 128, False), (50, 2, False)])
def test_cudnn_kernel_at_the_base_models_token_counts(tokens, multiple, prepadded):
    """cuDNN's kernel as CRATE-MAE-B's step calls it (12 heads of 64; 197 tokens padded to 198
    in the layers' stream, or to 256 around the call; the visible-only encoder's 50, no mask),
    output and gradient in bf16 against the fp32 symmetric form."""
    u = _u(batch=8, tokens=tokens, heads=12, head_dim=64) * 0.3
    rows = attention.stream_tokens(tokens, multiple) if prepadded else tokens
    assert rows == (198 if prepadded else tokens)

    def fused(x):
        out = attention.mssa(attention.pad_tokens(x, rows), 0.125, "cudnn", multiple, valid=tokens)
        return out[:, :tokens]

    ref = lambda x: attention.mssa(x, 0.125, "symmetric")  # noqa: E731
    ub = u.astype(jnp.bfloat16)
    assert rel(jax.jit(fused)(ub), ref(u)) < 2e-2
    assert rel(jax.jit(jax.grad(_loss(fused)))(ub), jax.grad(_loss(ref))(u)) < 5e-2
    if prepadded:  # the gradient the padded stream gets: finite, zero in the padded row
        on_stream = lambda x: attention.mssa(x, 0.125, "cudnn", multiple, valid=tokens)  # noqa: E731
        g = jax.jit(jax.grad(lambda x: jnp.sum(on_stream(x)[:, :tokens].astype(jnp.float32))))(
            attention.pad_tokens(ub, rows)
        )
        assert bool(jnp.all(jnp.isfinite(g))) and not bool(jnp.any(g[:, tokens:]))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(198, 197, 12, 64), (256, 197, 12, 64), (50, 50, 12, 64), (198, 197, 16, 32)])
def test_cudnn_kernel_passes_its_check_at_the_base_models_shapes(shape):
    """The check a GPU step runs before using the kernel (`check_cudnn_kernel`), at CRATE-MAE-B's
    and ViT-MAE-B's calls: 197 tokens carried as 198 or padded to 256, the visible 50, and
    ViT-MAE-B's decoder (16 heads of 32). A failure here means the step falls back (logged)."""
    assert attention.check_cudnn_kernel(*shape, jnp.bfloat16) is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a CUDA GPU")
@pytest.mark.parametrize(
    "name, multiple", [("crate_mae_tiny", 2), ("mae_vit_base", 2), ("crate_mae_tiny", 128), ("mae_vit_base", 128)]
)
def test_cudnn_kernel_on_gpu_against_fp32(name, multiple):
    size = dict(TINY, decoder_width=32, decoder_depth=2, decoder_num_heads=4) if name == "mae_vit_base" else TINY
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(4, 64)).astype(np.float32)
    ref_model = models.build(name, attention="autodiff", **size)
    params = ref_model.init(jax.random.key(0), images)["params"]

    def loss_and_grad(model):
        fn = lambda p: model.apply({"params": p}, images, noise=noise).loss  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(params), model.apply({"params": params}, images, noise=noise).pred

    (ref_loss, ref_grad), ref_pred = loss_and_grad(ref_model)
    cudnn = models.build(name, attention="cudnn", dtype="bfloat16", cudnn_token_multiple=multiple, **size)
    (loss, grad), pred = loss_and_grad(cudnn)
    assert rel(loss, ref_loss) < 1e-2
    assert rel(pred, ref_pred) < 5e-2
    assert rel(jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad)]),
               jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref_grad)])) < 5e-2  # fmt: skip


def _kernel_standing_in(monkeypatch, rejects=None, ignores_the_mask=False):
    """`_cudnn_through_xla` with a kernel that misbehaves: raises JAX's error where
    `rejects(tokens)`, or attends to the padded keys (drops `key_value_seq_lengths`)."""
    calls = _cudnn_through_xla(monkeypatch)
    through_xla = jax.nn.dot_product_attention

    def kernel(q, k, v, *, implementation=None, **kwargs):
        if implementation == "cudnn" and rejects and rejects(q.shape[1]):
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        if implementation == "cudnn" and ignores_the_mask:
            kwargs.pop("key_value_seq_lengths", None)
        return through_xla(q, k, v, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", kernel)
    return calls


def test_the_kernel_check_passes_an_exact_kernel_and_catches_a_wrong_one(monkeypatch):
    """`check_cudnn_kernel`, run on a GPU at each call shape before a step uses the kernel:
    None for a kernel that computes the masked attention, the reason for one that rejects the
    shape or lets a padded key through (its large key and value make the error O(1))."""
    _cudnn_through_xla(monkeypatch)
    for shape in [(198, 197, 2, 16), (50, 50, 3, 8), (256, 197, 2, 16)]:
        assert attention.check_cudnn_kernel(*shape, jnp.bfloat16) is None
    _kernel_standing_in(monkeypatch, ignores_the_mask=True)
    reason = attention.check_cudnn_kernel(198, 197, 2, 16, jnp.bfloat16)
    assert reason.startswith("differs from XLA's attention: output")
    assert float(reason.split("output ")[1].split(",")[0]) > 0.3  # O(1), not bf16 noise
    assert attention.check_cudnn_kernel(50, 50, 2, 16, jnp.bfloat16) is None  # nothing padded, nothing to let through
    _kernel_standing_in(monkeypatch, rejects=lambda n: n % 128)
    assert attention.check_cudnn_kernel(198, 197, 2, 16, jnp.bfloat16) == (
        "NotImplementedError: Unsupported sequence length Q 198, KV 198."
    )


@pytest.mark.parametrize("scan, broken", [(False, "rejects 66"), (True, "lets padded keys through")])
def test_a_kernel_failing_its_check_is_replaced_exactly(monkeypatch, scan, broken):
    """Where the check fails on the GPU (here: the process made to look like one), the jitted
    step takes the next path that passes, with the same loss and gradients: the real rows
    padded to whole 128-token tiles around the call (a kernel rejecting 66 tokens), else XLA's
    attention (a kernel that attends to padded keys at any count). Each shape is checked once
    and its outcome kept in `CUDNN_CHECKS`."""
    size = dict(TINY, scan_layers=scan)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(4, 64)).astype(np.float32)
    ref_model = models.build("crate_mae_tiny", **size)
    params = ref_model.init(jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)

    def loss_and_grad(model):
        fn = lambda p: model.apply({"params": p}, images, noise=noise).loss  # noqa: E731
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(fn))(params)

    ref_loss, ref_grad = loss_and_grad(ref_model)
    if broken == "rejects 66":
        calls = _kernel_standing_in(monkeypatch, rejects=lambda n: n % 128)
    else:
        calls = _kernel_standing_in(monkeypatch, ignores_the_mask=True)
    monkeypatch.setattr(attention, "_HALF", ("bfloat16", "float16", "float32"))  # the kernel is XLA's here
    monkeypatch.setattr(attention, "_on_gpu_devices", lambda: True)
    monkeypatch.setattr(attention, "CUDNN_CHECKS", {})
    model = models.build("crate_mae_tiny", attention="cudnn", cudnn_token_multiple=2, **size)
    loss, grad = loss_and_grad(model)
    checks = attention.CUDNN_CHECKS
    assert set(checks) == {(66, 65, 4, 16, "float32"), (128, 65, 4, 16, "float32")}
    assert checks[(66, 65, 4, 16, "float32")]
    step_calls = {(c[0], c[1][1]) for c in calls if c[1][0] == 4}  # the step's, not the check's (batch 2)
    if broken == "rejects 66":
        assert checks[(128, 65, 4, 16, "float32")] is None and step_calls == {("cudnn", 128)}
    else:
        assert checks[(128, 65, 4, 16, "float32")] and step_calls == {("xla", 65)}
    assert rel(loss, ref_loss) < 1e-6
    _assert_gradients_match(grad, ref_grad)
