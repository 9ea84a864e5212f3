"""A stack of identical layers: unrolled or `nn.scan`ned, with an optional remat policy.

Every layer module takes `(x, drop_path_rate)` and returns `(x, aux)`, where `aux` is a
dict of per-layer intermediates (empty unless `capture=True`). The stack returns the final
activations and `aux` stacked over layers, so scanned and unrolled stacks look alike to
their callers. Unrolled layers are named `layer_{i}`; a scanned stack holds one `layers`
subtree whose parameters carry a leading `layers` axis.

With `token_multiple` (cuDNN attention, set by the models) the stack pads the token axis once
with zero rows (`attention.stream_tokens`), tells each layer the real count (`valid_tokens`),
and slices the rows off after the last layer: the layers carry cuDNN's padding, rather than
padding and slicing around every attention call. Every layer is row-wise but for attention,
which masks the padded keys, so the real rows are exactly those of an unpadded stack; and the
attention sets the padded rows' cotangents to zero (`attention.zero_padded_cotangents`), so
nothing a kernel leaves there reaches a weight gradient or an earlier layer's real rows.

Stochastic depth follows FAIR/timm: layer i's rate is `drop_path_schedule(rate, depth)[i]`,
rising linearly from 0 in the first layer to `drop_path_rate` in the last. The rate is the
second argument because that is the scan's per-layer input: a scanned layer sees a traced
scalar, an unrolled one a float. Without drop-path it is None; layers with no identity
branch to drop ignore it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models.attention import pad_tokens, stream_tokens
from crate_jax.models.layers import LAYERS

# Names that configs use for `jax.checkpoint` policies: "none" keeps every activation.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r} is not one of {sorted(REMAT_POLICIES)}")


def drop_path_schedule(rate: float, depth: int) -> np.ndarray:
    """(depth,) per-layer drop-path rates, timm's `linspace(0, drop_path_rate, depth)`."""
    return np.linspace(0.0, rate, depth, dtype=np.float32)


class LayerStack(nn.Module):
    """`depth` copies of `layer_cls(**layer_kwargs)`."""

    layer_cls: Any  # an nn.Module subclass with signature (x, _) -> (x, aux)
    layer_kwargs: Any  # dict of the layer's fields
    depth: int
    scan: bool = False
    remat: str = "none"
    capture: bool = False
    drop_path_rate: float = 0.0  # the last layer's rate (see the module docstring)
    token_multiple: int = 0  # cuDNN's: carry its zero rows through the layers (module docstring); 0: none

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        check_remat(self.remat)
        cls = self.layer_cls
        if self.remat != "none":
            # Under scan the loop already stops CSE from undoing remat.
            cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        kwargs = dict(self.layer_kwargs, capture=self.capture)
        tokens = x.shape[1] if self.token_multiple else None
        rows = stream_tokens(tokens, self.token_multiple) if self.token_multiple else tokens
        padded = rows != tokens
        if padded:
            if self.capture:
                raise ValueError("capture=True keeps the token count: build the stack with token_multiple=0")
            x = pad_tokens(x, rows)
            kwargs["valid_tokens"] = tokens
        # None when off, so the layers ask for no "dropout" RNG (pretraining passes none).
        rates = drop_path_schedule(self.drop_path_rate, self.depth) if self.drop_path_rate > 0 else None
        if self.scan:
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            x, stacked = scanned(**kwargs, name="layers")(x, None if rates is None else jnp.asarray(rates))
            return (x[:, :tokens] if padded else x), stacked
        auxes = []
        for i in range(self.depth):
            x, aux = cls(**kwargs, name=f"layer_{i}")(x, None if rates is None else float(rates[i]))
            auxes.append(aux)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if self.capture else {}
        return (x[:, :tokens] if padded else x), stacked


# Converting parameter trees between the two layouts, on flat {'a/b/c': array} dicts.


def stack_layers(flat: dict) -> dict:
    """`encoder/layer_{i}/x` -> `encoder/layers/x` with a leading layer axis."""
    groups: dict[str, dict] = {}
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) > 2 and parts[1].startswith("layer_"):
            key = "/".join([parts[0], "layers", *parts[2:]])
            groups.setdefault(key, {})[int(parts[1][len("layer_") :])] = value
        else:
            out[path] = value
    for key, by_index in groups.items():
        out[key] = np.stack([by_index[i] for i in range(len(by_index))])
    return out


def unstack_layers(flat: dict) -> dict:
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "layers":
            for i in range(value.shape[0]):
                out["/".join([parts[0], f"layer_{i}", *parts[2:]])] = value[i]
        else:
            out[path] = value
    return out


def to_layout(params: dict, scan: bool) -> dict:
    """A parameter tree in the scanned (`scan=True`) or unrolled layout, whichever it was."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(params), sep="/")
    is_scanned = any(k.split("/")[1:2] == ["layers"] for k in flat)
    if is_scanned == scan:
        return params
    flat = stack_layers(flat) if scan else unstack_layers(flat)
    return traverse_util.unflatten_dict(flat, sep="/")
