"""Step-for-step parity of the three trainers with PyTorch ports of FAIR's loops.

Each test starts PyTorch and JAX from the same weights (a randomised PyTorch model ->
`import_torch` -> `config.init_from`), runs the real trainer (`train.train_and_evaluate`) on
an image folder with shuffling and augmentation off, and feeds tests/torch_fair_loops.py
the same images in the dataset's order (and, for pretraining, the trainer's own masks from
`crate_jax.step.masking_noise`). fp32 on CPU, tiny models, 24 updates (4 epochs of 6, one
warmup epoch). Bounds: every update's loss |dL| / |L| <= 1e-4; every trainable tensor at
the end (and BatchNorm's running statistics) |dw| / |w| <= 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from crate_jax import api, checkpoint, data, main, step, train  # noqa: E402
from crate_jax.config_file import load_config  # noqa: E402
from crate_jax.data import folder, transforms  # noqa: E402
from crate_jax.tools import export_torch, import_torch  # noqa: E402
from tests import torch_fair_loops as fair  # noqa: E402
from tests import torch_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 16, 4, 32, 2, 2, 4
BATCH, UPDATES_PER_EPOCH, EPOCHS = 8, 6, 4
STEPS, WARMUP = UPDATES_PER_EPOCH * EPOCHS, UPDATES_PER_EPOCH
NUM_IMAGES = BATCH * UPDATES_PER_EPOCH
LOSS_RTOL, WEIGHT_RTOL = 1e-4, 1e-3
MAE_SIZE = dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, num_heads=HEADS, depth=DEPTH, decoder_depth=2,
                decoder_num_heads=HEADS)  # fmt: skip


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
    """NUM_IMAGES random 20x20 PNGs in CLASSES class folders (`train/class_k/img_i.png`)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        path = root / "train" / f"class_{i % CLASSES}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    return str(root)


def dataset_in_order(root: str) -> tuple[np.ndarray, np.ndarray]:
    """Every example of the split, in the source's order, through the (deterministic) eval transform."""
    source = folder.image_folder_source(root, "train")
    transform = transforms.get_transform("eval", IMAGE)
    examples = [transform.map(source[i]) for i in range(len(source))]
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def global_batches(root: str):
    """Update u's global batch: examples [u B, (u + 1) B) of the repeated dataset, as NCHW torch."""
    images, labels = dataset_in_order(root)
    for u in range(STEPS):
        rows = np.arange(u * BATCH, (u + 1) * BATCH) % len(images)
        yield u, torch.from_numpy(images[rows]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[rows]).long()


def epochs_of_micro_batches(root: str, accum: int, with_noise: int = 0):
    """FAIR's data loader without shuffling: per epoch, micro-batches of B / accum consecutive
    examples; pretraining's carry the masking noise the trainer drew for their rows."""
    micro = BATCH // accum
    epochs = [[] for _ in range(EPOCHS)]
    for u, images, labels in global_batches(root):
        noise = None
        if with_noise:
            noise = torch.from_numpy(np.array(step.masking_noise(0, step.MASK_STREAM, jnp.int32(u), BATCH, with_noise)))
        for k in range(accum):
            rows = slice(k * micro, (k + 1) * micro)
            epochs[u // UPDATES_PER_EPOCH].append((images[rows], noise[rows] if with_noise else labels[rows]))
    return epochs


def set_keys(config, **values):
    config.unlock()
    for key, value in values.items():
        node, *path = key.split(".")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    config.lock()
    return config


def common_keys(root: str, init_dir: str, lr: float, accum: int = 1) -> dict:
    return {
        "seed": 0, "init_from": init_dir, "batch_size": BATCH, "grad_accum_steps": accum, "total_steps": STEPS,
        "log_every_steps": 1, "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS, "eval_steps": 1,
        "eval_batch_size": BATCH, "data.backend": "image_folder", "data.data_dir": root, "data.split": "train",
        "data.eval_split": "train", "data.transform": "eval", "data.shuffle": False, "data.worker_count": 0,
        "model.image_size": IMAGE, "model.dtype": "float32", "model.scan_layers": False,
        "optim.base_lr": lr * 256 / BATCH, "optim.warmup_steps": WARMUP,
    }  # fmt: skip


def run_trainer(config, workdir) -> list[dict]:
    main.run(config, str(workdir))
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "step" in r]


def save_torch(state_dict, path: Path) -> str:
    torch.save({"model": {k: v.clone() for k, v in state_dict.items()}}, path)
    return str(path)


def check(name: str, jax_rows: list[dict], fair_updates, jax_sd: dict, torch_model, keys) -> None:
    """Per-update loss and lr, then every named tensor at the end; prints the maxima (-s)."""
    assert [r["step"] for r in jax_rows] == list(range(1, STEPS + 1))
    assert len(fair_updates) == STEPS
    loss_dev = max(abs(r["loss"] - f) / abs(f) for r, (f, _) in zip(jax_rows, fair_updates, strict=True))
    lr_dev = max(abs(r["lr"] - lr) / max(lr, 1e-12) for r, (_, lr) in zip(jax_rows[1:], fair_updates[1:], strict=True))
    assert jax_rows[0]["lr"] == fair_updates[0][1] == 0.0
    reference = torch_model.state_dict()
    devs = {}
    for key in keys:
        for part, ours, ref in _parts(key, jax_sd[key], reference[key].detach().numpy().astype(np.float64)):
            devs[part] = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
    key_bias = {k: v for k, v in devs.items() if k.endswith(KEY_BIAS)}
    worst = max((k for k in devs if k not in key_bias), key=devs.get)
    weight_dev = devs[worst]
    print(f"{name}: max loss |dL|/|L| {loss_dev:.2e}, lr {lr_dev:.2e}, weights |dw|/|w| {weight_dev:.2e} ({worst})"
          + (f", attention key biases {max(key_bias.values()):.2e}" if key_bias else ""))  # fmt: skip
    assert loss_dev <= LOSS_RTOL, f"{name}: an update's loss differs by {loss_dev:.2e}"
    assert lr_dev <= 1e-5, f"{name}: the schedule differs by {lr_dev:.2e}"  # float32 here, float64 there
    assert weight_dev <= WEIGHT_RTOL, f"{name}: {worst} differs by {weight_dev:.2e}"
    for k, dev in key_bias.items():
        assert dev <= KEY_BIAS_RTOL, f"{name}: {k} differs by {dev:.2e}"
    moved = max(
        float(np.linalg.norm(reference[k].numpy() - START[name][k]) / max(np.linalg.norm(START[name][k]), 1e-12))
        for k in keys
    )
    assert moved > 10 * WEIGHT_RTOL, f"{name}: the weights hardly moved ({moved:.2e}); the comparison proves nothing"


START: dict[str, dict[str, np.ndarray]] = {}
# A ViT attention's key bias adds q.b_k to every score of a query: softmax ignores it, so its
# gradient is zero up to rounding, and Adam scales that rounding noise up to lr-sized steps in
# both implementations alike. Its third of `attn.qkv.bias` is held to a looser bound.
KEY_BIAS, KEY_BIAS_RTOL = "attn.qkv.bias[key]", 2e-2


def _parts(key: str, ours: np.ndarray, ref: np.ndarray):
    """(name, ours, reference) per compared tensor; a fused qkv bias in its three thirds."""
    if not key.endswith("attn.qkv.bias"):
        return [(key, ours, ref)]
    return [(f"{key}[{n}]", a, b) for n, a, b in zip(("query", "key", "value"), np.split(ours, 3), np.split(ref, 3),
                                                      strict=True)]  # fmt: skip


def fair_args(lr: float, min_lr: float, accum: int):
    return fair.loop_args(lr=lr, min_lr=min_lr, warmup_epochs=1, epochs=EPOCHS, accum_iter=accum)


# ----------------------------------------------------------------------------- data order
def test_batches_are_the_datasets_order_without_shuffling(image_root):
    """With shuffling and augmentation off, global batch u is examples [u B, (u + 1) B) of the
    repeated dataset, on any process count (process p takes its contiguous rows)."""
    images, labels = dataset_in_order(image_root)
    config = load_config(f"{ROOT}/configs/imagenet_mae.py:runlocal")
    set_keys(config, **common_keys(image_root, "", 1e-3))
    it = train.iterator(config, split="train", transform=config.data.transform, batch_size=BATCH,
                        shuffle=config.data.shuffle)  # fmt: skip
    for u in range(UPDATES_PER_EPOCH + 2):  # into the second epoch
        batch = next(it)
        rows = np.arange(u * BATCH, (u + 1) * BATCH) % NUM_IMAGES
        np.testing.assert_array_equal(batch["image"], images[rows])
        np.testing.assert_array_equal(batch["label"], labels[rows])
    kwargs = dict(name="", split="train", data_dir=image_root, image_size=IMAGE, transform="eval",
                  global_batch_size=BATCH, seed=0, shuffle=False, backend="image_folder", process_count=2)  # fmt: skip
    halves = [next(data.make_iterator(process_index=p, **kwargs))["image"] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), images[:BATCH])


def test_probe_batchnorm_is_pytorchs():
    """Training-mode normalisation by the biased variance, running variance moved by the
    unbiased one (BatchNorm1d), padding rows (mask 0) left out; eval mode uses the running ones."""
    import jax

    from crate_jax.evaluation.heads import BatchNormNoAffine

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 5)) * 2.0 + 1.0).astype(np.float32)
    mask = np.array([1] * 6 + [0] * 2, bool)
    bn = BatchNormNoAffine()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updated = bn.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
    ref = torch.nn.BatchNorm1d(5, affine=False, eps=1e-6).train()
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(x[:6])).numpy()
    np.testing.assert_allclose(np.asarray(y)[:6], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(updated["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-6)
    with torch.no_grad():
        y_eval = ref.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn.apply(updated, x, train=False), y_eval, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pretraining
@pytest.mark.parametrize("name,accum", [("crate_mae_tiny", 1), ("crate_mae_tiny", 2), ("mae_vit_base", 1)])
def test_pretraining_matches_fairs_loop(name, accum, image_root, tmp_path):
    lr = 1e-3
    if name.startswith("crate"):
        model = torch_reference.CrateMAE(img_size=IMAGE, patch_size=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS,
                                         decoder_depth=2)  # fmt: skip
        overrides, variant = dict(MAE_SIZE), "runlocal"
    else:
        model = torch_reference.FairMAE(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                        decoder_embed_dim=WIDTH, decoder_depth=2, decoder_num_heads=HEADS)  # fmt: skip
        overrides, variant = dict(MAE_SIZE, decoder_width=WIDTH), "runlocal,model=mae_vit_base"
    torch_reference.randomize_(model, seed=0)
    label = f"pretrain {name} accum {accum}"
    START[label] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    sd = import_torch.load_state_dict(save_torch(model.state_dict(), tmp_path / "init.pth"))
    import_torch.write(import_torch.convert(sd, name, **overrides), name, overrides, str(tmp_path / "init"), "test")

    config = load_config(f"{ROOT}/configs/imagenet_mae.py:{variant}")
    keys = common_keys(image_root, str(tmp_path / "init"), lr, accum)
    keys |= {f"model.{k}": v for k, v in overrides.items()}
    keys |= {"num_reconstructions": 2, "optim.end_lr": 0.0, "optim.weight_decay": 0.05, "optim.no_decay": ()}
    rows = run_trainer(set_keys(config, **keys), tmp_path / "run")

    optimizer = torch.optim.AdamW(fair.add_weight_decay(model, 0.05), lr=lr, betas=(0.9, 0.95))
    num_patches = (IMAGE // PATCH) ** 2
    updates = fair.train_pretrain(model, epochs_of_micro_batches(image_root, accum, num_patches), optimizer,
                                  fair_args(lr, 0.0, accum), mask_ratio=0.75)  # fmt: skip
    _, params = checkpoint.load(str(tmp_path / "run"))
    jax_sd = export_torch.export(params, name, **overrides)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad and not k.startswith("decoder_embed")]
    if name == "mae_vit_base":
        trainable += ["decoder_embed.weight", "decoder_embed.bias"]
    check(label, rows, updates, jax_sd, model, sorted(set(trainable)))


# ----------------------------------------------------------------------------- classifiers
def torch_classifier(arch: str, global_pool: bool, seed: int):
    model = fair.Classifier(arch=arch, img_size=IMAGE, patch_size=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS,
                            num_classes=CLASSES, global_pool=global_pool)  # fmt: skip
    return torch_reference.randomize_(model, seed=seed)  # pos_embed keeps the sin-cos table a MAE stores


def backbone_name(arch: str) -> tuple[str, dict]:
    return (
        ("crate_mae_tiny", dict(MAE_SIZE)) if arch == "crate" else ("mae_vit_base", dict(MAE_SIZE, decoder_width=WIDTH))
    )


def import_classifier(model, arch: str, path: Path) -> str:
    name, overrides = backbone_name(arch)
    sd = import_torch.load_state_dict(save_torch(model.state_dict(), path.with_suffix(".pth")))
    variables, clf = import_torch.convert_classifier(sd, name, **overrides)
    import_torch.write_classifier(variables, clf, name, overrides, str(path), "test")
    return str(path)


@pytest.mark.parametrize("arch", ["crate", "vit"])
def test_finetuning_matches_fairs_loop(arch, image_root, tmp_path):
    lr, min_lr = 1e-3, 1e-6
    model = torch_classifier(arch, global_pool=True, seed=1)
    label = f"finetune {arch}"
    START[label] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    init_dir = import_classifier(model, arch, tmp_path / "init")

    config = load_config(f"{ROOT}/configs/finetune.py:dataset=embedded,runlocal")
    keys = common_keys(image_root, init_dir, lr) | {
        "num_classes": CLASSES, "head.pool": "mean", "drop_path_rate": 0.0, "augment.mixup": 0.0,
        "augment.cutmix": 0.0, "augment.label_smoothing": 0.1, "optim.end_lr": min_lr, "optim.weight_decay": 0.05,
        "optim.layer_decay": 0.65, "optim.b2": 0.999,
    }  # fmt: skip
    rows = run_trainer(set_keys(config, **keys), tmp_path / "run")

    groups = fair.param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    criterion, epochs = fair.label_smoothing_cross_entropy(0.1), epochs_of_micro_batches(image_root, 1)
    updates = fair.train_classifier(model, criterion, epochs, optimizer, fair_args(lr, min_lr, 1))
    clf, variables = api.load(str(tmp_path / "run"))
    jax_sd = export_torch.export_classifier(variables, clf)
    check(label, rows, updates, jax_sd, model, sorted(k for k, p in model.named_parameters() if p.requires_grad))


@pytest.mark.parametrize("arch", ["crate", "vit"])
def test_linear_probe_matches_fairs_loop(arch, image_root, tmp_path):
    lr, weight_decay = 2.0, 0.01  # large enough that LARS moves the head measurably in 24 steps
    model = fair.make_linprobe(torch_classifier(arch, global_pool=False, seed=2))
    bn = model.head[0]
    generator = torch.Generator().manual_seed(3)
    bn.running_mean.copy_(0.1 * torch.randn(WIDTH, generator=generator))  # given statistics, not the defaults
    bn.running_var.copy_(1.0 + 0.5 * torch.rand(WIDTH, generator=generator))
    label = f"linear probe {arch}"
    START[label] = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    init_dir = import_classifier(model, arch, tmp_path / "init")

    config = load_config(f"{ROOT}/configs/linear_probe.py:dataset=embedded,runlocal")
    keys = common_keys(image_root, init_dir, lr) | {
        "num_classes": CLASSES, "head.pool": "cls", "optim.end_lr": 0.0, "optim.weight_decay": weight_decay,
        "optim.momentum": 0.9, "optim.trust_coefficient": 0.001,
    }  # fmt: skip
    rows = run_trainer(set_keys(config, **keys), tmp_path / "run")

    optimizer = fair.LARS(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    updates = fair.train_classifier(model, torch.nn.CrossEntropyLoss(), epochs_of_micro_batches(image_root, 1),
                                    optimizer, fair_args(lr, 0.0, 1))  # fmt: skip
    clf, variables = api.load(str(tmp_path / "run"))
    jax_sd = export_torch.export_classifier(variables, clf)
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    for key in frozen:  # the encoder did not move, on either side
        np.testing.assert_array_equal(jax_sd[key], START[label][key], err_msg=key)
    trained = ["head.1.weight", "head.1.bias", "head.0.running_mean", "head.0.running_var"]
    check(label, rows, updates, jax_sd, model, trained)
