"""Block exports: the common part of NBD, FUSE and vhost-user-blk exports.

An export is bound to a node and owns a nursery for its client tasks.  The
daemon starts ``export.run`` in its export nursery with ``nursery.start``;
``run`` calls ``task_status.started()`` once the export serves (mounted,
listed by the NBD server, ...) and serves until its cancel scope is
cancelled.  ``block-export-del`` and shutdown call :meth:`BlockExport.stop`.

Types register with :func:`register_export`; ``block-export-add`` (in
monitor/exports.py) looks up ``EXPORT_TYPES[args.type]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ..nodes.node import BdrvChild, BlockNode, BlockParent

if TYPE_CHECKING:
    from ..daemon import Daemon

EXPORT_TYPES: dict[str, type[BlockExport]] = {}


def register_export(cls: type[BlockExport]) -> type[BlockExport]:
    EXPORT_TYPES[cls.type] = cls
    return cls


class BlockExport(BlockParent):
    """One export.  ``args`` is the typed BlockExportOptions variant."""

    type: ClassVar[str] = ""
    # bytes of the read and write requests its clients sent (metrics); an
    # export type counts them itself or reads them from its handler
    read_bytes: int = 0
    written_bytes: int = 0

    def __init__(self, daemon: Daemon, args: Any, node: BlockNode) -> None:
        self.daemon = daemon
        self.args = args
        self.id: str = args.id
        self.node = node
        self.writable = bool(args.writable)
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        # set once the export is off the list and BLOCK_EXPORT_DELETED is out
        self.deleted = trio.Event()

    def child_attached(self, edge: BdrvChild) -> None:
        # the export's node follows its edge (a filter inserted above it, a pivot)
        self.node = edge.node

    def client_count(self) -> int:
        """Connected clients (block-export-del mode=safe refuses while > 0)."""
        return 0

    def connected_clients(self) -> int:
        """Clients connected now, for the metrics: client_count(), but for
        exports whose front-end holds no reference that block-export-del
        would wait for (vhost-user-blk, VDUSE)."""
        return self.client_count()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """End the export and its clients; returns once they are gone."""
        self.cancel_scope.cancel()
        await self.finished.wait()

    def info(self) -> dict[str, Any]:
        """query-block-exports entry."""
        return {
            "id": self.id,
            "type": self.type,
            "node-name": self.node.node_name,
            "shutting-down": self.cancel_scope.cancel_called,
        }
