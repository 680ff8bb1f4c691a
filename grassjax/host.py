"""Host-process settings that speed up XLA:CPU: glibc's malloc keeps freed memory for reuse.

launch.py calls `keep_freed_memory()` at start (--noreuse_host_memory turns it off); why it helps,
and how to get the same from the environment: keep_freed_memory. Its measured effect:
PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 30  # blocks below 1 GiB come from the heap and stay there when freed
# what keep_freed_memory set in this process (0: glibc's own thresholds); benchmarks report it
kept_below_bytes = 0


def keep_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Make glibc keep freed blocks below `threshold_bytes` for reuse instead of returning them to
    the OS.

    Why: XLA:CPU allocates each call's temporaries (tens of MiB for a train step) with malloc and
    frees them when the call returns. glibc serves blocks that large with a fresh mmap and hands
    them back with munmap, so every step faults its temporaries' pages in (and the kernel zeroes
    them) all over again, a large share of a small model's step time on a CPU (PERFORMANCE.md).
    Raising glibc's mmap and trim thresholds keeps the freed blocks in the heap, where the next
    step finds them.

    Process-wide and one-way: the resident memory stays near its peak. Returns True where it took
    effect, False where the C library has no mallopt (macOS, musl) or refused the value (an old
    glibc caps the mmap threshold at 32 MiB); then nothing changed.

    A script can call it, or get the same from the environment before Python starts:
      GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global kept_below_bytes
    value = int(threshold_bytes)
    # mmap first: glibc refuses an mmap threshold it cannot honour, and then the trim threshold
    # stays as it was.
    if not (mallopt(M_MMAP_THRESHOLD, value) and mallopt(M_TRIM_THRESHOLD, value)):
        return False
    kept_below_bytes = value
    return True
