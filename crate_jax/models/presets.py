"""Model presets by name, in one table, and `build(name, **overrides)`.

Sizes from Pai et al., ICLR 2024 (CRATE-MAE, Table of model configurations) and He et al.,
CVPR 2022 (FAIR MAE, `models_mae.py`). Parameter counts in `shared/docs/crate-mae-spec.md`
are reproduced by `count_params` (tests/test_models.py checks every row).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models.attention import CUDNN_TOKEN_MULTIPLE, MSSA_IMPLS, VIT_IMPLS
from crate_jax.models.layer_norm import FORMS as LAYER_NORM_FORMS
from crate_jax.models.mae import LOSS_PATCHES, CrateMAE, ViTMAE, check_crate_options
from crate_jax.models.stack import check_remat

_CRATE = dict(image_size=224, patch_size=16, mask_ratio=0.75)
# The paper's CRATE-MAE (Pai et al., ICLR 2024; see CrateMAE's docstring for the equations):
# no cls token, a learned mask token in pixel space, a learned position table subtracted
# again before the output projection, the loss over the whole image; with the release's
# ISTA step eta = 0.1 and lambda = 0.5 (the paper's sizes are the release's).
PAPER_OPTIONS = dict(
    cls_token=False,
    mask_token_space="pixel",
    position_table="learned",
    subtract_position_table=True,
    loss_patches="all",
    ista_step=0.1,
    ista_lambda=0.5,
)
_PAPER = dict(_CRATE, **PAPER_OPTIONS)
_FAIR = dict(
    image_size=224,
    patch_size=16,
    mask_ratio=0.75,
    decoder_width=512,
    decoder_depth=8,
    decoder_num_heads=16,
    mlp_ratio=4.0,
)

# name -> (module class, fields). CRATE-MAE's decoder has the encoder's width by design,
# and its depth and heads unless overridden.
PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "crate_mae_tiny": (CrateMAE, dict(_CRATE, width=384, num_heads=6, depth=12)),
    "crate_mae_small": (CrateMAE, dict(_CRATE, width=576, num_heads=12, depth=12)),
    "crate_mae_base": (CrateMAE, dict(_CRATE, width=768, num_heads=12, depth=12)),
    "crate_mae_large": (CrateMAE, dict(_CRATE, width=1024, num_heads=16, depth=24)),
    "crate_mae_paper_tiny": (CrateMAE, dict(_PAPER, width=384, num_heads=6, depth=12)),
    "crate_mae_paper_small": (CrateMAE, dict(_PAPER, width=576, num_heads=12, depth=12)),
    "crate_mae_paper_base": (CrateMAE, dict(_PAPER, width=768, num_heads=12, depth=12)),
    "crate_mae_paper_large": (CrateMAE, dict(_PAPER, width=1024, num_heads=16, depth=24)),
    "mae_vit_small": (ViTMAE, dict(_FAIR, width=384, num_heads=6, depth=12)),
    "mae_vit_base": (ViTMAE, dict(_FAIR, width=768, num_heads=12, depth=12)),
    "mae_vit_large": (ViTMAE, dict(_FAIR, width=1024, num_heads=16, depth=24)),
    "mae_vit_huge": (ViTMAE, dict(_FAIR, patch_size=14, width=1280, num_heads=16, depth=32)),
}

COMMON_OVERRIDES = (
    "image_size", "patch_size", "width", "depth", "num_heads", "decoder_depth", "decoder_num_heads",
    "mask_ratio", "norm_pix_loss", "loss_patches", "scan_layers", "remat", "dtype", "param_dtype",
    "cudnn_token_multiple", "layer_norm_form",
)  # fmt: skip
CRATE_OVERRIDES = COMMON_OVERRIDES + (
    "ista_step", "ista_lambda", "ista_fused", "encoder_tokens", "attention",
    "cls_token", "mask_token_space", "position_table", "subtract_position_table",
)  # fmt: skip
VIT_OVERRIDES = COMMON_OVERRIDES + ("decoder_width", "mlp_ratio", "attention")


def _dtype(value: Any, key: str) -> Any:
    try:
        return jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"model.{key}={value!r} is not a dtype (e.g. 'float32', 'bfloat16')") from e


def model_fields(name: str, **overrides) -> tuple[type, dict[str, Any]]:
    """The module class and its resolved fields; every error names the offending key."""
    if name not in PRESETS:
        raise ValueError(f"model.name={name!r} is not a preset; choose from {sorted(PRESETS)}")
    cls, fields = PRESETS[name]
    allowed = CRATE_OVERRIDES if cls is CrateMAE else VIT_OVERRIDES
    for key in overrides:
        if key not in allowed:
            hint = " (CRATE-MAE's decoder has the encoder's width and no MLP)" if key in VIT_OVERRIDES else ""
            raise ValueError(f"model.{key} does not apply to {name}{hint}; it takes {sorted(allowed)}")
    fields = dict(fields, **overrides)
    if cls is CrateMAE:  # the decoder mirrors the encoder unless told otherwise
        fields.setdefault("decoder_num_heads", fields["num_heads"])
        fields.setdefault("decoder_depth", fields["depth"])
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = _dtype(fields[key], key)
    if fields["image_size"] % fields["patch_size"]:
        raise ValueError(
            f"model.image_size={fields['image_size']} is not divisible by model.patch_size={fields['patch_size']}"
        )
    if fields["width"] % fields["num_heads"]:
        raise ValueError(f"model.num_heads={fields['num_heads']} does not divide model.width={fields['width']}")
    dec_width = fields.get("decoder_width", fields["width"])
    if dec_width % fields["decoder_num_heads"]:
        raise ValueError(
            f"model.decoder_num_heads={fields['decoder_num_heads']} does not divide the decoder width {dec_width}"
        )
    if cls is CrateMAE:
        check_crate_options(fields)
    impls = MSSA_IMPLS if cls is CrateMAE else VIT_IMPLS
    if fields.get("attention", "auto") not in impls:
        raise ValueError(f"model.attention={fields['attention']!r} is not one of {impls} for {name}")
    multiple = fields.get("cudnn_token_multiple", CUDNN_TOKEN_MULTIPLE)
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"model.cudnn_token_multiple={multiple!r} must be a positive integer")
    if fields.get("layer_norm_form", "auto") not in LAYER_NORM_FORMS:
        raise ValueError(f"model.layer_norm_form={fields['layer_norm_form']!r} is not one of {LAYER_NORM_FORMS}")
    if fields.get("loss_patches", "masked") not in LOSS_PATCHES:
        raise ValueError(f"model.loss_patches={fields['loss_patches']!r} is not one of {LOSS_PATCHES}")
    if not 0.0 <= fields["mask_ratio"] < 1.0:
        raise ValueError(f"model.mask_ratio={fields['mask_ratio']} must be in [0, 1)")
    check_remat(fields.get("remat", "none"))
    return cls, fields


def build(name: str, **overrides):
    """A flax.linen Module for the preset `name`, with `overrides` of its fields."""
    cls, fields = model_fields(name, **overrides)
    return cls(**fields)


def abstract_params(model, boxed: bool = False):
    """The model's parameters as ShapeDtypeStructs, without allocating them.

    `boxed=True` keeps flax's LogicallyPartitioned boxes (their logical axis names)."""
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    return params if boxed else nn.unbox(params)


def count_params(name: str, **overrides) -> dict[str, int | None]:
    """Parameter counts, abstractly (jax.eval_shape).

    `as_released` counts every state_dict entry of the PyTorch release, as the papers do:
    our parameters plus the fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`) and,
    for CRATE-MAE, the stored but unused `decoder_embed` Linear(d, d).
    `trainable` is what this model trains. A CRATE-MAE with the paper's options has no
    released layout: its `as_released` is None.
    """
    model = build(name, **overrides)
    shapes = abstract_params(model)
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    tokens = model.num_patches + 1
    if isinstance(model, CrateMAE) and model.release_layout_differences():
        return {"trainable": trainable, "as_released": None}
    if isinstance(model, CrateMAE):
        extra = 2 * tokens * model.width + model.width * model.width + model.width
    else:
        extra = tokens * (model.width + model.decoder_width)
    return {"trainable": trainable, "as_released": trainable + extra}
