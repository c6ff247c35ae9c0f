"""Process-wide allocator and garbage-collector settings.

Every NBD or FUSE read allocates its payload buffer (up to 1 MiB for FUSE,
32 MiB for NBD) in the event loop thread, fills it (often in a worker
thread) and frees it once the reply is sent.  glibc serves allocations above
its mmap threshold (128 KiB at start, raised dynamically only in some
free patterns) with a fresh ``mmap`` and returns them with ``munmap``, so
each 1 MiB read would pay 256 page faults plus the kernel zeroing the
pages.  A fixed threshold above our request sizes keeps those buffers in
the heap, where freed memory is reused at once (docs/io-engine.md).

The trim threshold bounds what an idle daemon keeps: free memory at the top
of the heap beyond it goes back to the kernel.  QEMU keeps its own bounce
buffers in pools, so it never had this cost.
"""

from __future__ import annotations

import ctypes
import gc
import os

from .libc import LIBC

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# above the largest buffer a single request normally allocates (1 MiB FUSE
# and backup chunks, 4 MiB stream/commit chunks, a few MiB NBD requests);
# larger ones still get mmap
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20


def tune_malloc() -> bool:
    """Apply the thresholds; False where the C library is not glibc."""
    # (platform.libc_ver() would read the whole python binary to find out)
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):
        return False
    try:
        mallopt = LIBC.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim: bool = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return trim and ok


# The cyclic garbage collector runs a young-generation pass whenever the
# container objects allocated and still alive outgrow 700.  Requests must
# not make cyclic garbage (a completion closure that referred to itself made
# ~7 such objects per request, and perf put 8% of the daemon's CPU under NBD
# 4k random reads in gc_collect_main; file.py now uses partials); what is
# left is bursts of objects that live a while (requests in flight, replies
# queued), which a larger threshold lets die by reference counting before a
# pass walks them.  The long-lived objects of startup (the schema, the
# drivers, the graph) are frozen out of every later pass.
GC_THRESHOLD_0 = 50_000


def tune_gc() -> None:
    """Collect the young generation less often (at process start)."""
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_0, t1, t2)


def freeze_startup_objects() -> None:
    """Move what startup allocated out of the collector's way (once the
    daemon is up): gc.freeze() puts every tracked object in a permanent
    generation that full collections no longer traverse."""
    gc.collect()
    gc.freeze()
