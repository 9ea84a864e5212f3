"""Evaluation: linear probes (FAIR's and the logistic one), fine-tuning, k-NN, their configs.

Tiny CRATE-MAE (width 64, 2 layers, 32 px, patch 4) with random weights as the "pretrained"
checkpoint; the trained protocols run in-process through `main.run` on the
embedded dataset built into a temporary data dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crate_jax import api, checkpoint, data, main, models
from crate_jax.config_file import load_config
from crate_jax.evaluation import classifier, classify, finetune, knn, linear_probe, llrd, logistic, mixup
from crate_jax.models.crate import EncoderLayer
from crate_jax.models.layers import sincos_table_2d

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2, decoder_depth=2, decoder_num_heads=4)
DATASETS = ("imagenet2012", "cifar10", "cifar100", "oxford_flowers102", "oxford_iiit_pet", "embedded")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return data.ensure_built(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random tiny CRATE-MAE saved as a params-only checkpoint: (dir, model, params)."""
    model = models.build("crate_mae_tiny", **TINY)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    path = tmp_path_factory.mktemp("pretrained")
    checkpoint.save_params(path, params, {"model": checkpoint.model_spec("crate_mae_tiny", TINY), "step": 0})
    return str(path), model, params


def tiny_config(name: str, pretrained_dir: str, data_dir: str, **overrides):
    config = load_config(f"{ROOT}/configs/{name}.py:dataset=embedded,runlocal")
    config.unlock()
    config.init_from, config.data.data_dir = pretrained_dir, data_dir
    if name != "knn":
        config.update(batch_size=8, total_steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2)
        config.update(eval_steps=1, eval_batch_size=8)
        config.optim.warmup_steps = 1
    for key, value in overrides.items():
        target, *path = key.split(".")
        node = config
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
    config.lock()
    return config


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def encoder_part(params, like) -> dict:
    """The encoder's parameters in `params` (those of the classifier `like` other than the head
    and the learned position table, which the autoencoder holds as a fixed table)."""
    return {k: params[k] for k in like if k not in ("head", "pos_embed")}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["linear_probe", "finetune", "knn"])
def test_configs_load_and_build_abstractly(name):
    for dataset in DATASETS:
        config = load_config(f"{ROOT}/configs/{name}.py:dataset={dataset}")
        assert config.task == name and config.num_classes >= 10
        models.model_fields(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
        if name != "knn":
            assert config.optim.warmup_steps < config.total_steps
    config = load_config(f"{ROOT}/configs/{name}.py:dataset=cifar10")
    assert config.model.image_size == 224 and config.num_classes == 10
    if name == "knn":
        assert (config.knn.k, config.knn.temperature) == (20, 0.07)
        return
    head = "probe" if name == "linear_probe" else "finetune"
    model, spec = classify.make_classifier(config, head, config.get("drop_path_rate", 0.0))
    variables = nn.unbox(jax.eval_shape(classifier.init_variables(model), jax.random.key(0)))
    assert variables["params"]["head"]["fc"]["kernel"].shape == (768, 10)
    assert spec["classifier"]["num_classes"] == 10 and "decoder" not in variables["params"]
    with pytest.raises(ValueError, match="dataset"):
        load_config(f"{ROOT}/configs/{name}.py:dataset=mnist")


def test_recipes():
    probe = load_config(f"{ROOT}/configs/linear_probe.py:dataset=imagenet2012")
    assert (probe.batch_size, probe.optim.base_lr, probe.optim.momentum, probe.optim.weight_decay) == (
        16384,
        0.1,
        0.9,
        0,
    )
    assert probe.total_steps == math.ceil(90 * 1_281_167 / 16384) and probe.head.init_std == 0.01
    tune = load_config(f"{ROOT}/configs/finetune.py:dataset=cifar100")
    assert (tune.batch_size, tune.optim.base_lr, tune.optim.layer_decay, tune.drop_path_rate) == (512, 5e-4, 0.65, 0.1)
    assert (tune.augment.mixup, tune.augment.cutmix, tune.augment.label_smoothing) == (0.8, 1.0, 0.1)
    assert tune.total_steps == math.ceil(100 * 50_000 / 512) and tune.head.pool == "mean"


# ----------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize("name,pool", [("crate_mae_tiny", "cls"), ("mae_vit_small", "mean")])
def test_classifier_features_are_the_encoders(name, pool):
    mae = models.build(name, **(TINY if name.startswith("crate") else dict(TINY, decoder_width=64)))
    params = nn.unbox(jax.jit(mae.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    model = classifier.from_autoencoder(mae, num_classes=64, head="probe", pool=pool, head_init_std=0.01)
    abstract = nn.unbox(jax.eval_shape(classifier.init_variables(model), jax.random.key(0)))["params"]
    clf_params = classifier.encoder_params(params, abstract)
    assert set(clf_params) == {"patch_embed", "cls_token", "encoder", "norm"}
    clf_params["head"] = {"fc": {"kernel": jnp.eye(64), "bias": jnp.zeros(64)}}  # identity head
    stats = {"head": {"bn": {"mean": jnp.zeros(64), "var": jnp.ones(64)}}}
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    logits = model.apply({"params": clf_params, "batch_stats": stats}, images)
    expected = api.encode(mae, params, images, pool=pool)
    np.testing.assert_allclose(logits * np.sqrt(1 + 1e-6), expected, rtol=1e-5, atol=1e-5)


def test_drop_path_only_in_training():
    x = jax.random.normal(jax.random.key(0), (16, 5, 32))
    layer = EncoderLayer(32, 2, deterministic=False)
    params = layer.init(jax.random.key(1), x)["params"]
    deterministic, _ = layer.clone(deterministic=True).apply({"params": params}, x, 0.5)
    plain, _ = EncoderLayer(32, 2).apply({"params": params}, x)
    np.testing.assert_array_equal(deterministic, plain)

    def scaled_branch(factor):  # the MSSA output scaled: 0 = dropped, 2 = kept and divided by 1 - 0.5
        p = jax.tree_util.tree_map_with_path(
            lambda path, v: v * factor if "to_out" in jax.tree_util.keystr(path) else v, params
        )
        return EncoderLayer(32, 2).apply({"params": p}, x)[0]

    dropped, kept = scaled_branch(0.0), scaled_branch(2.0)
    trained, _ = layer.apply({"params": params}, x, 0.5, rngs={"dropout": jax.random.key(2)})
    is_dropped = np.all(np.isclose(trained, dropped, atol=1e-5), axis=(1, 2))
    is_kept = np.all(np.isclose(trained, kept, atol=1e-5), axis=(1, 2))
    assert np.all(is_dropped ^ is_kept) and 0 < is_dropped.sum() < 16


def test_vit_classifier_takes_drop_path():
    mae = models.build("mae_vit_small", **dict(TINY, decoder_width=64, scan_layers=True))
    model = classifier.from_autoencoder(
        mae, num_classes=10, head="finetune", pool="mean", head_init_std=0.01, drop_path_rate=0.1
    )
    variables = nn.unbox(jax.jit(classifier.init_variables(model))(jax.random.key(0)))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    plain = model.clone(drop_path_rate=0.0).apply(variables, images)
    np.testing.assert_array_equal(model.apply(variables, images), plain)  # evaluation: no drop-path
    trained = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.all(np.isfinite(trained)) and not np.allclose(trained, plain, atol=1e-6)


# ----------------------------------------------------------------------------- trained protocols


def test_linear_probe_fair_trains_the_head_only(tmp_path, pretrained, data_dir):
    path, _, params = pretrained
    config = tiny_config("linear_probe", path, data_dir)
    main.run(config, str(tmp_path))
    model, variables = classifier.load_classifier(str(tmp_path))
    assert model.head == "probe" and model.num_classes == 16
    trained = variables["params"]
    assert_trees_equal(encoder_part(trained, trained), encoder_part(models.to_layout(params, False), trained))
    np.testing.assert_array_equal(trained["pos_embed"][0], sincos_table_2d(64, 8, 8))  # frozen at the MAE's table
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))["params"]
    fresh = classify.initial_params_fn(config, model)(abstract)["head"]
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), fresh, variables["params"]["head"])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(variables["batch_stats"]["head"]["bn"]["var"], 1.0)  # statistics were updated
    evals = [r for r in rows(tmp_path) if "eval_accuracy" in r]
    assert evals[-1]["step"] == 2 and 0.0 <= evals[-1]["eval_accuracy"] <= 1.0
    assert json.loads((tmp_path / "linear_probe.json").read_text())["eval_accuracy"] == evals[-1]["eval_accuracy"]
    logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 16)


def test_linear_probe_optimizer_keeps_no_encoder_state():
    config = load_config(f"{ROOT}/configs/linear_probe.py:dataset=embedded")
    params = {"encoder": {"w": jnp.ones((64, 64))}, "head": {"kernel": jnp.ones((64, 18)), "bias": jnp.ones(18)}}
    tx = linear_probe.make_optimizer(config, optax.constant_schedule(0.1), params)
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sorted(sizes) == [18, 64 * 18]  # the head's momentum only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.any(updates["encoder"]["w"]) and np.all(updates["head"]["kernel"] != 0)


def test_finetune_trains_everything_with_mixup(tmp_path, pretrained, data_dir):
    path, _, params = pretrained
    config = tiny_config("finetune", path, data_dir, grad_accum_steps=2, **{"model.scan_layers": True})
    last = main.run(config, str(tmp_path))
    assert np.isfinite(last["loss"])
    model, variables = classifier.load_classifier(str(tmp_path))
    assert (model.head, model.pool, model.scan_layers) == ("finetune", "mean", True)
    assert "norm" not in variables["params"]
    unrolled, unrolled_variables = classifier.load_classifier(str(tmp_path), scan_layers=False)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(
        model.apply(variables, images), unrolled.apply(unrolled_variables, images), rtol=1e-5, atol=1e-6
    )
    before = models.to_layout(params, True)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), variables["params"]["encoder"], before["encoder"])
    assert all(jax.tree.leaves(changed))
    assert [r["step"] for r in rows(tmp_path) if "eval_accuracy" in r] == [2]


def test_layer_wise_lr_decay():
    depth, decay = 3, 0.5
    mae = models.build("crate_mae_tiny", **dict(TINY, depth=depth))
    for scan in (False, True):
        model = classifier.from_autoencoder(
            mae.clone(scan_layers=scan), num_classes=5, head="finetune", pool="mean", head_init_std=0.0
        )
        params = nn.unbox(jax.eval_shape(classifier.init_variables(model), jax.random.key(0)))["params"]
        mult = llrd.lr_multipliers(params, depth, decay)
        assert mult["cls_token"] == mult["patch_embed"]["proj"]["kernel"] == decay ** (depth + 1)
        assert mult["head"]["fc"]["kernel"] == mult["head"]["fc_norm"]["scale"] == 1.0
        if scan:
            qkv = mult["encoder"]["layers"]["mssa"]["qkv"]["kernel"]
            assert qkv.shape == (depth, 1, 1)
            np.testing.assert_allclose(qkv.ravel(), [decay**3, decay**2, decay**1])
        else:
            for i in range(depth):
                assert mult["encoder"][f"layer_{i}"]["ista"]["D"] == decay ** (depth - i)
        # The optimizer applies them: AdamW's first step is lr x sign(grad), here scaled per layer.
        config = load_config(f"{ROOT}/configs/finetune.py:dataset=embedded")
        config.unlock()
        config.optim.weight_decay, config.optim.layer_decay = 0.0, decay
        tx = finetune.make_optimizer(config, optax.constant_schedule(0.1), params, depth)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape), params)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, zeros), tx.init(zeros), zeros)
        expected = jax.tree.map(lambda u, m: -0.1 * np.broadcast_to(m, u.shape), updates, mult)
        jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5), updates, expected)


def test_mixup_cutmix_and_smoothing():
    images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    labels = jnp.arange(8) % 4
    kw = dict(num_classes=4, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    smooth = mixup.smooth_one_hot(labels, 4, 0.1)
    np.testing.assert_allclose(smooth[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
    out, targets, lam = mixup.mix(jax.random.key(1), images, labels, mixup_alpha=0.8, cutmix_alpha=0.0, **kw)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-6)
    lams = []
    for seed in range(6):
        out, targets, lam = mixup.mix(jax.random.key(seed), images, labels, mixup_alpha=0.0, cutmix_alpha=1.0, **kw)
        from_reversed = np.all(np.asarray(out) == np.asarray(images[::-1]), axis=-1)
        assert np.all(from_reversed | np.all(np.asarray(out) == np.asarray(images), axis=-1))
        np.testing.assert_allclose(1 - from_reversed[0].mean(), lam, rtol=1e-6)  # lam = area kept
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        lams.append(float(lam))
    assert len(set(lams)) > 1
    out, targets, lam = mixup.mix(jax.random.key(0), images, labels, mixup_alpha=0.0, cutmix_alpha=0.0, **kw)
    assert float(lam) == 1.0 and out is images and np.allclose(targets, smooth)


# ----------------------------------------------------------------------------- frozen-feature protocols


def test_knn_votes_are_exact():
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    bank_labels = np.array([0, 1, 1, 2])
    queries = np.array([[2.0, 0.0], [-1.0, 0.1]])
    t = 0.5
    scores = knn.classify(bank, bank_labels, queries, num_classes=3, k=3, temperature=t)
    # Query 0: cosines 1, 0, 1/sqrt(2), -1 -> neighbours 0, 2, 1.
    np.testing.assert_allclose(scores[0], [np.exp(1 / t), np.exp(0 / t) + np.exp(2**-0.5 / t), 0.0], rtol=1e-5)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    c = [cos(queries[1], b) for b in bank]  # about -0.995, 0.0995, -0.633, 0.995: neighbours 3, 1, 2
    np.testing.assert_allclose(scores[1], [0.0, np.exp(c[1] / t) + np.exp(c[2] / t), np.exp(c[3] / t)], rtol=1e-5)
    assert knn.accuracies(scores, np.array([0, 2])) == {"top1": 1.0, "top5": 1.0}
    assert knn.accuracies(scores, np.array([1, 1]))["top1"] == 0.0


def test_logistic_separates_two_clouds():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16)) * 4
    x = np.concatenate([c + rng.normal(size=(200, 16)) for c in centres]).astype(np.float32)
    y = np.repeat([0, 1], 200)
    order = rng.permutation(400)
    x, y = x[order], y[order]
    out = logistic.select_and_fit(
        x[:300], y[:300], x[300:], y[300:], num_classes=2, l2_grid=[1e-4, 1e-2, 1.0], holdout_fraction=0.2, seed=0,
        max_iters=200, tol=1e-5,
    )  # fmt: skip
    assert out["eval_accuracy"] == 1.0 and out["holdout_accuracy"] == 1.0 and out["l2"] in (1e-4, 1e-2, 1.0)
    assert set(out["sweep"]) == {"1", "0.01", "0.0001"}


def test_knn_and_logistic_tasks_write_results(tmp_path, pretrained, data_dir):
    path, _, _ = pretrained
    metrics = knn.run(tiny_config("knn", path, data_dir), str(tmp_path / "knn"))
    saved = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert saved["knn_accuracy"] == metrics["knn_accuracy"] and saved["bank_size"] == 1024
    assert saved["num_queries"] == 512 and rows(tmp_path / "knn")[0]["knn_accuracy"] == metrics["knn_accuracy"]
    config = tiny_config("linear_probe", path, data_dir, protocol="logistic", **{"logistic.l2_grid": [1e-3, 1e-1]})
    metrics = linear_probe.run(config, str(tmp_path / "logistic"))
    saved = json.loads((tmp_path / "logistic" / "linear_probe_logistic.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"] > 1 / 16 and saved["num_train"] == 1024
    assert "eval_accuracy" in rows(tmp_path / "logistic")[0]
