"""The ``file`` protocol driver: a regular file on the host.

Reads, writes and flushes go through the graph's I/O engine for the node's
``aio`` option (engine/: worker threads, io_uring or Linux AIO), with no
thread hop of trio's own.  ``cache.direct=on`` opens with O_DIRECT: buffers
are page-aligned ones from the engine's pool (a write whose buffer is not
aligned is copied into one), and a request that is not aligned to the
device's logical block is read-modify-written, serialised against the
writes it overlaps as QEMU's request padding is.

Two things skip the engine, both as QEMU's do not need to: a buffered read
of data in the page cache (RWF_NOWAIT; on tmpfs, where the page cache *is*
the storage and RWF_NOWAIT is refused, a plain read) and a small buffered
write far from dirty-page throttling (inline_io.py) are done right here,
because a few microseconds of syscall beat any round trip through an engine.
Block status is an lseek (SEEK_DATA/SEEK_HOLE) done right here too, as
QEMU's raw_co_block_status does, and the last run of data it found is kept
until this node punches, zeroes or truncates: tmpfs answers SEEK_HOLE by
walking its pages to the next hole, the end of a full file, so every
question about a 1 GiB image cost milliseconds (a writer outside the daemon
that punches holes makes the answer say data where it now reads zeroes,
which is what a concurrent read would have seen).  Zero writes, discards and truncation use
fallocate/ftruncate on the engine's worker threads.  The image is locked
with QEMU's byte-range scheme (locking.py).

Resources: one file descriptor, closed by ``close()`` (which drops the
locks with it), after the node layer has drained every request.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio

from ..libc import LIBC
from ..qapi.errors import GenericError
from . import locking
from .engine import buffers
from .engine.base import advance
from .engine.base import os_error as engine_error
from .graph import register_driver
from .inline_io import INLINE_MAX, InlineWrites
from .node import BlockNode, BlockStatus, Perm, Status, bulk_requests

T = TypeVar("T")
# what a request started without a task calls: (data or None, error or None)
Done = Callable[[Any, "OSError | None"], None]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = LIBC
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_sync_file_range = getattr(_libc, "sync_file_range", None)  # Linux only
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2
BLKSSZGET = 0x1268
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)
# reads of the page cache above this go to the engine too: a 32 MiB NBD read
# would otherwise hold the event loop for milliseconds
INLINE_READ_MAX = 1 << 20
# a block job's reads (node.bulk_requests) above this go to the engine, as
# large buffered writes do: on its workers several 1 MiB copies run on the
# other cores while the loop goes on, where an exporter's read is better
# served at once (docs/io-engine.md)
BULK_READ_INLINE_MAX = INLINE_MAX

# preadv2 that keeps the GIL, for _started_read: os.preadv lets it go, and
# at queue depth 32 the pool's workers take it each time, so trio's thread
# waits to get it back (the miss is a few microseconds: nothing to wait for)
_preadv2: Any = getattr(ctypes.PyDLL(None, use_errno=True), "preadv2", None)
if _preadv2 is not None:
    _preadv2.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                         ctypes.c_int]
    _preadv2.restype = ctypes.c_ssize_t
_iov = (ctypes.c_uint64 * 2)()  # its one struct iovec (trio's thread only)
# preadv2/pwritev2 on an IovecList's array, letting the GIL go as os.preadv
# does (a 1 MiB copy: the workers run meanwhile): the project's CDLL
_preadv2_iov: Any = getattr(_libc, "preadv2", None)
_pwritev2_iov: Any = getattr(_libc, "pwritev2", None)
for _fn in (_preadv2_iov, _pwritev2_iov):
    if _fn is not None:
        _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                        ctypes.c_int]
        _fn.restype = ctypes.c_ssize_t
# whether a FileNode takes an IovecList here
TAKES_IOVECS = _preadv2_iov is not None and _pwritev2_iov is not None
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int
# file systems whose pages are the storage: a read never waits for a device
_MEMORY_FS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC


class IovecList(list[memoryview]):
    """A request's data as a ``struct iovec`` array (``pieces`` entries at
    ``address``, ``size`` bytes in all) instead of views: what a
    virtio-blk export hands a file node for a request in many pieces
    (exports/virtio/memory.GuestIovec, which keeps the memory mapped).
    The list itself is empty: only FileNode's read_now and write_submit
    paths take one, and only when the caller knows the request goes to a
    FileNode (raw over file); ``views()`` gives the pieces as views for
    whatever cannot use the array (a short write's rest)."""

    __slots__ = ("address", "pieces", "size")

    address: int
    pieces: int
    size: int

    def views(self) -> list[memoryview]:
        raise NotImplementedError


def _preadv_iov(fd: int, iov: IovecList, offset: int, flags: int) -> int:
    """os.preadv on the array; OSError (BlockingIOError for EAGAIN) as it."""
    n: int = _preadv2_iov(fd, iov.address, iov.pieces, offset, flags)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return n


def _pwritev_iov(fd: int, iov: IovecList, offset: int) -> None:
    """All of the array written at ``offset`` (a short write goes on from
    views of the rest)."""
    n: int = _pwritev2_iov(fd, iov.address, iov.pieces, offset, 0)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if n < iov.size:
        _pwritev_views(fd, advance(iov.views(), n), offset + n, iov.size - n)


def _pwritev_views(fd: int, views: list[memoryview], offset: int, n: int) -> None:
    """All ``n`` bytes of ``views`` written at ``offset``, however short
    each pwritev comes back."""
    done = os.pwritev(fd, views, offset)
    while done < n:
        got = os.pwritev(fd, advance(views, done), offset + done)
        if got == 0:
            raise OSError(errno.EIO, "write made no progress")
        done += got


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value


@register_driver
class FileNode(BlockNode):
    driver = "file"
    grows = True

    fd = -1  # the descriptor while open
    _writeback_error: OSError | None = None
    # open(2) flags a variant adds (raw_open_common's open_flags: host_cdrom's O_NONBLOCK)
    extra_open_flags = 0

    async def open(self, options: dict[str, Any]) -> None:
        self.path: str = options["filename"]
        self._discard_ok = self._discard_failed = self._discard_bytes = 0
        # [start, hole): the last run of data block status found (_status)
        self._data_run = (0, 0)
        aio = options.get("aio", "threads")
        if aio == "native" and not self.cache_direct:
            raise GenericError("aio=native was specified, but it requires cache.direct=on, "
                               "which was not specified.")
        flags = os.O_CLOEXEC | self.extra_open_flags | (os.O_RDONLY if self.read_only
                                                        else os.O_RDWR)
        if self.cache_direct:
            flags |= os.O_DIRECT
        threads = self.graph.io.threads
        try:
            self.fd = await threads.call(os.open, self.path, flags)
        except OSError as e:
            if (not self.read_only and self.auto_read_only
                    and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
                self.read_only = True
                flags = (flags & ~os.O_RDWR) | os.O_RDONLY
                try:
                    self.fd = await threads.call(os.open, self.path, flags)
                except OSError as e2:
                    raise GenericError(f"Could not open '{self.path}': {e2.strerror}") from e2
            elif e.errno == errno.EINVAL and self.cache_direct:
                raise GenericError(f"Could not open '{self.path}': Invalid argument") from e
            else:
                raise GenericError(f"Could not open '{self.path}': {e.strerror}") from e
        try:
            import stat
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise GenericError(f"Could not open '{self.path}': Is a directory")
            self._size = os.lseek(self.fd, 0, os.SEEK_END)
            mode = options.get("locking", "auto")
            supported = locking.ofd_supported(self.fd)
            if mode == "on" and not supported:
                raise GenericError("OFD lock is not supported")
            self.use_lock = mode != "off" and supported
            self.align = self._probe_alignment() if self.cache_direct else 1
            self.request_alignment = self.align
            # QEMU sets the engine up after opening the file, so a missing
            # file is reported before an engine that cannot be had
            self.io = self.graph.io.get(aio)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.threads = threads
        if self.cache_direct:
            threads.run_here.direct_fd(self.fd, True)
        # read-modify-writes in progress, and the aligned writes they wait for
        self._rmw_lock = trio.Lock()
        self._rmw: list[tuple[int, int]] = []
        self._rmw_done = trio.Event()
        self._direct_writes: dict[object, tuple[int, int]] = {}
        self._write_done: trio.Event | None = None
        # reads that need not wait: RWF_NOWAIT from the page cache, or plain
        # reads on a file system in memory (which refuses RWF_NOWAIT)
        self._memory_fs = _fs_type(self.fd) in _MEMORY_FS
        self._nowait = hasattr(os, "RWF_NOWAIT") and not self.cache_direct
        self._nowait_skip = self._nowait_backoff = 0  # probes skipped after misses
        # submitted buffered reads on worker threads start with RWF_NOWAIT
        # (_started_read); io_uring does its own, and a file system in
        # memory has nothing to start
        self._start_reads = (self._nowait and _preadv2 is not None and not self._memory_fs
                             and self.io is threads)
        self._inline = InlineWrites()

    def _probe_alignment(self) -> int:
        """QEMU's raw_probe_alignment: a block device's logical block size,
        else the smallest O_DIRECT read at offset 0 that is not refused with
        EINVAL, trying 1, 512, ... 4096 bytes.  A 1-byte read that succeeds
        (an empty file, a hole on some file systems) tells nothing, and the
        safe 4096 is used, as any error but EINVAL is taken as 'aligned'."""
        import fcntl
        import stat
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            try:
                got = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
                size = int.from_bytes(got, sys.byteorder)
                if size:
                    return size
            except OSError:
                pass
        buf = buffers.alloc(4096)
        for align in (1, 512, 1024, 2048, 4096):
            try:
                os.preadv(self.fd, [buf[:align]], 0)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    continue
            return align if align != 1 else 4096
        return 4096

    def _length(self) -> int:
        # the block layer counts whole 512-byte sectors (QEMU's
        # bdrv_getlength is total_sectors * 512): a file of 1000 bytes is a
        # 1024-byte disk whose tail reads as zeroes and grows the file when
        # written
        return -(-self._size // 512) * 512

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call no engine submits (fallocate, ftruncate, ...)."""
        return await self.threads.call(fn, *args)

    # -- reads ---------------------------------------------------------------------
    def _pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        mv = memoryview(buf)
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n == 0:
                buffers.zero_tail(mv, done)  # past EOF reads as zeroes
                break
            done += n

    async def _read_direct(self, offset: int, length: int) -> memoryview:
        a = self.align
        start = offset - offset % a
        end = -(-(offset + length) // a) * a
        buf = buffers.alloc(end - start)
        got = await self.io.read(self.fd, buf, start)
        if got < end - start:
            buffers.zero_tail(buf, got)
        if start == offset and end == offset + length:
            return buf
        return buf[offset - start:offset - start + length]

    async def _co_preadv(self, offset: int, length: int) -> bytes | memoryview:
        if not length:
            return b""
        if self.cache_direct:
            return await self._read_direct(offset, length)
        buf = buffers.alloc(length)
        done = self._pread_nowait([buf], offset) if self._may_read_now(length) else 0
        if done == length:
            # served from the page cache without the engine; a checkpoint
            # now and then keeps a client streaming cached reads from
            # starving the others (see InlineWrites.should_yield)
            if self._inline.should_yield():
                await trio.lowlevel.cancel_shielded_checkpoint()
            return buf
        got = await self.io.read(self.fd, buf[done:], offset + done)
        if done + got < length:
            buffers.zero_tail(buf, done + got)  # past EOF reads as zeroes
        return buf

    def _preadv_now(self, offset: int, length: int) -> memoryview | None:
        if self.cache_direct or not self._may_read_now(length):
            return None  # before any buffer is taken: the engine path takes its own
        buf = buffers.alloc(length)
        return buf if self._pread_nowait([buf], offset) == length else None

    # Scatter reads (BlockNode.read_into): straight into the caller's views,
    # with preadv (QEMU's raw_co_preadv with its QEMUIOVector).  O_DIRECT
    # needs every view aligned in address and length; a request whose
    # views are not is read into a pooled buffer and copied (the default).
    def _direct_ok(self, offset: int, length: int, views: list[memoryview]) -> bool:
        a = self.align
        if offset % a or length % a:
            return False
        address = buffers.address
        return all(not (len(v) % a or address(v) % a) for v in views)

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        if not length:
            return
        if self.cache_direct:
            if not self._direct_ok(offset, length, views):
                await super()._co_preadv_into(offset, length, views)
                return
            done = await self.io.readv(self.fd, views, offset)
        else:
            done = self._pread_nowait(views, offset) if self._may_read_now(length) else 0
            if done == length:
                if self._inline.should_yield():
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            done += await self.io.readv(self.fd, advance(views, done), offset + done)
        if done < length:
            for v in advance(views, done):  # past EOF reads as zeroes
                buffers.zero_tail(v, 0)

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        if self.cache_direct or not self._may_read_now(length):
            return False
        return self._pread_nowait(views, offset) == length

    def _preadv_into_submit(self, offset: int, length: int, views: list[memoryview],
                            done: Done) -> bool:
        # O_DIRECT straight into the caller's views (a guest's buffers),
        # through an engine of the kernel's; the page cache has read_now,
        # and a worker thread gains nothing over the caller's own task
        if not (self.cache_direct and self.io.submits_readv
                and self._direct_ok(offset, length, views)):
            return False
        self.io.submit_readv(self.fd, views, offset,
                             partial(self._readv_finished, views, offset, length, done, 0))
        return True

    def _readv_finished(self, views: list[memoryview], offset: int, length: int, done: Done,
                        got: int, res: int) -> None:
        if res < 0:
            done(None, engine_error(res))
            return
        got += res
        if got < length and res and offset + got < self._size:
            # a short read inside the file: read the rest
            self.io.submit_readv(self.fd, advance(views, got), offset + got,
                                 partial(self._readv_finished, views, offset, length, done, got))
            return
        if got < length:
            for v in advance(views, got):  # past EOF reads as zeroes
                buffers.zero_tail(v, 0)
        done(None, None)

    # The completions of submitted requests are bound methods with their
    # state in a partial, not closures: a closure that resubmits itself (a
    # short read) refers to itself, and a reference cycle per request would
    # keep the cyclic garbage collector busy.
    def _preadv_submit(self, offset: int, length: int, done: Done) -> bool:
        a = self.align
        if offset % a or length % a:
            return False  # padded reads take the general path
        buf, addr = buffers.alloc_at(length)
        if self._start_reads and length <= INLINE_READ_MAX:
            self._started_read(buf, addr, offset, done)
            return True
        self.io.submit_read(self.fd, buf, offset,
                            partial(self._read_finished, buf, offset, done, 0), addr)
        return True

    def _started_read(self, buf: memoryview, addr: int, offset: int, done: Done) -> None:
        """A buffered read on worker threads, started here: RWF_NOWAIT
        reads what the page cache has and, for what it misses, starts the
        device read right away (the kernel's readahead of that range); a
        worker of the pool's wait lane then only waits for those pages
        (ThreadPool.submit_started_read).  _read_finished as for
        submit_read, with the bytes read here."""
        iov = _iov
        iov[0] = addr
        iov[1] = len(buf)
        n = _preadv2(self.fd, iov, 1, offset, RWF_NOWAIT)
        if n < 0:
            e = ctypes.get_errno()
            if e in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = self._start_reads = False  # no RWF_NOWAIT here
            n = 0  # the worker reads it again and reports what fails
        if n == len(buf) or (n and offset + n >= self._size):
            # cached after all (or up to EOF)
            self.threads.submit_done(partial(self._read_finished, buf, offset, done, 0), n)
        else:
            self.threads.submit_started_read(self.fd, buf[n:] if n else buf, offset + n,
                                             partial(self._read_finished, buf, offset, done, n))

    def _read_finished(self, buf: memoryview, offset: int, done: Done, got: int,
                       res: int) -> None:
        if res < 0:
            done(None, engine_error(res))
            return
        got += res
        length = len(buf)
        if got < length and res and offset + got < self._size:
            # a short read inside the file: read the rest
            self.io.submit_read(self.fd, buf[got:], offset + got,
                                partial(self._read_finished, buf, offset, done, got))
            return
        if got < length:
            buffers.zero_tail(buf, got)  # past EOF reads as zeroes
        done(buf, None)

    def _may_read_now(self, length: int) -> bool:
        """Whether a read of ``length`` bytes is worth trying without the
        engine (_pread_nowait): not too large (smaller for a block job's
        read), and on a file system in memory or with RWF_NOWAIT, unless
        recent misses say to skip this one."""
        if length > BULK_READ_INLINE_MAX and (length > INLINE_READ_MAX
                                              or bulk_requests.get()):
            return False
        if self._memory_fs:
            return True
        if not self._nowait:
            return False
        if self._nowait_skip:
            self._nowait_skip -= 1
            return False
        return True

    def _pread_nowait(self, bufs: list[memoryview], offset: int) -> int:
        """Read what can be read without waiting for a device: from the page
        cache (RWF_NOWAIT), or anything on a file system in memory.  Returns
        the bytes read; the caller hands the rest to the engine.  Only after
        _may_read_now said yes."""
        if self._memory_fs:
            try:
                return (_preadv_iov(self.fd, bufs, offset, 0) if isinstance(bufs, IovecList)
                        else os.preadv(self.fd, bufs, offset))
            except OSError:
                return 0  # the engine tries again and reports it
        try:
            n = (_preadv_iov(self.fd, bufs, offset, RWF_NOWAIT) if isinstance(bufs, IovecList)
                 else os.preadv(self.fd, bufs, offset, os.RWF_NOWAIT))
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # kernel or file system without it
                return 0
            raise
        if n:
            self._nowait_backoff = 0
        else:
            # A miss costs: the kernel starts readahead from this thread and
            # the request goes to the engine anyway.  On data that is mostly
            # not cached (an image larger than RAM, cold data) probe less:
            # after each miss in a row skip twice as many requests, up to 64.
            self._nowait_backoff = min(max(1, self._nowait_backoff * 2), 64)
            self._nowait_skip = self._nowait_backoff
        return n

    # -- writes --------------------------------------------------------------------
    def _pwrite_all(self, mv: memoryview, offset: int, fua: bool) -> None:
        done = os.pwrite(self.fd, mv, offset) if len(mv) else 0
        while done < len(mv):
            done += os.pwritev(self.fd, [mv[done:]], offset + done)
        if fua:
            os.fdatasync(self.fd)

    async def _write_direct(self, data: memoryview, offset: int) -> None:
        a = self.align
        n = len(data)
        if offset % a or n % a:
            await self._write_padded(data, offset)
            return
        if data.readonly or buffers.address(data) % a:
            buf = buffers.alloc(n)  # O_DIRECT wants the memory aligned too
            buf[:] = data
        else:
            buf = data
        await self._direct_wait(offset, n)
        key = self._direct_writing(offset, n)
        try:
            await self.io.write(self.fd, buf, offset)
        finally:
            self._direct_written(key)

    async def _direct_wait(self, offset: int, n: int) -> None:
        if self._rmw:
            # a read-modify-write of a block this overlaps must not read it
            # before, and write it back after, this write
            while any(s < offset + n and offset < e for s, e in self._rmw):
                await self._rmw_done.wait()

    def _direct_writing(self, offset: int, n: int) -> object:
        """An O_DIRECT write of ``n`` bytes at ``offset`` is in flight (a
        read-modify-write of a block it overlaps waits for it); the key
        that _direct_written takes when it is done."""
        key = object()
        self._direct_writes[key] = (offset, offset + n)
        return key

    def _direct_written(self, key: object) -> None:
        del self._direct_writes[key]
        if self._write_done is not None:
            self._write_done.set()
            self._write_done = None

    async def _write_padded(self, data: memoryview, offset: int) -> None:
        """An O_DIRECT write that is not block-aligned: read the partial
        blocks at either end, merge, write whole blocks (QEMU's request
        padding).  Serialised with other padded writes, and with aligned
        writes in flight over the same blocks."""
        a = self.align
        start = offset - offset % a
        end = -(-(offset + len(data)) // a) * a
        async with self._rmw_lock:
            rng = (start, end)
            self._rmw.append(rng)
            try:
                while any(s < end and start < e for s, e in self._direct_writes.values()):
                    if self._write_done is None:
                        self._write_done = trio.Event()
                    await self._write_done.wait()
                buf = buffers.alloc(end - start)
                if start != offset:
                    got = await self.io.read(self.fd, buf[:a], start)
                    buffers.zero_tail(buf[:a], got)
                tail = end - a
                if end != offset + len(data) and (tail > start or start == offset):
                    got = await self.io.read(self.fd, buf[tail - start:], tail)
                    buffers.zero_tail(buf[tail - start:], got)
                buf[offset - start:offset - start + len(data)] = data
                await self.io.write(self.fd, buf, start)
            finally:
                self._rmw.remove(rng)
                self._rmw_done.set()
                self._rmw_done = trio.Event()

    def _pwritev_all(self, views: list[memoryview], offset: int) -> None:
        _pwritev_views(self.fd, views, offset, sum(len(v) for v in views))

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        if self.cache_direct:
            if any(v.readonly for v in views) or not self._direct_ok(offset, length, views):
                await super()._co_pwritev_vec(offset, length, views, fua)  # gathered
                return
            await self._direct_wait(offset, length)
            key = self._direct_writing(offset, length)
            try:
                await self.io.writev(self.fd, views, offset)
            finally:
                self._direct_written(key)
        elif not fua and self._inline.allowed(offset, length):
            self._inline.run(self._pwritev_all, views, offset)
            if self._inline.should_yield():
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self.io.writev(self.fd, views, offset)
        if fua:
            await self.io.fdatasync(self.fd)
        self._size = max(self._size, offset + length)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        if self.cache_direct or not self._inline.allowed(offset, len(mv)):
            return False
        self._inline.run(self._pwrite_all, mv, offset, False)
        self._size = max(self._size, offset + len(mv))
        return True

    def _pwritev_submit(self, offset: int, mv: memoryview, done: Done) -> bool:
        n = len(mv)
        if mv.readonly:
            return False
        addr = buffers.address(mv)
        if self.cache_direct:
            a = self.align
            if offset % a or n % a or self._rmw or addr % a:
                return False
        key = self._direct_writing(offset, n) if self.cache_direct else None
        self.io.submit_write(self.fd, mv, offset,
                             partial(self._write_finished, mv, offset, done, key, 0), addr)
        return True

    def _pwritev_submit_vec(self, offset: int, n: int, views: list[memoryview],
                            done: Done) -> bool:
        if isinstance(views, IovecList):
            return self._pwritev_iov_here(offset, n, views, done)
        if any(v.readonly for v in views):
            return False
        if self.cache_direct:
            if self._rmw or not self._direct_ok(offset, n, views):
                return False
        key = self._direct_writing(offset, n) if self.cache_direct else None
        self.io.submit_writev(self.fd, views, offset,
                              partial(self._writev_finished, views, offset, n, done, key, 0), n)
        return True

    def _pwritev_iov_here(self, offset: int, n: int, iov: IovecList, done: Done) -> bool:
        """An IovecList's write run here, where the threads engine would run
        a write of views (ThreadPool.submit_writev: into the page cache,
        not near dirty throttling, no recent stall; its RunHere watches it);
        False (the caller hands over views instead) anywhere else."""
        run_here = getattr(self.io, "run_here", None)
        if (self.cache_direct or _pwritev2_iov is None or run_here is None
                or not run_here.allowed(self.fd, offset, n)):
            return False
        self._write_settled(offset, n, done, None,
                            run_here._run(_pwritev_iov, self.fd, iov, offset, n))
        return True

    def _writev_finished(self, views: list[memoryview], offset: int, n: int, done: Done,
                         key: object | None, put: int, res: int) -> None:
        """_write_finished for a submitted pwritev: a short one goes on
        with the rest of the views."""
        if res == 0:
            res = -errno.EIO  # a write that makes no progress
        if res > 0 and put + res < n:
            put += res
            self.io.submit_writev(self.fd, advance(views, put), offset + put,
                                  partial(self._writev_finished, views, offset, n, done, key, put))
            return
        self._write_settled(offset, n, done, key, res)

    def _write_finished(self, mv: memoryview, offset: int, done: Done, key: object | None,
                        put: int, res: int) -> None:
        n = len(mv)
        if res == 0:
            res = -errno.EIO  # a write that makes no progress
        if res > 0:
            put += res
            if put < n:  # a short write: write the rest
                self.io.submit_write(self.fd, mv[put:], offset + put,
                                     partial(self._write_finished, mv, offset, done, key, put))
                return
        self._write_settled(offset, n, done, key, res)

    def _write_settled(self, offset: int, n: int, done: Done, key: object | None,
                       res: int) -> None:
        if key is not None:
            self._direct_written(key)
        if res < 0:
            done(None, engine_error(res))
        else:
            self._size = max(self._size, offset + n)
            done(None, None)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.cache_direct:
            await self._write_direct(data, offset)
        elif not fua and self._inline.allowed(offset, len(data)):
            # whole pages into the page cache, far from dirty throttling: a
            # few microseconds here beat any engine (see inline_io.py)
            self._inline.run(self._pwrite_all, data, offset, False)
            if self._inline.should_yield():
                await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self.io.write(self.fd, memoryview(data), offset)
        if fua:
            await self.io.fdatasync(self.fd)
        self._size = max(self._size, offset + len(data))

    def _zero(self, offset: int, length: int, may_unmap: bool) -> bool:
        self._forget_status()
        try:
            return self._zero_range(offset, length, may_unmap)
        finally:
            # again: a status asked meanwhile may have kept the old data run
            self._forget_status()

    def _zero_range(self, offset: int, length: int, may_unmap: bool) -> bool:
        end = offset + length
        if may_unmap:
            try:
                inside = min(end, self._size) - offset
                if inside > 0:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              offset, inside)
                if end > self._size:
                    os.ftruncate(self.fd, end)
                return True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # no ZERO_RANGE (tmpfs): punch a hole and allocate it again, as
        # QEMU's handle_aiocb_write_zeroes does
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            fallocate(self.fd, 0, offset, length)
            return True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        return False

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        end = offset + length
        if self.cache_direct and (offset % self.align or end % self.align):
            # O_DIRECT: the partial blocks at the edges are written as data
            # (QEMU's request padding), the aligned middle is zeroed; with
            # no_fallback the node layer has refused such a request already
            a = -(-offset // self.align) * self.align
            b = end // self.align * self.align
            if a >= b:
                await self._co_pwritev(offset, memoryview(bytes(length)), fua)
                return
            if offset < a:
                await self._co_pwritev(offset, memoryview(bytes(a - offset)), False)
            await self._co_pwrite_zeroes(a, b - a, may_unmap, False, no_fallback)
            if b < end:
                await self._co_pwritev(b, memoryview(bytes(end - b)), False)
            if fua:
                await self._run(os.fdatasync, self.fd)
            return
        done = await self._run(self._zero, offset, length, may_unmap)
        if not done:
            await super()._co_pwrite_zeroes(offset, length, may_unmap, fua, no_fallback)
            return
        self._size = max(self._size, offset + length)
        if fua:
            await self._run(os.fdatasync, self.fd)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        length = min(offset + length, self._size) - offset
        if length <= 0:
            return
        self._forget_status()
        try:
            await self._run(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                            offset, length)
        except OSError as e:
            self._discard_failed += 1
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return  # discard is advisory
            raise
        finally:
            self._forget_status()
        self._discard_ok += 1
        self._discard_bytes += length

    async def _co_flush(self) -> None:
        await self.io.fdatasync(self.fd)
        err, self._writeback_error = self._writeback_error, None
        if err is not None:
            raise err  # reported to write_back(), which is not the flush's caller

    def _write_back(self) -> None:
        if not self.cache_direct and _sync_file_range is not None:
            # the return value is ignored: fdatasync reports what failed
            _sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            # the kernel reports a failed writeback once per descriptor: keep
            # it for the next flush, which would otherwise succeed
            self._writeback_error = e

    async def write_back(self) -> None:
        """Write the file's dirty pages to disk now (sync_file_range, then
        fdatasync), on a worker thread: write-behind for long copies
        (jobs/write_behind.py), so that the flush ending them finds little
        left, on the host or in a virtual disk's own cache.

        Not a flush request: no statistics, no ordering promise to anyone;
        nothing for ``cache.no-flush``.  Raises nothing: an error is kept
        and raised by the next flush (the kernel reports it only once).
        """
        if self.fd < 0 or self.read_only or self.cache_no_flush:
            return
        await self._run(self._write_back)

    # -- status and size -------------------------------------------------------------
    def _forget_status(self) -> None:
        """Our own punch, zeroing or truncation may have made holes."""
        self._data_run = (0, 0)

    def _status(self, offset: int, length: int) -> BlockStatus:
        end = min(offset + length, self._size)
        if offset >= end:
            return BlockStatus(Status.ZERO | Status.ALLOCATED | Status.OFFSET_VALID, length,
                               offset=offset)
        start, hole = self._data_run
        if start <= offset < hole:
            return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID,
                               min(hole, end) - offset, offset=offset)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole until EOF
                data = end
            elif e.errno == errno.EINVAL:  # no SEEK_DATA here: all data
                data = offset
            else:
                raise
        if data > offset:
            return BlockStatus(Status.ZERO | Status.ALLOCATED | Status.OFFSET_VALID,
                               min(data, end) - offset, offset=offset)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENXIO):
                raise
            hole = end  # no SEEK_HOLE here (a device): QEMU pretends no holes
        self._data_run = (offset, hole)
        return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID,
                           min(hole, end) - offset, offset=offset)

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        # an lseek on the event loop, as QEMU's raw_co_block_status does it
        # in its coroutine: cheaper than any hop, and rarely waits for a device
        return self._status(offset, length)

    def _truncate(self, size: int, prealloc: str) -> None:
        self._forget_status()
        old = self._size
        os.ftruncate(self.fd, size)
        if size > old and prealloc == "falloc":
            os.posix_fallocate(self.fd, old, size - old)
        elif size > old and prealloc == "full":
            chunk = bytes(min(size - old, 1 << 20))
            pos = old
            while pos < size:
                n = min(len(chunk), size - pos)
                self._pwrite_all(memoryview(chunk)[:n], pos, False)
                pos += n

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if prealloc not in ("off", "falloc", "full"):
            raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
        try:
            await self._run(self._truncate, size, prealloc)
        except OSError as e:
            raise GenericError(f"Failed to resize file: {e.strerror}") from e
        self._size = size

    def _set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.use_lock and self.fd >= 0:
            locking.set_perm_locks(self.fd, (self.cum_perm, self.cum_shared),
                                   (perm, shared), self.path)

    async def reopen_rw(self) -> None:
        """blockdev-reopen with read-only=off: a new O_RDWR descriptor
        replaces the read-only one.  OFD locks belong to a descriptor, so the
        new one takes the current locks before the old one is closed."""
        flags = (os.O_CLOEXEC | os.O_RDWR | self.extra_open_flags
                 | (os.O_DIRECT if self.cache_direct else 0))
        try:
            fd = await self.threads.call(os.open, self.path, flags)
        except OSError as e:
            raise GenericError(f"Could not reopen file: {e.strerror}") from None
        if self.use_lock:
            try:
                locking.apply_lock_bytes(fd, self.cum_perm, self.cum_shared)
            except OSError as e:
                os.close(fd)
                raise GenericError(f"Failed to lock byte: {e.strerror}") from None
        old, self.fd = self.fd, fd
        if self.cache_direct:
            self.threads.run_here.direct_fd(fd, True)
        if old >= 0:
            self.threads.run_here.direct_fd(old, False)
            os.close(old)

    async def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.threads.run_here.direct_fd(fd, False)
            os.close(fd)  # drops the OFD locks with it

    # -- information -------------------------------------------------------------------
    @property
    def filename(self) -> str:
        return self.path

    def actual_size(self) -> int | None:
        try:
            return os.stat(self.path).st_blocks * 512 if self.fd < 0 else \
                os.fstat(self.fd).st_blocks * 512
        except OSError:
            return None

    def driver_stats(self) -> dict[str, Any] | None:
        return {"driver": "file", "discard-nb-ok": self._discard_ok,
                "discard-nb-failed": self._discard_failed,
                "discard-bytes-ok": self._discard_bytes}
