"""The correspondence between released PyTorch state_dicts and our parameter trees.

One table per model family, used in both directions by `import_torch` and `export_torch`.
Each row: (torch key, our paths, to_ours(w) -> arrays, to_torch(*arrays) -> w).

Classifiers (`classifier_rows`) follow FAIR's `models_vit` layout: `patch_embed`,
`cls_token`, a learned `pos_embed`, `blocks.{i}` (ViT blocks, or the CRATE-MAE release's
encoder-layer keys for the CRATE encoder), then `norm` (cls pooling) or `fc_norm` (global
pooling) and `head`; FAIR's linear probe's head is `Sequential(BatchNorm1d(affine=False),
Linear)`: `head.0.running_mean/var/num_batches_tracked` and `head.1.{weight,bias}`.
Our paths are for unrolled layers (`encoder/layer_3/...`); `stack_layers` turns them into
the scanned layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from crate_jax.models.layers import sincos_table_2d
from crate_jax.models.mae import CrateMAE
from crate_jax.models.stack import stack_layers, unstack_layers  # noqa: F401  (re-exported)


class Row(NamedTuple):
    torch_key: str
    paths: tuple[str, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_torch: Callable[..., np.ndarray]


def _same(w):
    return (w,)


def _linear(w):  # PyTorch Linear (out, in) -> Dense kernel (in, out)
    return (w.T,)


def _linear_back(k):
    return k.T


def _identity_back(w):
    return w


def _conv(patch_size: int):
    def to_ours(w):  # (d, c, p, q) -> ((p, q, c), d), the patchify order
        d, c, p, q = w.shape
        return (w.transpose(2, 3, 1, 0).reshape(p * q * c, d),)

    def to_torch(k):
        f, d = k.shape
        return k.reshape(patch_size, patch_size, f // patch_size**2, d).transpose(3, 2, 0, 1)

    return to_ours, to_torch


def _norm(torch_prefix: str, ours: str) -> list[Row]:
    return [
        Row(f"{torch_prefix}.weight", (f"{ours}/scale",), _same, _identity_back),
        Row(f"{torch_prefix}.bias", (f"{ours}/bias",), _same, _identity_back),
    ]


def _dense(torch_prefix: str, ours: str, bias: bool = True) -> list[Row]:
    rows = [Row(f"{torch_prefix}.weight", (f"{ours}/kernel",), _linear, _linear_back)]
    if bias:
        rows.append(Row(f"{torch_prefix}.bias", (f"{ours}/bias",), _same, _identity_back))
    return rows


def _split3(w):  # fused qkv (3d, ...) -> q, k, v; Linear weights also transposed
    parts = np.split(w, 3, axis=0)
    return tuple(p.T if p.ndim == 2 else p for p in parts)


def _join3(*parts):
    return np.concatenate([p.T if p.ndim == 2 else p for p in parts], axis=0)


def _mssa(torch_prefix: str, ours: str, heads: int) -> list[Row]:
    rows = _dense(f"{torch_prefix}.qkv", f"{ours}/qkv", bias=False)
    if heads > 1:
        rows += _dense(f"{torch_prefix}.to_out.0", f"{ours}/to_out")
    return rows


def _common(model) -> list[Row]:
    conv_in, conv_out = _conv(model.patch_size)
    rows = [
        Row("patch_embed.proj.weight", ("patch_embed/proj/kernel",), conv_in, conv_out),
        Row("patch_embed.proj.bias", ("patch_embed/proj/bias",), _same, _identity_back),
        Row("cls_token", ("cls_token",), _same, _identity_back),
        Row("mask_token", ("mask_token",), _same, _identity_back),
    ]
    rows += _norm("norm", "norm") + _norm("decoder_norm", "decoder_norm") + _dense("decoder_pred", "decoder_pred")
    return rows


def _crate_encoder_layer(i: int, heads: int) -> list[Row]:
    t, o = f"blocks.{i}.layers.0", f"encoder/layer_{i}"
    rows = _norm(f"{t}.0.norm", f"{o}/norm1") + _mssa(f"{t}.0.fn", f"{o}/mssa", heads)
    rows += _norm(f"{t}.1.norm", f"{o}/norm2")
    rows.append(Row(f"{t}.1.fn.weight", (f"{o}/ista/D",), _same, _identity_back))
    return rows


def _vit_layer(prefix: str, ours: str, i: int) -> list[Row]:
    t, o = f"{prefix}.{i}", f"{ours}/layer_{i}"
    qkv = tuple(f"{o}/attn/{n}/{{}}" for n in ("query", "key", "value"))
    rows = _norm(f"{t}.norm1", f"{o}/norm1") + _norm(f"{t}.norm2", f"{o}/norm2")
    rows.append(Row(f"{t}.attn.qkv.weight", tuple(p.format("kernel") for p in qkv), _split3, _join3))
    rows.append(Row(f"{t}.attn.qkv.bias", tuple(p.format("bias") for p in qkv), _split3, _join3))
    rows += _dense(f"{t}.attn.proj", f"{o}/attn/proj")
    return rows + _dense(f"{t}.mlp.fc1", f"{o}/fc1") + _dense(f"{t}.mlp.fc2", f"{o}/fc2")


def crate_rows(model: CrateMAE) -> list[Row]:
    differences = model.release_layout_differences()
    if differences:  # e.g. the crate_mae_paper_* presets
        raise ValueError(
            f"the released CRATE-MAE layout has no place for the paper's options {differences}; "
            "import or export a model with the release's cls_token, mask_token_space, position_table and "
            "subtract_position_table (a crate_mae_* preset)"
        )
    rows = _common(model)
    for i in range(model.depth):
        rows += _crate_encoder_layer(i, model.num_heads)
    for i in range(model.decoder_depth):
        t, o = f"decoder_blocks.{i}.layers.0", f"decoder/layer_{i}"
        rows += _norm(f"{t}.0.norm", f"{o}/norm1") + _dense(f"{t}.0.fn", f"{o}/linear", bias=False)
        rows += _norm(f"{t}.1.norm", f"{o}/norm2") + _mssa(f"{t}.1.fn", f"{o}/mssa", model.decoder_num_heads)
    return rows


def vit_rows(model) -> list[Row]:
    rows = _common(model) + _dense("decoder_embed", "decoder_embed")
    for prefix, ours, depth in (("blocks", "encoder", model.depth), ("decoder_blocks", "decoder", model.decoder_depth)):
        for i in range(depth):
            rows += _vit_layer(prefix, ours, i)
    return rows


def rows_for(model) -> list[Row]:
    return crate_rows(model) if isinstance(model, CrateMAE) else vit_rows(model)


def fixed_tables(model) -> dict[str, np.ndarray]:
    """The sin-cos tables a release stores, with their PyTorch shapes (1, L+1, width).

    CRATE-MAE adds `decoder_pos_embed` and never reads `pos_embed`; FAIR's MAE uses both."""
    g = model.grid_size
    enc = sincos_table_2d(model.width, g, g)[None]
    dec_width = model.width if isinstance(model, CrateMAE) else model.decoder_width
    return {"pos_embed": enc, "decoder_pos_embed": sincos_table_2d(dec_width, g, g)[None]}


def unused_keys(model) -> dict[str, tuple[int, ...]]:
    """Keys a release stores but whose values the forward pass never reads."""
    if isinstance(model, CrateMAE):
        d = model.width
        return {"pos_embed": (1, model.num_patches + 1, d), "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,)}
    return {}


def classifier_rows(classifier) -> list[Row]:
    """Parameter rows of an `evaluation.Classifier` (learned `pos_embed`) in models_vit layout."""
    conv_in, conv_out = _conv(classifier.patch_size)
    rows = [
        Row("patch_embed.proj.weight", ("patch_embed/proj/kernel",), conv_in, conv_out),
        Row("patch_embed.proj.bias", ("patch_embed/proj/bias",), _same, _identity_back),
        Row("cls_token", ("cls_token",), _same, _identity_back),
        Row("pos_embed", ("pos_embed",), _same, _identity_back),
    ]
    for i in range(classifier.depth):
        if classifier.arch == "crate":
            rows += _crate_encoder_layer(i, classifier.num_heads)
        else:
            rows += _vit_layer("blocks", "encoder", i)
    if classifier.head == "finetune" and classifier.pool == "mean":
        rows += _norm("fc_norm", "head/fc_norm")
    else:
        rows += _norm("norm", "norm")
    return rows + _dense("head.1" if classifier.head == "probe" else "head", "head/fc")


def classifier_stat_rows(classifier) -> list[Row]:
    """The probe head's BatchNorm running statistics (`batch_stats`), as BatchNorm1d stores them."""
    if classifier.head != "probe":
        return []
    return [
        Row("head.0.running_mean", ("head/bn/mean",), _same, _identity_back),
        Row("head.0.running_var", ("head/bn/var",), _same, _identity_back),
    ]
