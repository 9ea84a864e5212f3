r"""White-box analysis of a checkpoint: reconstructions, attention maps, coding rate, sparsity, PCA,
masked completion against classical inpainting.

    python -m crate_jax.analyze --init_from=/tmp/crate_demo --out=/tmp/crate_demo/analysis \
        [--what=reconstruction,attention,coding_rate,sparsity,pca,completion] [--images=DIR] [--num_images=64] \
        [--layer=-1] [--image_size=N] [--completion_split=completion]

`--init_from` (a training workdir or an import_torch output) is enough to rebuild the model.
Images are the embedded dataset's probe_test split, or every .jpg/.jpeg/.png in `--images`,
through the evaluation transform (`ResizeCenterCrop`) at `--image_size` pixels: by default
(0) the model's own image_size; any other multiple of the patch size runs every diagnostic at
that resolution, on a larger or smaller patch grid, with the model's position table resampled
as DINO does (bicubic, +0.1 on the scale factor; `models.layers.position_table`). Definitions
follow shared/docs/crate-mae-spec.md, "White-box diagnostics". Writes to `--out`:

  summary.json           coding_rate / coding_rate_std {"encoder": [...], "decoder": [...]} and
                         sparsity / sparsity_std {"encoder": [...]}: one value per layer in layer
                         order, mean and (population) std over the images, from un-masked
                         images (mask ratio 0), cls token included (if the model has one);
                         reconstruction_loss at the model's mask ratio with seeded masks;
                         what was analysed, image_size (the size used) and
                         model_image_size (the model's own).
  reconstruction.png     original | masked | reconstruction | reconstruction + visible patches
  attention_layer{L}.png image | cls-query attention of each head, layer L (0-based), un-masked
                         (a model without a cls token: the mean over queries; summary's
                         attention_query says which)
  attention_layers.png   every layer x head for the first image (--attention_all_layers)
  pca.png                image | PCA components 1-3 of the last encoder layer's qkv features
  depth.png              R^c and fraction of non-zeros against depth
  completion.png         original | masked | model | biharmonic (--what=completion)
  completion.npz         uint8 images (N, H, W, 3), bool mask (N, H, W; True = hidden), uint8
                         model, random_init, mean_fill, biharmonic completions
--what=completion (analysis/completion.py) scores the model's completion of the hidden patches
against the same architecture at random init, mean-colour fill and biharmonic inpainting, on
the same masks (from --seed, at the model's mask ratio), always at the model's own image size, on the
held-out split --completion_split (photographs no training split uses) or --images; summary.json
gets "completion": {"model": {"psnr", "ssim"}, "random_init", "mean_fill", "biharmonic",
"mask_ratio", "num_images", "seed", "split"}.
Figures show the first --num_show images, enlarged (nearest) to at least 128 pixels.
ViT-MAE checkpoints support reconstruction and attention only (no MSSA subspaces, no ISTA).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath

from crate_jax import checkpoint, data, models, visualize
from crate_jax.analysis import attention, coding_rate, completion, pca, plots
from crate_jax.data import embedded, transforms

WHAT = ("reconstruction", "attention", "coding_rate", "sparsity", "pca", "completion")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DISPLAY_MIN_PIXELS = 128  # Small demo models (32 px) are enlarged so their figures can be read.
# What each diagnostic needs from CRATE-MAE's captured intermediates (ViT-MAE lacks them).
_CRATE_ONLY = {
    "coding_rate": "MSSA input features (qkv intermediates)",
    "sparsity": "ISTA outputs",
    "pca": "qkv intermediates",
}


def parse_what(what: str | Sequence[str]) -> tuple[str, ...]:
    items = [w.strip() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    unknown = [w for w in items if w not in WHAT]
    if unknown or not items:
        raise ValueError(f"--what={','.join(items)} must be a comma-separated subset of {','.join(WHAT)}")
    return tuple(w for w in WHAT if w in items)


def load_image_dir(path: str, image_size: int, num_images: int) -> tuple[np.ndarray, list[str]]:
    """The first `num_images` image files of `path` (sorted by name) through the eval transform."""
    folder = epath.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images={path} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:num_images]
    if not files:
        raise FileNotFoundError(f"--images={path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    transform = transforms.ResizeCenterCrop(image_size)
    images = []
    for file in files:
        example = transform.map({"image": file.read_bytes()})
        if example["weight"] == 0:  # The transform's mark for undecodable bytes.
            raise ValueError(f"--images: {file} is not a readable image")
        images.append(example["image"])
    return np.stack(images), [f.name for f in files]


@functools.cache
def _unmasked_step(model, what: tuple[str, ...]):
    """Jitted (params, images) -> per-image diagnostics of an un-masked forward pass.

    Cached per (model, what), so that repeated `run` calls in one process compile once. Only
    small per-image results leave the device, never the (L, B, K, N, N) attention stack."""
    decoder_heads = model.decoder_num_heads or model.num_heads
    prefix = model.num_prefix_tokens  # 1 (cls) or 0 (the paper's CRATE-MAE)

    def step(params, images):
        rows, cols = model.patch_grid(images.shape, interpolate_pos=True)
        noise = jnp.zeros((images.shape[0], rows * cols))  # identity order; nothing is masked
        out = model.apply({"params": params}, images, noise=noise, capture=True, interpolate_pos=True)
        enc, dec = out.intermediates["encoder"], out.intermediates["decoder"]
        result = {}
        if "attention" in what:
            result["attention"] = attention.query_attention(enc["attn"], prefix)  # (L, B, K, patches)
        if "coding_rate" in what:
            result["coding_rate_encoder"] = coding_rate.layer_coding_rates(enc["qkv"], model.num_heads)
            result["coding_rate_decoder"] = coding_rate.layer_coding_rates(dec["qkv"], decoder_heads)
        if "sparsity" in what:
            result["sparsity"] = coding_rate.sparsity(enc["ista"])  # (L, B)
        if "pca" in what:
            result["pca"] = enc["qkv"][-1, :, prefix:].astype(jnp.float32)  # last layer, patch tokens
        return result

    return jax.jit(step)


@functools.cache
def _masked_step(model):
    """Jitted (params, images, noise, weight) -> (loss * denominator, denominator, pred, mask)."""

    def step(params, images, noise, weight):
        out = model.apply({"params": params}, images, noise=noise, example_weight=weight, interpolate_pos=True)
        return out.loss * out.loss_weight, out.loss_weight, out.pred, out.mask

    return jax.jit(step)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 with zeros to `size`, so that every batch has one shape and compiles once."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def _stats(per_layer_by_image: np.ndarray) -> tuple[list[float], list[float]]:
    """(layers, images) -> per-layer mean and population std over images, as JSON floats."""
    return per_layer_by_image.mean(axis=1).tolist(), per_layer_by_image.std(axis=1).tolist()


def unmasked_diagnostics(model, params, pixels: np.ndarray, what: tuple[str, ...], batch_size: int) -> dict:
    """Per-image diagnostics of all `pixels` at mask ratio 0: per-layer arrays (L, n, ...) and
    the last encoder layer's qkv features of the patch tokens, "pca" (n, patches, D)."""
    step = _unmasked_step(model.clone(mask_ratio=0.0), what)
    n = len(pixels)
    parts = [
        jax.device_get(step(params, _padded(pixels[i : i + batch_size], batch_size))) for i in range(0, n, batch_size)
    ]
    # Padding rows are dropped: per-layer results join on axis 1, the "pca" features on axis 0.
    joined = {k: np.concatenate([p[k] for p in parts], axis=0 if k == "pca" else 1) for k in parts[0]}
    return {k: v[:n] if k == "pca" else v[:, :n] for k, v in joined.items()}


def reconstruct(model, params, pixels: np.ndarray, seed: int, batch_size: int, keep: int):
    """(mean loss over all removed patches of all images, pred and mask of the first `keep`),
    at the model's mask ratio, with masks drawn once for all images from `seed` (so that they
    do not depend on the batch size)."""
    step = _masked_step(model)
    n = len(pixels)
    rows, cols = model.patch_grid(pixels.shape, interpolate_pos=True)
    noise = np.asarray(jax.random.uniform(jax.random.key(seed), (n, rows * cols)))
    total, denom, preds, masks = 0.0, 0.0, [], []
    for i in range(0, n, batch_size):
        real = len(pixels[i : i + batch_size])
        weight = _padded(np.ones(real, np.float32), batch_size)  # padding rows weigh nothing
        args = (_padded(pixels[i : i + batch_size], batch_size), _padded(noise[i : i + batch_size], batch_size))
        loss_sum, loss_weight, pred, mask = jax.device_get(step(params, *args, weight))
        total, denom = total + float(loss_sum), denom + float(loss_weight)
        if i < keep:
            preds.append(pred[:real])
            masks.append(mask[:real])
    return total / denom, np.concatenate(preds)[:keep], np.concatenate(masks)[:keep]


def run(
    init_from: str,
    what: str | Sequence[str] = WHAT,
    out: str = "analysis",
    images: str | None = None,
    num_images: int = 64,
    num_show: int = 8,
    layer: int = -1,
    attention_all_layers: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    dataset: str = embedded.NAME,
    split: str = "probe_test",
    data_dir: str | None = None,
    image_size: int = 0,
    completion_split: str = embedded.COMPLETION_SPLIT,
) -> dict:
    """Analyses the checkpoint at `init_from`, writes PNGs and summary.json to `out`, returns the summary."""
    what = parse_what(what)
    if num_images < 1 or num_show < 1 or batch_size < 1:
        raise ValueError(f"--num_images={num_images}, --num_show={num_show}, --batch_size={batch_size} must be >= 1")
    meta = checkpoint.read_meta(init_from)
    name = meta["model"]["name"]
    unsupported = [w for w in what if w in _CRATE_ONLY and models.PRESETS[name][0] is not models.CrateMAE]
    if unsupported:  # before reading the weights
        item = unsupported[0]
        raise ValueError(
            f"--what={item} needs CRATE-MAE's {_CRATE_ONLY[item]}, but {init_from} holds {name} (a ViT-MAE); "
            f"leave {item} out of --what"
        )
    model, params = checkpoint.load(init_from)
    if not -model.depth <= layer < model.depth:
        raise ValueError(
            f"--layer={layer} is outside the encoder's {model.depth} layers [-{model.depth}, {model.depth})"
        )
    layer %= model.depth
    if image_size < 0 or image_size % model.patch_size:
        raise ValueError(
            f"--image_size={image_size} must be 0 (the model's own {model.image_size}) "
            f"or a positive multiple of the patch size {model.patch_size}"
        )

    size = image_size or model.image_size
    grid = size // model.patch_size  # patches per side at the analysed size
    if images:
        pixels, names = load_image_dir(images, size, num_images)
        source = {"images": images, "image_files": names}
    elif what == ("completion",):  # nothing else to analyse: read only the held-out split
        pixels, source = None, {"dataset": dataset}
    else:
        pixels = data.first_images(dataset, split, data_dir, size, num_images, batch_size)
        source = {"dataset": dataset, "split": split}
    held_out = None  # completion's images: always at the model's own size (its masks are the model's)
    if "completion" in what and images:
        held_out = pixels if size == model.image_size else load_image_dir(images, model.image_size, num_images)[0]
    elif "completion" in what:
        held_out = data.first_images(dataset, completion_split, data_dir, model.image_size, num_images, batch_size)
        pixels = held_out if pixels is None else pixels
    n, shown = len(pixels), min(num_show, len(pixels))
    step = meta.get("step")
    logging.info("analysing %s (%s, step %s) on %d images of %d px: %s", init_from, name, step, n, size, ",".join(what))

    summary: dict = {"checkpoint": str(init_from), "model": name, "step": step, **source}
    summary.update(num_images=n, image_size=size, model_image_size=model.image_size, what=list(what))
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    factor = math.ceil(DISPLAY_MIN_PIXELS / size)
    display = visualize.denormalise(pixels[:shown])
    written = []

    def save(array: np.ndarray, filename: str) -> None:
        visualize.save_png(_enlarge(array, factor), out_dir / filename)
        written.append(filename)

    if any(w not in ("reconstruction", "completion") for w in what):
        got = unmasked_diagnostics(model, params, pixels, what, batch_size)
        if "coding_rate" in what:
            enc_mean, enc_std = _stats(got["coding_rate_encoder"])
            dec_mean, dec_std = _stats(got["coding_rate_decoder"])
            summary["coding_rate"] = {"encoder": enc_mean, "decoder": dec_mean}
            summary["coding_rate_std"] = {"encoder": enc_std, "decoder": dec_std}
            summary["coding_rate_epsilon_sq"] = coding_rate.EPS_SQ
        if "sparsity" in what:
            mean, std = _stats(got["sparsity"])
            summary["sparsity"], summary["sparsity_std"] = {"encoder": mean}, {"encoder": std}
        if "attention" in what:
            maps = attention.to_patch_grid(got["attention"][:, :shown], grid)  # (L, B, K, G, G)
            summary["attention_layer"] = layer
            summary["attention_query"] = "cls" if model.num_prefix_tokens else "mean"
            for index in range(model.depth) if attention_all_layers else [layer]:
                save(attention.attention_grid(display, maps[index], model.patch_size), f"attention_layer{index}.png")
            if attention_all_layers:
                fig = plots.attention_layers_figure(_enlarge(display[0], factor), maps[:, 0], model.patch_size * factor)
                plots.save_figure(fig, out_dir / "attention_layers.png")
                written.append("attention_layers.png")
        if "pca" in what:
            rgb = pca.pca_rgb(got["pca"], grid)[:shown]  # fitted over all n images
            rgb = np.repeat(np.repeat(rgb, model.patch_size, axis=1), model.patch_size, axis=2)
            rows = np.concatenate([display, (rgb * 255).round().astype(np.uint8)], axis=2)
            save(rows.reshape(-1, rows.shape[2], 3), "pca.png")
        if "coding_rate" in what or "sparsity" in what:
            plots.save_figure(plots.depth_figure(summary), out_dir / "depth.png")
            written.append("depth.png")

    if "reconstruction" in what:
        loss, pred, mask = reconstruct(model, params, pixels, seed, batch_size, shown)
        summary.update(reconstruction_loss=loss, mask_ratio=model.mask_ratio, mask_seed=seed)
        grid = visualize.reconstruction_grid(pixels[:shown], pred, mask, model.patch_size, model.norm_pix_loss)
        save(grid, "reconstruction.png")

    if "completion" in what:
        result = completion.evaluate(model, params, held_out, seed=seed)
        arrays = result.pop("arrays")
        summary["completion"] = result | {"split": f"images:{images}" if images else completion_split}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (out_dir / "completion.npz").write_bytes(buffer.getvalue())
        written.append("completion.npz")
        save(completion.grid(arrays, num_show), "completion.png")

    summary["files"] = written
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    flags.DEFINE_string("init_from", None, "Checkpoint: a training workdir or a tools.import_torch output.")
    flags.DEFINE_string("out", None, "Directory for the PNGs and summary.json (local or gs://).")
    flags.DEFINE_list("what", list(WHAT), f"Diagnostics to run, a subset of {','.join(WHAT)}.")
    flags.DEFINE_string("images", None, "A directory of .jpg/.png files; default: the dataset below.")
    flags.DEFINE_integer("num_images", 64, "Images to analyse (statistics, PCA fit) at most.")
    flags.DEFINE_integer("num_show", 8, "Images shown in the figures.")
    flags.DEFINE_integer("layer", -1, "Encoder layer (0-based, negative from the end) for the attention maps.")
    flags.DEFINE_integer(
        "image_size", 0, "Analyse at this many pixels (a multiple of the patch size; 0: the model's own size)."
    )
    flags.DEFINE_bool("attention_all_layers", False, "Also write attention maps of every encoder layer.")
    flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")
    flags.DEFINE_integer("seed", 0, "Seed of the reconstruction masks.")
    flags.DEFINE_string("dataset", embedded.NAME, "TFDS dataset (array_record) used without --images.")
    flags.DEFINE_string("split", "probe_test", "Split of --dataset (every diagnostic but completion).")
    flags.DEFINE_string(
        "completion_split", embedded.COMPLETION_SPLIT, "Split of --dataset for --what=completion (held-out photos)."
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data_dir of --dataset (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
    )
    flags.mark_flags_as_required(["init_from", "out"])


class _QuietOrbax(logging.Filter):
    """Orbax logs every file it reads at INFO through absl; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv: Sequence[str]) -> None:
    logging.getLogger("absl").addFilter(_QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    summary = run(
        f.init_from,
        f.what,
        f.out,
        images=f.images,
        num_images=f.num_images,
        num_show=f.num_show,
        layer=f.layer,
        attention_all_layers=f.attention_all_layers,
        batch_size=f.batch_size,
        seed=f.seed,
        dataset=f.dataset,
        split=f.split,
        data_dir=f.data_dir,
        image_size=f.image_size,
        completion_split=f.completion_split,
    )
    print(json.dumps({k: summary[k] for k in summary if k not in ("files",)}, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
