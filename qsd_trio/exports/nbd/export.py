"""The NBD block export: a name on the NBD server and a nursery for its clients.

Created by block-export-add (type ``nbd``) or nbd-server-add once the
server runs.  Connections that chose this export run in its nursery, so
deleting it ends exactly its clients; :meth:`NbdExport.stop` first lets the
requests in flight finish, for a few seconds at most, as QEMU drains them.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import trio

from ...nodes.node import BdrvChild, BlockNode, Perm
from ...proto import nbd as P
from ...qapi.cstr import c_bytes
from ...qapi.errors import GenericError
from ..base import BlockExport, register_export

if TYPE_CHECKING:
    from ...daemon import Daemon
    from ...nodes.bitmaps import DirtyBitmap
    from .connection import Connection
    from .server import NbdServer

_MAX_DATA_EXTENTS = 4096
_DRAIN_DEADLINE = 5.0  # seconds in-flight requests get when an export stops


def _find_bitmap(node: BlockNode, spec: Any) -> DirtyBitmap:
    """The dirty bitmap named by a BlockDirtyBitmapOrStr (a name, or a
    BlockDirtyBitmap: node and name)."""
    if isinstance(spec, str):
        # a bare name is looked for down the chain of filters and backing
        # files, as QEMU does (bdrv_filter_or_cow_bs)
        name = spec
        holder: BlockNode | None = node
        while holder is not None:
            bm = holder.bitmaps.get(name)
            if bm is not None:
                return bm
            edge = holder.children.get("backing")
            if edge is None and holder.is_filter:
                edge = holder.children.get("file")
            holder = edge.node if edge is not None else None
        raise GenericError(f"Bitmap '{name}' is not found")
    name = spec.name
    bm = node.graph.lookup(spec.node).bitmaps.get(name)
    if bm is None:
        raise GenericError(f"Bitmap '{name}' is not found")
    return bm


@register_export
class NbdExport(BlockExport):
    """One NBD export: a name on the server and a nursery for its clients."""

    type = "nbd"

    def __init__(self, daemon: Daemon, args: Any, node: BlockNode):
        super().__init__(daemon, args, node)
        server: NbdServer | None = daemon.nbd_server
        if server is None:
            raise GenericError("NBD server not running")
        self.server = server
        self.name: str = args.name if args.name is not None else args.node_name
        self.description: str | None = args.description
        if len(c_bytes(self.name)) > P.MAX_STRING_SIZE:
            raise GenericError(f"export name '{self.name}' too long")
        if self.description is not None and len(c_bytes(self.description)) > P.MAX_STRING_SIZE:
            raise GenericError(f"description '{self.description}' too long")
        if self.name in server.exports:
            raise GenericError(f"NBD server already has export named '{self.name}'")
        if not node.inserted():  # blk_getlength's ENOMEDIUM
            raise GenericError("Failed to determine the NBD export's length: No medium found")
        # writethrough: every write is made stable before it is acknowledged
        self.writethrough = bool(args.writethrough)
        self.allocation_depth = bool(args.allocation_depth)
        self.bitmaps: list[DirtyBitmap] = []
        for spec in args.bitmaps or []:
            bm = _find_bitmap(node, spec)
            bm.check(allow_ro=True)
            if not self.writable and not node.read_only and bm.enabled:
                raise GenericError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
            self.bitmaps.append(bm)
        self.clients: set[Connection] = set()
        self.stopping = False
        self._clients_changed = trio.Event()
        self._data_starts: list[int] = []
        self._data_ends: list[int] = []
        self.nursery: trio.Nursery | None = None
        self.edge: BdrvChild | None = None

    # transmission flags this export announces (QEMU 7.2 sets multi-conn and
    # cache always: every connection goes through the same node, so a flush
    # on one covers writes acknowledged on another)
    @property
    def flags(self) -> int:
        f = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_DF
             | P.FLAG_CAN_MULTI_CONN | P.FLAG_SEND_CACHE)
        if self.writable:
            f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        else:
            f |= P.FLAG_READ_ONLY
        return f

    @property
    def size(self) -> int:
        return self.node.length

    @property
    def block_alignment(self) -> int:
        """The minimum block size NBD_INFO_BLOCK_SIZE announces: the node's."""
        return max(self.node.request_alignment, 1)

    def meta_contexts(self) -> list[str]:
        ctx = [P.META_BASE_ALLOCATION]
        if self.allocation_depth:
            ctx.append(P.META_ALLOCATION_DEPTH)
        ctx += [P.META_DIRTY_BITMAP + (bm.name or "") for bm in self.bitmaps]  # all named
        return ctx

    # Ranges known to hold data, so a sparse READ can skip asking the block
    # layer.  Being wrong in the "data" direction is harmless (zeroes are sent
    # as data instead of as a hole), so other writers need not invalidate it;
    # our own TRIM/WRITE_ZEROES do, to keep replies as sparse as QEMU's.
    def known_data(self, offset: int, length: int) -> bool:
        i = bisect.bisect_right(self._data_starts, offset) - 1
        return i >= 0 and self._data_ends[i] >= offset + length

    def note_data(self, offset: int, length: int) -> None:
        starts, ends = self._data_starts, self._data_ends
        end = offset + length
        lo = bisect.bisect_left(ends, offset)      # first extent ending at/after offset
        hi = bisect.bisect_right(starts, end)      # extents starting at/before end
        if lo < hi:  # overlapping or touching extents merge into one
            offset = min(offset, starts[lo])
            end = max(end, ends[hi - 1])
        if len(starts) > _MAX_DATA_EXTENTS:
            starts.clear()
            ends.clear()
            lo = hi = 0
        starts[lo:hi] = [offset]
        ends[lo:hi] = [end]

    def forget_data(self, offset: int, length: int) -> None:
        i = bisect.bisect_right(self._data_starts, offset + length) - 1
        if i >= 0 and self._data_ends[i] > offset:
            self._data_starts.clear()
            self._data_ends.clear()

    def bitmap_for_context(self, ctx: str) -> DirtyBitmap:
        name = ctx[len(P.META_DIRTY_BITMAP):]
        return next(bm for bm in self.bitmaps if bm.name == name)

    def client_count(self) -> int:
        # clients that have said goodbye are only finishing their replies
        return sum(not c.ending for c in self.clients)

    async def stop(self) -> None:
        """Stop taking requests, let those in flight finish (a few seconds at
        most, as QEMU drains them), then end the clients and the export."""
        if not self.stopping:
            self.stopping = True
            for conn in list(self.clients):
                conn.stop_reading()
            with trio.move_on_after(_DRAIN_DEADLINE):
                while self.clients:
                    self._clients_changed = trio.Event()
                    await self._clients_changed.wait()
        self.cancel_scope.cancel()
        await self.finished.wait()

    def client_left(self, conn: Connection) -> None:
        self.clients.discard(conn)
        self._clients_changed.set()

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["shutting-down"] = d["shutting-down"] or self.stopping
        return d

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else 0)
        # QEMU's NBD export does not let anyone resize the node under its
        # clients (they were told the size at negotiation)
        self.edge = edge = self.node.attach("root", self, Perm(perm),
                                            Perm.ALL & ~Perm.RESIZE)
        # exported bitmaps are busy: no job or QMP command may change them
        for bm in self.bitmaps:
            bm.busy = True
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.server.exports[self.name] = self
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            if self.server.exports.get(self.name) is self:
                del self.server.exports[self.name]
            for bm in self.bitmaps:
                bm.busy = False
            edge.detach()
            self.finished.set()
