"""Let a process reuse the memory it frees instead of handing it back to the kernel at once.

glibc serves allocations over 128 KiB with fresh mmap()s and trims freed heap tops eagerly,
so every segment-sized buffer (a serialised blob, a zstd frame, a protobuf arena, a gRPC
slice, a decoded tensor) is new memory whose every page faults on first touch. On the 2-core
development VM that costs ~3 us a page: copying 14.7 MB into fresh memory took 11 ms (1.3 GB/s)
instead of ~0.4 ms, and the latent transport touches a packet's worth of memory several times.
Keeping freed memory in the heap for reuse (what jemalloc and tcmalloc do by default) made
most transport stages, measured one at a time, and the raw gRPC baseline about twice as
fast; a whole handoff, whose buffers partly recycle anyway, gained less (0-20% across runs).

The price is resident memory: up to `trim_threshold` bytes freed at the top of each malloc
arena stay mapped. The services hold models of hundreds of MB, so 128 MiB is small beside them.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: only bigger blocks get their own mmap
TRIM_THRESHOLD = 128 << 20  # freed memory kept at the top of a heap before it is returned


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible.

    Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment, without
    needing them set before the interpreter starts. A no-op on other platforms and C libraries.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    if not done:
        log.warning("mallopt refused mmap_threshold=%d, trim_threshold=%d", mmap_threshold, trim_threshold)
    return bool(done)
