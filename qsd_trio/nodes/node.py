"""Block nodes: the one I/O layer every export, job and format driver calls.

A driver subclasses :class:`BlockNode` and implements the small ``_co_*``
hooks (nbdkit style).  The public methods here (``read``, ``write``,
``write_zeroes``, ``discard``, ``flush``, ``block_status``, ``truncate``) do
what is common, once: bounds and permission checks, request tracking for
drain, dirty bitmaps, fallbacks (zero-write falls back to write), statistics.

Offsets and lengths are bytes.  Data passed to ``write`` is any buffer
(bytes, bytearray, memoryview); ``read`` returns a buffer the caller may keep.

Errors: I/O failures are raised as ``OSError`` with an errno (exports turn it
into the protocol's error code); misuse that a QMP client can cause is a
``QapiError``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

import attrs
import trio

from ..qapi.errors import GenericError

if TYPE_CHECKING:
    from .graph import BlockGraph


class Perm(enum.IntFlag):
    """QEMU's BlockPermission (block-core.json: consistent-read, write, ...)."""

    CONSISTENT_READ = 1
    WRITE = 2
    WRITE_UNCHANGED = 4
    RESIZE = 8
    ALL = 15


class Status(enum.IntFlag):
    """Block status of a range (QEMU's BDRV_BLOCK_*)."""

    DATA = 1          # reads come from stored data
    ZERO = 2          # reads return zeroes
    ALLOCATED = 4     # allocated in this layer (not from a backing file)
    OFFSET_VALID = 8  # ``offset`` is the host offset in ``file``


@attrs.frozen
class BlockStatus:
    """Status of ``length`` bytes at the start of the queried range."""

    flags: Status
    length: int
    # how many layers down the data is (1 = this node); 0 = unallocated anywhere
    depth: int = 1
    offset: int | None = None  # host offset when OFFSET_VALID


@attrs.define(eq=False)
class BdrvChild:
    """An edge: ``parent`` uses ``node`` in role ``role`` with permissions.

    ``parent`` is a BlockNode or any object naming a user (export, job) that
    has a ``name`` attribute for error messages.
    """

    name: str
    node: BlockNode
    parent: object
    perm: Perm
    shared: Perm

    def detach(self) -> None:
        self.node.parents.remove(self)


class BlockNode:
    """A node in the block graph.  Subclasses set ``driver`` and the hooks."""

    driver: ClassVar[str] = ""

    def __init__(self, graph: BlockGraph, node_name: str, *, read_only: bool = False):
        self.graph = graph
        self.node_name = node_name
        self.read_only = read_only
        self.children: dict[str, BdrvChild] = {}  # role -> edge
        self.parents: list[BdrvChild] = []
        self.options: dict = {}  # the validated options it was opened with
        self._in_flight = 0
        self._drained = trio.Event()
        self._drained.set()
        # allocation granularity for callers that care (mirror, NBD min block)
        self.request_alignment = 1

    # -- what drivers implement ------------------------------------------
    async def open(self, options: dict) -> None:
        """Open with validated options (QAPI names, hyphenated keys)."""

    def _length(self) -> int:
        raise NotImplementedError

    async def _co_preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        raise OSError(95, "Operation not supported")

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        # fallback: write explicit zeroes (the I/O layer chunks this)
        await self._co_pwritev(offset, memoryview(bytes(length)), fua)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        return None  # discard is advisory

    async def _co_flush(self) -> None:
        for child in self.children.values():
            await child.node.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.DATA | Status.ALLOCATED, length)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        raise GenericError("Cannot resize this image")

    async def _close(self) -> None:
        return None

    # -- the public I/O layer ----------------------------------------------
    @property
    def length(self) -> int:
        return self._length()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._length():
            raise OSError(5, "Input/output error")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(1, "Operation not permitted")

    def _begin(self) -> None:
        if self._in_flight == 0:
            self._drained = trio.Event()
        self._in_flight += 1

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._drained.set()

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check(offset, length)
        self._begin()
        try:
            return await self._co_preadv(offset, length)
        finally:
            self._end()

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        mv = memoryview(data).cast("B")
        self._check_writable()
        self._check(offset, len(mv))
        self._begin()
        try:
            await self._co_pwritev(offset, mv, fua)
        finally:
            self._end()

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                           fua: bool = False) -> None:
        self._check_writable()
        self._check(offset, length)
        self._begin()
        try:
            await self._co_pwrite_zeroes(offset, length, may_unmap, fua)
        finally:
            self._end()

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check(offset, length)
        self._begin()
        try:
            await self._co_pdiscard(offset, length)
        finally:
            self._end()

    async def flush(self) -> None:
        self._begin()
        try:
            await self._co_flush()
        finally:
            self._end()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check(offset, length)
        return await self._co_block_status(offset, length)

    async def truncate(self, size: int, *, exact: bool = True, prealloc: str = "off") -> None:
        self._check_writable()
        await self._co_truncate(size, exact, prealloc)

    async def drain(self) -> None:
        """Wait until no request is in flight on this node."""
        await self._drained.wait()

    async def close(self) -> None:
        """Drain, flush (if writable), close; children are closed by the graph."""
        await self.drain()
        if not self.read_only:
            await self.flush()
        await self._close()

    # -- graph edges -----------------------------------------------------------
    def attach(self, name: str, parent: object, perm: Perm, shared: Perm = Perm.ALL) -> BdrvChild:
        """Add ``parent`` as a user of this node.  Callers detach() when done."""
        if perm & (Perm.WRITE | Perm.RESIZE) and self.read_only:
            raise GenericError(f"Block node is read-only")
        edge = BdrvChild(name, self, parent, perm, shared)
        self.parents.append(edge)
        return edge
