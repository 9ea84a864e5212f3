"""Host memory settings for XLA:CPU runs."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory instead of returning it to the OS.

    XLA:CPU allocates a step's temporaries (about 1 GB for CRATE-MAE-Tiny at batch 32) and
    frees them at its end; glibc serves such blocks with mmap and unmaps them on free, so
    every step page-faults its whole working set anew (about 216,000 faults and 0.3 s of
    system time per Tiny step here) and the faults serialise XLA's threads. One arena, no
    mmap and no trimming keep the pages mapped: the faults go to zero and the step uses both
    cores. Returns whether it applied (glibc only); call it before the first allocation
    that matters. Used by the trainer on CPU backends (`--keep_freed_memory`, main.py) and by
    the benchmark: the memory stays with the process until it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return all(
        libc.mallopt(opt, v) == 1 for opt, v in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
    )
