"""``aio=native``: reads and writes through Linux AIO (io_submit).

As QEMU's linux-aio.c: only with O_DIRECT (the file driver refuses the
option otherwise, with QEMU's message), every iocb carries IOCB_FLAG_RESFD
so that completions signal the engine's eventfd, and flushes go to worker
threads (Linux AIO has no fdatasync that file systems implement).

The binding is a ctypes layer over the syscalls (io_setup, io_submit,
io_getevents, io_destroy), not the ``libaio`` package from PyPI: that one
(0.9.5) is a source distribution that compiles a C extension against
libaio's headers, for an ABI of four syscalls and two fixed structs.
Submissions are batched as in uring.py: iocbs queued in one scheduler pass
go to the kernel in one io_submit.  Completions are read from the
completion ring the kernel maps into the process at the context's address
(struct aio_ring: a header, then io_events between head and tail), as
QEMU's linux-aio.c does (io_getevents_peek/commit): at queue depth 1 the
io_getevents call that did the same was one system call of seven per
request.  A ring whose header does not say what we read (magic, no
incompatible features) is read with io_getevents (no timeout), as is any
ring off x86-64, whose memory ordering the plain loads rely on (as uring.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from . import buffers
from .base import Callback, KernelEngine, Request
from .threads import ThreadPool

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
NR_IO_SETUP, NR_IO_DESTROY, NR_IO_GETEVENTS, NR_IO_SUBMIT = 206, 207, 208, 209

CMD_PREAD, CMD_PWRITE, CMD_PREADV, CMD_PWRITEV = 0, 1, 7, 8
IOCB_FLAG_RESFD = 1
# struct iocb: aio_data, aio_key, aio_rw_flags, aio_lio_opcode, aio_reqprio,
# aio_fildes, aio_buf, aio_nbytes, aio_offset, aio_reserved2, aio_flags, aio_resfd
_IOCB = struct.Struct("<QIIHhIQQqQII")
_pack_iocb = _IOCB.pack_into
_IOCB_SIZE = _IOCB.size
_EVENT = struct.Struct("<QQqq")   # data, obj, res, res2
_unpack_event = _EVENT.unpack_from
_EVENT_SIZE = _EVENT.size
MAX_EVENTS = 1024                  # QEMU's MAX_EVENTS
# struct aio_ring's header (fs/aio.c): id, nr, head, tail, magic,
# compat_features, incompat_features, header_length; io_events follow
AIO_RING_MAGIC = 0xA10A10A1
_RING_HEADER = 32
_NR, _HEAD, _TAIL, _MAGIC, _INCOMPAT, _HEADER_LENGTH = 1, 2, 3, 4, 6, 7


class LinuxAio(KernelEngine):
    name = "native"
    READ, WRITE = CMD_PREAD, CMD_PWRITE
    READV, WRITEV = CMD_PREADV, CMD_PWRITEV

    def __init__(self, threads: ThreadPool) -> None:
        ctx = ctypes.c_ulong(0)
        if _syscall(NR_IO_SETUP, MAX_EVENTS, ctypes.byref(ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.ctx = ctx.value
        self.threads = threads          # the ThreadPool, for fdatasync
        # iocbs live in one buffer, one slot per request in flight; the kernel
        # copies an iocb at io_submit, so a slot is free again right after
        self._iocbs = ctypes.create_string_buffer(_IOCB.size * MAX_EVENTS)
        self._iocb_base = ctypes.addressof(self._iocbs)
        # io_submit's array of iocb pointers: slot i always points at iocb i
        self._ptrs = (ctypes.c_uint64 * MAX_EVENTS)(
            *(self._iocb_base + i * _IOCB.size for i in range(MAX_EVENTS)))
        self._ctx_arg = ctypes.c_ulong(self.ctx)  # made once: io_submit runs per batch
        self._events = ctypes.create_string_buffer(_EVENT.size * MAX_EVENTS)
        # id -> (task, callback, buffer): the buffer is held until the
        # completion, as the kernel may write into it until then
        self._reqs: dict[int, Request] = {}
        self._next_id = 1
        # iocbs of this pass, not yet submitted: (id, cmd, fd, addr, length, offset)
        self._pending: list[tuple[int, int, int, int, int, int]] = []
        self._ring_header, self._ring = self._map_ring(self.ctx)
        super().__init__()

    @staticmethod
    def _map_ring(ctx: int) -> tuple[ctypes.Array[ctypes.c_uint32] | None,
                                     ctypes.Array[ctypes.c_char] | None]:
        """The completion ring's header words and its bytes, or (None, None)
        to reap with io_getevents."""
        if platform.machine() not in ("x86_64", "AMD64"):
            return None, None
        header = (ctypes.c_uint32 * 8).from_address(ctx)
        if (header[_MAGIC] != AIO_RING_MAGIC or header[_INCOMPAT]
                or header[_HEADER_LENGTH] != _RING_HEADER):
            return None, None
        nr = header[_NR]
        return header, (ctypes.c_char * (_RING_HEADER + nr * _EVENT_SIZE)).from_address(ctx)

    def _start(self, op: int, fd: int, addr: int, length: int, offset: int,
               req: Request) -> None:
        rid = self._next_id
        self._next_id = rid + 1
        self._reqs[rid] = req
        self.in_flight += 1
        self._pending.append((rid, op, fd, addr, length, offset))
        if len(self._pending) >= MAX_EVENTS // 4 or self.in_flight == 1:
            self._submit()
        elif not self._held_now:
            self._flush_soon()  # not again once a holder submits (hold_submissions)

    def submit_read(self, fd: int, buf: memoryview, offset: int, cb: Callback,
                    addr: int = 0) -> None:
        # KernelEngine's with _start written out: this runs once per
        # exported request
        rid = self._next_id
        self._next_id = rid + 1
        self._reqs[rid] = (None, cb, buf)
        self.in_flight += 1
        pending = self._pending
        pending.append((rid, CMD_PREAD, fd, addr or buffers.address(buf), len(buf), offset))
        if len(pending) >= MAX_EVENTS // 4 or self.in_flight == 1:
            self._submit()
        elif not self._held_now:
            self._flush_soon()

    def _submit(self) -> None:
        pending = self._pending
        while pending:
            # never more iocbs in the kernel than the context was set up for
            room = MAX_EVENTS - (self.in_flight - len(pending))
            if room <= 0:
                return   # the reaper submits the rest as completions free room
            batch = pending[:room]
            iocbs = self._iocbs
            efd = self.efd
            pos = 0
            for rid, cmd, fd, addr, length, offset in batch:
                _pack_iocb(iocbs, pos, rid, 0, 0, cmd, 0, fd, addr, length, offset, 0,
                           IOCB_FLAG_RESFD, efd)
                pos += _IOCB_SIZE
            r = _syscall(NR_IO_SUBMIT, self._ctx_arg, len(batch), self._ptrs)
            if r < 0:
                e = ctypes.get_errno()
                if e == errno.EAGAIN:
                    return   # retried when the next completion arrives
                # the first iocb is bad: fail it alone and go on with the rest
                rid = batch[0][0]
                del pending[0]
                self._fail(rid, -e)
                continue
            del pending[:r]

    def _fail(self, rid: int, res: int) -> None:
        task, cb, _buf = self._reqs.pop(rid)
        self._finished(task, cb, res)

    def completions_ready(self) -> bool:
        header = self._ring_header
        return header is not None and header[_HEAD] != header[_TAIL]

    def _reap(self) -> None:
        header, ring = self._ring_header, self._ring
        if header is not None and ring is not None:
            self._reap_ring(header, ring)
        else:
            self._reap_getevents()
        if self._pending:
            self._submit()
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    def _reap_ring(self, header: ctypes.Array[ctypes.c_uint32],
                   ring: ctypes.Array[ctypes.c_char]) -> None:
        """Take the io_events between head and tail and hand the head back
        (the kernel reuses their slots from there).  Every event is popped
        before the first callback runs, as with io_getevents."""
        reqs = self._reqs
        nr = header[_NR]
        done = []
        while True:
            head = header[_HEAD]
            tail = header[_TAIL]
            if head == tail:
                break
            end = tail if tail > head else nr  # to the ring's end first, if it wraps
            for i in range(head, end):
                rid, _obj, res, _res2 = _unpack_event(ring, _RING_HEADER + i * _EVENT_SIZE)
                done.append((reqs.pop(rid), res))
            header[_HEAD] = end % nr
        self._complete(done)

    def _reap_getevents(self) -> None:
        ev = self._events
        reqs = self._reqs
        while True:
            n = _syscall(NR_IO_GETEVENTS, self._ctx_arg, 0, MAX_EVENTS, ev, None)
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, os.strerror(e))
            self._complete([(reqs.pop(rid), res) for rid, _obj, res, _res2
                            in (_unpack_event(ev, i * _EVENT_SIZE) for i in range(n))])
            if n < MAX_EVENTS:
                break

    def _close_fds(self) -> None:
        super()._close_fds()
        self._ring_header = self._ring = None  # unmapped by io_destroy
        if self.ctx:
            _syscall(NR_IO_DESTROY, ctypes.c_ulong(self.ctx))
            self.ctx = 0

    _submit_pending = _submit

    async def fdatasync(self, fd: int) -> None:
        await self.threads.fdatasync(fd)
