"""What QEMU's table-mapped image formats share.

vdi, vpc, parallels, qcow and qed (and the read-only bochs, cloop and dmg,
through read_only_format) keep the guest disk in clusters of their file and
find them through tables read at open: a block map, a BAT, L1 and L2
tables.  They differ in the tables' geometry (one level or two, the entry's
size and byte order, what an entry means) and in how they allocate; what
they share is here.

A driver subclasses :class:`TableFormatNode`, opens its file with
:meth:`~TableFormatNode.open_file`, holds its tables as :class:`Table`
objects (loaded by :meth:`~TableFormatNode.load_table`; second-level ones
in a :class:`TableCache`) and declares how a guest offset maps to its file:

- :meth:`~TableFormatNode._extent` when its tables are all in memory: the
  host offset of a guest offset (or :data:`ZEROES`, :data:`BACKING`) and
  how many bytes from there map alike;
- else :meth:`~TableFormatNode._map`, the same awaiting what it must load,
  and :meth:`~TableFormatNode._host`, the same from what is in memory now.

From that mapping the base reads (``_co_preadv``) and serves the
synchronous fast path and the requests without a task (``read_now``,
``write_now``, ``read_submit``, ``write_submit``: a run the mapping puts
in one place in the file goes to the file as it is).  Writes that allocate
are every format's own ``_co_pwritev``.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .backing import read_backing
from .graph import BDRV_MAX_LENGTH
from .node import BdrvChild, BlockNode, Buffer, ReadDone, Status, WriteDone

SECTOR = 512
# bdrv_check_request32: a request larger than this fails with EIO
BDRV_REQUEST_MAX_BYTES = (2**31 - 1) // SECTOR * SECTOR
# what a mapping gives instead of a host offset
ZEROES = -1   # the guest bytes read as zeroes
BACKING = -2  # they are the backing file's (zeroes without one)


def eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def check_request(offset: int, length: int) -> None:
    """bdrv_check_request32 on a request a driver makes of its file:
    ``offset`` as QEMU's int64_t (a value the image gives as 64 bits
    unsigned is negative from 2**63 on), EIO beyond BDRV_MAX_LENGTH or for
    more than BDRV_REQUEST_MAX_BYTES at once."""
    if offset >= 1 << 63:
        offset -= 1 << 64
    if (offset < 0 or length > BDRV_REQUEST_MAX_BYTES or offset > BDRV_MAX_LENGTH
            or length > BDRV_MAX_LENGTH - offset):
        raise eio()


def pieces(offset: int, length: int, unit: int) -> Iterator[tuple[int, int, int]]:
    """A request cut where multiples of ``unit`` (a cluster, a block) fall:
    ``(done, pos, n)``, ``n`` bytes at guest offset ``pos``, ``done`` bytes
    into the request."""
    done = 0
    while done < length:
        pos = offset + done
        n = min(length - done, unit - pos % unit)
        yield done, pos, n
        done += n


_NATIVE = sys.byteorder == "little"
if TYPE_CHECKING:
    _IntArray = array[int]
else:
    _IntArray = array


def pack_entries(fmt: str, values: array[int]) -> bytes:
    """``values``, an array of the typecode of struct format ``fmt``
    (``"<I"``, ``">Q"``...), as the file holds them."""
    if (fmt[0] == "<") != _NATIVE:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


class Table(_IntArray):
    """A table of entries of one struct format (``"<I"``, ``">I"``, ``"<Q"``,
    ``">Q"``) as the file holds it, in host order: an ``array`` indexed,
    changed and iterated at C speed on the request paths.

    A table the file holds only in part is a :class:`PartialTable`."""

    __slots__ = ("fmt",)
    fmt: str

    @staticmethod
    def of(fmt: str, count: int, raw: Buffer = b"") -> Table:
        """The ``count`` entries of format ``fmt`` that ``raw`` holds (a
        last entry it cuts padded with zeroes, as QEMU's pread pads it); a
        :class:`PartialTable` when it holds fewer."""
        size = struct.calcsize(fmt)
        if len(raw) % size:
            raw = bytes(raw) + bytes(-len(raw) % size)
        t = (Table if len(raw) >= count * size else PartialTable)(fmt[1])
        assert t.itemsize == size
        t.frombytes(raw)
        del t[count:]
        if (fmt[0] == "<") != _NATIVE:
            t.byteswap()
        t.fmt = fmt
        if isinstance(t, PartialTable):
            t.total = count
            t.extra = {}
        return t

    @staticmethod
    def zeroed(fmt: str, count: int) -> Table:
        """A new table, every entry 0."""
        return Table.of(fmt, count, bytes(count * struct.calcsize(fmt)))

    def to_bytes(self, first: int, count: int) -> bytes:
        """Entries ``first``..``first+count`` as the file holds them (those
        past the table, in the sector that ends it, as zeroes)."""
        part = array(self.typecode, self[first:first + count])
        if len(part) < count:
            extra = self.extra if isinstance(self, PartialTable) else {}
            part.extend(extra.get(i, 0) for i in range(first + len(part), first + count))
        return pack_entries(self.fmt, part)


class PartialTable(Table):
    """A table of :attr:`total` entries of which the file held only the
    first ``len(table)`` at open: the entries past them read as 0 (QEMU's
    bdrv_pread pads them with zeroes) and those set since are kept in
    :attr:`extra`, so that a corrupt header's huge table costs no memory.
    ``len()`` and iteration cover the entries the file held."""

    __slots__ = ("total", "extra")
    total: int
    extra: dict[int, int]

    def __getitem__(self, i: Any) -> Any:
        try:
            return _IntArray.__getitem__(self, i)
        except IndexError:
            return self.extra.get(i, 0)

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, int) and i >= _IntArray.__len__(self):
            self.extra[i] = value
        else:
            _IntArray.__setitem__(self, i, value)


class TableCache(OrderedDict[int, Table]):
    """Second-level tables by their offset in the file, at most ``size``, the
    least recently used dropped first (QEMU's L2 caches).  ``get`` leaves
    the order as it is (the fast path's look)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def lookup(self, offset: int) -> Table | None:
        """The table at ``offset`` if cached, now the most recently used."""
        t = self.get(offset)
        if t is not None:
            self.move_to_end(offset)
        return t

    def put(self, offset: int, table: Table) -> None:
        self[offset] = table
        self.move_to_end(offset)
        while len(self) > self.size:
            self.popitem(last=False)


class TableFormatNode(BlockNode):
    """A format node over a ``file`` child (and, for the formats that name
    one, a ``backing`` child) whose guest clusters its tables map to the file.

    Resources: the children, released by the graph when the node closes; the
    base holds no descriptors or tasks.  Errors: reads of the file raise
    OSError (EIO where QEMU's generic layer refuses the request)."""

    file_edge: BdrvChild
    file: BlockNode
    backing_edge: BdrvChild | None = None
    backing: BlockNode | None = None
    # whether a write into mapped clusters may go to the file as it is
    # (vpc's dynamic images first mark a block's sectors in its bitmap)
    writes_in_place = True

    # -- children -------------------------------------------------------------------
    def child_attached(self, edge: BdrvChild) -> None:
        # the request paths use the nodes themselves, kept here as the graph
        # links or moves the edges (replace_node)
        if edge.name == "file":
            self.file_edge, self.file = edge, edge.node
        elif edge.name == "backing":
            self.backing_edge, self.backing = edge, edge.node

    def child_detached(self, edge: BdrvChild) -> None:
        if edge.name == "backing":
            self.backing_edge, self.backing = None, None

    async def open_file(self, options: dict[str, Any]) -> None:
        """bdrv_open_file_child: the ``file`` child, as :attr:`file`."""
        await self.open_child(options, "file")

    # -- reading the file -------------------------------------------------------------
    async def pread(self, offset: int, length: int) -> Buffer:
        """bdrv_pread on the file: :func:`check_request`'s EIO, and past the
        end of the file zeroes (QEMU's generic layer pads such reads), so
        nothing is read past it."""
        check_request(offset, length)
        have = max(0, min(length, self.file.length - offset))
        data = await self.file.read(offset, have) if have else b""
        if have == length:
            return data
        return bytes(data) + bytes(length - have)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """bdrv_pwrite on the file, with :func:`check_request`'s EIO."""
        check_request(offset, len(data))
        await self.file.write(offset, data)

    async def pwrite_sync(self, offset: int, data: Buffer) -> None:
        """bdrv_pwrite_sync: :meth:`pwrite`, then a flush of the file."""
        await self.pwrite(offset, data)
        await self.file.flush()

    async def load_table(self, offset: int, count: int, fmt: str) -> Table:
        """The ``count`` entries of format ``fmt`` at ``offset``: the whole
        table is checked as QEMU reads it (EIO), then what the file holds of
        it is read."""
        size = struct.calcsize(fmt)
        check_request(offset, count * size)
        have = max(0, min(count * size, self.file.length - offset))
        raw = await self.pread(offset, -(-have // size) * size) if have else b""
        return Table.of(fmt, count, raw)

    async def cached_table(self, cache: TableCache, offset: int, count: int,
                           fmt: str) -> Table:
        """The table at ``offset`` from ``cache``, else loaded into it."""
        t = cache.lookup(offset)
        if t is None:
            t = await self.load_table(offset, count, fmt)
            cache.put(offset, t)
        return t

    # -- the mapping the driver declares ----------------------------------------------
    def _extent(self, pos: int, length: int) -> tuple[int, int]:
        """``(host, n)``: where the guest bytes at ``pos`` are in the file
        (a host offset, or :data:`ZEROES`, or :data:`BACKING`), and how many
        of the ``length`` from there map alike (on the host one after the
        other, or all zeroes, or all the backing file's); ``n`` >= 1.  For a
        driver whose tables are all in memory."""
        raise NotImplementedError

    async def _map(self, pos: int, length: int) -> tuple[int, int]:
        """:meth:`_extent`, for a driver that may have to load a table first."""
        return self._extent(pos, length)

    def _host(self, offset: int, length: int) -> int | None:
        """The host offset of the ``length`` bytes at ``offset`` when they are
        one run in the file that can be read or written in place now;
        :data:`ZEROES` when they read as zeroes (a write needs an allocation
        there); None when the request needs the coroutine path (a table not
        in memory, the backing file, data past the end of the file)."""
        host, n = self._extent(offset, length)
        if n < length:
            return None
        if host < 0:
            return ZEROES if host == ZEROES else None
        return host if host + length <= self.file.length else None

    # -- reads --------------------------------------------------------------------------
    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        host, n = await self._map(offset, length)
        if n >= length and host >= 0:
            return await self.pread(host, length)  # one run: the file's buffer as it is
        out = bytearray(length)
        done = 0
        while True:
            if host >= 0:
                out[done:done + n] = await self.pread(host, n)
            elif host == BACKING:
                await read_backing(self.backing, offset + done, n, out, done)
            done += n
            if done >= length:
                return out
            host, n = await self._map(offset + done, length - done)

    async def recurse_status(self, host: int, n: int) -> tuple[Status, int]:
        """BDRV_BLOCK_RECURSE for ``n`` data bytes at ``host``: the file says
        whether they read as zeroes (a hole of a preallocated image; past
        the end of the file they do), and for how many of them."""
        end = self.file.length
        if host >= end:
            return Status.ZERO, n
        st = await self.file.block_status(host, min(n, end - host))
        return st.flags & Status.ZERO, min(n, st.length)

    # -- the fast path and requests without a task (node.py) ---------------------------
    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        host = self._host(offset, length)
        if host is None:
            return None
        if host < 0:
            return bytearray(length)
        return self.file.read_now(host, length)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        if not self.writes_in_place:
            return False
        host = self._host(offset, len(mv))
        return host is not None and host >= 0 and self.file.write_now(host, mv)

    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        host = self._host(offset, length)
        return host is not None and host >= 0 and self.file.read_submit(host, length, done)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        if not self.writes_in_place:
            return False
        host = self._host(offset, len(mv))
        return host is not None and host >= 0 and self.file.write_submit(host, mv, done)
