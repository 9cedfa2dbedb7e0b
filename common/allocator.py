"""How the process's C allocator keeps freed memory: for reuse, not for the OS.

A training step allocates and frees every activation and gradient buffer, several
MB each. glibc's ``malloc`` serves blocks above its mmap threshold with fresh
``mmap`` pages and unmaps them on ``free``, and it trims the top of the heap as
soon as 128 KB are free there, so the next step page-faults all of that memory in
again, zero-filled by the kernel: a ``resnet10`` step on one thread took 5,000 to
17,000 minor page faults, step after step. :func:`keep_freed_memory` raises the
mmap threshold to glibc's maximum (32 MiB) and the trim threshold to 256 MiB, so
freed blocks stay in the heap for the next step: after the first steps, none. A
step took 0.66x (``cnn``) to 1.0x (``resnet12``) the time (``python -m
bench.step``, docs/BENCHMARKS.md). The cost is resident memory a process keeps
after its peak, at most the trim threshold per arena. It changes no result: where
memory comes from, not what is computed.

The ClientApp and ServerApp modules call it when they load, and so does the
sequential loop of ``bench.round``. A ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment is the user's choice and is left
alone; other C libraries (macOS, musl) have no ``mallopt`` and keep their own
policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module); return whether they
    were set (``False``: not glibc, or the user set either in the environment)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
