"""The image-folder source: `DATA_DIR/SPLIT/<class>/<image>`, ImageNet's train/val layout.

Labels are the index of the class folder in the sorted list of class folders of the split
(torchvision's `ImageFolder` rule), so a val folder must hold the same classes as train. The
source is a grain random-access source of `{"image": encoded bytes, "label": int32}`; the
images are read when grain asks for them (in its worker processes when there are any), and
they go through exactly the same shuffle, sharding, transforms, resume and corrupt-image
handling as a TFDS source (pipeline.py). A file that cannot be read becomes empty bytes, so
the transform turns it into a weight-0 placeholder as it does an undecodable image.

`SPLIT` may carry TFDS slicing (`train[:10%]`, `train+val`), resolved by TFDS's own split
parser over the number of files in each split folder. `validation` falls back to `val` and
`val` to `validation` when only the other folder exists. Paths may be local or anything
`etils.epath` opens (e.g. `gs://`, see crate_jax/storage.py).
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# torchvision's IMG_EXTENSIONS; matched case-insensitively (ImageNet's files end in .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_ALIASES = {"validation": "val", "val": "validation"}

_log = logging.getLogger(__name__)


class ImageFolderSource:
    """Random access to `(root/relpath bytes, label)` pairs; picklable and compact.

    Relative paths are held as one numpy bytes array (about 40 MB for ImageNet's 1.28M
    training files), so sending the source to grain's worker processes stays cheap.
    """

    def __init__(self, root: str, relpaths: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]):
        self.root, self.relpaths, self.labels, self.class_names = root, relpaths, labels, class_names

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index) -> dict:
        path = epath.Path(self.root) / self.relpaths[index].decode()
        try:
            data = path.read_bytes()
        except OSError as e:
            _log.warning("Unreadable image %s replaced by a weight-0 placeholder: %s", path, e)
            data = b""  # Fails to decode, so the transform makes a weight-0 placeholder.
        return {"image": data, "label": np.int32(self.labels[index])}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, {len(self)} images, {len(self.class_names)} classes)"


def _split_dir(data_dir: str, split: str) -> epath.Path:
    path = epath.Path(data_dir) / split
    if not path.is_dir() and split in _SPLIT_ALIASES and (epath.Path(data_dir) / _SPLIT_ALIASES[split]).is_dir():
        path = epath.Path(data_dir) / _SPLIT_ALIASES[split]
    if not path.is_dir():
        parent = epath.Path(data_dir)
        found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else None
        raise FileNotFoundError(
            f"Image folder split {split!r} not found: expected {data_dir}/{split}/<class>/<image> "
            f"(ImageNet's train/val layout); "
            + (f"sub-folders of {data_dir}: {found}." if found is not None else f"{data_dir} does not exist.")
        )
    return path


@functools.lru_cache(maxsize=8)
def _list_split(data_dir: str, split: str) -> ImageFolderSource:
    """All images of one split folder, sorted by (class, file name). Cached: listing ImageNet takes seconds."""
    root = _split_dir(data_dir, split)
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:
        raise FileNotFoundError(
            f"{root} has no class sub-folders: the image folder layout is {data_dir}/{split}/<class>/<image> "
            "(ImageNet's raw validation images must first be sorted into class folders)."
        )
    relpaths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        names = sorted(p.name for p in class_dir.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
        relpaths += [f"{class_dir.name}/{name}".encode() for name in names]
        labels += [label] * len(names)
    if not relpaths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}.")
    return ImageFolderSource(
        str(root), np.array(relpaths, dtype=bytes), np.array(labels, np.int32), tuple(p.name for p in class_dirs)
    )


def image_folder_source(data_dir: str, split: str) -> ImageFolderSource:
    """The images of `split` (TFDS slicing allowed) under `data_dir`, in a fixed order."""
    data_dir = str(data_dir)
    instruction = tfds.core.ReadInstruction.from_spec(split)
    lengths = _Lengths(data_dir)
    parts = [(_list_split(data_dir, a.splitname), a.from_ or 0, a.to) for a in instruction.to_absolute(lengths)]
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] in (None, len(parts[0][0])):
        return parts[0][0]  # A whole split folder.
    class_names = {source.class_names for source, _, _ in parts}
    if len(class_names) > 1:
        raise ValueError(f"Split {split!r} combines folders with different class lists under {data_dir}.")
    root = epath.Path(data_dir)
    # Relative paths from data_dir (`split_folder/class/file`), so one source can span folders.
    relpaths = np.concatenate(
        [np.char.add(f"{epath.Path(s.root).relative_to(root)}/".encode(), s.relpaths[a:b]) for s, a, b in parts]
    )
    labels = np.concatenate([s.labels[a:b] for s, a, b in parts])
    return ImageFolderSource(str(root), relpaths, labels, class_names.pop())


class _Lengths(dict):
    """split name -> object with `num_examples`, listed on first use (what TFDS's split parser reads)."""

    def __init__(self, data_dir: str):
        super().__init__()
        self.data_dir = data_dir

    def __contains__(self, split) -> bool:
        return True  # Missing folders fail in _list_split with a message naming the layout.

    def __missing__(self, split: str) -> SimpleNamespace:
        n = len(_list_split(self.data_dir, split))
        self[split] = SimpleNamespace(num_examples=n, shard_lengths=[n])
        return self[split]
