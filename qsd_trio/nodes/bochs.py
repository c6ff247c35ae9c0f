"""The ``bochs`` format (Bochs "growing" redolog images), read-only, as
QEMU 7.2's block/bochs.c.

Layout (little-endian): a 512-byte header (the magic "Bochs Virtual HD
Image", type "Redolog", subtype "Growing", version 2.0 or 1.0, the header
size, the catalog size, the bitmap size, the extent size and the disk size,
which version 1.0 keeps 4 bytes earlier), the catalog at ``header`` (one
32-bit entry per extent: the extent's place among the stored extents, or
0xffffffff when it is not allocated), then the stored extents from
``data_offset`` = header + 4 * catalog, each a sector bitmap (``bitmap``
bytes rounded up to sectors) followed by the extent's sectors.  A sector
reads from the file when its extent is allocated and its bit is set, and as
zeroes otherwise.

The arithmetic is QEMU's, with its integer widths: ``data_offset`` and the
block counts are 32-bit, the extent's offset 64-bit, so a corrupt header
gives the offsets QEMU computes; reads past the end of the file are
zeroes and reads beyond BDRV_MAX_LENGTH fail with EIO, as in QEMU.
"""

from __future__ import annotations

import struct
from typing import Any

from ..qapi.errors import GenericError
from .graph import register_driver
from .node import Buffer
from .read_only_format import MASK32, MASK64, SECTOR, ReadOnlyFormatNode

HEADER_MAGIC = b"Bochs Virtual HD Image\0"
REDOLOG_TYPE = b"Redolog\0"
GROWING_TYPE = b"Growing\0"
HEADER_VERSION = 0x00020000
HEADER_V1 = 0x00010000
UNALLOCATED = 0xFFFFFFFF
CATALOG_MAX = 0x100000  # what bximage needs for its largest image (~8 TB)
EXTENT_MAX = 0x800000


@register_driver
class BochsNode(ReadOnlyFormatNode):
    driver = "bochs"

    async def open(self, options: dict[str, Any]) -> None:
        """bochs_open's checks, in its order, with its messages."""
        await self.open_file_read_only(options)
        h = bytes(await self.pread(0, SECTOR))
        # strcmp on the char arrays: each string up to its NUL
        version, header, catalog, bitmap, extent = struct.unpack_from("<5I", h, 64)
        if (not h.startswith(HEADER_MAGIC) or h[32:40] != REDOLOG_TYPE
                or h[48:56] != GROWING_TYPE or version not in (HEADER_VERSION, HEADER_V1)):
            raise GenericError("Image not in Bochs format")
        disk = struct.unpack_from("<Q", h, 84 if version == HEADER_V1 else 88)[0]
        total_sectors = disk // SECTOR
        if catalog > CATALOG_MAX:
            raise GenericError("Catalog size is too large")
        self.catalog = await self.load_table(header, catalog, "<I")
        self.data_offset: int = (header + catalog * 4) & MASK32
        self.bitmap_blocks: int = (1 + ((bitmap - 1) & MASK32) // SECTOR) & MASK32
        self.extent_blocks: int = (1 + ((extent - 1) & MASK32) // SECTOR) & MASK32
        self.extent_size: int = extent
        if extent < SECTOR:
            # bximage never makes extents smaller than 4k
            raise GenericError("Extent size must be at least 512")
        if extent & (extent - 1):
            raise GenericError(f"Extent size {extent} is not a power of two")
        if extent > EXTENT_MAX:
            raise GenericError(f"Extent size {extent} is too large")
        if catalog < -(-total_sectors // (extent // SECTOR)):
            raise GenericError("Catalog size is too small for this disk size")
        self.set_total_sectors(total_sectors)

    def _extent_base(self, index: int) -> int | None:
        """The file offset of extent ``index``'s bitmap, None when the
        catalog says it is not allocated (seek_to_sector)."""
        entry: int = self.catalog[index]
        if entry == UNALLOCATED:
            return None
        stride = (self.extent_blocks + self.bitmap_blocks) & MASK32
        return (self.data_offset + SECTOR * entry * stride) & MASK64

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        first, count, skip = self.sector_range(offset, length)
        out = bytearray(count * SECTOR)
        per = self.extent_size // SECTOR
        sector = first
        end = first + count
        while sector < end:
            index, in_extent = divmod(sector, per)
            n = min(end - sector, per - in_extent)
            base = self._extent_base(index)
            if base is not None:
                await self._read_extent(out, (sector - first) * SECTOR, base, in_extent, n)
            sector += n
        return memoryview(out)[skip:skip + length]

    async def _read_extent(self, out: bytearray, pos: int, base: int, in_extent: int,
                           n: int) -> None:
        """Sectors ``in_extent``.. ``+n`` of the extent whose bitmap is at
        ``base``: those whose bit is set, read in runs; the others stay
        zeroes.  The bitmap bytes are read as QEMU reads them, one pread
        per sector in QEMU, one for the run here (the same bytes)."""
        b0 = in_extent // 8
        bits = bytes(await self.pread((base + b0) & MASK64, (in_extent + n - 1) // 8 - b0 + 1))
        data0 = (base + SECTOR * (self.bitmap_blocks + in_extent)) & MASK64
        i = 0
        while i < n:
            s = in_extent + i
            if not (bits[s // 8 - b0] >> (s % 8)) & 1:
                i += 1
                continue
            j = i
            while j < n and (bits[(in_extent + j) // 8 - b0] >> ((in_extent + j) % 8)) & 1:
                j += 1
            host = (data0 + i * SECTOR) & MASK64
            if host == 0:
                i += 1  # seek_to_sector's 0 means "not allocated": zeroes
                continue
            out[pos + i * SECTOR:pos + j * SECTOR] = await self.pread(host, (j - i) * SECTOR)
            i = j
