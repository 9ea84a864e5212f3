"""A hang watchdog: when a run makes no progress for `config.hang_timeout_s`, it logs every
thread's Python stack and exits non-zero, so a scheduler restarts it from the last checkpoint.

Progress is a finished train step or evaluation batch, or a heartbeat from a long phase
(compiling, restoring, building a dataset, extracting features, fitting the logistic probe):
anything calls `beat("what")`. A collective that a peer never joins, a deadlocked thread pool
or a stuck file system all end the same way: the main thread waits forever at 0% CPU, and no
Python code of ours runs again; only a separate thread can notice.

One watchdog per process at a time (`with Watchdog(...)`, started by `main.run`); `beat` is a
no-op when none runs, so library code can report progress unconditionally, as it logs.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import tempfile
import threading
import time

EXIT_CODE = 3  # what a hung process exits with (os._exit: no cleanup can block it)

_active: Watchdog | None = None


def beat(what: str) -> None:
    """Report progress (`what` is named in the report if the run hangs after it)."""
    if _active is not None:
        _active.beat(what)


class Watchdog:
    """`with Watchdog(timeout_s):` runs a daemon thread that ends the process after
    `timeout_s` seconds without a `beat`. timeout_s <= 0 disables it."""

    def __init__(self, timeout_s: float, poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(self.timeout_s / 10, 0.05))
        self._last = time.monotonic()
        self._what = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what

    def __enter__(self) -> Watchdog:
        global _active
        if self.timeout_s > 0:
            if _active is not None:
                raise RuntimeError("a watchdog is already running in this process")
            self.beat("start")
            self._thread = threading.Thread(target=self._watch, name="crate_jax-watchdog", daemon=True)
            self._thread.start()
            _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            _active = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        message = (
            f"no progress for {idle:.0f} s (config.hang_timeout_s={self.timeout_s:g}); last progress: "
            f"{self._what!r}. Every thread's Python stack follows; exiting with code {EXIT_CODE}."
        )
        # stderr first, without locks: a thread that hangs holding the logging lock must not stop us.
        sys.stderr.write(f"HANG: {message}\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if _logs_to_a_file():  # otherwise the log is stderr, written above
            logger = threading.Thread(target=_log_stacks, args=(message,), daemon=True)
            logger.start()
            logger.join(timeout=5.0)
        os._exit(EXIT_CODE)


def _logs_to_a_file() -> bool:
    from absl import logging as absl_logging

    stream = getattr(absl_logging.get_absl_handler().python_handler, "stream", None)
    return stream is not None and stream not in (sys.stderr, sys.__stderr__)


def _log_stacks(message: str) -> None:
    with tempfile.TemporaryFile("w+") as f:  # faulthandler writes to a real file only
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        logging.error("HANG: %s\n%s", message, f.read())
    for handler in logging.getLogger().handlers:
        handler.flush()
