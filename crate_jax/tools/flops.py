"""Analytic FLOP counts of CRATE-MAE and ViT-MAE, forward and train step.

Only matrix products are counted (2 FLOPs per multiply-add), as MFU conventionally does:
LayerNorm, softmax, the loss and the optimizer are left out (a few percent at the preset
sizes). The count is of the computation as executed:

* `encoder_tokens="visible"` runs the CRATE encoder on cls + visible tokens only;
* `cls_token=False` (the paper's CRATE-MAE) has L tokens instead of L + 1; its other options
  (pixel-space or zero mask token, learned table, its subtraction) add no matrix product;
* `ista_fused=True` rewrites the ISTA residual Y·D − (Y·Dᵀ)·D exactly, in whichever form
  `models.crate.ista_form` picks for the step's token count: Y·(I + η(D − DᵀD)), one d×d
  product per token plus d³ per layer and step (not per image; its backward is one more d³),
  or Y + η(Y − Y·Dᵀ)·D, two d×d products per token; `ista_fused=False` counts the release's
  three.

Backward costs twice the forward for every product whose two operands both need a
gradient (weights times activations, attention) and once for the patch embedding (its
input, the images, needs none): a train step is 3× the forward minus one patch embedding.
"""

from __future__ import annotations

import dataclasses

from crate_jax.models.crate import ista_form


@dataclasses.dataclass(frozen=True)
class Flops:
    """FLOPs of a forward pass and of a train step, as functions of the batch size."""

    per_image_forward: float  # one image's forward pass, without the ISTA steps
    patch_embed: float  # per image, forward: its backward is once, not twice
    ista_layers: int = 0  # CRATE encoder layers (each one ISTA step)
    ista_rows: int = 0  # tokens per image through each ISTA step
    width: int = 0
    ista_fused: bool = True

    def ista_form(self, batch_size: int) -> str | None:
        """How the ISTA steps run at this batch size: "gram", "factored" (`ista_form`),
        "released" (three products) or None (no ISTA: a ViT)."""
        if not self.ista_layers:
            return None
        return ista_form(batch_size * self.ista_rows, self.width) if self.ista_fused else "released"

    def _ista(self, batch_size: int) -> tuple[float, float]:
        """(forward, train step) FLOPs of every ISTA step, in the form the model runs."""
        r, d = batch_size * self.ista_rows, self.width
        if not self.ista_layers:
            return 0.0, 0.0
        form = self.ista_form(batch_size)
        if form == "released":
            macs = (3 * r * d * d, 9 * r * d * d)
        elif form == "gram":
            macs = (r * d * d + d**3, 3 * r * d * d + 2 * d**3)
        else:
            macs = (2 * r * d * d, 6 * r * d * d)
        return 2.0 * self.ista_layers * macs[0], 2.0 * self.ista_layers * macs[1]

    def forward(self, batch_size: int) -> float:
        return batch_size * self.per_image_forward + self._ista(batch_size)[0]

    def train_step(self, batch_size: int) -> float:
        per_image = 3 * self.per_image_forward - self.patch_embed
        return batch_size * per_image + self._ista(batch_size)[1]

    def train_per_image(self, batch_size: int) -> float:
        return self.train_step(batch_size) / batch_size


def _attention(n: int, d: int) -> float:
    """softmax(u uᵀ) u summed over heads: two n×n×(d/K) products per head."""
    return 2 * n * n * d


def crate_mae(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    decoder_depth: int,
    decoder_num_heads: int,
    mask_ratio: float,
    ista_fused: bool = True,
    encoder_tokens: str = "all",
    cls_token: bool = True,
    **_,
) -> Flops:
    d = width
    num_patches = (image_size // patch_size) ** 2
    n_dec = num_patches + int(cls_token)  # the paper's variant has no cls token
    n_enc = n_dec if encoder_tokens == "all" else int(cls_token) + int(num_patches * (1 - mask_ratio))
    pixels = patch_size * patch_size * 3

    def mssa(n: int, heads: int) -> float:
        return n * d * d + _attention(n, d) + (n * d * d if heads > 1 else 0)

    encoder = depth * mssa(n_enc, num_heads)  # + the ISTA steps, counted by Flops per batch
    decoder = decoder_depth * (n_dec * d * d + mssa(n_dec, decoder_num_heads))
    patch_embed = num_patches * pixels * d
    head = n_dec * d * pixels
    macs = patch_embed + encoder + decoder + head
    return Flops(
        per_image_forward=2.0 * macs,
        patch_embed=2.0 * patch_embed,
        ista_layers=depth,
        ista_rows=n_enc,
        width=d,
        ista_fused=ista_fused,
    )


def vit_mae(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    decoder_depth: int,
    decoder_num_heads: int,
    mask_ratio: float,
    decoder_width: int = 512,
    mlp_ratio: float = 4.0,
    **_,
) -> Flops:
    num_patches = (image_size // patch_size) ** 2
    n_dec = num_patches + 1
    n_enc = 1 + int(num_patches * (1 - mask_ratio))
    pixels = patch_size * patch_size * 3

    def block(n: int, d: int) -> float:  # qkv, attention, proj, two MLP layers
        return 3 * n * d * d + _attention(n, d) + n * d * d + 2 * n * d * int(d * mlp_ratio)

    patch_embed = num_patches * pixels * width
    macs = (
        patch_embed
        + depth * block(n_enc, width)
        + n_enc * width * decoder_width  # decoder_embed
        + decoder_depth * block(n_dec, decoder_width)
        + n_dec * decoder_width * pixels
    )
    return Flops(per_image_forward=2.0 * macs, patch_embed=2.0 * patch_embed)


def for_model(model) -> Flops:
    """The count for a built model (`crate_jax.models.build(...)`)."""
    from crate_jax.models import CrateMAE, ViTMAE

    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
    if isinstance(model, CrateMAE):
        fields["decoder_num_heads"] = fields["decoder_num_heads"] or fields["num_heads"]
        return crate_mae(**fields)
    if isinstance(model, ViTMAE):
        return vit_mae(**fields)
    raise TypeError(f"no FLOP count for {type(model).__name__}")
