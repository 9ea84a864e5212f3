"""`crate_jax_embedded`: a small offline image dataset cut from real photographs.

No package ships CIFAR or ImageNet and these machines cannot download, so the smoke runs,
tests and the Colab train on crops of the photographs that scikit-image, scikit-learn and
matplotlib carry inside their wheels. It is a real TFDS dataset (array_record), read through
exactly the same grain pipeline as ImageNet.

Splits (all 64x64 RGB, JPEG quality 90; `label` = index of the source photograph in
`PHOTOS` then `HELD_OUT`, `source` = its name):
  train        3,024 crops (189 per photo of the 16 in PHOTOS) at random positions and scales
               anywhere in the photo: the unlabelled pretraining set.
  probe_train  1,024 crops (64 per photo) from the "white" cells of a 4x4 checkerboard laid
               over each photo.
  probe_test     512 crops (32 per photo) from the "black" cells of the same checkerboard.
  completion     384 crops (128 per photo) at random positions and scales of the 3 HELD_OUT
               photographs, which no other split uses: masked completion is scored there, on
               pixels that no training split has seen.
A linear probe therefore has to recognise a photograph from regions whose pixels it never saw
in probe_train: probe_train and probe_test share no pixel. `train` covers whole photos, so
pretraining has seen (unlabelled) the probe_test pixels, as self-supervised pretraining on an
unlabelled pool usually does; the probe numbers say "these features tell 16 photos apart", no
more. Everything is seeded: the same package versions give the same examples in the same order.

`ensure_built(data_dir)` builds it on first use (a few seconds) under a file lock, so that
several processes starting together build it once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import ClassVar

import filelock
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "crate_jax_embedded"
IMAGE_SIZE = 64
SEED = 20240501
_JPEG_QUALITY = 90
_GRID = 4  # Checkerboard cells per side for the probe splits.
# Crops per photograph, per split.
_PER_PHOTO = {"train": 189, "probe_train": 64, "probe_test": 32, "completion": 128}
COMPLETION_SPLIT = "completion"  # crops of HELD_OUT only


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data  # Imported lazily: only the build needs it.

        return getattr(skimage.data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]  # the left view; the right one shows the same scene


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


# Natural photographs that load without network (checked with scikit-image 0.26). Left out:
# synthetic or binary images (colorwheel, logo, horse, binary_blobs), documents (page, text),
# `cat` (the same photo as chelsea) and ones that need a download (e.g. eagle). PHOTOS feed
# train and the probe splits; HELD_OUT only the completion split. The installed packages ship
# one natural photograph more (the motorcycle; microaneurysms is a 102 px grey fundus crop and
# Minduka_Present_Blue_Pack clip art), so two photographs were moved out of PHOTOS to join it:
# a colour one and a grey one, so that the held-out set mixes colour and grey as PHOTOS does.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "skimage/astronaut": _skimage("astronaut"),
    "skimage/chelsea": _skimage("chelsea"),
    "skimage/rocket": _skimage("rocket"),
    "skimage/hubble_deep_field": _skimage("hubble_deep_field"),
    "skimage/immunohistochemistry": _skimage("immunohistochemistry"),
    "skimage/retina": _skimage("retina"),
    "skimage/coins": _skimage("coins"),
    "skimage/moon": _skimage("moon"),
    "skimage/brick": _skimage("brick"),
    "skimage/grass": _skimage("grass"),
    "skimage/gravel": _skimage("gravel"),
    "skimage/cell": _skimage("cell"),
    "skimage/clock": _skimage("clock"),
    "sklearn/china": _sklearn(0),
    "sklearn/flower": _sklearn(1),
    "matplotlib/grace_hopper": _grace_hopper,
}
HELD_OUT: dict[str, Callable[[], np.ndarray]] = {
    "skimage/stereo_motorcycle": _motorcycle,
    "skimage/coffee": _skimage("coffee"),
    "skimage/camera": _skimage("camera"),
}


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _encode(photo: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    """Crops `box` (left, top, right, bottom) and resizes it to IMAGE_SIZE in one PIL call."""
    crop = photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _random_box(
    rng: np.random.Generator, left: int, top: int, width: int, height: int, min_frac: float, max_frac: float
) -> tuple[int, int, int, int]:
    """A random square inside the rectangle, its side a fraction of the rectangle's shorter side."""
    side = max(8, round(min(width, height) * rng.uniform(min_frac, max_frac)))
    x = left + int(rng.integers(0, width - side + 1))
    y = top + int(rng.integers(0, height - side + 1))
    return x, y, x + side, y + side


def _boxes(split: str, width: int, height: int, rng: np.random.Generator) -> Iterator[tuple[int, int, int, int]]:
    if split in ("train", COMPLETION_SPLIT):
        for _ in range(_PER_PHOTO[split]):
            yield _random_box(rng, 0, 0, width, height, 0.15, 0.8)
        return
    # Probe splits: cell (i, j) belongs to probe_train when i + j is even, else to probe_test,
    # and every crop lies inside one cell, so the two splits never share a pixel.
    parity = 0 if split == "probe_train" else 1
    cells = [(i, j) for i in range(_GRID) for j in range(_GRID) if (i + j) % 2 == parity]
    cell_w, cell_h = width // _GRID, height // _GRID
    for k in range(_PER_PHOTO[split]):
        i, j = cells[k % len(cells)]
        yield _random_box(rng, j * cell_w, i * cell_h, cell_w, cell_h, 0.6, 1.0)


class CrateJaxEmbedded(tfds.core.GeneratorBasedBuilder):
    """Crops of 19 photographs shipped inside installed Python packages (see module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release.",
        "1.1.0": "A held-out completion split; coffee and camera moved out of train and the probes.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=[*PHOTOS, *HELD_OUT]),
                    "source": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Everything is already on disk, inside installed packages.
        return {split: self._generate_examples(split) for split in _PER_PHOTO}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        split_id = list(_PER_PHOTO).index(split)
        for label, (source, load) in enumerate([*PHOTOS.items(), *HELD_OUT.items()]):
            if (source in HELD_OUT) != (split == COMPLETION_SPLIT):
                continue
            photo = Image.fromarray(_as_rgb(load()))
            rng = np.random.default_rng([SEED, split_id, label])
            for k, box in enumerate(_boxes(split, photo.width, photo.height, rng)):
                # Pre-encoded bytes are stored as they are (TFDS would otherwise encode
                # numpy arrays through a TensorFlow graph).
                example = {"image": _encode(photo, box), "label": label, "source": source}
                yield f"{label:02d}_{k:04d}", example


def default_data_dir() -> str:
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (the TFDS default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def ensure_built(data_dir: str | None = None, file_format: str = "array_record") -> str:
    """Builds `crate_jax_embedded` into `data_dir` unless it is there already; returns `data_dir`.

    `data_dir=None` means `default_data_dir()`. `file_format` is what a build writes
    ("tfrecord" for the tfrecord backend); a dataset already there is left as it is, in
    whichever format (the pipeline says so if it is not the one it reads). Safe to call from
    many processes at once: the first takes the lock `<data_dir>/crate_jax_embedded.lock` and
    builds, the others wait on it and then find the dataset prepared. TFDS writes into a
    temporary directory and renames it, so a build killed halfway leaves no half-written
    dataset behind.
    """
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    if CrateJaxEmbedded(data_dir=data_dir).is_prepared():
        return data_dir
    os.makedirs(data_dir, exist_ok=True)
    with filelock.FileLock(os.path.join(data_dir, f"{NAME}.lock")):
        if not CrateJaxEmbedded(data_dir=data_dir).is_prepared():  # Another process may have built it meanwhile.
            builder = CrateJaxEmbedded(data_dir=data_dir, file_format=file_format)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir
