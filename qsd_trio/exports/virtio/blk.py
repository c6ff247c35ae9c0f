"""virtio-blk: requests on descriptor chains and the config space.

The device side of the virtio block device (device-types_blk_*.tex in the
virtio specification), shared by the vhost-user-blk and VDUSE exports.
Requests and their status bytes follow QEMU 7.2's
block/export/virtio-blk-handler.c, which both of its exports use: IN, OUT,
FLUSH, GET_ID, DISCARD and WRITE_ZEROES (with the UNMAP flag), anything
else ``VIRTIO_BLK_S_UNSUPP``; a request out of range, misaligned, on a
read-only export, or failing in the block layer ``VIRTIO_BLK_S_IOERR``.

I/O goes through :class:`BlkBackend`, the few async methods a
:class:`~qsd_trio.nodes.node.BlockNode` has, so the export hands its node
over as it is and the unit tests can hand over a model.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

from ...nodes.engine.base import caller_waits
from ...nodes.file import TAKES_IOVECS, FileNode
from ...qapi.cstr import c_bytes
from ..read_now import NowGuess
from .memory import GuestIovec, GuestMemoryError, Segment, views_of
from .virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Chain,
)

# request types (device-types_blk_description.tex "Device Operation")
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_T_BARRIER = 0x80000000  # legacy flag, ignored

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

# feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

SECTOR_BITS = 9
SECTOR_SIZE = 1 << SECTOR_BITS
# QEMU's limits: one discard / write-zeroes segment of at most 32768
# sectors, at most 128 - 2 data segments per request (a request header
# and a status byte take the other two of 128), and BDRV_REQUEST_MAX_BYTES
# (INT_MAX rounded down to a sector) for reads and writes
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768
SEG_MAX = 128 - 2
REQUEST_MAX_SECTORS = (0x7FFFFFFF & ~(SECTOR_SIZE - 1)) >> SECTOR_BITS

# struct virtio_blk_config (60 bytes, little-endian), offsets of the fields
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_SIZE = CONFIG.size
CONFIG_WCE_OFFSET = 32

_OUTHDR = struct.Struct("<IIQ")
_IOERR = bytes([VIRTIO_BLK_S_IOERR])
log = logging.getLogger(__name__)

# BlkHandler.start: the request was handed to the node and completes later
STARTED = -1
# what BlkHandler.start calls when a request it started completes: the
# chain's head and its used length
Completion = Callable[[int, int], None]
_DWZ = struct.Struct("<QII")


class Prepared:
    """A read or write that BlkHandler.start parsed and checked but could
    not serve without a task: what :meth:`BlkHandler.process` needs to do
    it without walking the chain again (its views of guest memory, the
    status byte's place, the used length), and that the node's fast path
    already declined it."""

    __slots__ = ("is_write", "offset", "views", "size", "status", "used")

    def __init__(self, is_write: bool, offset: int, views: list[memoryview], size: int,
                 status: Segment, used: int):
        self.is_write = is_write
        self.offset = offset
        self.views = views
        self.size = size
        self.status = status
        self.used = used


class BlkBackend(Protocol):
    """The block I/O an export does for its virtio-blk device.  A
    BlockNode is one; every method raises OSError on failure."""

    @property
    def length(self) -> int: ...

    async def read_into(self, offset: int, views: list[memoryview]) -> None: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None: ...

    async def writev(self, offset: int, views: list[memoryview], *, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None: ...

    # the synchronous fast path (BlockNode.read_into_now/write_now): False
    # when the request needs the full path above
    def read_into_now(self, offset: int, views: list[memoryview]) -> bool: ...

    def write_now(self, offset: int, mv: memoryview) -> bool: ...

    # a write started without a task (BlockNode.writev_submit): False when
    # the node cannot take it that way; else done(None, None or OSError) later
    def writev_submit(self, offset: int, views: list[memoryview],
                      done: Callable[[Any, OSError | None], None]) -> bool: ...

    # a read into the views started without a task (BlockNode.readv_submit), the same way
    def readv_submit(self, offset: int, length: int, views: list[memoryview],
                     done: Callable[[Any, OSError | None], None]) -> bool: ...


def device_features(*, writable: bool) -> int:
    """The virtio feature bits QEMU 7.2's vhost-user-blk export offers for
    the device and its rings (the transport adds its own)."""
    bits = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_TOPOLOGY | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX)
    if not writable:
        bits |= 1 << VIRTIO_BLK_F_RO
    return bits


def _take(segments: tuple[Segment, ...] | list[Segment], n: int) -> tuple[list[Segment], list[Segment]]:
    """Split a segment list after its first ``n`` bytes."""
    head: list[Segment] = []
    rest: list[Segment] = []
    for r, off, length in segments:
        if n <= 0:
            rest.append((r, off, length))
        elif length <= n:
            head.append((r, off, length))
            n -= length
        else:
            head.append((r, off, n))
            rest.append((r, off + n, length - n))
            n = 0
    return head, rest


def _answer_later(status: Segment, head: int, used: int,
                  done: Completion) -> Callable[[Any, OSError | None], None]:
    """The completion of a request started without a task: it writes the
    status byte (the engine held the request's views of guest memory until
    now) and hands ``done`` the head and used length (0 if the status byte
    is gone)."""
    sr, soff, _ = status

    def answer(_result: object, error: OSError | None) -> None:
        try:
            sr.write(soff, b"\0" if error is None else _IOERR)
        except GuestMemoryError:
            done(head, 0)
        else:
            done(head, used)

    return answer


class _IovReader:
    """BlockNode.read_into_now for a GuestIovec, whose length is its own
    (the list is empty), so that NowGuess keeps count of it as of views."""

    __slots__ = ("backend",)

    def __init__(self, backend: BlkBackend):
        self.backend = backend

    def read_into_now(self, offset: int, views: list[memoryview]) -> bool:
        assert isinstance(views, GuestIovec)
        backend: Any = self.backend
        return backend.read_now(offset, views.size, views) is not None


def _gather(segments: list[Segment]) -> bytes:
    return b"".join(r.read(off, n) for r, off, n in segments)


def _scatter(segments: list[Segment], data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data).cast("B")
    pos = 0
    for r, off, n in segments:
        if pos >= len(mv):
            break
        chunk = mv[pos:pos + n]
        r.write(off, chunk)
        pos += len(chunk)


class BlkHandler:
    """One virtio-blk device: its config space and its request handling.

    ``serial`` is what GET_ID answers (QEMU's vhost-user-blk export answers
    ``vhost_user_blk``; VDUSE's has a ``serial`` option).  ``writethrough``
    makes every write a FUA write; the driver toggles it through the config
    space's ``writeback`` byte (SET_CONFIG).

    The ``writeback`` byte tells the driver the truth: 1 while writes are
    cached (``writethrough`` off), so that it sends flushes, 0 while every
    write is FUA.  QEMU 7.2 starts it at 0 whatever the cache mode, so a
    guest told "write through" never flushes while a format driver such as
    qcow2 keeps metadata in memory until a flush; a SIGKILL then loses
    writes the guest took as durable.
    """

    def __init__(self, backend: BlkBackend, *, writable: bool, logical_block_size: int = 512,
                 num_queues: int = 1, serial: str = "vhost_user_blk", writethrough: bool = False):
        self.backend = backend
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.num_queues = num_queues
        self.serial = c_bytes(serial)
        self.writethrough = writethrough
        # the config space's writeback byte, kept equal to the cache mode
        self.wce = 0 if writethrough else 1
        # bytes of the read and write requests the driver sent (metrics)
        self.read_bytes = 0
        self.written_bytes = 0
        self._now = NowGuess()  # whether a READ is worth the fast path first
        self._iov_reader = _IovReader(backend)

    # -- config space ---------------------------------------------------------------
    def features(self) -> int:
        return device_features(writable=self.writable)

    def config(self) -> bytes:
        """struct virtio_blk_config as QEMU 7.2 fills it: capacity in
        sectors, blk_size from logical-block-size, seg_max 126, min_io_size
        and opt_io_size 1, num_queues, one discard and one write-zeroes
        segment of up to 32768 sectors aligned to the block size."""
        bs = self.logical_block_size
        return CONFIG.pack(
            self.backend.length >> SECTOR_BITS,  # capacity
            0,  # size_max
            SEG_MAX,
            0, 0, 0,  # geometry: cylinders, heads, sectors
            bs,  # blk_size
            0, 0, 1, 1,  # physical_block_exp, alignment_offset, min_io_size, opt_io_size
            self.wce, 0,  # writeback, unused0
            self.num_queues,
            MAX_DISCARD_SECTORS, 1, bs >> SECTOR_BITS,
            MAX_WRITE_ZEROES_SECTORS, 1, 0,  # ..., write_zeroes_may_unmap
        )

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: the first ``size`` bytes of the config space (QEMU
        ignores the offset); b"" (the error answer) when ``size`` is larger
        than the config space."""
        del offset
        if size > CONFIG_SIZE:
            return b""
        return self.config()[:size]

    def write_config(self, offset: int, data: bytes, flags: int) -> bool:
        """SET_CONFIG: only the writeback byte may be written, and not for
        migration (flags must be 0); False when refused."""
        if flags != 0 or offset != CONFIG_WCE_OFFSET or len(data) != 1:
            return False
        self.wce = data[0]
        self.writethrough = not self.wce
        return True

    # -- requests --------------------------------------------------------------------
    def _range_ok(self, sector: int, size: int) -> bool:
        if size % SECTOR_SIZE:
            return False
        nb_sectors = size >> SECTOR_BITS
        if nb_sectors > REQUEST_MAX_SECTORS:
            return False
        if ((sector << SECTOR_BITS) & 0xFFFFFFFFFFFFFFFF) % self.logical_block_size:
            return False
        total = self.backend.length >> SECTOR_BITS
        return not (sector > total or nb_sectors > total - sector)

    async def process(self, chain: Chain, prepared: Prepared | None = None) -> int:
        """Carry out the request in ``chain`` (``prepared``: as start()
        parsed it) and write its status byte.

        Returns the used length to push: every device-writable byte of the
        chain, as QEMU counts it.  A chain without a device-writable byte
        has nowhere to put a status; it is returned with length 0 and
        nothing done.  Errors of the backend (OSError, or any other
        Exception, as the FUSE export treats them) and of guest memory that
        went away become ``VIRTIO_BLK_S_IOERR``; cancellation is not caught.
        """
        if prepared is None:
            in_len = chain.writable_len
            if in_len == 0:
                return 0
            data_in, status_seg = _take(chain.writable, in_len - 1)
            r, off, _ = status_seg[0]
        else:
            in_len = prepared.used
            r, off, _ = prepared.status
        try:
            if prepared is None:
                status = await self._execute(chain, data_in)
            else:
                await self._rw(prepared.is_write, prepared.offset, prepared.views, prepared.size,
                               tried_now=True)
                status = VIRTIO_BLK_S_OK
        except (OSError, GuestMemoryError):
            status = VIRTIO_BLK_S_IOERR
        except Exception:  # noqa: BLE001 - a failed request, not a failed device
            # a bug, not an I/O error: the guest sees EIO, stderr says why
            log.exception("virtio-blk request failed")
            status = VIRTIO_BLK_S_IOERR
        try:
            r.write(off, bytes([status]))
        except GuestMemoryError:
            return 0
        return in_len

    def start(self, chain: Chain, done: Completion | None = None) -> int | Prepared | None:
        """The request in ``chain`` done or started without a task, where
        the node allows it; else nothing done, and the caller runs
        :meth:`process`, which also words every error.

        * A read or write the node serves without waiting (BlockNode's
          read_into_now, a cached read; write_now, a write into the page
          cache): its status byte is written and the used length returned,
          as :meth:`process` returns it.
        * With ``done``, a write (not FUA) that the node hands to its I/O
          engine as it is, its guest buffers one pwritev's views
          (BlockNode.writev_submit), or a read the engine reads into them
          (BlockNode.readv_submit, O_DIRECT): :data:`STARTED` is returned, and
          ``done(chain.head, used length)`` is called once the status byte
          is written, from the engine's completion (or at once).
        * A :class:`Prepared` read or write, or None: nothing was done
          (anything written into the chain's data buffers is rewritten by
          the full request); the caller hands the Prepared to process().

        This spares an export a task per request for what the page cache or
        the engine serves; it raises nothing.
        """
        readable = chain.readable
        if not readable:
            return None
        r, off, n = readable[0]
        if n < _OUTHDR.size:
            return None  # a header split across buffers: process() gathers it
        try:
            rtype, _reserved, sector = r.unpack_from(_OUTHDR, off)
            kind = rtype & ~VIRTIO_BLK_T_BARRIER
            if kind == VIRTIO_BLK_T_IN:
                writable = chain.writable
                if len(readable) != 1 or not writable:
                    return None
                tried = False
                sc = chain.scattered
                if sc is not None and n == _OUTHDR.size and sc[0].host and self._takes_iovecs():
                    # pieces apart in guest memory: one preadv2 on an iovec
                    # array, no view per piece (memory.GuestIovec)
                    region, offsets, lens = sc
                    size = sum(lens) - _OUTHDR.size - 1
                    if lens[-1] == 1 and size > 0 and self._range_ok(sector, size):
                        iov = GuestIovec(region, offsets[1:-1], lens[1:-1], size)
                        if self._now.read_into_now(self._iov_reader, sector << SECTOR_BITS, iov):
                            sr, soff, _ = writable[-1]
                            sr.write(soff, b"\0")
                            self.read_bytes += size
                            return size + 1
                        tried = True  # not in the page cache: the engine's
                data_in: tuple[Segment, ...] | list[Segment]
                status_seg: tuple[Segment, ...] | list[Segment]
                if writable[-1][2] == 1:
                    # the status byte in a buffer of its own, as Linux sends it
                    data_in, status_seg = writable[:-1], writable[-1:]
                else:
                    data_in, status_seg = _take(writable, chain.writable_len - 1)
                # (the views go with the list: slices of the region's view)
                views, size = views_of(data_in)
                in_len = size + 1
                if size <= 0 or not self._range_ok(sector, size):
                    return None
                if tried or not self._read_now(sector << SECTOR_BITS, views):
                    if done is not None:
                        # into the guest's buffers by the engine, without a
                        # task (BlockNode.readv_submit: O_DIRECT)
                        read = _answer_later(status_seg[0], chain.head, in_len, done)
                        if self.backend.readv_submit(sector << SECTOR_BITS, size, views, read):
                            self.read_bytes += size
                            return STARTED
                    return Prepared(False, sector << SECTOR_BITS, views, size, status_seg[0],
                                    in_len)
                self.read_bytes += size
            elif kind == VIRTIO_BLK_T_OUT:
                if not self.writable or self.writethrough:
                    return None
                segs: tuple[Segment, ...] | list[Segment]
                if n > _OUTHDR.size:
                    segs = [(r, off + _OUTHDR.size, n - _OUTHDR.size), *readable[1:]]
                elif len(readable) > 1:
                    segs = readable[1:]
                else:
                    return None
                status_seg = chain.writable
                if len(status_seg) != 1 or status_seg[0][2] != 1:
                    return None
                in_len = 1
                sc = chain.scattered
                if (sc is not None and n == _OUTHDR.size and done is not None and sc[0].host
                        and self._takes_iovecs()):
                    # pieces apart in guest memory: one pwritev2 on an iovec
                    # array, no view per piece (memory.GuestIovec), where the
                    # file node runs it at once; else views, as below
                    region, offsets, lens = sc
                    k = len(readable)
                    size = sum(lens) - _OUTHDR.size - 1
                    if k > 1 and self._range_ok(sector, size):
                        iov = GuestIovec(region, offsets[1:k], lens[1:k], size)
                        finished = _answer_later(status_seg[0], chain.head, 1, done)
                        # (BlockNode.writev_submit's own step, which takes
                        # the length given: writev_submit sums the views)
                        node: Any = self.backend
                        if node._write_submit(sector << SECTOR_BITS, size, iov, finished):
                            self.written_bytes += size
                            return STARTED
                views, size = views_of(segs)
                if not self._range_ok(sector, size):
                    return None
                backend = self.backend
                if len(views) > 1 or not backend.write_now(sector << SECTOR_BITS, views[0]):
                    if done is None:
                        return Prepared(True, sector << SECTOR_BITS, views, size,
                                        status_seg[0], 1)
                    finished = _answer_later(status_seg[0], chain.head, 1, done)
                    # one buffer (a guest's in huge pages) goes where several
                    # go (ThreadPool.submit_writev, file._pwritev_iov_here):
                    # on trio's thread when it cannot block, not to a
                    # worker and back (caller_waits; see the commit that
                    # made it so for what it measured)
                    caller_waits(True)
                    try:
                        started = backend.writev_submit(sector << SECTOR_BITS, views, finished)
                    finally:
                        caller_waits(False)
                    if not started:
                        return Prepared(True, sector << SECTOR_BITS, views, size,
                                        status_seg[0], 1)
                    self.written_bytes += size
                    return STARTED
                self.written_bytes += size
            else:
                return None
            sr, soff, _ = status_seg[0]
            sr.write(soff, b"\0")
        except Exception:  # noqa: BLE001 - process() does it again and words the error
            return None
        return in_len

    async def _execute(self, chain: Chain, data_in: list[Segment]) -> int:
        if chain.readable_len < _OUTHDR.size:
            # QEMU leaves such a request unanswered; it is failed here
            return VIRTIO_BLK_S_IOERR
        hdr, data_out = _take(chain.readable, _OUTHDR.size)
        rtype, _reserved, sector = _OUTHDR.unpack(_gather(hdr))
        kind = rtype & ~VIRTIO_BLK_T_BARRIER
        backend = self.backend
        if kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            is_write = bool(rtype & VIRTIO_BLK_T_OUT)
            if is_write and not self.writable:
                return VIRTIO_BLK_S_IOERR
            # the node reads into, and writes from, the guest's buffers as
            # they are (QEMU's preadv/pwritev on the request's iovecs)
            # (no release(): the views are slices of the region's one view,
            # and go, with the mapping if it was closed meanwhile, with the
            # last reference; the engine holds them until its completion)
            views, size = views_of(data_out if is_write else data_in)
            if not self._range_ok(sector, size):
                return VIRTIO_BLK_S_IOERR
            await self._rw(is_write, sector << SECTOR_BITS, views, size, tried_now=False)
            return VIRTIO_BLK_S_OK
        if kind == VIRTIO_BLK_T_FLUSH:
            await backend.flush()
            return VIRTIO_BLK_S_OK
        if kind == VIRTIO_BLK_T_GET_ID:
            size = min(len(self.serial) + 1, sum(n for _, _, n in data_in), VIRTIO_BLK_ID_BYTES)
            _scatter(data_in, (self.serial + b"\0")[:size])
            return VIRTIO_BLK_S_OK
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if not self.writable:
                return VIRTIO_BLK_S_IOERR
            return await self._discard_write_zeroes(kind, data_out)
        return VIRTIO_BLK_S_UNSUPP

    def _takes_iovecs(self) -> bool:
        """Whether the node whose driver serves this export's reads and
        writes (BlockNode: a pass-through raw node's file) is a FileNode,
        the one driver that takes a GuestIovec, and reads through the page
        cache."""
        backend: Any = self.backend
        node = getattr(backend, "_through", None) or backend
        return type(node) is FileNode and TAKES_IOVECS and not node.cache_direct

    def _read_now(self, offset: int, views: list[memoryview]) -> bool:
        """The node's synchronous fast path (BlockNode.read_into_now: a
        read the driver serves without waiting, no task or thread), unless
        recent reads say it will not serve this one either (an image opened
        with O_DIRECT never can; see exports/read_now.py).  False: read_into()."""
        return self._now.read_into_now(self.backend, offset, views)

    async def _rw(self, is_write: bool, offset: int, views: list[memoryview], size: int, *,
                  tried_now: bool) -> None:
        """A checked read into, or write from, the request's views of guest
        memory; through the node's synchronous fast path first unless
        ``tried_now`` (start() asked it already)."""
        backend = self.backend
        if is_write:
            self.written_bytes += size
            if len(views) != 1:
                await backend.writev(offset, views, fua=self.writethrough)
            elif tried_now or self.writethrough or not backend.write_now(offset, views[0]):
                # (write_now: not FUA, into allocated space)
                await backend.write(offset, views[0], fua=self.writethrough)
        else:
            self.read_bytes += size
            if tried_now or not (size and self._read_now(offset, views)):
                await backend.read_into(offset, views)

    async def _discard_write_zeroes(self, kind: int, data_out: list[Segment]) -> int:
        size = sum(n for _, _, n in data_out)
        # one segment only, as QEMU
        if size > _DWZ.size:
            return VIRTIO_BLK_S_UNSUPP
        if size != _DWZ.size:
            return VIRTIO_BLK_S_IOERR
        sector, num_sectors, flags = _DWZ.unpack(_gather(data_out))
        max_sectors = (MAX_WRITE_ZEROES_SECTORS if kind == VIRTIO_BLK_T_WRITE_ZEROES
                       else MAX_DISCARD_SECTORS)
        if num_sectors > max_sectors:
            return VIRTIO_BLK_S_IOERR
        nbytes = num_sectors << SECTOR_BITS
        if not self._range_ok(sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        offset = sector << SECTOR_BITS
        if kind == VIRTIO_BLK_T_WRITE_ZEROES:
            await self.backend.write_zeroes(
                offset, nbytes, may_unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            return VIRTIO_BLK_S_OK
        if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        await self.backend.discard(offset, nbytes)
        return VIRTIO_BLK_S_OK
