"""Large CPU tensors kept in the process's heap between training steps.

glibc's `malloc` maps every allocation above its mmap threshold (at most 32 MiB by default) afresh and unmaps it
when it is freed, so a training step's large tensors (the logits of a SmolLM2 batch alone take hundreds of MiB)
are page-faulted in again at every step. On 2 CPU cores a LoRA step of SmolLM2-135M on 16 x 200 tokens took
20.3 s, 14.3 s of it in the kernel; with the heap kept, 11.1 s (0.1 s; `benchmarks/cpu_allocator.py`).
`keep_large_allocations` raises glibc's mmap and trim thresholds (`mallopt`, as `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` would at start-up), so freed memory stays with the process for the next step.
`VPL_TRL_KEEP_HEAP=0` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from .distributed import has_accelerator

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int


def keep_large_allocations() -> bool:
    """Keep large allocations in the heap, when training on a CPU with glibc (no GPU) and
    `VPL_TRL_KEEP_HEAP` is not `0`. Returns whether glibc took the settings."""
    if os.environ.get("VPL_TRL_KEEP_HEAP", "").strip().lower() in ("0", "false", "no"):
        return False
    if has_accelerator():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
