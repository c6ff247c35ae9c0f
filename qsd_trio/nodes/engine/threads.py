"""``aio=threads``: long-lived worker threads, completions through an eventfd.

A request is a small object put on a ``queue.SimpleQueue``; an idle worker
takes it, runs the blocking call and appends it to a deque of finished
requests.  The first worker to finish after the reaper last looked writes the
eventfd; the others see the flag and do not (one syscall per batch, not per
request).  The reaper clears the flag *before* it empties the deque, so a
request finished while it works either is taken now or signals again.

Buffered writes to one descriptor wait in that descriptor's lane and one
worker at a time runs them, one after another (``_put_write``): the kernel
takes the file's inode lock for each anyway, and workers that wait for it
spin in the kernel and then queue for the GIL.

Workers start on demand, one for each request beyond the number of workers
already busy (a lane counting as one), up to ``MAX_WORKERS`` (QEMU's
thread-pool-max default), and then stay: starting a thread costs far more
than keeping one parked.  This also runs the calls no engine has a kernel
interface for (fallocate, lseek, ftruncate, fdatasync under Linux AIO):
``call(fn, *args)``.

A buffered write whose caller would only wait for it (``caller_waits``:
a FUSE export's write with nothing else in flight) runs on trio's thread
when the pool is idle and the write cannot block (``RunHere``): the hop to
a worker and back costs the worker's wakeup, the GIL passed to it and back,
and the eventfd round, for a copy that nothing else overlaps.  A vectored
write (a guest's scatter-gather list from the virtio data plane) runs
there whenever it cannot block, busy pool or not: a vhost-user guest's
1 MiB writes cost a quarter less CPU that way, and on a machine whose
cores the guest needs as well, the CPU is the throughput.

A buffered read the file driver has started itself with a RWF_NOWAIT
miss (the kernel then reads the missed pages from the device) waits in a
small lane of its own (``submit_started_read``): ``LANE_WORKERS`` threads
that only wait for those pages and copy them, one request after another,
instead of a thread per request each taking the GIL twice.

It is not ``trio.to_thread.run_sync``, which takes a new token, a result
channel and a ``run_sync_soon`` per call: here a request costs a queue put
and, per batch of completions, one eventfd wakeup.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .. import inline_io
from . import base
from .base import Callback, Engine, _current_task, advance, os_error

T = TypeVar("T")

MAX_WORKERS = 64
# workers of the wait lane (submit_started_read): they wait for reads the
# kernel is already doing, one after another, so a few cover any queue depth
LANE_WORKERS = 4


class _Call:
    __slots__ = ("fn", "args", "task", "cb", "result", "error", "lane", "wlane")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 task: trio.lowlevel.Task | None, cb: Callback | None = None,
                 lane: bool = False) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.cb = cb
        self.result: Any = None
        self.error: BaseException | None = None
        self.lane = lane  # served by the wait lane
        self.wlane: _WriteLane | None = None  # the write lane it was queued in

    def res(self) -> int:
        """The result as an engine callback sees it: a count or -errno."""
        e = self.error
        if e is None:
            return int(self.result)
        return -(e.errno or 5) if isinstance(e, OSError) else -5  # EIO


class _WriteLane:
    """The buffered writes to one descriptor, run one after another by one
    worker at a time (see ThreadPool._put_write)."""

    __slots__ = ("calls", "busy", "n")

    def __init__(self) -> None:
        self.calls: deque[_Call] = deque()
        self.busy = False  # a worker is (about to be) draining ``calls``
        self.n = 0  # its writes not yet reaped (trio's thread only)


def _read_all(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    n = len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _readv_all(fd: int, views: list[memoryview], offset: int) -> int:
    n = sum(len(v) for v in views)
    done = os.preadv(fd, views, offset)
    while done < n:
        got = os.preadv(fd, advance(views, done), offset + done)
        if got == 0:
            break
        done += got
    return done


def _writev_all(fd: int, views: list[memoryview], offset: int) -> int:
    n = 0
    for v in views:
        n += len(v)
    done = os.pwritev(fd, views, offset)
    while done < n:
        done += os.pwritev(fd, advance(views, done), offset + done)
    return n


def _write_all(fd: int, buf: memoryview, offset: int) -> None:
    done = os.pwritev(fd, [buf], offset)
    n = len(buf)
    while done < n:
        done += os.pwritev(fd, [buf[done:]], offset + done)


def _write_all_count(fd: int, buf: memoryview, offset: int) -> int:
    _write_all(fd, buf, offset)
    return len(buf)


class RunHere:
    """When a write may run on trio's thread instead of a worker, as
    file.py's small inline writes (nodes/inline_io.py, whose thresholds
    these are): whole pages, not O_DIRECT (that waits for the device),
    dirty memory far from throttling, and not within ``COOL_DOWN`` of a
    write that slept in the kernel for longer than ``STALL_NS``."""

    def __init__(self) -> None:
        self.resume_at = 0.0
        self.done = 0    # statistics: writes run here
        self.stalls = 0  # statistics: of those, writes that slept too long
        # descriptors opened with O_DIRECT: the file driver, the one
        # submitter of writes, says so (direct_fd) when it opens and closes
        # one, instead of an fcntl(F_GETFL) per write
        self._direct: set[int] = set()

    def direct_fd(self, fd: int, direct: bool) -> None:
        """``fd`` is (from now on) opened with O_DIRECT, or no longer open."""
        if direct:
            self._direct.add(fd)
        else:
            self._direct.discard(fd)

    def allowed(self, fd: int, offset: int, n: int) -> bool:
        page = inline_io.PAGE
        return (offset % page == 0 and n % page == 0 and fd not in self._direct
                and time.monotonic() >= self.resume_at and inline_io.dirty_memory_ok())

    def write(self, fd: int, buf: memoryview, offset: int) -> int:
        """``_write_all`` here; the bytes written or -errno."""
        return self._run(_write_all, fd, buf, offset, len(buf))

    def writev(self, fd: int, views: list[memoryview], offset: int, n: int) -> int:
        """``_writev_all`` here (``n`` bytes in ``views``); as :meth:`write`."""
        return self._run(_writev_all, fd, views, offset, n)

    def _run(self, fn: Callable[[int, Any, int], Any], fd: int, data: Any, offset: int,
             n: int) -> int:
        switches = inline_io.voluntary_switches()
        t0 = time.perf_counter_ns()
        try:
            fn(fd, data, offset)
        except OSError as e:
            return -(e.errno or 5)  # EIO
        finally:
            self.done += 1
            if (time.perf_counter_ns() - t0 > inline_io.STALL_NS
                    and inline_io.voluntary_switches() != switches):
                self.stalls += 1
                self.resume_at = time.monotonic() + inline_io.COOL_DOWN
        return n


class ThreadPool(Engine):
    name = "threads"

    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self.max_workers = max_workers
        self._queue: queue.SimpleQueue[_Call | _WriteLane | None] = queue.SimpleQueue()
        self._done: deque[_Call] = deque()
        self._signalled = False
        self._threads: list[threading.Thread] = []
        # the wait lane: its queue, workers and requests queued or running
        self._lane: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lane_threads: list[threading.Thread] = []
        self._lane_n = 0
        # buffered writes per descriptor (_put_write)
        self._write_lanes: dict[int, _WriteLane] = {}
        self._lane_writes = 0   # writes in lanes, not yet reaped
        self._lanes_active = 0  # lanes with such writes: a worker each at most
        self.run_here = RunHere()
        super().__init__()

    def _worker(self, q: queue.SimpleQueue[_Call | _WriteLane | None]) -> None:
        get = q.get
        done = self._done.append
        efd = self.efd
        while True:
            call = get()
            if call is None:
                return
            if type(call) is _WriteLane:
                self._run_lane(call)
                continue
            assert type(call) is _Call
            self._run_call(call, done, efd)

    def _run_lane(self, lane: _WriteLane) -> None:
        """Run a descriptor's writes until none is queued.  Every step is
        one operation under the GIL, and the submitter appends before it
        looks at ``busy``: a write appended as this worker gives up is
        either seen here on the second look or finds ``busy`` False and
        starts the lane again (in a race both may go on: two workers then
        drain one lane for a while, which costs what it did before lanes)."""
        calls = lane.calls
        done = self._done.append
        efd = self.efd
        while True:
            try:
                call = calls.popleft()
            except IndexError:
                lane.busy = False
                if not calls or lane.busy:
                    return
                lane.busy = True
                continue
            self._run_call(call, done, efd)

    def _run_call(self, call: _Call, done: Callable[[_Call], None], efd: int) -> None:
        """Run one call on a worker, hand it to the reaper, and signal the
        eventfd unless a signal is already pending."""
        try:
            call.result = call.fn(*call.args)
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            call.error = e
        done(call)
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(efd, 1)

    def _reap(self) -> None:
        self._signalled = False
        done = self._done
        while done:
            call = done.popleft()
            if call.lane:
                self._lane_n -= 1
            wl = call.wlane
            if wl is not None:
                self._lane_writes -= 1
                wl.n -= 1
                if not wl.n:
                    self._lanes_active -= 1
            if call.cb is None:
                self._finished(call.task, None, call)
            else:
                self._finished(None, call.cb, call.res())

    def _put(self, call: _Call) -> None:
        self.in_flight += 1
        self._grow()
        self._queue.put(call)

    def _grow(self) -> None:
        """A worker more if the work that could run at once needs one: every
        request in flight but those waiting in a write lane, which needs
        one worker whatever it holds."""
        n = self.in_flight - self._lane_writes + self._lanes_active
        if n > len(self._threads) and len(self._threads) < self.max_workers:
            t = threading.Thread(target=self._worker, args=(self._queue,), name="qsd-io",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _put_write(self, fd: int, call: _Call) -> None:
        """A buffered write: into the descriptor's lane, which one worker
        drains at a time.  The kernel runs buffered writes to one file one
        at a time anyway (ext4 and tmpfs take the inode's lock for each):
        with 16 of a job's 1 MiB copies in flight, the workers writing the
        same file spun on that lock (rwsem_spin_on_owner: 2-11 % of the
        daemon's CPU samples in perf profiles of a qcow2 commit on tmpfs)
        or slept on it, and each woke to take the GIL.  In a lane the worker that holds the file
        goes from one write to the next; reads, and writes to other files,
        still run beside it.  O_DIRECT writes, which the kernel runs in
        parallel, keep going to any worker."""
        if fd in self.run_here._direct:
            self._put(call)
            return
        lane = self._write_lanes.get(fd)
        if lane is None:
            lane = self._write_lanes[fd] = _WriteLane()
        self.in_flight += 1
        self._lane_writes += 1
        if not lane.n:
            self._lanes_active += 1
        lane.n += 1
        call.wlane = lane
        lane.calls.append(call)
        if not lane.busy:
            lane.busy = True
            self._grow()
            self._queue.put(lane)

    def submit_started_read(self, fd: int, buf: memoryview, offset: int, cb: Callback) -> None:
        """submit_read() of a read the kernel is already doing: the
        caller's RWF_NOWAIT preadv missed the page cache, which starts the
        device read of what it missed (the kernel's readahead for that
        range), as QEMU's workers would each start theirs.  What is left
        is waiting for those pages and copying them: a worker of the wait
        lane does that for one request after another, and the device still
        has every request of the queue depth in flight.

        A few workers instead of one per request in flight: at queue depth
        32 the pool ran 17-32 threads that each woke, took the GIL, slept
        in preadv and took the GIL again, with some 9 futex calls per
        request on each (strace -f: the GIL's mutex and condition); in the
        lane a worker that wakes finds the next read done or nearly so."""
        self.in_flight += 1
        self._lane_n += 1
        threads = self._lane_threads
        if self._lane_n > len(threads) and len(threads) < LANE_WORKERS:
            t = threading.Thread(target=self._worker, args=(self._lane,), name="qsd-io-wait",
                                 daemon=True)
            threads.append(t)
            t.start()
        self._lane.put(_Call(_read_all, (fd, buf, offset), None, cb, True))

    def submit_done(self, cb: Callback, res: int) -> None:
        """A request done before it reached a worker (a started read that
        found its data cached after all): ``cb(res)`` from the reaper, as
        for any other completion."""
        self.in_flight += 1
        call = _Call(int, (res,), None, cb)
        call.result = res
        self._done.append(call)
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self.efd, 1)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the blocking ``fn(*args)`` on a worker; its result or exception."""
        call = _Call(fn, args, _current_task())
        self._put(call)
        await self._park()
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result

    async def read(self, fd: int, buf: memoryview, offset: int) -> int:
        return await self.call(_read_all, fd, buf, offset)

    async def _call_write(self, fn: Callable[..., Any], *args: Any) -> None:
        call = _Call(fn, args, _current_task())
        self._put_write(args[0], call)
        await self._park()
        if call.error is not None:
            raise call.error

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        await self._call_write(_write_all, fd, buf, offset)

    async def readv(self, fd: int, views: list[memoryview], offset: int) -> int:
        return await self.call(_readv_all, fd, views, offset)

    async def writev(self, fd: int, views: list[memoryview], offset: int) -> None:
        await self._call_write(_writev_all, fd, views, offset)

    async def fdatasync(self, fd: int) -> None:
        await self.call(os.fdatasync, fd)

    def submit_read(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        self._put(_Call(_read_all, (fd, buf, offset), None, cb))

    def submit_write(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        if (base._caller_waits and not self.in_flight
                and self.run_here.allowed(fd, offset, len(buf))):
            # cb runs before this returns, as the caller expects
            self.in_flight += 1
            self._finished(None, cb, self.run_here.write(fd, buf, offset))
            return
        self._put_write(fd, _Call(_write_all_count, (fd, buf, offset), None, cb))

    def submit_writev(self, fd: int, views: list[memoryview], offset: int,
                      cb: Callback, n: int = 0) -> None:
        # a guest's scatter-gather write (the virtio data plane, directly or
        # through qcow2): here whenever it cannot block, whatever else is in
        # flight; its copy costs what it costs on any thread, the hop to a
        # worker and back is what it saves (docs/vhost-user.md)
        if not n:
            n = sum(map(len, views))
        if self.run_here.allowed(fd, offset, n):
            self.in_flight += 1
            self._finished(None, cb, self.run_here.writev(fd, views, offset, n))
            return
        self._put_write(fd, _Call(_writev_all, (fd, views, offset), None, cb))

    async def aclose(self) -> None:
        await super().aclose()
        for _ in self._threads:
            self._queue.put(None)
        self._threads.clear()
        for _ in self._lane_threads:
            self._lane.put(None)
        self._lane_threads.clear()


__all__ = ["ThreadPool", "os_error"]
