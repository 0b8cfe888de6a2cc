"""Host memory: keep what a training step frees for the next step, instead of handing it back to the OS."""

from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MB come from the heap
TRIM_THRESHOLD = 2**30  # up to 1 GB of free heap stays with the process


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks up to 32 MB from the heap and keep up to 1 GB of it free.

    That is the way jemalloc and tcmalloc behave by default. Returns False where the C library is not glibc (nothing
    changes there).

    A step allocates and frees the same activations every time. By default glibc hands blocks above its adaptive
    mmap threshold back to the OS when freed, and the next step faults their pages in again, zeroed: thousands of
    page faults per step for LeNet on a CPU, more or less from one process to the next. With this: none (the
    numbers, before and after: BENCHMARKS.md).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
