"""The paper's CRATE-MAE (Pai et al., ICLR 2024) as options and `crate_mae_paper_*` presets.

Each option is held against its equation through an exact identity with the released model
(same parameters, one of them rewritten): the pixel-space mask token m is the released
embedding-space token W_pre m + b; the book's zeros are the released token set to 0; a learned
table holding the sin-cos values is the fixed table; subtracting E before the output layer
changes the prediction by exactly -E W_post. Tiny models: width 64, 2 layers, 32 px, batch 8.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crate_jax
from crate_jax import analyze, checkpoint, data, main, models, sharding
from crate_jax.analysis import attention
from crate_jax.config_file import load_config
from crate_jax.evaluation import classifier, knn, llrd
from crate_jax.models.layers import patchify, sincos_table_2d, unpatchify
from crate_jax.models.mae import RELEASE_LAYOUT
from crate_jax.models.presets import PAPER_OPTIONS
from crate_jax.tools import export_torch, flops, import_torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2, decoder_depth=2, decoder_num_heads=4)
SIZES = ("tiny", "small", "base", "large")
RTOL, ATOL = 1e-5, 1e-5


def init(model):
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])


@pytest.fixture(scope="module")
def batch():
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(2), (8, 64))
    return images, noise


@functools.partial(jax.jit, static_argnames=("model", "interpolate_pos"))
def forward(model, params, images, noise, interpolate_pos=False):
    return model.apply({"params": params}, images, noise=noise, interpolate_pos=interpolate_pos)


@functools.partial(jax.jit, static_argnames=("model",))
def loss_grad(model, params, images, noise):
    return jax.grad(lambda p: model.apply({"params": p}, images, noise=noise).loss)(params)


def assert_close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("size", SIZES)
def test_paper_presets_are_the_release_sizes_with_the_papers_options(size):
    _, paper = models.model_fields(f"crate_mae_paper_{size}")
    _, release = models.model_fields(f"crate_mae_{size}")
    assert {k: paper[k] for k in PAPER_OPTIONS} == PAPER_OPTIONS
    assert (paper["ista_step"], paper["ista_lambda"]) == (0.1, 0.5)
    assert (paper["cls_token"], paper["mask_token_space"], paper["position_table"]) == (False, "pixel", "learned")
    assert paper["subtract_position_table"] and paper["loss_patches"] == "all"
    for key in ("width", "num_heads", "depth", "decoder_depth", "decoder_num_heads", "image_size", "patch_size"):
        assert paper[key] == release[key], key
    # The released presets keep the released layout and loss.
    model = models.build(f"crate_mae_{size}")
    assert model.release_layout_differences() == {} and model.loss_patches == "masked"
    assert {k: getattr(model, k) for k in RELEASE_LAYOUT} == RELEASE_LAYOUT


@pytest.mark.parametrize("size", SIZES)
def test_paper_parameter_counts(size):
    paper, release = models.count_params(f"crate_mae_paper_{size}"), models.count_params(f"crate_mae_{size}")
    d, tokens, pixels = models.build(f"crate_mae_{size}").width, 196, 16 * 16 * 3
    # No cls token, a P*P*3 mask token instead of a d one, a learned (L, d) table.
    assert paper["trainable"] == release["trainable"] - 2 * d + pixels + tokens * d
    assert paper["as_released"] is None  # no released layout to count
    print(f"crate_mae_paper_{size}: {paper['trainable'] / 1e6:.2f}M")


@pytest.mark.parametrize("variant", [f"paper_{s}" for s in SIZES])
def test_pretraining_config_carries_the_presets_options(variant):
    config = load_config(f"{ROOT / 'configs' / 'imagenet_mae.py'}:variant={variant}")
    assert config.model.name == f"crate_mae_{variant}"
    _, fields = models.model_fields(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
    assert {k: fields[k] for k in PAPER_OPTIONS} == PAPER_OPTIONS
    assert config.model.remat == ("dots" if variant.endswith("large") else "none")
    release = load_config(f"{ROOT / 'configs' / 'imagenet_mae.py'}:variant={variant[len('paper_') :]}")
    _, fields = models.model_fields(release.model.name, **{k: v for k, v in release.model.items() if k != "name"})
    assert {k: fields[k] for k in RELEASE_LAYOUT} == RELEASE_LAYOUT and fields["loss_patches"] == "masked"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(mask_token_space="pixels"), "model.mask_token_space"),
        (dict(position_table="fixed"), "model.position_table"),
        (dict(cls_token="no"), "model.cls_token"),
        (dict(subtract_position_table=1), "model.subtract_position_table"),
        (dict(mask_token_space="pixel", encoder_tokens="visible"), "model.mask_token_space='pixel'"),
    ],
)
def test_bad_options_are_one_line_errors(overrides, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")) as err:
        models.build("crate_mae_tiny", **TINY, **overrides)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- mask token space


def test_pixel_mask_token_replaces_the_patches_before_the_embedding(batch):
    images, noise = batch
    pixel = models.build("crate_mae_tiny", **TINY, mask_token_space="pixel")
    params = init(pixel)
    token = params["mask_token"]
    assert token.shape == (1, 1, 48)
    # x_i <- m for hidden i, then W_pre x_i + b: the released model with mask token W_pre m + b.
    kernel, bias = params["patch_embed"]["proj"]["kernel"], params["patch_embed"]["proj"]["bias"]
    released = dict(params, mask_token=(token @ kernel + bias).reshape(1, 1, 64))
    ours = forward(pixel, params, images, noise)
    ref = forward(models.build("crate_mae_tiny", **TINY), released, images, noise)
    assert_close(ours.latent, ref.latent)
    assert_close(ours.pred, ref.pred)
    # The hidden patches' pixels never reach the model; only the loss target sees them.
    hidden = unpatchify(patchify(images, 4) + 10.0 * ours.mask[..., None], 4)
    other = forward(pixel, params, hidden, noise)
    assert_close(other.latent, ours.latent, atol=1e-6)
    assert float(other.loss) > float(ours.loss)
    grads = loss_grad(pixel, params, images, noise)
    assert float(jnp.abs(grads["mask_token"]).max()) > 0


@pytest.mark.parametrize("encoder_tokens", ["all", "visible"])
def test_zeros_are_the_released_token_set_to_zero(batch, encoder_tokens):
    images, noise = batch
    zeros = models.build("crate_mae_tiny", **TINY, mask_token_space="zeros", encoder_tokens=encoder_tokens)
    params = init(zeros)
    assert "mask_token" not in params
    released = models.build("crate_mae_tiny", **TINY, encoder_tokens=encoder_tokens)
    ref = forward(released, dict(params, mask_token=jnp.zeros((1, 1, 64))), images, noise)
    out = forward(zeros, params, images, noise)
    assert_close(out.pred, ref.pred)
    assert_close(out.loss, ref.loss)


# ----------------------------------------------------------------------------- position table


@pytest.mark.parametrize("cls_token", [True, False])
def test_learned_table_holding_the_sincos_values_is_the_fixed_table(batch, cls_token):
    images, noise = batch
    learned = models.build("crate_mae_tiny", **TINY, position_table="learned", cls_token=cls_token)
    fixed = models.build("crate_mae_tiny", **TINY, cls_token=cls_token)
    params = init(learned)
    assert params["pos_embed"].shape == (1, 64 + cls_token, 64)
    table = sincos_table_2d(64, 8, 8, cls_token=cls_token)[None]
    params = dict(params, pos_embed=jnp.asarray(table))
    fixed_params = {k: v for k, v in params.items() if k != "pos_embed"}
    assert_close(forward(learned, params, images, noise).pred, forward(fixed, fixed_params, images, noise).pred)
    # At another size the learned table is resampled as the fixed one is (DINO's bicubic).
    big = jax.random.normal(jax.random.key(3), (2, 48, 48, 3))
    big_noise = jnp.zeros((2, 144))
    a = forward(learned.clone(mask_ratio=0.0), params, big, big_noise, interpolate_pos=True)
    b = forward(fixed.clone(mask_ratio=0.0), fixed_params, big, big_noise, interpolate_pos=True)
    assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-4)
    grads = loss_grad(learned, params, images, noise)
    assert float(jnp.abs(grads["pos_embed"]).max()) > 0


@pytest.mark.parametrize("name", ["crate_mae_tiny", "crate_mae_paper_tiny"])
def test_subtracting_the_table_before_the_output_layer(batch, name):
    images, noise = batch
    sub = models.build(name, **TINY, subtract_position_table=True)
    plain = sub.clone(subtract_position_table=False)
    params = init(sub)
    if "pos_embed" in params:
        table = params["pos_embed"][0]
    else:
        table = jnp.asarray(sincos_table_2d(64, 8, 8))
    # W_post (LN(Z) - E) + b = (W_post LN(Z) + b) - E W_post, on the patch rows.
    kernel = params["decoder_pred"]["kernel"]
    expected = forward(plain, params, images, noise).pred - (table[sub.num_prefix_tokens :] @ kernel)[None]
    assert_close(forward(sub, params, images, noise).pred, expected)


def test_new_parameters_carry_logical_axes_and_are_born_sharded():
    model = models.build("crate_mae_paper_tiny", **TINY)
    boxed = models.abstract_params(model, boxed=True)
    assert boxed["pos_embed"].names == (None, None, "embed")
    assert boxed["mask_token"].names == (None, None, "patch")
    config = load_config(f"{ROOT / 'configs' / 'imagenet_mae.py'}:variant=paper_tiny")
    mesh = sharding.make_mesh(config.mesh)
    shardings = sharding.logical_shardings(boxed, mesh, sharding.axis_rules(config))
    assert shardings["pos_embed"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")


# ----------------------------------------------------------------------------- no cls token


def test_no_cls_token_features_are_the_mean_token(batch):
    images, noise = batch
    mae = models.build("crate_mae_paper_tiny", **TINY)
    params = init(mae)
    assert "cls_token" not in params and mae.num_prefix_tokens == 0
    out = forward(mae, params, images, noise)
    assert out.latent.shape == (8, 64, 64) and out.pred.shape == (8, 64, 48)
    unmasked = forward(mae.clone(mask_ratio=0.0), params, images, jnp.zeros((8, 64)))
    mean = unmasked.latent.mean(axis=1)
    assert_close(crate_jax.encode(mae, params, images, pool="cls"), mean)
    assert_close(crate_jax.encode(mae, params, images, pool="mean"), mean)
    for head, pool in (("probe", "cls"), ("finetune", "cls"), ("probe", "mean")):
        model = classifier.from_autoencoder(mae, num_classes=64, head=head, pool=pool, head_init_std=0.01)
        assert (model.pool, model.cls_token, model.position_table) == ("mean", False, "learned")
        abstract = nn.unbox(jax.eval_shape(classifier.init_variables(model), jax.random.key(0)))["params"]
        clf = classifier.encoder_params(params, abstract)
        assert set(clf) == {"patch_embed", "pos_embed", "encoder", "norm"} - ({"norm"} if head == "finetune" else set())
        if head == "probe":  # identity head: the logits are the (batch-normalised) feature
            clf["head"] = {"fc": {"kernel": jnp.eye(64), "bias": jnp.zeros(64)}}
            stats = {"head": {"bn": {"mean": jnp.zeros(64), "var": jnp.ones(64)}}}
            logits = model.apply({"params": clf, "batch_stats": stats}, images)
            assert_close(logits * np.sqrt(1 + 1e-6), mean)
    with pytest.raises(ValueError, match="pool='cls' needs a cls token"):
        classifier.Classifier(
            arch="crate", image_size=32, patch_size=4, width=64, depth=2, num_heads=4, num_classes=3, cls_token=False
        ).init(jax.random.key(0), images[:1])


def test_attention_maps_without_a_cls_token_are_the_mean_over_queries():
    attn = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 3, 5, 5)), axis=-1)
    np.testing.assert_array_equal(attention.query_attention(attn, 1), attn[:, :, 0, 1:])
    assert_close(attention.query_attention(attn, 0), attn.sum(axis=-2) / 5)
    with pytest.raises(ValueError, match="num_prefix_tokens=2"):
        attention.query_attention(attn, 2)


def test_flops_count_the_tokens_there_are():
    paper = models.build("crate_mae_paper_base")
    n, d, px = 196, 768, 768  # no cls token: 196 tokens through 12 + 12 layers
    mssa = n * d * d + 2 * n * n * d + n * d * d
    macs = n * px * d + 12 * mssa + 12 * (n * d * d + mssa) + n * d * px
    assert flops.for_model(paper.clone(ista_fused=False)).per_image_forward == 2.0 * macs
    released = flops.for_model(models.build("crate_mae_base", ista_fused=False)).per_image_forward
    assert flops.for_model(paper.clone(ista_fused=False)).per_image_forward < released


def test_learned_table_is_an_embedding_layer_for_lr_decay():
    params = {"pos_embed": np.zeros((1, 4, 2)), "encoder": {"layer_0": {"w": np.zeros(2)}}, "norm": np.zeros(2)}
    assert llrd.layer_ids(params, depth=1) == {"pos_embed": 0, "encoder": {"layer_0": {"w": 1}}, "norm": 2}


def test_release_layout_refuses_paper_options():
    with pytest.raises(ValueError, match="released CRATE-MAE layout has no place for the paper's options"):
        import_torch.convert({}, "crate_mae_paper_tiny", **TINY)
    with pytest.raises(ValueError, match="'mask_token_space': 'zeros'"):
        import_torch.convert({}, "crate_mae_tiny", **TINY, mask_token_space="zeros")
    with pytest.raises(ValueError, match="released CRATE-MAE layout has no place"):
        export_torch.export({}, "crate_mae_paper_tiny", **TINY)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.ensure_built(str(tmp_path_factory.mktemp("tfds")))


def pretrain(workdir, data_dir, *overrides):
    command = [
        sys.executable, "-m", "crate_jax.main", "--config=configs/imagenet_mae.py:variant=paper_tiny,runlocal",
        "--config.data.name=crate_jax_embedded", "--config.data.eval_split=probe_test", "--config.log_every_steps=1",
        "--config.optim.warmup_steps=1",
        f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, data_dir):
    """crate_mae_paper_tiny trained 2 steps by the real trainer, then resumed for a third."""
    workdir = tmp_path_factory.mktemp("paper")
    pretrain(workdir, data_dir, "--config.total_steps=2", "--config.checkpoint_every_steps=2",
             "--config.eval_every_steps=2")  # fmt: skip
    pretrain(workdir, data_dir, "--config.total_steps=3", "--config.checkpoint_every_steps=1",
             "--config.eval_every_steps=3")  # fmt: skip
    return workdir


def test_paper_preset_trains_resumes_and_loads(paper_run):
    rows = [json.loads(line) for line in (paper_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the second run resumed at step 2
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    meta = checkpoint.read_meta(str(paper_run))
    assert meta["model"]["name"] == "crate_mae_paper_tiny" and meta["step"] == 3
    model, params = crate_jax.load(str(paper_run))
    assert model.release_layout_differences() == {k: PAPER_OPTIONS[k] for k in RELEASE_LAYOUT}
    assert params["mask_token"].shape == (1, 1, 48) and params["pos_embed"].shape == (1, 64, 64)
    features = crate_jax.encode(model, params, np.zeros((3, 32, 32, 3), np.float32))
    assert features.shape == (3, 64) and np.all(np.isfinite(features))


def test_paper_checkpoint_analyses(paper_run, tmp_path):
    summary = analyze.run(str(paper_run), out=str(tmp_path), num_images=8, num_show=2, batch_size=8)
    assert summary["attention_query"] == "mean" and summary["model"] == "crate_mae_paper_tiny"
    assert len(summary["coding_rate"]["encoder"]) == 2 and len(summary["sparsity"]["encoder"]) == 2
    assert np.isfinite(summary["reconstruction_loss"])
    for name in ("attention_layer1.png", "pca.png", "reconstruction.png", "depth.png"):
        assert (tmp_path / name).stat().st_size > 500, name


def eval_config(name: str, init_from, data_dir):
    config = load_config(f"{ROOT}/configs/{name}.py:dataset=embedded,runlocal")
    config.unlock()
    config.init_from, config.data.data_dir = str(init_from), data_dir
    if name != "knn":
        config.update(batch_size=8, total_steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2)
        config.update(eval_steps=1, eval_batch_size=8)
        config.optim.warmup_steps = 1
    config.lock()
    return config


def test_paper_checkpoint_probes_fine_tunes_and_knn(paper_run, data_dir, tmp_path):
    config = eval_config("knn", paper_run, data_dir)
    assert config.knn.pool == "cls"  # the default: the model's only feature, the mean, is used
    metrics = knn.run(config, str(tmp_path / "knn"))
    saved = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert saved["pool"] == "mean" and saved["knn_accuracy"] == metrics["knn_accuracy"]
    for name in ("linear_probe", "finetune"):
        config = eval_config(name, paper_run, data_dir)
        last = main.run(config, str(tmp_path / name))
        assert np.isfinite(last["loss"])
        model, variables = crate_jax.load(str(tmp_path / name))
        assert (model.cls_token, model.pool) == (False, "mean") and "pos_embed" in variables["params"]
