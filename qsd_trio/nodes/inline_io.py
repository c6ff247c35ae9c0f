"""When a small buffered write may run inline on the event loop.

A 4 KiB ``pwrite`` into the page cache takes a few microseconds; the hop to
a worker thread and back costs tens to hundreds (it dominated the NBD random
write benchmark).  But a buffered write can block: the kernel throttles
writers when too much of memory is dirty (balance_dirty_pages), and a write
of part of a page that is not cached reads that page first.  So a write runs
inline only when none of that can happen, as far as we can tell cheaply:

* it covers whole pages (no read-modify-write of a page);
* the system's dirty and writeback memory is below half the point where the
  kernel starts to throttle ((background + dirty threshold) / 2, the
  "freerun" ceiling), read from /proc at most every 100 ms;
* the node has not seen an inline write *block* for longer than
  ``STALL_NS`` recently: one that does (journal commit, cgroup limits) sends
  that node's writes to threads for ``COOL_DOWN`` seconds.

A write counts as blocked only if it took that long and the thread slept in
the kernel meanwhile (a voluntary context switch, from getrusage).  The
getrusage calls cost as much as a quarter of the write itself, so only
every ``WATCH_EVERY``-th inline write is watched that closely, and the one
after any write that took too long: a node whose writes block keeps
blocking, and is caught a write later.  A busy machine preempts the event
loop anywhere, inside a write as often as outside one (involuntary
switches); those are not stalls, and a thread hop would not make the CPU
any less busy.

Everything else, and every write with FUA, goes to worker threads.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
# Larger writes go to the I/O engine: a large copy into the page cache holds
# the event loop, while on the engine's worker threads several such copies
# run on the other cores at once and the loop goes on
INLINE_MAX = 256 * 1024
STALL_NS = 2_000_000      # an inline write slower than this disables inlining ...
COOL_DOWN = 1.0           # ... for this many seconds on that node
YIELD_EVERY = 8           # inline writes/cached reads on a node between checkpoints
WATCH_EVERY = 8           # inline writes checked for sleeping (see above)
_REFRESH = 0.1            # seconds between reads of /proc/meminfo

_last_check = -1.0
_dirty_ok = False


def voluntary_switches() -> int:
    """How often this thread has slept in the kernel (ru_nvcsw); ~0.7 us."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def _sysctl(name: str) -> int:
    try:
        with open(f"/proc/sys/vm/{name}") as f:
            return int(f.read())
    except OSError:
        return 0


def _compute_dirty_ok() -> bool:
    try:
        m = _meminfo()
    except OSError:
        return False
    avail = m.get("MemAvailable", 0)
    bg = _sysctl("dirty_background_bytes") or avail * _sysctl("dirty_background_ratio") // 100
    hard = _sysctl("dirty_bytes") or avail * _sysctl("dirty_ratio") // 100
    freerun = (bg + hard) // 2
    return m.get("Dirty", 0) + m.get("Writeback", 0) < freerun // 2


def dirty_memory_ok() -> bool:
    """True if buffered writes are far from being throttled (cached briefly)."""
    global _last_check, _dirty_ok
    now = time.monotonic()
    if now - _last_check >= _REFRESH:
        _dirty_ok = _compute_dirty_ok()
        _last_check = now
    return _dirty_ok


class InlineWrites:
    """Per-node switch with the stall detector."""

    def __init__(self) -> None:
        self.resume_at = 0.0
        self.inline = 0   # statistics: writes done inline
        self.stalls = 0   # statistics: inline writes that were too slow
        self._since_yield = 0
        self._until_watch = 0  # writes until the next watched one

    def allowed(self, offset: int, length: int) -> bool:
        return (0 < length <= INLINE_MAX and offset % PAGE == 0 and length % PAGE == 0
                and time.monotonic() >= self.resume_at and dirty_memory_ok())

    def should_yield(self) -> bool:
        """Whether the inline write (or page-cache read) just done should
        end with a checkpoint.

        A trip through the scheduler costs more than the I/O itself, and
        the callers on the hot path (NBD and FUSE request loops) reach one
        of their own per request anyway.  But a loop that only does such
        I/O (a zero-write fallback, preallocation, a copy from a cached
        source) must not hold the event loop for long, so every
        ``YIELD_EVERY``-th one on a node still yields."""
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            return True
        return False

    def run(self, fn: Callable[..., object], *args: Any) -> None:
        """Run the write ``fn(*args)`` here, watching for a stall."""
        watched = self._until_watch <= 0
        if watched:
            self._until_watch = WATCH_EVERY
            switches = voluntary_switches()
        self._until_watch -= 1
        t0 = time.perf_counter_ns()
        try:
            fn(*args)
        finally:
            self.inline += 1
            if time.perf_counter_ns() - t0 > STALL_NS:
                if not watched:
                    self._until_watch = 0  # slow, for some reason: watch the next one
                elif voluntary_switches() != switches:
                    self.stalls += 1
                    self.resume_at = time.monotonic() + COOL_DOWN
