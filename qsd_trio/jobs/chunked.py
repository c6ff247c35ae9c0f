"""Many copies in flight for the jobs that walk a disk once (stream, commit).

QEMU's stream and commit copy one 512 KiB chunk at a time from a single
coroutine and rely on the thread pool or the kernel (aio) underneath to
overlap the work of successive chunks.  Here the job issues the chunks
itself, in order, up to ``max_tasks`` (16) chunks and ``max_bytes``
(16 MiB) at once, as QEMU's mirror does, so that an I/O engine that serves
requests in parallel has enough of them.

:class:`ChunkCopier` walks ``[0, length)``.  The job gives it two
callbacks:

* ``plan(offset, limit) -> (n, what)``: how many bytes from ``offset``
  (1 to ``limit``) share one decision, and the decision: ``None`` to skip
  them (a hole to leave alone, data the destination already holds), or a
  value passed on to ``copy``.  Planning is in order, one call at a time,
  and an answer covers the whole extent it returns: the chunks cut from it
  in the same window reuse it without asking again.
* ``copy(offset, n, what)``: copy those bytes; an ``OSError`` is the
  chunk's failure (one from ``plan`` fails the chunk that starts there).

A plan's answer is kept for the next windows too when the job gives a
``stamp``: a function whose value changes when something the plans depend
on may have changed between windows (a write by someone else).  Without
one, each window plans afresh.  A block status answer can cost more than
its chunk: a file system's SEEK_HOLE on tmpfs walks the page cache from
the offset to the next hole, 3 ms for each window of a fully allocated
1 GiB file.

Each call of :meth:`ChunkCopier.window` issues chunks of at most ``chunk``
bytes until a stop: the end of the disk, the job told to pause or cancel,
the speed limit's quota for the slice used up, a failed chunk, or the
window's budget (bytes issued, seconds) spent.  It then waits for every
chunk still in flight, so that the job pauses, sleeps, handles an error or
leaves a drained section with none of its requests in flight -- as the
QEMU job is when it reaches a pause point.

Progress: a skipped extent counts when it is planned, a copied chunk when
it has been copied; the total is the disk's length (QEMU's stream and
commit count every chunk, copied or not).  Speed: only copied bytes count,
when they are issued.

Errors: every failed chunk goes back on a list of ranges to plan again
before the walk goes on (a retry after ``stop`` and a resume, or at once
for ``ignore``); the window returns the first failure so the job decides
what to do with it, once.  The others are not reported: they are tried
again and report themselves if they fail again.  A job may give up the
first failure's range instead (:meth:`ChunkCopier.skip_failed`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .job import Job

Plan = Callable[[int, int], Awaitable[tuple[int, Any]]]
Copy = Callable[[int, int, Any], Awaitable[None]]
Stamp = Callable[[], object]

MAX_TASKS = 16           # chunks in flight at once (QEMU's mirror: MAX_IN_FLIGHT)
MAX_BYTES = 16 << 20     # bytes in flight at once (QEMU's mirror: buf-size)


class ChunkCopier:
    def __init__(self, job: Job, length: int, plan: Plan, copy: Copy, *, chunk: int,
                 max_tasks: int = MAX_TASKS, max_bytes: int = MAX_BYTES,
                 window_bytes: int | None = None,
                 window_seconds: float | None = None, stamp: Stamp | None = None) -> None:
        self.job = job
        self.length = length
        self.plan = plan
        self.copy = copy
        self.chunk = chunk
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.window_bytes = window_bytes
        self.window_seconds = window_seconds
        self.stamp = stamp
        self._extent: tuple[int, int, Any] | None = None  # the last plan: start, end, what
        self._stamp: object = None  # stamp() when the last window ended
        self.pos = 0
        self.retry: list[tuple[int, int]] = []  # failed ranges [start, end), in order
        self.first_failed: tuple[int, int] | None = None  # of the last window's error
        # statistics, for tests: the most chunks that were in flight at once
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.max_in_flight = 0
        self._freed = trio.Event()  # set (and replaced) when a chunk ends

    @property
    def done(self) -> bool:
        return self.pos >= self.length and not self.retry

    def _next(self) -> tuple[int, int] | None:
        if self.retry:
            return self.retry[0]
        if self.pos < self.length:
            return self.pos, self.length
        return None

    def _advance(self, n: int) -> None:
        if self.retry:
            start, end = self.retry[0]
            if start + n >= end:
                self.retry.pop(0)
            else:
                self.retry[0] = (start + n, end)
        else:
            self.pos += n

    def _must_stop(self) -> bool:
        job = self.job
        return job._should_pause() or job.is_cancelled or job.limit.delay() > 0

    async def window(self) -> OSError | None:
        """Issue chunks until a stop, wait for those in flight; the first
        failure, if any (its range is back on the retry list)."""
        job = self.job
        failed: list[tuple[int, int, OSError]] = []
        budget = self.window_bytes if self.window_bytes is not None else math.inf
        deadline = (trio.current_time() + self.window_seconds
                    if self.window_seconds is not None else math.inf)
        # the last window's plan still holds if nothing changed since
        extent = self._extent if self.stamp is not None and self.stamp() == self._stamp \
            else None

        async def run_one(offset: int, n: int, what: Any) -> None:
            try:
                await self.copy(offset, n, what)
            except OSError as e:
                failed.append((offset, n, e))
            else:
                job.progress_current += n
            finally:
                self.in_flight -= 1
                self.in_flight_bytes -= n
                self._freed.set()
                self._freed = trio.Event()

        async with trio.open_nursery() as nursery:
            while not failed and budget > 0 and trio.current_time() < deadline \
                    and not self._must_stop():
                nxt = self._next()
                if nxt is None:
                    break
                offset, end = nxt
                if extent is not None and extent[0] <= offset < extent[1]:
                    n, what = min(extent[1], end) - offset, extent[2]
                else:
                    try:
                        n, what = await self.plan(offset, end - offset)
                    except OSError as e:
                        # as a chunk that failed: tried again, or given up
                        n = min(self.chunk, end - offset)
                        self._advance(n)
                        failed.append((offset, n, e))
                        break
                    n = max(1, min(n, end - offset))
                    extent = (offset, offset + n, what)
                if what is None:
                    job.progress_current += n
                    self._advance(n)
                    continue
                n = min(n, self.chunk)
                if self.in_flight >= self.max_tasks or (
                        self.in_flight and self.in_flight_bytes + n > self.max_bytes):
                    await self._freed.wait()
                    continue  # look again: a failure, a pause, the quota
                self._advance(n)
                self.in_flight += 1
                self.in_flight_bytes += n
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                budget -= n
                job.limit.processed(n)
                # trio runs the chunks started in one pass in either order
                # (a cold source is then read backwards in runs of up to 16
                # chunks); a checkpoint after each start puts them in order,
                # and was tried here and in mirror (issue 11): on a cold disk
                # file it cost more CPU per MiB (raw mirror 674 -> 830 us at
                # load 5; stream and commit worse too at load 12-27) at no
                # gain in speed, so it is not done
                nursery.start_soon(run_one, offset, n, what)
        self._extent = extent
        if self.stamp is not None:
            self._stamp = self.stamp()
        if not failed:
            return None
        # planned again (first) when the job goes on
        self.retry[:0] = sorted((o, o + n) for o, n, _ in failed)
        offset, n, err = failed[0]
        self.first_failed = (offset, offset + n)
        return err

    def skip_failed(self) -> None:
        """Give up the range of the failure :meth:`window` returned: it
        counts as done, and is not tried again (QEMU's stream with
        on-error=ignore)."""
        rng, self.first_failed = self.first_failed, None
        if rng is not None:
            self.retry.remove(rng)
            self.job.progress_current += rng[1] - rng[0]
