"""An image classifier made of a pretrained autoencoder's encoder and a head.

The parameters keep the autoencoder's names (`patch_embed`, `cls_token`, `encoder`, and
`norm` where the feature goes through it), so a pretraining checkpoint's encoder drops in;
its mask token and decoder are not used. The encoder sees the whole image: cls + every patch
token, the position table of the classifier's own patch grid added once: the fixed sin-cos
table; the paper's learned `pos_embed` when the autoencoder has one (`position_table="learned"`);
or, with `learned_pos_embed` (every fine-tuning run since FAIR-loop parity; checkpoints written
before hold a fixed table), a parameter `pos_embed` (1, prefix + L, D) initialised to the sin-cos
table and trained by fine-tuning as FAIR's timm ViT trains its `pos_embed` (layer 0, no weight
decay). At initialisation this is exactly the autoencoder's forward at mask ratio 0
(`api.encode`), then:

  head="probe"     final norm -> cls token or mean of the patch tokens -> stop_gradient ->
                   BatchNorm without affine -> Dense   (FAIR's linear probe)
  head="finetune"  pool="mean": mean of the patch tokens (no final norm) -> LayerNorm -> Dense;
                   pool="cls": final norm -> cls token -> Dense   (FAIR's fine-tuning model)

An encoder without a cls token (`cls_token=False`, the paper's CRATE-MAE) has only the mean
of its tokens: `from_autoencoder` turns pool="cls" into "mean" for it (FAIR's global pool).

`drop_path_rate` is stochastic depth in training, FAIR/timm's linear schedule: 0 in the first
encoder layer rising to `drop_path_rate` in the last. It drops the MSSA residual of a CRATE
layer (ISTA has no identity branch) and both residuals of a ViT block.

Checkpoints of these runs store the backbone spec plus `{"classifier": {...}}` in
meta["model"]; `load_classifier(path)` rebuilds the classifier and its variables from them.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from crate_jax import checkpoint, models
from crate_jax.evaluation.heads import HEADS
from crate_jax.models.attention import CUDNN_TOKEN_MULTIPLE, stream_multiple
from crate_jax.models.crate import EncoderLayer, layer_norm
from crate_jax.models.layers import EMBED, PatchEmbed, position_rows, token_init
from crate_jax.models.mae import FINAL_NORM_EPS, CrateMAE
from crate_jax.models.stack import LayerStack
from crate_jax.models.vit import ViTBlock

POOLS = ("cls", "mean")
ENCODER_KEYS = ("patch_embed", "cls_token", "pos_embed", "encoder", "norm")
CLASSIFIER_TASKS = ("linear_probe", "finetune")


class Classifier(nn.Module):
    """images (B, S, S, 3) -> logits (B, num_classes). See the module docstring."""

    arch: str  # "crate" (EncoderLayer) or "vit" (ViTBlock)
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_classes: int
    head: str = "probe"
    pool: str = "cls"
    head_init_std: float = 0.01
    # attention / cudnn_token_multiple / layer_norm_form, and ista_step / ista_lambda / ista_fused or mlp_ratio
    layer_kwargs: Any = flax.core.FrozenDict()
    drop_path_rate: float = 0.0
    cls_token: bool = True  # False: the paper's CRATE-MAE, tokens are the patches only
    position_table: str = "sincos"  # or "learned": the autoencoder's `pos_embed`
    learned_pos_embed: bool = False  # a trainable `pos_embed` (FAIR's fine-tuning) or the fixed table
    scan_layers: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def make_head(self, name: str | None = None) -> nn.Module:
        kwargs = dict(init_std=self.head_init_std, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.head == "finetune":
            kwargs["norm"] = self.pool == "mean"
        return HEADS[self.head](self.num_classes, **kwargs)

    def _encoder(self, images: jax.Array, train: bool) -> jax.Array:
        """(B, prefix + L, D): the encoder's output before its final norm, cls first if any."""
        x = PatchEmbed(self.patch_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed")(
            images
        )
        prefix = int(self.cls_token)
        grid = self.image_size // self.patch_size
        if self.cls_token:
            cls_token = self.param(
                "cls_token", nn.with_logical_partitioning(token_init, (None, None, EMBED)), (1, 1, self.width),
                self.param_dtype,
            ).astype(x.dtype)  # fmt: skip
        if self.position_table == "sincos" and self.learned_pos_embed:
            table = position_rows(self, "sincos", self.width, grid, (grid, grid), prefix, self.param_dtype)

            def table_init(key, shape, dtype):
                del key, shape
                return jnp.asarray(table, dtype)[None]

            pos = self.param(
                "pos_embed",
                nn.with_logical_partitioning(table_init, (None, None, EMBED)),
                (1,) + table.shape,
                self.param_dtype,
            )[0]
        else:  # the fixed table, or the autoencoder's own learned one (also named `pos_embed`)
            pos = position_rows(self, self.position_table, self.width, grid, (grid, grid), prefix, self.param_dtype)
        pos = jnp.asarray(pos, x.dtype)
        x = x + pos[prefix:]
        if self.cls_token:
            cls = jnp.broadcast_to(cls_token, (images.shape[0], 1, self.width)) + pos[:1]
            x = jnp.concatenate([cls, x], axis=1)
        kwargs = dict(self.layer_kwargs, width=self.width, num_heads=self.num_heads, deterministic=not train)
        # cuDNN attention: the stack carries the kernel's zero rows (models/stack.py).
        model = "mssa" if self.arch == "crate" else "vit"
        multiple = kwargs.get("cudnn_token_multiple", CUDNN_TOKEN_MULTIPLE)
        multiple = stream_multiple(kwargs.get("attention", "auto"), self.dtype, model, multiple)
        z, _ = LayerStack(
            EncoderLayer if self.arch == "crate" else ViTBlock,
            flax.core.FrozenDict(kwargs, dtype=self.dtype, param_dtype=self.param_dtype),
            self.depth,
            scan=self.scan_layers,
            remat=self.remat,
            drop_path_rate=self.drop_path_rate,
            token_multiple=multiple,
            name="encoder",
        )(x)
        return z

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B,): examples that count (BatchNorm statistics leave the others out)."""
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r} is not one of {sorted(HEADS)}")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}")
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("pool='cls' needs a cls token, and this encoder has none (cls_token=False): use 'mean'")
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be (batch, {self.image_size}, {self.image_size}, 3), got {images.shape}")
        z = self._encoder(images, train)
        prefix = int(self.cls_token)
        if self.head == "finetune" and self.pool == "mean":
            features = z[:, prefix:].mean(axis=1)
        else:
            form = self.layer_kwargs.get("layer_norm_form", "auto")
            latent = layer_norm(FINAL_NORM_EPS, self.dtype, self.param_dtype, "norm", form)(z)
            features = latent[:, 0] if self.pool == "cls" else latent[:, prefix:].mean(axis=1)
        if self.head == "probe":
            features = jax.lax.stop_gradient(features)  # a frozen encoder
        return self.make_head("head")(features, train=train, mask=mask)


def from_autoencoder(
    mae, *, num_classes: int, head: str, pool: str, head_init_std: float, drop_path_rate: float = 0.0,
    learned_pos_embed: bool = False,
) -> Classifier:  # fmt: skip
    """The classifier on the encoder of `mae` (a CrateMAE or ViTMAE module); pool="cls" is
    "mean" for an encoder without a cls token."""
    tokens = dict(cls_token=True, position_table="sincos")
    # How the layers compute, as the autoencoder's (not what: the parameters are the same).
    compute = dict(
        attention=mae.attention, cudnn_token_multiple=mae.cudnn_token_multiple, layer_norm_form=mae.layer_norm_form
    )
    if isinstance(mae, CrateMAE):
        arch = "crate"
        layer_kwargs = dict(compute, ista_step=mae.ista_step, ista_lambda=mae.ista_lambda, ista_fused=mae.ista_fused)
        tokens = dict(cls_token=mae.cls_token, position_table=mae.position_table)
    else:
        arch, layer_kwargs = "vit", dict(compute, mlp_ratio=mae.mlp_ratio)
    pool = "mean" if pool == "cls" and not tokens["cls_token"] else pool
    return Classifier(
        arch=arch,
        image_size=mae.image_size,
        patch_size=mae.patch_size,
        width=mae.width,
        depth=mae.depth,
        num_heads=mae.num_heads,
        num_classes=num_classes,
        head=head,
        pool=pool,
        head_init_std=head_init_std,
        layer_kwargs=flax.core.FrozenDict(layer_kwargs),
        drop_path_rate=drop_path_rate,
        **tokens,
        learned_pos_embed=learned_pos_embed,
        scan_layers=mae.scan_layers,
        remat=mae.remat,
        dtype=mae.dtype,
        param_dtype=mae.param_dtype,
    )


def classifier_spec(backbone_spec: dict[str, Any], classifier: Classifier) -> dict[str, Any]:
    """meta["model"] of a classification run: the backbone spec plus what rebuilds the head."""
    fields = dict(
        num_classes=classifier.num_classes, head=classifier.head, pool=classifier.pool,
        head_init_std=classifier.head_init_std, learned_pos_embed=classifier.learned_pos_embed,
    )  # fmt: skip
    return dict(backbone_spec, classifier=fields)


def from_spec(model_spec: dict[str, Any], **overrides) -> Classifier:
    """The classifier a classification checkpoint's meta["model"] describes (no drop-path)."""
    mae = models.build(model_spec["name"], **dict(model_spec["overrides"], **overrides))
    return from_autoencoder(mae, **model_spec["classifier"])


def init_variables(classifier: Classifier):
    """key -> boxed variables (params, and batch_stats for the probe head)."""

    def init(key):
        images = jnp.zeros((1, classifier.image_size, classifier.image_size, 3), jnp.float32)
        return classifier.init(key, images)

    return init


def encoder_params(mae_params, abstract_params) -> dict[str, Any]:
    """The parameters of a pretrained autoencoder (or classifier) that the classifier uses:
    those in `abstract_params` other than the head, in the classifier's layer layout. A
    learned `pos_embed` is taken where the source has one (the caller fills it otherwise)."""
    scanned = "layers" in abstract_params["encoder"]
    optional = ("head", "pos_embed")
    missing = [k for k in abstract_params if k not in optional and k not in mae_params]
    if missing:
        raise ValueError(f"the pretrained checkpoint lacks {missing} for the classifier (it has {sorted(mae_params)})")
    picked = models.to_layout({k: mae_params[k] for k in abstract_params if k != "head" and k in mae_params}, scanned)
    want = jax.tree.map(jnp.shape, {k: abstract_params[k] for k in picked})
    got = jax.tree.map(jnp.shape, picked)
    if want != got:
        raise ValueError(f"the pretrained encoder's parameters do not fit the classifier: {got} vs {want}")
    return picked


def load_classifier(path, **overrides) -> tuple[Classifier, dict[str, Any]]:
    """(classifier, variables) of a linear-probe or fine-tuning checkpoint, from the directory
    alone: `classifier.apply(variables, images)` gives logits. `overrides` change
    non-structural backbone fields (e.g. scan_layers=False, dtype='float32')."""
    meta = checkpoint.read_meta(path)
    if "classifier" not in meta["model"]:
        raise ValueError(
            f"{path} holds no classifier (task {meta.get('task')!r}); use crate_jax.load for autoencoder checkpoints"
        )
    saved = from_spec(meta["model"])
    classifier = from_spec(meta["model"], **overrides)
    abstract = nn.unbox(jax.eval_shape(init_variables(saved), jax.random.key(0)))
    abstract = dict(abstract)
    abstract_params = abstract.pop("params")
    mngr = checkpoint.make_manager(checkpoint.checkpoint_dir(path), read_only=True)
    items = dict(params=ocp.args.StandardRestore(abstract_params))
    if jax.tree.leaves(abstract):
        items["model_state"] = ocp.args.StandardRestore(abstract)
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(**items))
    mngr.close()
    rest = out["model_state"] if "model_state" in items else {}
    variables = {"params": models.to_layout(out["params"], classifier.scan_layers), **rest}
    return classifier, variables
