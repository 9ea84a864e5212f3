"""Import a released PyTorch checkpoint (CRATE-MAE or FAIR MAE) as an Orbax checkpoint.

    python -m crate_jax.tools.import_torch --checkpoint=crate_mae_base.pth \
        --model=crate_mae_base --out=/tmp/crate_mae_base

The output directory rebuilds the model by itself (`crate_jax.load(DIR)`, `init_from=DIR`).
A classifier checkpoint in FAIR's `models_vit` layout (a fine-tuned model with `head`, or a
linear probe with `head.0` BatchNorm + `head.1` Linear; `norm` or `fc_norm`; ViT blocks, or
the CRATE-MAE release's encoder-layer keys with `--model=crate_mae_*`) is recognised by its
head and imported as a classifier (`convert_classifier`): its directory is what
`init_from` of configs/finetune.py and configs/linear_probe.py starts from, head weights and
BatchNorm statistics included. torch is needed only to read `.pth` files
(`pip install torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags
from flax import traverse_util

from crate_jax import checkpoint, models
from crate_jax.tools import torch_layout

# Stored fixed tables may differ from ours by float rounding (MAE builds them in float32).
TABLE_TOLERANCE = 1e-4


def load_state_dict(path: str) -> dict[str, Any]:
    """torch.load with weights_only=True, allowing only FAIR's stored argparse.Namespace."""
    import torch  # optional dependency

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def normalise_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Bare or under "model"; a DistributedDataParallel `module.` prefix stripped."""
    if "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    out = {}
    for key, value in obj.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        out[key] = _to_numpy(value)
    return out


def convert(state_dict: Mapping[str, Any], name: str, **overrides) -> dict[str, Any]:
    """Params for `models.build(name, **overrides)` from a released state_dict.

    Any missing, unexpected or mis-shaped key raises ValueError naming it; unused keys
    are logged as ignored; a stored sin-cos table that differs from ours raises."""
    model = models.build(name, **overrides)
    sd = normalise_state_dict(state_dict)
    unrolled = models.build(name, **dict(overrides, scan_layers=False))
    expected = traverse_util.flatten_dict(models.abstract_params(unrolled), sep="/")
    rows = torch_layout.rows_for(model)
    known = {r.torch_key for r in rows}
    tables = torch_layout.fixed_tables(model)
    unused = torch_layout.unused_keys(model)

    missing = sorted(known - sd.keys())
    if missing:
        raise ValueError(f"checkpoint for {name} is missing {len(missing)} key(s), first {missing[0]!r}: {missing[:5]}")
    unexpected = sorted(set(sd) - known - tables.keys() - unused.keys())
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} key(s) {name} does not have, first {unexpected[0]!r}: {unexpected[:5]}"
        )

    for key, shape in unused.items():
        if key in sd:
            if sd[key].shape != shape:
                raise ValueError(f"{key}: checkpoint shape {sd[key].shape}, {name} expects {shape}")
            logging.info("ignoring %s %s: the released model stores it but never uses it", key, sd[key].shape)
    for key, table in tables.items():
        if key in sd and key not in unused:
            if sd[key].shape != table.shape:
                raise ValueError(f"{key}: checkpoint shape {sd[key].shape}, {name} expects {table.shape}")
            diff = float(np.max(np.abs(sd[key] - table)))
            if diff > TABLE_TOLERANCE:
                raise ValueError(
                    f"{key} differs from the 2-D sin-cos table this model uses (largest difference {diff:.3g})"
                )

    params = traverse_util.unflatten_dict(_fill(sd, rows, expected, name), sep="/")
    return models.to_layout(params, model.scan_layers)


def _fill(sd, rows, expected, name: str) -> dict[str, np.ndarray]:
    """Our flat arrays from the rows' torch keys, shapes checked against `expected`."""
    flat = {}
    for row in rows:
        value = sd[row.torch_key]
        parts = row.to_ours(value)
        for path, part in zip(row.paths, parts, strict=True):
            want = tuple(expected[path].shape)
            if part.shape != want:
                torch_shape = tuple(row.to_torch(*[np.zeros(expected[p].shape) for p in row.paths]).shape)
                raise ValueError(f"{row.torch_key}: checkpoint shape {value.shape}, {name} expects {torch_shape}")
            flat[path] = part.astype(expected[path].dtype)
    return flat


# BatchNorm1d's step counter: not part of the function (momentum is fixed, as FAIR sets it).
IGNORED_CLASSIFIER_KEYS = ("head.0.num_batches_tracked",)


def classifier_fields(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"head", "pool", "num_classes"} of a FAIR `models_vit` classifier state_dict (already
    normalised); None for an autoencoder checkpoint (no `head`)."""
    if "head.weight" in state_dict:
        head, weight = "finetune", state_dict["head.weight"]
    elif "head.1.weight" in state_dict:
        head, weight = "probe", state_dict["head.1.weight"]
    else:
        return None
    pool = "mean" if "fc_norm.weight" in state_dict else "cls"
    if head == "probe" and pool == "mean":
        raise ValueError(
            "fc_norm.weight: FAIR's global-pool linear probe (LayerNorm of the mean token) is not supported; "
            "the probe here pools the cls token or the mean of the final-normed tokens"
        )
    return {"head": head, "pool": pool, "num_classes": int(np.shape(weight)[0])}


def convert_classifier(state_dict: Mapping[str, Any], name: str, **overrides):
    """(variables, classifier) from a FAIR `models_vit` classifier state_dict: the encoder of
    `models.build(name, **overrides)` with a learned `pos_embed`, the head, and for a linear
    probe the BatchNorm running statistics (`batch_stats`). Keys are checked as `convert`."""
    import flax.linen as nn
    import jax

    from crate_jax.evaluation import classifier as classifier_lib
    from crate_jax.evaluation.heads import HEADS

    sd = normalise_state_dict(state_dict)
    fields = classifier_fields(sd)
    if fields is None:
        raise ValueError("checkpoint has no classifier head ('head.weight' or 'head.1.weight')")
    clf = classifier_lib.from_autoencoder(
        models.build(name, **overrides), **fields, head_init_std=HEADS[fields["head"]].init_std,
        learned_pos_embed=True,
    )  # fmt: skip
    unrolled = clf.clone(scan_layers=False)
    abstract = nn.unbox(jax.eval_shape(classifier_lib.init_variables(unrolled), jax.random.key(0)))
    expected = traverse_util.flatten_dict(abstract["params"], sep="/")
    expected_stats = traverse_util.flatten_dict(abstract.get("batch_stats", {}), sep="/")
    rows, stat_rows = torch_layout.classifier_rows(clf), torch_layout.classifier_stat_rows(clf)
    known = {r.torch_key for r in rows + stat_rows}
    missing = sorted(known - sd.keys())
    label = f"{name} classifier ({fields['head']} head, {fields['pool']} pool)"
    if missing:
        raise ValueError(f"checkpoint for {label} misses {len(missing)} key(s), first {missing[0]!r}: {missing[:5]}")
    unexpected = sorted(set(sd) - known - set(IGNORED_CLASSIFIER_KEYS))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} key(s) {label} does not have, first {unexpected[0]!r}: {unexpected[:5]}"
        )
    params = traverse_util.unflatten_dict(_fill(sd, rows, expected, label), sep="/")
    variables = {"params": models.to_layout(params, clf.scan_layers)}
    if stat_rows:
        variables["batch_stats"] = traverse_util.unflatten_dict(_fill(sd, stat_rows, expected_stats, label), sep="/")
    return variables, clf


def write_classifier(variables, clf, name: str, overrides: dict[str, Any], out: str, source: str) -> None:
    """An Orbax checkpoint `crate_jax.load` and the probe / fine-tune `init_from` read."""
    from crate_jax.evaluation import classifier as classifier_lib

    spec = classifier_lib.classifier_spec(checkpoint.model_spec(name, overrides), clf)
    task = "linear_probe" if clf.head == "probe" else "finetune"
    meta = {"model": spec, "step": 0, "source": source, "task": task}
    rest = {k: v for k, v in variables.items() if k != "params"}
    path = checkpoint.save_params(out, variables["params"], meta, model_state=rest or None)
    logging.info("wrote %s", path)


def write(params, name: str, overrides: dict[str, Any], out: str, source: str) -> None:
    meta = {"model": checkpoint.model_spec(name, overrides), "step": 0, "source": source}
    path = checkpoint.save_params(out, params, meta)
    logging.info("wrote %s", path)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv):
    del argv
    for name in ("checkpoint", "model", "out"):
        if not getattr(flags.FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    overrides = parse_overrides(flags.FLAGS.override)
    state_dict = load_state_dict(flags.FLAGS.checkpoint)
    fields = classifier_fields(normalise_state_dict(state_dict))
    if fields is not None:
        variables, clf = convert_classifier(state_dict, flags.FLAGS.model, **overrides)
        write_classifier(variables, clf, flags.FLAGS.model, overrides, flags.FLAGS.out, source=flags.FLAGS.checkpoint)
        kind = f"a {fields['head']} classifier ({fields['pool']} pool, {fields['num_classes']} classes) on"
    else:
        params = convert(state_dict, flags.FLAGS.model, **overrides)
        write(params, flags.FLAGS.model, overrides, flags.FLAGS.out, source=flags.FLAGS.checkpoint)
        kind = "the autoencoder"
    print(f"imported {flags.FLAGS.checkpoint} as {kind} {flags.FLAGS.model} into {flags.FLAGS.out}")


def define_flags() -> None:
    # Defined here, not at import, so that importing this module never clashes with other flags.
    flags.DEFINE_string("checkpoint", None, "PyTorch .pth file (state_dict bare or under 'model').")
    flags.DEFINE_string("model", None, f"Preset name: {sorted(models.PRESETS)}.")
    flags.DEFINE_string("out", None, "Output directory (local or gs://).")
    flags.DEFINE_multi_string("override", [], "Model override KEY=VALUE (e.g. image_size=224), repeatable.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
