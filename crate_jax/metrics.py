"""Metric writers: clu (TensorBoard + console) and `metrics.jsonl` for scripts.

Only process 0 writes files; other processes log to the console only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from etils import epath

from crate_jax import storage


def _plain(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsLog:
    """One place every scalar goes: TensorBoard, the console, and WORKDIR/metrics.jsonl.

    On an object store (gs://) metrics.jsonl is one object rewritten whole at every row (no
    append there), and TensorBoard's writer (TensorFlow's own GCS client cannot reach an
    emulator) writes into a local mirror copied into the workdir at every row and at the end."""

    def __init__(self, workdir: str):
        self.is_writer = jax.process_index() == 0
        self.mirror = storage.Mirror(workdir) if self.is_writer else None
        logdir = str(self.mirror.local) if self.mirror else workdir
        self.writer = metric_writers.create_default_writer(logdir, just_logging=not self.is_writer, asynchronous=True)
        self.jsonl = epath.Path(workdir) / "metrics.jsonl"
        self.rewrite = storage.is_remote(workdir)
        self._text = storage.read_text(self.jsonl) if self.is_writer and self.rewrite else ""

    @property
    def local_dir(self) -> epath.Path:
        """Where writers that need a local disk (jax's profiler) write; copied into the workdir."""
        return self.mirror.local

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        values = {k: _plain(v) for k, v in values.items()}
        self.writer.write_scalars(step, values)
        if self.is_writer:
            row = json.dumps({"step": int(step), **values}) + "\n"
            if self.rewrite:  # every row of every run of this workdir, in one object
                self._text += row
                storage.write_text(self.jsonl, self._text)
            else:
                with self.jsonl.open("a") as f:  # appends, also for a resumed run
                    f.write(row)
            self._sync()

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.writer.write_images(step, images)

    def hparams(self, values: dict[str, Any]) -> None:
        self.writer.write_hparams(values)

    def _sync(self) -> None:
        if self.mirror and self.rewrite:
            self.writer.flush()
            self.mirror.sync()

    def flush(self) -> None:
        self.writer.flush()
        self._sync()

    def close(self) -> None:
        self.writer.close()
        if self.mirror:
            self.mirror.sync()


class Throughput:
    """Images per second over training steps only: pause around evals and checkpoints."""

    def __init__(self):
        self.images = 0
        self.elapsed = 0.0
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def pause(self) -> None:
        if self._start is not None:
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        """Images/s since the last call; resets the window."""
        running = self._start is not None
        self.pause()
        rate = self.images / self.elapsed if self.elapsed > 0 else 0.0
        self.images, self.elapsed = 0, 0.0
        if running:
            self.start()
        return rate
