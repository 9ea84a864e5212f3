"""Preemption: SIGTERM makes every process stop at the same step, save it and exit 0,
without a blocking host sync per step.

Several processes (jax.distributed initialised): JAX's preemption service owns SIGTERM. Its
C++ handler tells the coordination service, which propagates the notice to every process and
agrees on a step (the largest step any process has reached, plus one);
`multihost_utils.reached_preemption_sync_point(step)` is True on every process at that step
and a local call otherwise. No Python SIGTERM handler is installed then: it would replace
JAX's, and the notice would reach no other process. The sync point must be asked at every
step, from the same starting step on every process (a resumed run starts them all at the
checkpoint's step).

One process (no jax.distributed): a Python handler sets a flag that the loop reads.
"""

from __future__ import annotations

import logging
import signal

from jax._src import distributed  # whether jax.distributed is initialised: no public accessor
from jax.experimental import multihost_utils


class Preemption:
    """`stop(step)` once per step: True on every process at the same step after a SIGTERM."""

    def __init__(self):
        self._requested = False
        self._previous = None
        self._distributed = distributed.global_state.client is not None
        if self._distributed:
            if distributed.global_state.preemption_sync_manager is None:
                raise ValueError(
                    "jax.distributed runs without its preemption service (jax_enable_preemption_service=False): "
                    "a SIGTERM could not stop every process at the same step"
                )
        else:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step")
        self._requested = True

    def stop(self, step: int) -> bool:
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
