"""``aio=io_uring``: reads, writes and fdatasync through an io_uring.

The binding is a small layer over the kernel ABI (io_uring_setup and
io_uring_enter through ``syscall``, the rings through ``mmap``, SQEs written with
``struct.pack_into``), not the ``liburing`` package from PyPI (2026.3, a
compiled wrapper of liburing's C helpers): what costs per request is the
bookkeeping around the ring, which any binding needs, not the ring access
(docs/io-engine.md has the comparison).

Submissions are batched: a request writes its SQE and, if none is pending
yet, wakes a small flusher task; by the time the flusher runs (the next
scheduler batch) every request started in the same pass has written its
SQE, and one ``io_uring_enter`` submits them all.  A request started when
nothing else is in flight is submitted at once instead: at queue depth 1
there is nothing to batch with, and the flusher's task switch would be
pure latency.  A task that submits its own batch before it parks (an NBD
reader, base.hold_submissions) leaves the flusher asleep.

The reaper (base.py) waits for the ring's own descriptor to poll readable,
which it does while the CQ ring holds completions (or the kernel's overflow
list does: _reap has them moved to the ring), and reads the CQ ring
between its head and tail; advancing the head makes it unreadable again.
No eventfd is registered: it would cost the kernel a signal per batch of
completions and the reaper a read() per wakeup, for the same information.  Ring memory ordering: the kernel reads the SQ tail with
acquire semantics and publishes the CQ tail with release semantics; on
x86-64 (TSO) plain stores and loads from Python are ordered enough, as
liburing's own x86 barriers are compiler barriers only.  Other
architectures would need real barriers, so the engine refuses them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections import deque

import trio

from . import buffers
from .base import Callback, KernelEngine, Request, _current_task, os_error

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

NR_SETUP, NR_ENTER = 425, 426
FEAT_SINGLE_MMAP = 1
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
OP_READV, OP_WRITEV, OP_FSYNC, OP_READ, OP_WRITE = 1, 2, 3, 22, 23
FSYNC_DATASYNC = 1
ENTER_GETEVENTS = 1
# Completions are posted to the CQ ring by task work queued to the
# submitting thread.  By default the kernel also interrupts that thread
# with an IPI when it is running in user space; with COOP_TASKRUN the work
# waits for its next system call, and a thread asleep (select, epoll_wait)
# is woken all the same.  Ours is never long without a system call (trio's
# loop, the NBD reader's inline wait), and at queue depth 32 completions
# arrive while it runs Python: each IPI is an interrupt (a VM exit in a
# guest) for nothing.
SETUP_COOP_TASKRUN = 1 << 8
SQ_CQ_OVERFLOW = 2  # IORING_SQ_CQ_OVERFLOW in the SQ ring's flags

# struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, rw_flags,
# user_data, then 24 bytes we leave zero (buf_index, personality, ...)
_SQE = struct.Struct("<BBHiQQIIQ24x")
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")

ENTRIES = 256
_EAGAIN, _EINTR = -errno.EAGAIN, -errno.EINTR


class Uring(KernelEngine):
    name = "io_uring"
    READ, WRITE = OP_READ, OP_WRITE
    READV, WRITEV = OP_READV, OP_WRITEV

    def __init__(self, entries: int = ENTRIES) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(errno.ENOSYS, "io_uring ring access needs x86-64 memory ordering")
        params = (ctypes.c_uint32 * 30)()
        params[2] = SETUP_COOP_TASKRUN
        fd = _syscall(NR_SETUP, entries, params)
        if fd < 0 and ctypes.get_errno() == errno.EINVAL:
            # a kernel before 5.19 knows no COOP_TASKRUN
            params = (ctypes.c_uint32 * 30)()
            fd = _syscall(NR_SETUP, entries, params)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.ring_fd = fd
        self.setup_flags = params[2]  # what the ring was set up with
        try:
            self._map(params)
        except BaseException:
            os.close(fd)
            raise
        # in flight: _queue's arguments by user_data
        self._reqs: dict[int, tuple[int, int, int, int, int, int, Request]] = {}
        self._next_id = 1
        self._pending = 0          # SQEs written, not yet entered
        # requests beyond the CQ ring's size: _queue's arguments
        self._waiting: deque[tuple[int, int, int, int, int, int, Request]] = deque()
        self.wake_fd = fd
        super().__init__()

    def _map(self, p: ctypes.Array[ctypes.c_uint32]) -> None:
        sq_entries, cq_entries, features = p[0], p[1], p[5]
        sq_off, cq_off = p[10:20], p[20:30]
        sq_size = sq_off[6] + sq_entries * 4
        cq_size = cq_off[5] + cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if features & FEAT_SINGLE_MMAP:
            self.sq_ring = self.cq_ring = mmap.mmap(self.ring_fd, max(sq_size, cq_size), flags,
                                                    prot, offset=OFF_SQ_RING)
        else:
            self.sq_ring = mmap.mmap(self.ring_fd, sq_size, flags, prot, offset=OFF_SQ_RING)
            self.cq_ring = mmap.mmap(self.ring_fd, cq_size, flags, prot, offset=OFF_CQ_RING)
        self.sqes = mmap.mmap(self.ring_fd, sq_entries * _SQE.size, flags, prot,
                              offset=OFF_SQES)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self.sq_mask = _U32.unpack_from(self.sq_ring, sq_off[2])[0]
        self.cq_mask = _U32.unpack_from(self.cq_ring, cq_off[2])[0]
        self.sq_tail_off = sq_off[1]
        self.cq_head_off, self.cq_tail_off, self.cqes_off = cq_off[0], cq_off[1], cq_off[5]
        self.sq_flags_off = sq_off[4]
        # the SQ array maps ring slots to SQEs one to one, once and for all
        arr = sq_off[6]
        for i in range(sq_entries):
            _U32.pack_into(self.sq_ring, arr + 4 * i, i)
        self.sq_tail = _U32.unpack_from(self.sq_ring, self.sq_tail_off)[0]
        self.cq_head = _U32.unpack_from(self.cq_ring, self.cq_head_off)[0]

    # -- submission ------------------------------------------------------------
    def _queue(self, op: int, fd: int, addr: int, length: int, offset: int, flags: int,
               req: Request) -> None:
        """Write one SQE; ``req`` is (task, callback, buffer), kept in the
        table of requests in flight until the completion (the buffer with
        it: the kernel may write into it until then)."""
        if self.in_flight >= self.cq_entries:
            # never more in flight than the CQ ring holds; the rest waits here
            self._waiting.append((op, fd, addr, length, offset, flags, req))
            return
        rid = self._next_id
        self._next_id = rid + 1
        # the whole SQE kept: a completion with EAGAIN or EINTR submits it again
        self._reqs[rid] = (op, fd, addr, length, offset, flags, req)
        self.in_flight += 1
        tail = self.sq_tail
        _SQE.pack_into(self.sqes, (tail & self.sq_mask) * 64, op, 0, 0, fd, offset, addr,
                       length, flags, rid)
        self.sq_tail = tail + 1
        self._pending += 1
        if self._pending >= self.sq_entries or self.in_flight == 1:
            self._enter()   # the ring is full, or there is nothing to batch with
        elif not self._held_now:
            self._flush_soon()  # not again once a holder submits (hold_submissions)

    def _enter(self) -> None:
        n = self._pending
        if not n:
            return
        _U32.pack_into(self.sq_ring, self.sq_tail_off, self.sq_tail & 0xFFFFFFFF)
        while n:
            r = _syscall(NR_ENTER, self.ring_fd, n, 0, 0, None, 0)
            if r < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise OSError(e, os.strerror(e))
            n -= r
        self._pending = 0

    # -- completion ------------------------------------------------------------
    def _flush_overflow(self) -> None:
        while _syscall(NR_ENTER, self.ring_fd, 0, 0, ENTER_GETEVENTS, None, 0) < 0:
            e = ctypes.get_errno()
            if e in (errno.EAGAIN, errno.EBUSY):
                return  # the CQ ring is still full: the next reap tries again
            if e != errno.EINTR:
                raise OSError(e, os.strerror(e))

    def completions_ready(self) -> bool:
        tail = _U32.unpack_from(self.cq_ring, self.cq_tail_off)[0]
        return bool(tail != self.cq_head)

    def _reap(self) -> None:
        # Engine._finished written out: this loop runs once per request.
        # The head is published before any callback runs, so a callback
        # that submits (and enters) sees the ring as it is.
        ring = self.cq_ring
        head = self.cq_head
        tail = _U32.unpack_from(ring, self.cq_tail_off)[0]
        if head == tail:
            if not _U32.unpack_from(self.sq_ring, self.sq_flags_off)[0] & SQ_CQ_OVERFLOW:
                return
            # Completions the kernel could not post to a full CQ ring wait
            # on its overflow list, and the ring's descriptor polls readable
            # until they are moved to the ring, which only io_uring_enter
            # with GETEVENTS does: without it the reaper would spin on an
            # empty ring and those requests would never complete.
            self._flush_overflow()
            tail = _U32.unpack_from(ring, self.cq_tail_off)[0]
            if head == tail:
                return
        mask = self.cq_mask
        off = self.cqes_off
        reqs = self._reqs
        done = []
        again = None
        while head != tail:
            rid, res, _flags = _CQE.unpack_from(ring, off + (head & mask) * 16)
            head = (head + 1) & 0xFFFFFFFF
            sqe = reqs.pop(rid)
            if res == _EAGAIN or res == _EINTR:
                # Not the request's result: the kernel could not start it
                # without blocking (a device out of tags for an O_DIRECT
                # request, among others) and gave up.  QEMU's io_uring
                # resubmits these (luring_process_completions); failing them
                # turned a busy device into EIO for the client.
                if again is None:
                    again = []
                again.append(sqe)
                continue
            done.append((sqe[6], res))
        self.cq_head = head
        _U32.pack_into(ring, self.cq_head_off, head)
        if again is not None:
            self.in_flight -= len(again)
            for sqe in again:
                self._queue(*sqe)
        self._complete(done)
        waiting = self._waiting
        while waiting and self.in_flight < self.cq_entries:
            self._queue(*waiting.popleft())
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    def _close_fds(self) -> None:
        super()._close_fds()
        if self.ring_fd >= 0:
            trio.lowlevel.notify_closing(self.ring_fd)
            for m in {id(x): x for x in (self.sq_ring, self.cq_ring, self.sqes)}.values():
                m.close()
            os.close(self.ring_fd)
            self.ring_fd = -1

    # -- requests --------------------------------------------------------------
    def _start(self, op: int, fd: int, addr: int, length: int, offset: int,
               req: Request) -> None:
        self._queue(op, fd, addr, length, offset, 0, req)

    # KernelEngine's, one call shorter: these run once per exported request
    def submit_read(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        self._queue(OP_READ, fd, addr or buffers.address(buf), len(buf), offset, 0,
                    (None, cb, buf))

    def submit_write(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        self._queue(OP_WRITE, fd, addr or buffers.address(buf), len(buf), offset, 0,
                    (None, cb, buf))

    def _submit_pending(self) -> None:
        self._enter()

    async def fdatasync(self, fd: int) -> None:
        self._queue(OP_FSYNC, fd, 0, 0, 0, FSYNC_DATASYNC, (_current_task(), None, None))
        res: int = await self._park()
        if res < 0:
            raise os_error(res)
