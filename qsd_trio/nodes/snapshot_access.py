"""The ``snapshot-access`` driver (QEMU's block/snapshot-access.c).

Its ``file`` child provides the snapshot API (today: a copy-before-write
filter); reads, block status and discards here become that child's snapshot
reads, snapshot block status and snapshot discards.  So an NBD export of a
snapshot-access node over a copy-before-write filter whose target is a
temporary overlay serves the disk as it was when the filter was opened while
the guest keeps writing through the filter (fleecing).  Writes fail with
ENOTSUP.  The node takes no permission on its child: it reads the snapshot,
not the child's current data.
"""

from __future__ import annotations

import errno
from typing import Any

from .graph import register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, Perm


def _not_supported() -> OSError:
    return OSError(errno.ENOTSUP, "Operation not supported")


@register_driver
class SnapshotAccessNode(BlockNode):
    driver = "snapshot-access"
    has_info = False

    async def open(self, options: dict[str, Any]) -> None:
        self.file = await self.open_child(options, "file")
        self.request_alignment = self.file.node.request_alignment

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return Perm(0), Perm.ALL

    @property
    def filename(self) -> str:
        # snapshot_access_refresh_filename: the file child's filename
        return self.file.node.filename

    def _length(self) -> int:
        return self.file.node.length

    def _snapshot_api(self) -> BlockNode:
        node = self.file.node
        if not node.supports_snapshot_access:
            raise _not_supported()
        return node

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        return await self._snapshot_api().preadv_snapshot(offset, length)

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._snapshot_api().snapshot_block_status(offset, length)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self._snapshot_api().pdiscard_snapshot(offset, length)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        raise _not_supported()

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        raise _not_supported()

    async def _co_flush(self) -> None:
        return None

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        raise _not_supported()
