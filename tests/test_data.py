"""Tests of the input pipeline: the same tiny dataset stored as TFDS array_record, TFDS TFRecord
and an image folder (made here), read by every backend; the transforms; the embedded set."""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from crate_jax.config_file import load_config
from crate_jax.data import BACKENDS, embedded, make_iterator, num_examples, transforms
from crate_jax.tools import bench_input

NUM_IMAGES = 20
CORRUPT = 7  # Example 7's image is garbage bytes, in every format.
GARBAGE = b"not an image"
NAME = "crate_jax_test_images"
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# finetune_train's options: FAIR's recipe, and with every augmentation off.
NO_AUGMENT = {"randaugment": {"num_ops": 0, "magnitude": 9.0, "magnitude_std": 0.5}, "random_erasing": 0.0}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _examples() -> list[tuple[bytes, int]]:
    """20 (encoded image, label) pairs: random noise of assorted sizes, 4 classes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_IMAGES):
        height, width = rng.integers(24, 48, size=2)
        image = _png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out.append((GARBAGE if i == CORRUPT else image, i % 4))
    return out


class CrateJaxTestImages(tfds.core.GeneratorBasedBuilder):
    """The `_examples()`; example 7's image is garbage bytes (TFDS stores encoded bytes as they are)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (image, label) in enumerate(_examples()):
            yield str(i), {"image": image, "label": label}


def _build(path: str, file_format: str, num_shards: int) -> str:
    builder = CrateJaxTestImages(data_dir=path, file_format=file_format)
    config = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards)
    builder.download_and_prepare(download_config=config)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return _build(str(tmp_path_factory.mktemp("array_record")), "array_record", 1)


@pytest.fixture(scope="module")
def tfrecord_dir(tmp_path_factory) -> str:
    # Three files, so that file shuffling and interleaving take part.
    return _build(str(tmp_path_factory.mktemp("tfrecord")), "tfrecord", 3)


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory) -> str:
    """The same examples as image files: train/class_<label>/<index>.png, plus a stray non-image."""
    root = tmp_path_factory.mktemp("folder")
    for i, (image, label) in enumerate(_examples()):
        os.makedirs(root / "train" / f"class_{label}", exist_ok=True)
        (root / "train" / f"class_{label}" / f"{i:02d}.png").write_bytes(image)
    (root / "train" / "class_0" / "notes.txt").write_text("not an image file: ignored")
    return str(root)


@pytest.fixture(scope="module")
def dirs(data_dir, tfrecord_dir, folder_dir) -> dict[str, str]:
    return {"grain": data_dir, "tfrecord": tfrecord_dir, "image_folder": folder_dir}


def _source(data_dir: str):
    """The stored examples, in storage order (TFDS orders them by a hash of their key)."""
    return tfds.data_source(
        NAME, split="train", data_dir=data_dir, download=False, decoders={"image": tfds.decode.SkipDecoding()}
    )


def _iterator(data_dir: str, **overrides):
    kwargs = {
        "name": NAME,
        "split": "train",
        "data_dir": data_dir,
        "image_size": 16,
        "transform": "mae_pretrain",
        "global_batch_size": 8,
        "seed": 0,
        "process_index": 0,
        "process_count": 1,
    }
    return make_iterator(**(kwargs | overrides))


def _backend_iterator(dirs: dict[str, str], backend: str, **overrides):
    return _iterator(dirs[backend], backend=backend, **overrides)


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("image", "label", "weight"):
            np.testing.assert_array_equal(x[key], y[key])


def _examples_of(batches: list[dict]) -> list[tuple[np.ndarray, int]]:
    """(image, label) of every weight-1 row."""
    return [
        (image, int(label))
        for batch in batches
        for image, label, weight in zip(batch["image"], batch["label"], batch["weight"], strict=True)
        if weight > 0
    ]


def _labels(batches: list[dict]) -> np.ndarray:
    return np.concatenate([b["label"] for b in batches])


def _pixels(image: np.ndarray) -> np.ndarray:
    """A normalised image back in [0, 1] pixel units."""
    return image * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN


# ------------------------------------------------------------------------------------ pipeline


def test_batches_have_the_promised_shapes_and_dtypes(data_dir):
    batch = next(_iterator(data_dir))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["weight"].shape == (8,) and batch["weight"].dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_the_same_batches_and_another_seed_does_not(dirs, backend):
    first = _take(_backend_iterator(dirs, backend, seed=3), 4)  # 32 examples: crosses an epoch boundary.
    _assert_batches_equal(first, _take(_backend_iterator(dirs, backend, seed=3), 4))
    other = _take(_backend_iterator(dirs, backend, seed=4), 4)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(first, other, strict=True))


@pytest.mark.parametrize("backend", ["grain", "image_folder"])
def test_processes_split_each_global_batch_into_contiguous_rows(dirs, backend):
    whole = _take(_backend_iterator(dirs, backend), 5)
    parts = [_take(_backend_iterator(dirs, backend, process_index=p, process_count=2), 5) for p in (0, 1)]
    for b, batch in enumerate(whole):
        for key in ("image", "label", "weight"):
            np.testing.assert_array_equal(np.concatenate([parts[0][b][key], parts[1][b][key]]), batch[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_epoch_over_two_processes_covers_every_example_once(dirs, backend):
    # Eval transform (deterministic) so that an example's pixels identify it.
    eval_transform = transforms.get_transform("eval", 16)
    reference = [eval_transform.map(e)["image"].tobytes() for e in _source(dirs["grain"]) if e["image"] != GARBAGE]
    seen, weights, counts = [], [], []
    for p in (0, 1):
        it = _backend_iterator(
            dirs, backend, transform="eval", num_epochs=1, drop_remainder=False, process_index=p, process_count=2
        )
        batches = list(it)
        counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (4, 16, 16, 3)
            weights += list(batch["weight"])
            seen += [image.tobytes() for image, weight in zip(batch["image"], batch["weight"], strict=True) if weight]
    assert counts == [3, 3]  # 20 examples -> 3 global batches of 8 on both processes, padded with weight 0.
    assert sum(weights) == NUM_IMAGES - 1  # All but the corrupt one; padding weighs 0.
    assert sorted(seen) == sorted(reference)


@pytest.mark.parametrize("backend", ["tfrecord", "image_folder"])
def test_backends_give_the_grain_batches_up_to_order(dirs, backend):
    """Same keys, shapes, dtypes and batch count; the same examples with the same pixels."""
    kwargs = dict(transform="eval", image_size=24, num_epochs=1, drop_remainder=False)
    expected = list(_backend_iterator(dirs, "grain", **kwargs))
    got = list(_backend_iterator(dirs, backend, **kwargs))
    assert len(got) == len(expected) == 3
    for x, y in zip(got, expected, strict=True):
        assert {k: (v.shape, v.dtype) for k, v in x.items()} == {k: (v.shape, v.dtype) for k, v in y.items()}
    got_examples, expected_examples = _examples_of(got), _examples_of(expected)
    assert len(got_examples) == len(expected_examples) == NUM_IMAGES - 1
    unmatched = list(range(len(expected_examples)))
    for image, label in got_examples:
        diffs = [np.abs(_pixels(image) - _pixels(expected_examples[j][0])).mean() for j in unmatched]
        j = unmatched.pop(int(np.argmin(diffs)))
        assert min(diffs) <= 1 / 255 and expected_examples[j][1] == label


def test_drop_remainder_drops_the_last_partial_global_batch(data_dir, tfrecord_dir):
    assert len(list(_iterator(data_dir, num_epochs=1))) == 2  # 20 // 8
    assert len(list(_iterator(tfrecord_dir, backend="tfrecord", num_epochs=1))) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_state_gives_exactly_the_next_batch(dirs, backend):
    it = _backend_iterator(dirs, backend)
    _take(it, 3)  # 24 examples: the state lies inside the second epoch.
    state = it.get_state()
    expected = _take(it, 2)
    resumed = _backend_iterator(dirs, backend)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iterator_state_round_trips_through_orbax(dirs, backend, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = _backend_iterator(dirs, backend)
    _take(it, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 2)
    fresh = _backend_iterator(dirs, backend)
    restored = manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(restored["data"], 2), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_batch_equals_skipping(dirs, backend):
    it = _backend_iterator(dirs, backend)
    _take(it, 3)
    _assert_batches_equal(_take(_backend_iterator(dirs, backend, start_batch=3), 2), _take(it, 2))


def test_tfrecord_state_of_another_process_layout_is_refused(tfrecord_dir):
    state = _iterator(tfrecord_dir, backend="tfrecord", process_index=1, process_count=2).get_state()
    with pytest.raises(ValueError, match="saved with process_index=1"):
        _iterator(tfrecord_dir, backend="tfrecord").set_state(state)


def test_corrupt_image_becomes_a_weight_zero_placeholder(data_dir):
    source = _source(data_dir)
    corrupt = [i for i, e in enumerate(source) if e["image"] == GARBAGE]
    batches = list(_iterator(data_dir, transform="eval", shuffle=False, num_epochs=1, global_batch_size=4))
    images = np.concatenate([b["image"] for b in batches])
    weights = np.concatenate([b["weight"] for b in batches])
    assert len(corrupt) == 1 and weights[corrupt[0]] == 0.0 and np.all(images[corrupt[0]] == 0.0)
    assert np.all(np.delete(weights, corrupt[0]) == 1.0)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [e["label"] for e in source])


@pytest.mark.parametrize("backend", ["tfrecord", "image_folder"])
def test_corrupt_file_is_counted_as_one_weight_zero_example(dirs, backend):
    batches = list(_backend_iterator(dirs, backend, num_epochs=1, global_batch_size=4))  # 5 full batches
    weights = np.concatenate([b["weight"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert len(weights) == NUM_IMAGES and np.sum(weights == 0) == 1  # What the train step counts as skipped.
    assert np.all(images[weights == 0] == 0.0) and _labels(batches)[weights == 0] == CORRUPT % 4


def test_image_folder_labels_splits_and_errors(tmp_path):
    for split, classes in (("train", ("b_second", "a_first")), ("val", ("a_first", "b_second"))):
        for name in classes:
            os.makedirs(tmp_path / split / name)
            for i in range(2):
                (tmp_path / split / name / f"{i}.JPEG").write_bytes(_png(np.full((8, 8, 3), i * 200, np.uint8)))
    labels = _labels(
        list(_iterator(str(tmp_path), backend="image_folder", num_epochs=1, shuffle=False, global_batch_size=4))
    )
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # Sorted class folders: a_first is 0.
    # "validation" (the TFDS name) falls back to the val folder; TFDS slicing works.
    assert num_examples("unused", "validation", str(tmp_path), backend="image_folder") == 4
    assert num_examples("unused", "train[:50%]+val[-1:]", str(tmp_path), backend="image_folder") == 3
    with pytest.raises(FileNotFoundError, match=r"'test' not found.*test/<class>/<image>.*\['train', 'val'\]"):
        num_examples("unused", "test", str(tmp_path), backend="image_folder")


def test_backend_errors_say_what_to_do(data_dir, tfrecord_dir):
    with pytest.raises(ValueError, match="stored as tfrecord.*use backend='tfrecord'"):
        _iterator(tfrecord_dir)
    with pytest.raises(ValueError, match="stored as array_record.*use backend='grain'"):
        _iterator(data_dir, backend="tfrecord")
    with pytest.raises(ValueError, match="Unknown data backend 'nope'"):
        _iterator(data_dir, backend="nope")
    with pytest.raises(ValueError, match="image_folder' needs data_dir"):
        _iterator(None, backend="image_folder")


def test_batch_not_divisible_by_process_count_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match="batch_size 9 .*process count 2"):
        _iterator(data_dir, global_batch_size=9, process_count=2)


def test_missing_dataset_error_names_the_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'imagenet2012' not found in data_dir {tmp_path}.*downloads/manual"):
        _iterator(str(tmp_path), name="imagenet2012")
    with pytest.raises(FileNotFoundError, match=f"'no_such_dataset' not found in data_dir {tmp_path}"):
        num_examples("no_such_dataset", "train", str(tmp_path))


def test_num_examples(data_dir, tfrecord_dir, folder_dir):
    assert num_examples(NAME, "train", data_dir) == NUM_IMAGES
    assert num_examples(NAME, "train[:50%]", data_dir) == NUM_IMAGES // 2
    assert num_examples(NAME, "train", tfrecord_dir, backend="tfrecord") == NUM_IMAGES
    assert num_examples(NAME, "train", folder_dir, backend="image_folder") == NUM_IMAGES


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_input_runs_on_every_backend(dirs, backend):
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    with config.unlocked():
        config.model.image_size = 32
        config.batch_size = 4
        config.data.name = NAME
        config.data.data_dir = dirs[backend]
        config.data.worker_count = 0
        config.data.backend = backend
    result = bench_input.run(config, batches=2, warmup=1)
    assert result["images_per_sec"] > 0 and result["tfdata_images_per_sec"] > 0 and result["ratio"] > 0
    assert "images/s per process" in bench_input.format_result(result)


# ---------------------------------------------------------------------------------- transforms


def test_transforms_shape_dtype_and_normalisation():
    mean_colour = np.broadcast_to((transforms.IMAGENET_MEAN * 255).round().astype(np.uint8), (30, 50, 3))
    element = {"image": _png(np.ascontiguousarray(mean_colour)), "label": 3}
    for name in set(transforms.TRANSFORMS) - {"mae_pretrain_recolour"}:  # it changes colours (test below)
        t = transforms.get_transform(name, 24, **(NO_AUGMENT if name == "finetune_train" else {}))
        out = t.random_map(element, np.random.default_rng(0)) if name != "eval" else t.map(element)
        assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32
        np.testing.assert_allclose(out["image"], 0.0, atol=0.01)  # The mean colour normalises to 0.
        assert out["label"] == 3 and out["weight"] == 1.0
    white = transforms.get_transform("eval", 8).map({"image": _png(np.full((8, 8, 3), 255, np.uint8))})
    expected_white = (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
    np.testing.assert_allclose(white["image"][0, 0], expected_white, rtol=1e-5)


def test_random_transform_is_a_function_of_the_rng():
    element = {"image": _png(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))}
    t = transforms.get_transform("mae_pretrain", 16)
    a, b, c = (t.random_map(element, np.random.default_rng(s))["image"] for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_recolour_and_turn_is_a_quarter_turn_channel_order_affine_map_and_inversion():
    """Every output is one of the 4 turns x 6 channel orders of the input under a per-channel
    gain and offset in range (inverted or not), and every turn, order and inversion occurs."""
    rng = np.random.default_rng(0)
    image = rng.integers(100, 151, (8, 8, 3)).astype(np.uint8)  # 150 x 1.4 + 40 < 255: never clipped
    seen = set()
    for seed in range(300):
        out = transforms.recolour_and_turn(image, np.random.default_rng(seed)).astype(np.float64)
        assert out.shape == image.shape
        matches = []
        for turn in range(4):
            for order in itertools.permutations(range(3)):
                x = np.rot90(image, turn)[..., list(order)].reshape(-1, 3).astype(np.float64)
                for inverted in (False, True):
                    y = (255 - out if inverted else out).reshape(-1, 3)
                    fits = [np.polyfit(x[:, c], y[:, c], 1) for c in range(3)]
                    residual = max(np.abs(np.polyval(f, x[:, c]) - y[:, c]).max() for c, f in enumerate(fits))
                    gain_ok = all(transforms.RECOLOUR_GAIN[0] - 0.02 <= f[0] <= transforms.RECOLOUR_GAIN[1] + 0.02
                                  for f in fits)  # fmt: skip
                    if residual <= 1.0 and gain_ok:  # rounding to uint8: 0.5, plus the fit
                        matches.append((turn, order, inverted))
        assert len(matches) == 1, (seed, matches)
        seen.add(matches[0])
    assert {m[0] for m in seen} == set(range(4)) and len({m[1] for m in seen}) == 6
    assert {m[2] for m in seen} == {False, True}
    recolour = transforms.get_transform("mae_pretrain_recolour", 16)
    element = {"image": _png(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))}
    a, b = (recolour.random_map(element, np.random.default_rng(5))["image"] for _ in range(2))
    np.testing.assert_array_equal(a, b)  # a function of the rng, as every random transform


def test_random_resized_crop_box_stays_inside_and_falls_back_to_center():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = transforms.random_resized_crop_box(rng, 30, 70, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 70 and h > 0 and w > 0
    # A 1x100 strip admits no crop within the ratio range: torchvision's fallback center crop.
    assert transforms.random_resized_crop_box(rng, 1, 100, (0.5, 1.0), (3 / 4, 4 / 3)) == (0, 49, 1, 1)


def test_eval_geometry_matches_torchvision():
    assert transforms.eval_resize_size(224) == 256
    assert transforms.resize_shorter_side_shape(375, 500, 256) == (256, 341)
    assert transforms.center_crop_box(256, 341, 224) == (16, 58, 224, 224)


def test_unknown_transform_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown transform 'nope'"):
        transforms.get_transform("nope", 32)


# ---------------------------------------------------------------------------- embedded dataset


def test_embedded_dataset_builds_once_under_concurrent_callers_and_yields_batches(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(embedded.ensure_built, [data_dir, data_dir])) == [data_dir, data_dir]
    sizes = {
        split: num_examples(embedded.NAME, split, data_dir)
        for split in ("train", "probe_train", "probe_test", "completion")
    }
    assert sizes == {"train": 3024, "probe_train": 1024, "probe_test": 512, "completion": 384}
    it = make_iterator(
        name=embedded.NAME,
        split="probe_test",
        data_dir=data_dir,
        image_size=32,
        transform="eval",
        global_batch_size=16,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["image"].shape == (16, 32, 32, 3) and np.all(batch["weight"] == 1.0)
    assert np.all((batch["label"] >= 0) & (batch["label"] < len(embedded.PHOTOS)))


def test_bench_input_command_line_with_a_grain_worker(data_dir):
    repo = os.path.join(os.path.dirname(__file__), "..")
    command = [
        sys.executable,
        "-m",
        "crate_jax.tools.bench_input",
        "--config=configs/demo.py",
        "--config.model.image_size=32",
        "--config.batch_size=4",
        f"--config.data.name={NAME}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.worker_count=1",
        "--batches=2",
        "--warmup=1",
    ]
    out = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images/s per process" in out.stdout and "ratio (this / tf.data)" in out.stdout
