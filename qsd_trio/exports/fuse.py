"""The FUSE export: a block node's guest-visible bytes as one regular file.

Like qemu-storage-daemon, the export mounts a file system whose root inode is
a regular file over an existing regular file (the mountpoint), which it
covers and never changes.

Design: the kernel FUSE protocol spoken directly, in trio
---------------------------------------------------------
qemu-storage-daemon serves any number of FUSE exports from one process.
pyfuse3 keeps its session in module globals (one mount per process), so the
choices were (a) speak the kernel protocol on ``/dev/fuse`` ourselves, one
session object per export, or (b) one pyfuse3 process per export forwarding
each request to the daemon over a socket pair.  (a) is the faster by far
(docs/io-engine.md has the measurements): pyfuse3 alone adds libfuse's
dispatch and a Cython-to-trio hop to every request, and (b) adds a socket
round trip that copies each payload twice more.  With (a) every request is
one ``read()`` and one ``writev()`` of the device in the daemon's own event
loop, with no serialisation and no second process to supervise; it needs
only the dozen opcodes a one-file file system receives
(:mod:`qsd_trio.proto.fuse`) and scales to any number of mounts: each export
is one task waiting on its own fd.

READs and WRITEs are started from that task without a task of their own:
served at once where the node can (BlockNode.read_now/write_now: the page
cache), else started on the I/O engine (read_submit/write_submit) and
answered from the completion, so a request waiting on its device holds up
no other.  A write is started from the receive buffer the kernel put its
payload in (no copy; the payload begins on a page boundary, as O_DIRECT
wants), and the next request is read into another buffer until that write
completes.  What a node cannot start so gets a task (READ) or is handled in
the loop itself, in arrival order (every other request).

Behaviour follows QEMU 7.2's export (see the handlers): short writes at the end of a non-growable export, truncate
allowed when writable, fallocate mode 0 only at the end of the file,
SEEK_DATA/SEEK_HOLE from block status, chmod of owner bits (and chown, with
allow-other).

Resources: the ``/dev/fuse`` fd and the mount.  ``run`` unmounts (lazily)
and closes the fd when it ends, whichever way it ends: cancelled by
``stop()`` (block-export-del, shutdown) or because someone unmounted it
(the kernel then fails reads with ENODEV).  Either way the generic export
code then drops it and emits BLOCK_EXPORT_DELETED.  (qemu-storage-daemon
7.2 keeps listing an export whose mount was removed from outside; ending it
is deliberate here, the issue asks for it.)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..nodes.engine import base as engine
from ..nodes.engine import buffers
from ..nodes.node import BdrvChild, BlockNode, Perm, Status
from ..nodes.perms import refresh
from ..proto import fuse as fp
from ..qapi.errors import GenericError, QapiError
from . import fuse_mount
from .base import BlockExport, register_export
from .read_now import NowGuess

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
# a request is its header and body plus up to max_write bytes of payload
BUFFER_SIZE = MAX_WRITE + 64 * 1024
ATTR_TIMEOUT = 1.0  # seconds the kernel may cache attributes (QEMU's value)
# seconds _unmount waits for the replies of requests still on the I/O engine
ANSWER_GRACE = 10.0
WANTED_INIT_FLAGS = (fp.ASYNC_READ | fp.BIG_WRITES | fp.MAX_PAGES | fp.AUTO_INVAL_DATA
                     | fp.ASYNC_DIO | fp.ATOMIC_O_TRUNC)

# the replies of the requests served per request, packed with one call
_OUT_HEADER_PACK = fp.OUT_HEADER.pack
_OUT_HEADER_SIZE = fp.OUT_HEADER.size
_WRITE_REPLY_PACK = fp.WRITE_REPLY.pack
_WRITE_REPLY_SIZE = fp.WRITE_REPLY.size

# where a WRITE's payload starts in a request (in_header, then fuse_write_in)
WRITE_PAYLOAD = fp.IN_HEADER.size + fp.WRITE_IN.size
PAGE = buffers.PAGE
# what _start_write did with a WRITE
_NOT_TAKEN, _ANSWERED, _SUBMITTED = 0, 1, 2

# mountpoints of live FUSE exports in this process, as given (QEMU compares
# the strings too: resolving them would need a stat() we might have to serve)
_MOUNTPOINTS: set[str] = set()


def _error_number(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _raise_readahead(device: str) -> None:
    """Let the kernel read ahead up to max_write per request instead of 128 KiB.

    Each request costs a fixed amount of Python time, so fewer, larger reads
    matter here more than in QEMU (which keeps the default).  Best effort:
    only root may write the mount's bdi setting.
    """
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(MAX_WRITE // 1024))
    except OSError:
        pass


# a reply: one buffer, or a header and data for one writev()
Reply = bytes | list[Any]
Handler = Callable[[int, memoryview], Awaitable[Reply]]


@register_export
class FuseExport(BlockExport):
    type = "fuse"

    def __init__(self, daemon: Any, args: Any, node: BlockNode) -> None:
        super().__init__(daemon, args, node)
        self.mountpoint: str = args.mountpoint
        self.growable = bool(args.growable)
        self.writethrough = bool(args.writethrough)
        self.allow_other_arg = args.allow_other or "auto"
        self.allow_other = False
        self.st_mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if self.writable else 0)
        self.st_uid = os.getuid()
        self.st_gid = os.getgid()
        self.startup_time = int(time.time())
        self.use_helper: bool | None = None  # None: fusermount3 only when not root
        self.edge: BdrvChild | None = None
        self._fd = -1
        self._submitted = 0  # READs and WRITEs started on the engine, not yet answered
        self._spare_buffers: list[memoryview] = []  # receive buffers not in use
        self._write_now = NowGuess().write_now  # asks write_now while it serves
        self._submitted_idle: trio.Event | None = None
        self._device: str | None = None
        self._target = self.mountpoint
        self._handlers: dict[int, Handler] = {
            fp.INIT: self._init,
            fp.LOOKUP: self._lookup,
            fp.GETATTR: self._getattr,
            fp.SETATTR: self._setattr,
            fp.OPEN: self._open,
            fp.WRITE: self._write,
            fp.FLUSH: self._flush,
            fp.FSYNC: self._flush,
            fp.RELEASE: self._empty,
            fp.STATFS: self._statfs,
            fp.FALLOCATE: self._fallocate,
            fp.LSEEK: self._lseek,
            fp.DESTROY: self._empty,
        }

    # -- lifecycle -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mount, report started, serve until cancelled or unmounted.

        Ending because the mount went away is a normal return: the caller
        (monitor/exports.py) then drops the export and emits
        BLOCK_EXPORT_DELETED, as for block-export-del.
        """
        perm = Perm.CONSISTENT_READ
        if self.writable:
            # qemu-storage-daemon 7.2 holds RESIZE for the life of any
            # writable FUSE export, growable or not (a truncate through the
            # mount needs it), so a job that does not share it (mirror) is
            # refused with the same permission conflict
            perm |= Perm.WRITE | Perm.RESIZE
        self.edge = self.node.attach("root", self, perm)
        try:
            with self.cancel_scope:
                try:
                    await self._mount()
                    task_status.started()
                    try:
                        await self._serve()
                    except Exception as e:  # noqa: BLE001 - one export fails, the daemon lives
                        print(f"qsd-trio: FUSE export '{self.id}' failed: {e!r}",
                              file=sys.stderr)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._unmount()
        finally:
            self.edge.detach()
            with contextlib.suppress(Exception):
                refresh(self.node)
            self.finished.set()

    async def _mount(self) -> None:
        if self.mountpoint in _MOUNTPOINTS:
            raise GenericError(f"There already is a FUSE export on '{self.mountpoint}'")
        _MOUNTPOINTS.add(self.mountpoint)
        try:
            # in a thread: the path may lie on a FUSE mount that we serve
            try:
                st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
            except OSError as e:
                raise GenericError(f"Failed to stat '{self.mountpoint}': {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise GenericError(f"'{self.mountpoint}' is not a regular file")
            self._target = await trio.to_thread.run_sync(os.path.realpath, self.mountpoint)
            if self.allow_other_arg == "auto":
                try:
                    await self._mount_once(True)
                    self.allow_other = True
                except OSError:
                    await self._mount_once(False)
            else:
                self.allow_other = self.allow_other_arg == "on"
                await self._mount_once(self.allow_other)
        except OSError:
            _MOUNTPOINTS.discard(self.mountpoint)
            raise GenericError("Failed to mount FUSE session to export") from None
        except BaseException:
            if self._fd < 0:
                _MOUNTPOINTS.discard(self.mountpoint)
            raise  # once mounted, run() unmounts and releases the mountpoint
        os.set_blocking(self._fd, False)

    async def _mount_once(self, allow_other: bool) -> None:
        # self._fd is set before the next checkpoint, so a cancellation after
        # the mount still finds it to unmount
        self._fd = await trio.to_thread.run_sync(
            lambda: fuse_mount.mount(self.mountpoint, allow_other=allow_other,
                                     use_helper=self.use_helper))
        try:
            self._device = await trio.to_thread.run_sync(fuse_mount.mount_device,
                                                         self._target)
        except OSError:
            self._device = None

    async def _unmount(self) -> None:
        if self._fd < 0:
            return  # never mounted: the path is not ours to unmount
        with trio.move_on_after(10):
            try:
                await trio.to_thread.run_sync(
                    lambda: fuse_mount.unmount(self.mountpoint, target=self._target,
                                               device=self._device,
                                               use_helper=self.use_helper))
            except OSError:
                pass  # already gone (unmounted from outside)
        # the descriptor stays open until every request started on the
        # engine has answered, so no reply reaches a reused fd number; one
        # that never comes (a driver that lost its completion) holds the
        # daemon's shutdown for ANSWER_GRACE at most, and _send drops any
        # reply after the close
        with trio.move_on_after(ANSWER_GRACE, shield=True):
            while self._submitted:
                self._submitted_idle = trio.Event()
                await self._submitted_idle.wait()
        fd, self._fd = self._fd, -1
        trio.lowlevel.notify_closing(fd)
        os.close(fd)  # aborts requests still waiting on the connection
        _MOUNTPOINTS.discard(self.mountpoint)

    # -- the request loop ------------------------------------------------------
    async def _serve(self) -> None:
        """Serve requests; returns once the mount is gone (ENODEV)."""
        fd = self._fd
        buf = self._receive_buffer()
        handlers = self._handlers
        # an O_DIRECT image never serves a read without the engine: stop
        # asking after a run of misses (read_now.py)
        read_now = NowGuess().read_now
        # every request's header, and a READ's offset and size, in one call
        read_request = fp.READ_REQUEST.unpack_from
        read_op = fp.READ
        readv = os.readv
        bufs = [buf]
        partial = functools.partial
        read_done = self._read_done
        served = 0
        # waits for the device and the I/O engines' completions without the
        # scheduler while nothing else can run (nodes/engine/inline_wait.py)
        wait_inline = self.node.graph.io.inline_waiter()
        # the device is expected to be empty: the read just started is the
        # only one in flight, and its client waits for it before it asks
        # again; then a wait comes first, not a read that fails with EAGAIN
        expect_empty = False
        async with trio.open_nursery() as readers:
            while True:
                if expect_empty:
                    expect_empty = False
                    if wait_inline is not None:
                        wait_inline(fd)  # readable or not, read next
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    if wait_inline is None or not wait_inline(fd):
                        await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR):
                        continue  # the request was interrupted before we read it
                    if e.errno == errno.ENODEV:
                        readers.cancel_scope.cancel()
                        return
                    raise
                _len, opcode, unique, offset, size = read_request(buf)
                if opcode == read_op:
                    # reads run concurrently: the kernel sends readahead alongside
                    # the reader's own request, and each may wait on a file thread.
                    # The node is looked up per request, not kept from the
                    # start: the export's edge moves when a filter is
                    # inserted above the node or a mirror pivots
                    # (BlockExport.child_attached)
                    node = self.node
                    end = node._length()
                    if offset + size > end:
                        size = end - offset if offset < end else 0
                    self.read_bytes += size
                    data = read_now(node, offset, size) if size else None
                    if data is None:
                        # started on the I/O engine and answered from its
                        # completion, or else in a task of its own
                        if size and node.read_submit(offset, size, partial(read_done, unique)):
                            self._submitted += 1
                            expect_empty = self._submitted == 1
                        else:
                            readers.start_soon(self._read, unique, offset, size)
                        continue
                    # served from the cache without a task (BlockNode.read_now)
                    self._send([_OUT_HEADER_PACK(_OUT_HEADER_SIZE + len(data), 0, unique),
                                data])
                    expect_empty = not self._submitted
                    served += 1
                    if served % 64 == 0:
                        await trio.lowlevel.checkpoint()
                    continue
                body = buf[fp.IN_HEADER.size:n]
                if opcode == fp.WRITE:
                    started = self._start_write(unique, body, buf)
                    if started:
                        if started == _SUBMITTED:
                            # the payload stays where it is until the write
                            # completes: the next request goes elsewhere
                            buf = self._receive_buffer()
                            bufs = [buf]
                        # answered, or in flight alone: its client waits
                        expect_empty = self._submitted <= 1
                        served += 1
                        if served % 64 == 0:
                            await trio.lowlevel.checkpoint()
                        continue
                if opcode in fp.NO_REPLY:
                    continue
                handler = handlers.get(opcode)
                out: Reply
                if handler is None:
                    out = fp.reply_error(unique, errno.ENOSYS)
                else:
                    try:
                        out = await handler(unique, body)
                    except Exception as e:  # noqa: BLE001 - a failed request, not a failed export
                        out = fp.reply_error(unique, _error_number(e))
                self._send(out)
                if opcode == fp.INIT and self._device is not None:
                    # the kernel sets the mount's readahead from the INIT reply,
                    # capped at its 128 KiB default: raise it once that is done
                    await trio.to_thread.run_sync(_raise_readahead, self._device)
                served += 1
                if served % 64 == 0:
                    # handlers that never await would otherwise starve other tasks
                    await trio.lowlevel.checkpoint()

    def _receive_buffer(self) -> memoryview:
        """A buffer to read the next request into: one kept from a write
        that has completed, or a new one.  Its WRITE payload starts on a
        page boundary, so that a write to an O_DIRECT image can go to the
        I/O engine from where the kernel put it.  From the engine's pool:
        a slot of this size is one huge page where the kernel has them,
        which the copies of a 1 MiB payload in and out walk faster."""
        if self._spare_buffers:
            return self._spare_buffers.pop()
        return buffers.alloc(PAGE + BUFFER_SIZE)[PAGE - WRITE_PAYLOAD:]

    def _start_write(self, unique: int, body: memoryview, buf: memoryview) -> int:
        """A WRITE served without awaiting, as the READs are: written now
        (into the page cache, BlockNode.write_now) and answered, or started
        on the I/O engine from the receive buffer ``buf`` and answered by
        _write_done, which hands ``buf`` back for later requests.
        _NOT_TAKEN leaves it to _write (a read-only, writethrough or
        growing export, a write the node cannot start without a task)."""
        if not self.writable or self.writethrough:
            return _NOT_TAKEN
        _fh, offset, size, _wflags, _lock, _flags, _pad = fp.WRITE_IN.unpack_from(body)
        length = self.node.length
        if offset + size > length:
            if self.growable:
                return _NOT_TAKEN
            size = max(length - offset, 0)  # a short write, as _write does
            if not size:
                return _NOT_TAKEN
        data = body[fp.WRITE_IN.size:fp.WRITE_IN.size + size]
        if self._write_now(self.node, offset, data):
            self.written_bytes += size
            self._send(_WRITE_REPLY_PACK(_WRITE_REPLY_SIZE, 0, unique, size, 0))
            return _ANSWERED
        # counted first: the write may complete before write_submit returns
        # (the threads engine runs it here when this export waits for
        # nothing else: engine.caller_waits)
        self._submitted += 1
        alone = self._submitted == 1
        if alone:
            engine.caller_waits(True)
        try:
            started = self.node.write_submit(
                offset, data, functools.partial(self._write_done, unique, size, buf))
        finally:
            if alone:
                engine.caller_waits(False)
        if started:
            self.written_bytes += size
            return _SUBMITTED
        self._submitted -= 1
        return _NOT_TAKEN

    def _write_done(self, unique: int, size: int, buf: memoryview, _res: Any,
                    err: OSError | None) -> None:
        """A WRITE started by _start_write has completed: answer it, and
        keep its receive buffer for later requests."""
        self._spare_buffers.append(buf)
        self._answer(fp.reply_error(unique, _error_number(err)) if err is not None
                     else _WRITE_REPLY_PACK(_WRITE_REPLY_SIZE, 0, unique, size, 0))

    def _answer(self, out: Reply) -> None:
        """Send the reply of a request started on the engine (_submitted).

        _send written out: this runs once per READ or WRITE served from a
        completion, and at queue depth 1 between the device's completion
        and the client's next request."""
        self._submitted -= 1
        fd = self._fd
        if fd >= 0:  # else closed (_unmount): nobody to answer
            try:
                if isinstance(out, list):
                    os.writev(fd, out)
                else:
                    os.write(fd, out)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    raise  # as _send
        if not self._submitted and self._submitted_idle is not None:
            self._submitted_idle.set()

    def _send(self, out: Reply) -> None:
        if self._fd < 0:
            return  # closed (_unmount): nobody to answer
        try:
            if isinstance(out, list):
                os.writev(self._fd, out)
            else:
                os.write(self._fd, out)
        except OSError as e:
            # ENOENT: the request was interrupted and needs no answer now;
            # ENODEV: the mount is gone, which the read loop sees next
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    # -- handlers: each returns the reply as bytes or a list of buffers --------
    async def _init(self, unique: int, body: memoryview) -> Reply:
        major, minor, max_readahead, flags = fp.INIT_IN.unpack_from(body)
        if major != fp.KERNEL_VERSION:
            # the kernel retries with our major when it can speak it
            return fp.reply(unique, fp.init_out(max_readahead=0, flags=0, max_write=4096,
                                                    max_pages=1))
        return fp.reply(unique, fp.init_out(
            max_readahead=max_readahead, flags=flags & WANTED_INIT_FLAGS,
            max_write=MAX_WRITE, max_pages=MAX_PAGES))

    async def _lookup(self, unique: int, body: memoryview) -> Reply:
        # the root is a file: it has no directory entries
        return fp.reply_error(unique, errno.ENOENT)

    async def _attr(self) -> fp.Attr:
        length = self.node.length
        allocated = await self._allocated_bytes()
        if allocated is None or allocated <= 0:
            allocated = length
        return fp.Attr(ino=fp.ROOT_ID, size=length, blocks=-(-allocated // 512),
                       mode=self.st_mode, uid=self.st_uid, gid=self.st_gid,
                       time=(self.startup_time, 0),
                       blksize=self.node.request_alignment)

    async def _allocated_bytes(self) -> int | None:
        """Bytes the node's image file takes on disk (QEMU's allocated file size)."""
        return await trio.to_thread.run_sync(self.node.actual_size)

    async def _getattr(self, unique: int, body: memoryview) -> Reply:
        return fp.reply(unique, fp.attr_out(await self._attr(), ATTR_TIMEOUT))

    async def _setattr(self, unique: int, body: memoryview) -> Reply:
        req = fp.parse_setattr(body)
        supported = fp.FATTR_SIZE | fp.FATTR_MODE
        if self.allow_other:
            supported |= fp.FATTR_UID | fp.FATTR_GID
        to_set = req.valid & fp.FATTR_ATTRIBUTES
        if to_set & ~supported:
            raise OSError(errno.ENOTSUP, "unsupported attribute")
        if to_set & fp.FATTR_MODE:
            # without allow_other nobody but the owner gets in: refuse group/other bits
            if not self.allow_other and req.mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise OSError(errno.EPERM, "group/other bits need allow-other")
            if not self.writable and req.mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise OSError(errno.EROFS, "read-only export")
        if to_set & fp.FATTR_SIZE:
            if not self.writable:
                raise OSError(errno.EACCES, "read-only export")
            await self._truncate(req.size)
        if to_set & fp.FATTR_MODE:
            self.st_mode = stat.S_IFREG | (req.mode & 0o7777)
        if to_set & fp.FATTR_UID:
            self.st_uid = req.uid
        if to_set & fp.FATTR_GID:
            self.st_gid = req.gid
        return await self._getattr(unique, body)

    async def _truncate(self, size: int, prealloc: str = "off") -> None:
        # only writable exports get here, and they hold RESIZE (run)
        try:
            await self.node.truncate(size, exact=True, prealloc=prealloc)
        except QapiError:
            raise OSError(errno.ENOTSUP, "cannot resize") from None

    async def _open(self, unique: int, body: memoryview) -> Reply:
        # no direct_io/keep_cache flags: the kernel's page cache serves re-reads
        # within one open and is dropped on the next open, as with QEMU
        return fp.reply(unique, fp.OPEN_OUT.pack(0, 0, 0))

    async def _empty(self, unique: int, body: memoryview) -> Reply:
        return fp.reply(unique)

    async def _statfs(self, unique: int, body: memoryview) -> Reply:
        return fp.reply(unique, fp.statfs_out())

    async def _read(self, unique: int, offset: int, size: int) -> None:
        """READ, as its own task: replies itself.  ``size`` is already cut
        at the end of the export (short reads, as clients expect at EOF)."""
        out: Reply
        try:
            if size == 0:
                out = fp.reply(unique)
            else:
                data = await self.node.read(offset, size)
                out = [fp.reply_header(unique, len(data)), data]
        except Exception as e:  # noqa: BLE001 - a failed request, not a failed export
            out = fp.reply_error(unique, _error_number(e))
        self._send(out)

    def _read_done(self, unique: int, data: Any, err: OSError | None) -> None:
        """A READ started with read_submit has completed: answer it.  The
        session's descriptor stays open until every such read has answered
        (_unmount waits), so the reply cannot reach a reused fd number."""
        self._answer(fp.reply_error(unique, _error_number(err)) if err is not None
                     else [_OUT_HEADER_PACK(_OUT_HEADER_SIZE + len(data), 0, unique), data])

    async def _write(self, unique: int, body: memoryview) -> Reply:
        _fh, offset, size, _wflags, _lock, _flags, _pad = fp.WRITE_IN.unpack_from(body)
        data = body[fp.WRITE_IN.size:fp.WRITE_IN.size + size]
        if not self.writable:
            raise OSError(errno.EACCES, "read-only export")
        length = self.node.length
        if offset + size > length:
            if self.growable:
                await self._truncate(offset + size)
            else:
                # QEMU writes what fits and reports a short write
                size = max(length - offset, 0)
                data = data[:size]
        self.written_bytes += size
        if size and (self.writethrough or not self.node.write_now(offset, data)):
            await self.node.write(offset, data, fua=self.writethrough)
        return fp.reply(unique, fp.WRITE_OUT.pack(size, 0))

    async def _flush(self, unique: int, body: memoryview) -> Reply:
        await self.node.flush()
        return fp.reply(unique)

    async def _fallocate(self, unique: int, body: memoryview) -> Reply:
        _fh, offset, length, mode, _pad = fp.FALLOCATE_IN.unpack_from(body)
        if not self.writable:
            raise OSError(errno.EACCES, "read-only export")
        size = self.node.length
        if mode & fp.FALLOC_FL_KEEP_SIZE:
            length = min(length, size - offset)
        if mode == 0:
            # plain preallocation can only extend the file at its end
            if offset < size:
                raise OSError(errno.EOPNOTSUPP, "fallocate inside the image")
            if offset > size:
                await self._truncate(offset)
            await self._truncate(offset + length, "falloc")
        elif mode & fp.FALLOC_FL_PUNCH_HOLE:
            if not mode & fp.FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EINVAL, "punch-hole needs keep-size")
            if length > 0:
                await self.node.discard(offset, length)
        elif mode & fp.FALLOC_FL_ZERO_RANGE:
            if not mode & fp.FALLOC_FL_KEEP_SIZE and offset + length > size:
                await self._truncate(offset + length)
            if length > 0:
                await self.node.write_zeroes(offset, length)
        else:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode")
        return fp.reply(unique)

    async def _lseek(self, unique: int, body: memoryview) -> Reply:
        _fh, offset, whence, _pad = fp.LSEEK_IN.unpack_from(body)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "whence")
        length = self.node.length
        while True:
            if offset >= length:
                # past the data there is an implicit hole up to the end
                if offset > length or whence == os.SEEK_DATA:
                    raise OSError(errno.ENXIO, "no more data")
                return fp.reply(unique, fp.LSEEK_OUT.pack(offset))
            st = await self.node.block_status(offset, length - offset)
            is_data = bool(st.flags & Status.DATA)
            if is_data == (whence == os.SEEK_DATA):
                return fp.reply(unique, fp.LSEEK_OUT.pack(offset))
            if st.length <= 0:
                raise OSError(errno.ENXIO, "no progress")
            offset += st.length

