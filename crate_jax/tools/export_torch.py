"""Export our parameters in the released PyTorch layout (the reverse of import_torch).

    python -m crate_jax.tools.export_torch --init_from=WORKDIR --out=model.pth

The file holds {"model": state_dict} as FAIR's and CRATE's trainers write it, loadable by
the released model with `load_state_dict`; a linear-probe or fine-tune workdir is written in
FAIR's `models_vit` layout (`export_classifier`). CRATE-MAE's unused `decoder_embed` is written
as the identity map (the release stores one but never applies it).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath
from flax import traverse_util

from crate_jax import checkpoint, models
from crate_jax.tools import torch_layout


def export(params, name: str, **overrides) -> dict[str, np.ndarray]:
    """A released-layout state_dict of numpy arrays."""
    model = models.build(name, **overrides)
    flat = traverse_util.flatten_dict(models.to_layout(params, scan=False), sep="/")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    sd: dict[str, np.ndarray] = {}
    for row in torch_layout.rows_for(model):
        sd[row.torch_key] = np.ascontiguousarray(row.to_torch(*[flat[p] for p in row.paths]))
    sd.update(torch_layout.fixed_tables(model))
    for key, shape in torch_layout.unused_keys(model).items():
        if key not in sd:
            sd[key] = np.eye(*shape, dtype=np.float32) if len(shape) == 2 else np.zeros(shape, np.float32)
    return sd


def export_classifier(variables, clf) -> dict[str, np.ndarray]:
    """FAIR `models_vit`-layout state_dict of an `evaluation.Classifier` with a learned
    `pos_embed` (the reverse of `import_torch.convert_classifier`); a probe's BatchNorm
    running statistics included."""
    flat = traverse_util.flatten_dict(models.to_layout(variables["params"], scan=False), sep="/")
    flat |= traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    rows = torch_layout.classifier_rows(clf) + torch_layout.classifier_stat_rows(clf)
    return {row.torch_key: np.ascontiguousarray(row.to_torch(*[flat[p] for p in row.paths])) for row in rows}


def save(state_dict: dict[str, np.ndarray], path: str) -> None:
    import torch  # optional dependency

    buffer = io.BytesIO()  # serialised in memory, so `path` may be gs:// (etils.epath)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, buffer)
    epath.Path(path).write_bytes(buffer.getvalue())


def main(argv):
    del argv
    if not flags.FLAGS.init_from or not flags.FLAGS.out:
        raise app.UsageError("--init_from and --out are required")
    meta: dict[str, Any] = checkpoint.read_meta(flags.FLAGS.init_from)
    spec = meta["model"]
    if "classifier" in spec:  # a linear-probe / fine-tune run or an imported classifier
        from crate_jax.evaluation.classifier import load_classifier

        clf, variables = load_classifier(flags.FLAGS.init_from)
        if not clf.learned_pos_embed:
            raise app.UsageError(f"{flags.FLAGS.init_from}: a classifier with a fixed position table has no pos_embed")
        save(export_classifier(variables, clf), flags.FLAGS.out)
    else:
        _, params = checkpoint.load(flags.FLAGS.init_from)
        save(export(params, spec["name"], **spec["overrides"]), flags.FLAGS.out)
    print(f"exported {flags.FLAGS.init_from} ({spec['name']}) to {flags.FLAGS.out}")


def define_flags() -> None:
    # Defined here, not at import, so that importing this module never clashes with other flags.
    flags.DEFINE_string("init_from", None, "A training workdir or checkpoint directory.")
    flags.DEFINE_string("out", None, "Output .pth file (local or gs://).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
