"""What every engine shares: requests parked on their task, completions
reaped in batches from one file descriptor that becomes readable.

A request is submitted from the task that wants it, which then parks with
``trio.lowlevel.wait_task_rescheduled``.  One reaper task per engine waits
for the engine's wakeup descriptor to become readable
(``trio.lowlevel.wait_readable``): an eventfd that worker threads or Linux
AIO signal, or, for io_uring, the ring's own descriptor, which polls
readable while its completion queue holds entries (no eventfd to signal and
read).  Each wakeup takes every completion that has arrived and reschedules
its task with the result.  So a thousand completions cost one wakeup of the
event loop, not one each.

A request can also be submitted with a callback instead of a task
(``submit_read``/``submit_write``): the reaper calls ``cb(result)`` with the
byte count or a negative errno.  That is how an export serves a request
straight from its reader task, with no task of its own to park and wake
(BlockNode.read_submit).  A callback must not raise; one that does is
logged, and the reaper goes on.

A parked request cannot be cancelled: the kernel (or a worker thread) owns
its buffer until the completion arrives, and a write must not be half done.
A cancelled caller gets its ``Cancelled`` at its next checkpoint, after the
request has finished; that is what makes it safe for a client to go away,
or an export to be deleted, with requests in flight (the buffers are held
by the engine's table of requests in flight until then, see buffers.py).

The reaper is a trio system task, started with the engine: engines belong
to the block graph, which is a set of plain objects any task may call (see
the design notes on nodes), and a system task outlives whichever task
opened the first file.  ``aclose()`` waits for the requests in flight and
then stops the reaper.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

import outcome
import trio

from . import buffers

_Abort = trio.lowlevel.Abort
_reschedule = trio.lowlevel.reschedule
_wait = trio.lowlevel.wait_task_rescheduled
_current_task = trio.lowlevel.current_task

log = logging.getLogger(__name__)

# calls deferred until the reaper has handled its current batch of
# completions (after_completions); reapers run one at a time, on trio's thread
_deferred: list[Callable[[], None]] = []
_reaping = False

# A caller that will do nothing but wait for the request it starts (a FUSE
# export with no other request in flight: caller_waits).  trio's thread only.
_caller_waits = False

# Submissions held by a caller that hands them to the kernel itself before
# it next parks (hold_submissions/submit_held), and the kernel engines with
# requests queued meanwhile.  trio's thread only.
_holding = False
_held: list[KernelEngine] = []


# what a submitted request calls when it completes: bytes done, or -errno
Callback = Callable[[int], None]
# a request in an engine's table: the parked task or the callback (one of
# them is None), and the buffer, held until the completion arrives
Request = tuple["trio.lowlevel.Task | None", "Callback | None", Any]


def after_completions(fn: Callable[[], None]) -> bool:
    """From a completion callback: call ``fn()`` once the reaper has handled
    every completion of this wakeup, so that, for example, an export sends
    the replies of a whole batch with one ``sendmsg`` and no task wakeup.
    False (and nothing deferred) outside a reaper."""
    if not _reaping:
        return False
    _deferred.append(fn)
    return True


def hold_submissions() -> None:
    """From a task about to start several requests in one go (an NBD
    reader with a batch of requests): requests queued on a kernel engine
    (io_uring, Linux AIO) wait for :func:`submit_held`, which enters them
    all with one system call, instead of waking the engine's flusher task
    for the next scheduler pass.  The caller must call ``submit_held()``
    before it next parks: nothing else runs to submit them meanwhile."""
    global _holding
    _holding = True


def submit_held() -> None:
    """Stop holding, and hand the kernel every request queued meanwhile."""
    global _holding
    _holding = False
    while _held:
        eng = _held.pop()
        eng._held_now = False
        eng._submit_pending()


def caller_waits(on: bool) -> None:
    """Around starting one request (``submit_write``) that the caller would
    only wait for, with nothing else of its own in flight: the threads
    engine may then run a buffered write on trio's thread instead of
    handing it to a worker and back (threads.py, ``RunHere``)."""
    global _caller_waits
    _caller_waits = on


def _no_abort(raise_cancel: object) -> _Abort:
    return _Abort.FAILED


def os_error(res: int) -> OSError:
    """The OSError for a negative errno result."""
    return OSError(-res, os.strerror(-res))


class Engine:
    """Base class: an eventfd, a reaper task, parked requests."""

    name = ""
    # the descriptor the reaper waits on; -1: the engine's eventfd (efd)
    wake_fd = -1

    def __init__(self) -> None:
        if self.wake_fd < 0:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.wake_fd = self.efd
        else:
            self.efd = -1  # the engine's own descriptor wakes the reaper
        self.in_flight = 0
        self._idle: trio.Event | None = None
        self._reaper_scope = trio.CancelScope()
        self._closed = False
        trio.lowlevel.spawn_system_task(self._reaper, name=f"io-engine-{self.name}")

    async def _reaper(self) -> None:
        try:
            with self._reaper_scope:
                fd = self.wake_fd
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    self.reap_now()
        finally:
            self._close_fds()

    def completions_ready(self) -> bool:
        """Whether completions are known to wait for reap_now without a
        system call to ask (io_uring's CQ ring); False: perhaps not."""
        return False

    def reap_now(self, signalled: bool = False) -> None:
        """What the reaper does once its descriptor is readable, for a
        caller that saw it readable itself (inline_wait.py); ``signalled``:
        the caller has read the eventfd already (a second read would only
        fail)."""
        global _reaping
        if self.efd >= 0 and not signalled:
            try:
                os.eventfd_read(self.efd)
            except BlockingIOError:
                pass
        _reaping = True
        try:
            self._reap()
        finally:
            _reaping = False
            while _deferred:
                fn = _deferred.pop()
                try:
                    fn()
                except Exception:  # noqa: BLE001 - as for callbacks
                    log.exception("deferred I/O completion call failed")

    def _reap(self) -> None:
        """Reschedule the tasks of every completion that has arrived."""
        raise NotImplementedError

    def _close_fds(self) -> None:
        if self.efd >= 0:
            trio.lowlevel.notify_closing(self.efd)
            os.close(self.efd)
        self.efd = self.wake_fd = -1

    async def _park(self) -> Any:
        """Wait for this task's request; returns its result."""
        return await _wait(_no_abort)

    def _finished(self, task: trio.lowlevel.Task | None, cb: Callback | None,
                  result: Any) -> None:
        """One request is done: wake its task or call its callback."""
        self.in_flight -= 1
        if cb is None:
            assert task is not None
            _reschedule(task, outcome.Value(result))
        else:
            try:
                cb(result)
            except Exception:  # noqa: BLE001 - one request's bug, not the engine's
                log.exception("I/O completion callback failed")
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    async def aclose(self) -> None:
        """Wait for everything in flight, then stop reaping."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            while self.in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
        self._reaper_scope.cancel()

    # -- what drivers call --------------------------------------------------
    async def read(self, fd: int, buf: memoryview, offset: int) -> int:
        """Read into ``buf`` at ``offset``; the bytes read (fewer at EOF)."""
        raise NotImplementedError

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at ``offset``."""
        raise NotImplementedError

    async def readv(self, fd: int, views: list[memoryview], offset: int) -> int:
        """Read into ``views`` in order at ``offset`` (preadv); the bytes
        read (fewer at EOF)."""
        raise NotImplementedError

    async def writev(self, fd: int, views: list[memoryview], offset: int) -> None:
        """Write all of ``views`` in order at ``offset`` (pwritev)."""
        raise NotImplementedError

    async def fdatasync(self, fd: int) -> None:
        raise NotImplementedError

    def submit_read(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        """Start one read into ``buf`` (at ``addr``, if the caller knows it);
        ``cb(bytes read or -errno)`` later.
        A short count is the caller's to handle (EOF, or read the rest)."""
        raise NotImplementedError

    def submit_write(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        """Start one write of ``buf`` (writable, pinned until ``cb`` runs;
        at ``addr``, if the caller knows it)."""
        raise NotImplementedError

    def submit_writev(self, fd: int, views: list[memoryview], offset: int,
                      cb: Callback, n: int = 0) -> None:
        """Start one pwritev of ``views`` (writable, pinned until ``cb``
        runs; ``n`` bytes in all, if the caller knows); ``cb(bytes written
        or -errno)``, a short count the caller's."""
        raise NotImplementedError

    # whether submit_readv is there (the kernel's engines)
    submits_readv = False

    def submit_readv(self, fd: int, views: list[memoryview], offset: int,
                     cb: Callback) -> None:
        """Start one preadv into ``views`` (pinned until ``cb`` runs);
        ``cb(bytes read or -errno)``, a short count the caller's."""
        raise NotImplementedError


def advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` after their first ``n`` bytes (a short
    preadv or pwritev goes on from there)."""
    for i, v in enumerate(views):
        if n < len(v):
            return [v[n:], *views[i + 1:]] if n else views[i:]
        n -= len(v)
    return []


def iovecs(views: list[memoryview]) -> ctypes.Array[ctypes.c_uint64]:
    """A struct iovec array for ``views`` (writable buffers), for an SQE or
    iocb; the caller keeps it (and the views) until the completion."""
    iov = (ctypes.c_uint64 * (2 * len(views)))()
    i = 0
    for v in views:
        iov[i] = buffers.address(v)
        iov[i + 1] = len(v)
        i += 2
    return iov


class KernelEngine(Engine):
    """An engine the kernel runs (io_uring, Linux AIO): a subclass names its
    READ and WRITE operations, queues one with ``_start`` and hands what is
    queued to the kernel with ``_submit_pending``; reads and writes, parked
    or with a callback, and the batching of submissions are the same for
    both.

    Batching: the first request queued in a scheduler pass wakes a small
    flusher task (``_flush_soon``); it runs in the next pass, once every
    request of this one is queued, and submits them all with one system
    call.  A task that starts a batch of requests itself and submits them
    before it parks (an NBD reader: hold_submissions/submit_held) saves the
    flusher's wakeup."""

    READ = WRITE = 0
    # the vectored operations: addr is a struct iovec array, length its count
    READV = WRITEV = 0

    def __init__(self) -> None:
        self._flusher: trio.lowlevel.Task | None = None
        self._flush_wanted = False
        self._held_now = False  # in _held: a holder submits its requests
        self._flush_scope = trio.CancelScope()
        super().__init__()
        trio.lowlevel.spawn_system_task(self._flush_loop, name=f"io-engine-{self.name}-submit")

    def _submit_pending(self) -> None:
        raise NotImplementedError

    def _complete(self, done: list[tuple[Request, int]]) -> None:
        """A reaper's batch of completions: Engine._finished written out
        (this loop runs once per request), without the idle check, which
        the reaper makes once at the end.  Counted out one by one: a
        callback that submits must see the others still in flight, or its
        request is entered alone."""
        value = outcome.Value
        for (task, cb, _buf), res in done:
            self.in_flight -= 1
            if cb is None:
                assert task is not None
                _reschedule(task, value(res))
            else:
                try:
                    cb(res)
                except Exception:  # noqa: BLE001 - one request's bug, not the engine's
                    log.exception("I/O completion callback failed")

    def _flush_soon(self) -> None:
        if _holding:
            # the holder submits before it parks (submit_held)
            if not self._held_now:
                self._held_now = True
                _held.append(self)
        elif not self._flush_wanted:
            self._flush_wanted = True
            if self._flusher is not None:
                _reschedule(self._flusher)
                self._flusher = None

    async def _flush_loop(self) -> None:
        with self._flush_scope:
            while True:
                if not self._flush_wanted:
                    self._flusher = _current_task()
                    await _wait(lambda _: _Abort.SUCCEEDED)
                self._flush_wanted = False
                self._submit_pending()

    def _close_fds(self) -> None:
        self._flush_scope.cancel()
        super()._close_fds()

    def _start(self, op: int, fd: int, addr: int, length: int, offset: int,
               req: Request) -> None:
        """Queue one operation; ``req`` is (task, callback, buffer)."""
        raise NotImplementedError

    async def _rw(self, op: int, fd: int, buf: memoryview, offset: int) -> int:
        self._start(op, fd, buffers.address(buf), len(buf), offset, (_current_task(), None, buf))
        res: int = await self._park()
        if res < 0:
            raise os_error(res)
        return res

    def submit_read(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        self._start(self.READ, fd, addr or buffers.address(buf), len(buf), offset,
                    (None, cb, buf))

    def submit_write(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        self._start(self.WRITE, fd, addr or buffers.address(buf), len(buf), offset,
                    (None, cb, buf))

    def submit_writev(self, fd: int, views: list[memoryview], offset: int,
                      cb: Callback, n: int = 0) -> None:
        iov = iovecs(views)
        self._start(self.WRITEV, fd, ctypes.addressof(iov), len(views), offset,
                    (None, cb, (iov, views)))

    submits_readv = True

    def submit_readv(self, fd: int, views: list[memoryview], offset: int,
                     cb: Callback) -> None:
        iov = iovecs(views)
        self._start(self.READV, fd, ctypes.addressof(iov), len(views), offset,
                    (None, cb, (iov, views)))

    async def read(self, fd: int, buf: memoryview, offset: int) -> int:
        n = len(buf)
        if not n:
            return 0
        done = await self._rw(self.READ, fd, buf, offset)
        while done < n:
            got = await self._rw(self.READ, fd, buf[done:], offset + done)
            if got == 0:
                break
            done += got
        return done

    async def _rwv(self, op: int, fd: int, views: list[memoryview], offset: int) -> int:
        iov = iovecs(views)
        self._start(op, fd, ctypes.addressof(iov), len(views), offset,
                    (_current_task(), None, (iov, views)))
        res: int = await self._park()
        if res < 0:
            raise os_error(res)
        return res

    async def readv(self, fd: int, views: list[memoryview], offset: int) -> int:
        n = sum(len(v) for v in views)
        done = 0
        while done < n:
            got = await self._rwv(self.READV, fd, advance(views, done), offset + done)
            if got == 0:
                break
            done += got
        return done

    async def writev(self, fd: int, views: list[memoryview], offset: int) -> None:
        if any(v.readonly for v in views):
            await self.write(fd, gather(views), offset)
            return
        n = sum(len(v) for v in views)
        done = 0
        while done < n:
            done += await self._rwv(self.WRITEV, fd, advance(views, done), offset + done)

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        if buf.readonly:
            copy = buffers.alloc(len(buf))
            copy[:] = buf
            buf = copy
        n = len(buf)
        if not n:
            return
        done = await self._rw(self.WRITE, fd, buf, offset)
        while done < n:
            done += await self._rw(self.WRITE, fd, buf[done:], offset + done)


def gather(views: list[memoryview]) -> memoryview:
    """The views' bytes in one pooled buffer."""
    buf = buffers.alloc(sum(len(v) for v in views))
    pos = 0
    for v in views:
        buf[pos:pos + len(v)] = v
        pos += len(v)
    return buf
