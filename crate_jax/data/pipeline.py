"""The input pipeline: `make_iterator`, one entry point over three storage backends.

  backend="grain" (default)  a TFDS dataset in the array_record format (`builder.as_data_source`)
  backend="image_folder"     images in class folders, `DATA_DIR/SPLIT/<class>/<image>` (folder.py)
  backend="tfrecord"         a TFDS dataset in the default TFRecord format, read by tf.data
                             (`builder.as_dataset`), which reads `gs://` directly (tfrecord.py)

The first two are random-access sources read by the same grain pipeline:

    source -> seeded global shuffle (reshuffled each epoch) -> repeat -> [drop or pad the last
    global batch] -> per-example transform -> local batches -> this process's batches

The global stream of examples depends only on (source, seed, shuffle, num_epochs): global
batch b is examples [b*B, (b+1)*B) of it, and process p of P reads rows [p*B/P, (p+1)*B/P) of
every global batch. Grain's MapDataset is random access, so a process only ever reads and
decodes its own rows, and the per-example augmentation rng depends on the example's position
in the global stream, never on the process count. Stacking the local batches of all processes
in process order therefore gives the same global batch for any P.

The tfrecord backend streams: process p reads its own contiguous part of the split
(`tfds.even_splits`), shuffled per epoch by file order and a shuffle buffer; its batches hold
the same keys, shapes, dtypes and pixels (the transforms of transforms.py run inside tf.data)
in another order. See tfrecord.py.

Every backend returns a `grain.DatasetIterator`: `get_state()`/`set_state()` (and
`grain.checkpoint.CheckpointSave/CheckpointRestore` under Orbax) resume at exactly the next
batch, and `start_batch` starts as if that many batches had been consumed. A state restores
only onto the same process count (one state per process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from crate_jax import storage
from crate_jax.data import embedded, folder, transforms

BACKENDS = ("grain", "tfrecord", "image_folder")
# Examples held by the tfrecord backend's shuffle buffer (encoded bytes: about 1.1 GB for ImageNet).
SHUFFLE_BUFFER_SIZE = 10_000

# A padding element: decodes to a zeros image with weight 0 (see transforms.py).
_PADDING = {"image": None, "label": 0, "weight": 0.0}


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir` or the TFDS default, made absolute unless it is a URL such as gs://."""
    data_dir = data_dir or embedded.default_data_dir()
    return data_dir if "://" in data_dir else os.path.abspath(os.path.expanduser(data_dir))


def _how_to_prepare(name: str, data_dir: str, file_format: str) -> str:
    fmt = f", file_format='{file_format}'" if file_format == "array_record" else ""
    build = (
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}'{fmt})"
        f'.download_and_prepare()"'
    )
    if name.split(":")[0].split("/")[0] == "imagenet2012":
        return (
            f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {data_dir}/downloads/manual, then run {build} "
            f"(or `tfds build imagenet2012 --data_dir={data_dir} --file_format={file_format}`, which needs apache-beam)"
        )
    return f"prepare it with {build}"


def tfds_builder(name: str, data_dir: str | None, file_format: str = "array_record") -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `name` stored as `file_format`, or a one-line error saying how to make it."""
    if name == embedded.NAME and not (data_dir and storage.is_remote(data_dir)):  # built on local disks only
        data_dir = embedded.ensure_built(data_dir, file_format)
    searched = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=searched)
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        raise FileNotFoundError(
            f"Dataset {name!r} not found in data_dir {searched}: {_how_to_prepare(name, searched, file_format)}."
        )
    stored = builder.info.file_format
    if stored is None or stored.value != file_format:
        backend = "grain" if file_format == "array_record" else "tfrecord"
        other = "tfrecord" if file_format == "array_record" else "grain"
        raise ValueError(
            f"Dataset {name!r} in {builder.data_dir} is stored as {stored and stored.value}, but the {backend!r} "
            f"backend reads only {file_format}: use backend={other!r}, or "
            f"{_how_to_prepare(name, searched, file_format)} into another data_dir."
        )
    if "image" not in builder.info.features:
        raise ValueError(f"Dataset {name!r} has no 'image' feature (features: {list(builder.info.features)}).")
    return builder


def skip_image_decoding(builder: tfds.core.DatasetBuilder) -> dict:
    """TFDS decoders that leave every image feature encoded (the transforms decode `image`;
    others, such as oxford_iiit_pet's segmentation masks, are never decoded at all)."""
    features = builder.info.features
    return {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, tfds.features.Image)}


def _check_backend(backend: str, data_dir: str | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown data backend {backend!r}; expected one of {list(BACKENDS)}.")
    if backend == "image_folder" and not data_dir:
        raise ValueError("backend='image_folder' needs data_dir (the folder holding SPLIT/<class>/<image>).")
    if backend == "grain" and storage.is_remote(resolve_data_dir(data_dir)):
        raise ValueError(
            f"data_dir={resolve_data_dir(data_dir)}: the grain backend reads array_record files through the local "
            "file system; mount the bucket with gcsfuse and pass the mount point, or use backend='tfrecord' "
            "(reads gs:// directly)."
        )


def num_examples(name: str, split: str, data_dir: str | None, backend: str = "grain") -> int:
    """Number of examples in `split` (TFDS slicing like 'train[:10%]' allowed)."""
    _check_backend(backend, data_dir)
    if backend == "image_folder":
        return len(folder.image_folder_source(resolve_data_dir(data_dir), split))
    file_format = "tfrecord" if backend == "tfrecord" else "array_record"
    return tfds_builder(name, data_dir, file_format).info.splits[split].num_examples


def make_iterator(
    *,
    name: str,
    split: str,
    data_dir: str | None,
    image_size: int,
    transform: str,
    global_batch_size: int,
    seed: int,
    transform_options: Mapping[str, Any] | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    start_batch: int = 0,
    backend: str = "grain",
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> grain.DatasetIterator:
    """An iterator of this process's batches of `name`/`split`, transformed by `transform`.

    Each element is `{"image": float32 (b, S, S, 3), "label": int32 (b,), "weight": float32 (b,)}`
    with b = global_batch_size / process_count and S = image_size; `label` is 0 for datasets
    without one; `weight` is 0.0 for undecodable images and for padding. `num_epochs=None`
    repeats forever. With a finite `num_epochs`, `drop_remainder=True` drops the last partial
    global batch, and `drop_remainder=False` pads it with weight-0 examples so that every
    process yields the same number of equally shaped batches (what a jitted eval step needs).
    `start_batch` skips that many batches without decoding them: it re-positions a run whose
    saved iterator state cannot be used (another process count).

    `backend` picks the storage (module docstring): "grain" reads TFDS array_record, "tfrecord"
    reads TFDS TFRecord through tf.data, "image_folder" reads `data_dir/split/<class>/<image>`
    (`name` is then unused). `worker_count > 0` transforms in that many grain worker processes
    (the caller needs an `if __name__ == "__main__":` guard); the tfrecord backend ignores it
    (tf.data autotunes its threads) and alone uses `shuffle_buffer_size`.
    `prefetch_buffer_size` is in batches. `transform_options` are the options `transform` takes
    (transforms.TRANSFORM_OPTIONS: finetune_train's RandAugment and random erasing settings).
    """
    _check_backend(backend, data_dir)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"Global batch_size {global_batch_size} is not divisible by the process count {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count}).")
    # Fails early on a bad name or option.
    example_transform = transforms.get_transform(transform, image_size, **(transform_options or {}))
    if backend == "tfrecord":
        from crate_jax.data import tfrecord  # Imports TensorFlow, which the other backends never need.

        builder = tfds_builder(name, data_dir, "tfrecord")
        return tfrecord.TFRecordIterator(
            builder=builder,
            split=split,
            decoders=skip_image_decoding(builder),
            transform=example_transform,
            image_size=image_size,
            global_batch_size=global_batch_size,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer_size=shuffle_buffer_size,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            prefetch_buffer_size=prefetch_buffer_size,
            process_index=process_index,
            process_count=process_count,
            start_batch=start_batch,
        )
    if backend == "image_folder":
        source = folder.image_folder_source(resolve_data_dir(data_dir), split)
    else:
        builder = tfds_builder(name, data_dir)
        source = builder.as_data_source(split=split, decoders=skip_image_decoding(builder))
    return _grain_iterator(
        source,
        description=f"{name}/{split}",
        transform=example_transform,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        worker_count=worker_count,
        prefetch_buffer_size=prefetch_buffer_size,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        start_batch=start_batch,
    )


def first_images(
    name: str, split: str, data_dir: str | None, image_size: int, num_images: int, batch_size: int = 64
) -> np.ndarray:
    """The first `num_images` decodable examples of `name`/`split`, in order, through the eval
    transform (float32 in [0, 1]), read whole by this process: every process gets the same
    images (analysis and the completion metric)."""
    batches = make_iterator(
        name=name,
        split=split,
        data_dir=data_dir,
        image_size=image_size,
        transform="eval",
        global_batch_size=batch_size,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=0,
        process_count=1,
    )
    chunks, count = [], 0
    for batch in batches:
        chunks.append(batch["image"][batch["weight"] > 0])
        count += len(chunks[-1])
        if count >= num_images:
            break
    if not count:
        raise ValueError(f"{name}/{split} yielded no decodable images")
    return np.concatenate(chunks)[:num_images]


def _grain_iterator(
    source,
    *,
    description: str,
    transform: transforms.Transform,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    worker_count: int,
    prefetch_buffer_size: int,
    process_index: int,
    process_count: int,
    drop_remainder: bool,
    start_batch: int,
) -> grain.DatasetIterator:
    """The grain pipeline of the module docstring over a random-access `source` of encoded images."""
    local_batch_size = global_batch_size // process_count
    # `seed` feeds both the shuffle and the augmentation; grain derives a distinct seed for each.
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()  # Reshuffled every epoch by the repeat below.
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        full_batches, remainder = divmod(len(ds), global_batch_size)
        if drop_remainder:
            if full_batches == 0:
                raise ValueError(
                    f"{description} has {len(ds)} examples over {num_epochs} epoch(s), fewer than one "
                    f"global batch_size {global_batch_size}, and drop_remainder=True leaves nothing."
                )
            ds = ds[: full_batches * global_batch_size]
        elif remainder:
            padding = grain.MapDataset.source([_PADDING] * (global_batch_size - remainder))
            ds = grain.MapDataset.concatenate([ds, padding])
    if isinstance(transform, grain.transforms.RandomMap):
        ds = ds.random_map(transform)
    else:
        ds = ds.map(transform)
    # The stream now holds whole global batches, so its local-sized chunks are all full and
    # process p's rows of global batch b are chunk b * P + p.
    ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
    if start_batch:
        ds = ds[start_batch:]
    # One reader thread per buffered batch: more threads could not run ahead of the buffer.
    read_options = grain.ReadOptions(num_threads=prefetch_buffer_size, prefetch_buffer_size=prefetch_buffer_size)
    iter_ds = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain's workers read absl flags; outside absl.app.run (tests, Colab) take the defaults.
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch_buffer_size)
        iter_ds = iter_ds.mp_prefetch(options)
    return iter(iter_ds)
