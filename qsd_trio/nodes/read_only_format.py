"""What QEMU 7.2's read-only image formats (bochs, cloop, dmg) share.

Each of block/bochs.c, block/cloop.c and block/dmg.c opens the same way:
``bdrv_apply_auto_read_only(bs, NULL, errp)`` before anything else (a node
opened read-write fails with "Image is read-only" unless
``auto-read-only`` lets it fall back to read-only, which its file child then
inherits), then the file child.  They read their metadata with
``bdrv_pread``, which QEMU's generic layer pads with zeroes past the end of
the file and refuses (``-EIO``) beyond ``BDRV_MAX_LENGTH``; their requests
are whole sectors (``request_alignment`` 512, which the NBD export
advertises as its minimum block size); they have no ``bdrv_get_info`` and
no ``bdrv_co_block_status``, so a query shows no cluster size or dirty flag
and block status is ``DATA|ALLOCATED`` for the whole range asked.
"""

from __future__ import annotations

from typing import Any

from ..qapi.errors import GenericError
from .graph import BDRV_MAX_LENGTH
from .table_format import SECTOR, TableFormatNode, eio

__all__ = ["MASK32", "MASK64", "SECTOR", "ReadOnlyFormatNode", "eio"]

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1


class ReadOnlyFormatNode(TableFormatNode):
    """A format node over a ``file`` child that QEMU only reads.

    Resources: the file child, released by the graph when the node closes;
    the subclasses hold no descriptors or tasks of their own.
    """

    has_info = False  # no bdrv_get_info: no cluster-size, no dirty-flag

    async def open_file_read_only(self, options: dict[str, Any]) -> None:
        """bdrv_apply_auto_read_only, then bdrv_open_file_child."""
        if not self.read_only:
            if not self.auto_read_only:
                raise GenericError("Image is read-only")
            self.read_only = True
            # the file child inherits the flags as they are now (no BDRV_O_RDWR)
            options = {**options, "read-only": True}
        await self.open_file(options)
        self.request_alignment = SECTOR

    def _host(self, offset: int, length: int) -> int | None:
        return None  # no plain mapping: bitmaps, compressed blocks or chunks

    def set_total_sectors(self, total_sectors: int) -> None:
        """refresh_total_sectors after the driver's open: a size beyond
        BDRV_MAX_LENGTH is -EFBIG (the product computed in int64_t)."""
        size = (total_sectors * SECTOR) & MASK64
        if size >= 1 << 63:
            size -= 1 << 64
        if size > BDRV_MAX_LENGTH:
            raise GenericError("Could not refresh total sector count: File too large")
        self.total_sectors = total_sectors

    def _length(self) -> int:
        return self.total_sectors * SECTOR

    @staticmethod
    def sector_range(offset: int, length: int) -> tuple[int, int, int]:
        """The whole sectors covering a request, as QEMU's generic layer
        aligns it: (first sector, sector count, offset into the first)."""
        first = offset // SECTOR
        end = -(-(offset + length) // SECTOR)
        return first, end - first, offset - first * SECTOR
