"""The ``vpc`` format (Virtual PC / Hyper-V VHD), as QEMU's block/vpc.c.

Every image ends with a 512-byte big-endian *footer* (:data:`_FOOTER`):
"conectix", the disk type (2 fixed, 3 dynamic), the size twice and a CHS
geometry, and a checksum (the one's complement of the byte sum).

A *fixed* image is the raw data followed by the footer.  A *dynamic* image
starts with a copy of the footer, then the 1024-byte dynamic header
("cxsparse", at the footer's ``data_offset``), which gives the block size
(2 MiB from QEMU) and where the *BAT* is: one 32-bit sector number per
guest block, 0xffffffff when unallocated (read as zeroes).  An allocated
block is a sector bitmap (``bitmap_size``) followed by the block's data.

The disk size is the geometry's ``cyls * heads * secs`` sectors, unless
the footer's creator is one of those that use ``current_size`` (Hyper-V,
qemu-img with ``force-size``, disk2vhd, XenServer) or the geometry is the
maximum 65535/16/255 (vpc_open).

A write to an unallocated block allocates it at the end of the file, as
QEMU's alloc_block: the bitmap (all ones) is written where the footer was,
the footer is written again after the new block, then the BAT entry; each
of the three is flushed (bdrv_pwrite_sync).  A write to another allocated
block than the last one written first rewrites that block's bitmap with all
ones, as get_image_offset does, so images stay byte-identical with QEMU's.

Open refuses what QEMU refuses with its messages (bad cookie or checksum,
block size, table sizes, a BAT whose blocks lie past the end of the file),
so every mapped block lies inside the file and reads never go past it; only
the part of a BAT that the file holds is read.

``blockdev-create`` with ``driver=vpc`` is :func:`create_vpc`, with
:func:`rounded_size` for QEMU's CHS geometry rules.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from typing import Any

import trio

from ..qapi.errors import GenericError
from .graph import register_driver
from .node import BlockNode, BlockStatus, Status
from .packed import Packed
from .table_format import ZEROES, Table, TableFormatNode, check_request, pieces

SECTOR = 512
VHD_FIXED = 2
VHD_DYNAMIC = 3
VHD_TIMESTAMP_BASE = 946684800  # 2000-01-01 00:00:00 UTC
VHD_CHS_MAX_C, VHD_CHS_MAX_H, VHD_CHS_MAX_S = 65535, 16, 255
VHD_MAX_SECTORS = 0xFF000000  # 2040 GiB
VHD_MAX_GEOMETRY = VHD_CHS_MAX_C * VHD_CHS_MAX_H * VHD_CHS_MAX_S
UNALLOCATED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 0x200000
INT_MAX = (1 << 31) - 1
# creators whose images are sized by current_size, not by the geometry
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# VHDFooter: creator[8], features, version, data_offset (u64), timestamp,
# creator_app[4], major (u16), minor (u16), creator_os[4], orig_size (u64),
# current_size (u64), cyls (u16), heads (u8), secs_per_cyl (u8), type,
# checksum, uuid[16], in_saved_state (u8), reserved[427]
_FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB427s")
assert _FOOTER.size == SECTOR
_FIELDS = ("creator", "features", "version", "data_offset", "timestamp", "creator_app",
           "major", "minor", "creator_os", "orig_size", "current_size", "cyls", "heads",
           "secs_per_cyl", "type", "checksum", "uuid", "in_saved_state", "reserved")
_CHECKSUM_AT = 64  # offset of the footer's checksum field
# VHDDynDiskHeader up to its checksum: magic[8], data_offset, table_offset
# (u64), version, max_table_entries, block_size, checksum; 1024 bytes in all
_DYN = struct.Struct(">8sQQIIII")
DYN_HEADER_SIZE = 1024
_DYN_CHECKSUM_AT = 36


def vpc_checksum(buf: bytes | bytearray) -> int:
    """The one's complement of the byte sum (vpc_checksum); the checksum
    field must be zero in ``buf``."""
    return ~sum(buf) & 0xFFFFFFFF


def _read_error(offset: int, length: int) -> bool:
    """Whether QEMU's generic layer refuses a read there (bdrv_check_request)."""
    try:
        check_request(offset, length)
    except OSError:
        return True
    return False


class Footer(Packed):
    """The footer's fields by QEMU's names."""

    STRUCT = _FOOTER
    FIELDS = _FIELDS


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """The VHD specification's CHS for ``total_sectors`` (it may round the
    size down), with up to 255 sectors per track beyond 127 GB; QEMU's
    calculate_geometry, including its uint8_t heads and uint16_t cyls."""
    total_sectors = min(total_sectors, VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cth = total_sectors // secs
    else:
        secs = 17
        cth = total_sectors // secs
        heads = (-(-cth // 1024)) & 0xFF
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cth = total_sectors // secs
        if cth >= heads * 1024:
            secs, heads = 63, 16
            cth = total_sectors // secs
    return (cth // heads) & 0xFFFF, heads, secs


def rounded_size(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """calculate_rounded_image_size: the sectors the image will have and its
    geometry.  Without ``force-size`` the geometry is the first whose size
    reaches ``size``; a size only the maximum geometry holds uses ``size``
    itself, up to 2040 GiB."""
    if force_size:
        chs = (VHD_CHS_MAX_C, VHD_CHS_MAX_H, VHD_CHS_MAX_S)
    else:
        chs = (0, 0, 0)
        total = min(VHD_MAX_GEOMETRY, size // SECTOR)
        i = 0
        while total > chs[0] * chs[1] * chs[2]:
            chs = calculate_geometry(total + i)
            i += 1
    if chs[0] * chs[1] * chs[2] == VHD_MAX_GEOMETRY:
        total = size // SECTOR
        if total > VHD_MAX_SECTORS:
            raise GenericError("Disk size is too large, max size is 2040 GiB")
    else:
        total = chs[0] * chs[1] * chs[2]
    return total, chs


@register_driver
class VpcNode(TableFormatNode):
    driver = "vpc"

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
        # bdrv_getlength: the file's length in whole sectors, rounded up
        flen = -(-self.file.length // SECTOR) * SECTOR
        raw = bytes(await self.pread(0, SECTOR))
        disk_type = VHD_DYNAMIC
        if raw[:8] != b"conectix":
            # a fixed image has its footer only at the end of the file
            if flen < SECTOR:
                raise GenericError("File too small for a VHD header")
            raw = bytes(await self.pread(flen - SECTOR, SECTOR))
            if raw[:8] != b"conectix" or struct.unpack_from(">I", raw, 60)[0] != VHD_FIXED:
                raise GenericError("invalid VPC image")
            disk_type = VHD_FIXED
        footer = Footer(raw)
        zeroed = bytearray(raw)
        zeroed[_CHECKSUM_AT:_CHECKSUM_AT + 4] = bytes(4)
        if vpc_checksum(zeroed) != footer["checksum"]:
            raise GenericError("Incorrect header checksum")
        self.footer = footer
        self.footer_raw = raw
        # the I/O paths go by the footer's type, as QEMU's
        self.fixed = footer["type"] == VHD_FIXED
        # a dynamic image's write may rewrite its block's bitmap first
        self.writes_in_place = self.fixed

        total: int = footer["cyls"] * footer["heads"] * footer["secs_per_cyl"]
        use_chs = footer["creator_app"] not in CURRENT_SIZE_CREATORS
        if not use_chs or total == VHD_MAX_GEOMETRY:
            total = footer["current_size"] // SECTOR
        if total > VHD_MAX_SECTORS:
            # -EFBIG without a message of vpc's own: bdrv_open_common's
            raise GenericError(f"Could not open '{self.file.filename}': File too large")
        self.total_sectors = total

        self.block_size = 0
        self.bitmap_size = 0
        self.max_table_entries = 0
        self.bat_offset = 0
        self.pagetable = Table.zeroed(">I", 0)
        self.free_data_block_offset = 0
        self.last_bitmap_offset = -1
        if disk_type == VHD_DYNAMIC:
            await self._open_dynamic(footer, flen)
        # QEMU's s->lock around the block table, bitmaps and footer
        self._lock = trio.Lock()
        self.request_alignment = 1

    async def _open_dynamic(self, footer: Footer, flen: int) -> None:
        """vpc_open's dynamic part: the dynamic header and the BAT."""
        at = footer["data_offset"]
        if _read_error(at, DYN_HEADER_SIZE):
            raise GenericError("Error reading dynamic VHD header")
        dyn = bytes(await self.pread(at, DYN_HEADER_SIZE))
        magic, _, table_offset, _, mte_raw, block_size, _ = _DYN.unpack_from(dyn)
        if magic != b"cxsparse":
            raise GenericError("Invalid header magic")
        if block_size < SECTOR or block_size & (block_size - 1):
            raise GenericError(f"Invalid block size {block_size}")
        self.block_size = block_size
        self.bitmap_size = ((block_size // (8 * SECTOR)) + 511) & ~511
        # max_table_entries is an int in QEMU: the u32 is read signed
        mte = mte_raw - (1 << 32) if mte_raw >= 1 << 31 else mte_raw
        if self.total_sectors * SECTOR // block_size > 0xFFFFFFFF:
            raise GenericError("Too many blocks")
        if (mte % (1 << 64)) * block_size % (1 << 64) < self.total_sectors * SECTOR:
            raise GenericError("Page table too small")
        if mte < 0 or mte > INT_MAX // 4:
            raise GenericError(f"Max Table Entries too large ({mte})")
        self.max_table_entries = mte
        self.bat_offset = table_offset
        size = mte * 4
        if _read_error(table_offset, size):
            raise GenericError("Error reading pagetable")
        free = -(-(table_offset + size) // SECTOR) * SECTOR
        if free <= flen:
            # the whole table is in the file (else open fails below, before
            # anything is read: QEMU reads the missing part as zeroes, whose
            # blocks then lie past the end of the file as well)
            self.pagetable = await self.load_table(table_offset, mte, ">I")
            step = self.bitmap_size + block_size
            top = max((e for e in self.pagetable if e != UNALLOCATED), default=None)
            if top is not None:
                free = max(free, SECTOR * top + step)
        if free > flen:
            raise GenericError("block-vpc: free_data_block_offset points after the end "
                               "of file. The image has been truncated.")
        self.free_data_block_offset = free

    @property
    def has_info(self) -> bool:
        return True

    def info_extra(self) -> dict[str, Any]:
        # vpc_co_get_info: the block size of a dynamic image, nothing format-specific
        return {} if self.fixed else {"cluster-size": self.block_size}

    def _length(self) -> int:
        return self.total_sectors * SECTOR

    def _extent(self, pos: int, length: int) -> tuple[int, int]:
        """get_image_offset: a fixed image is its data; a dynamic one goes
        block by block (a bitmap lies between two blocks' data)."""
        if self.fixed:
            return pos, length
        index, in_block = divmod(pos, self.block_size)
        n = self.block_size - in_block
        if n > length:
            n = length
        if index >= self.max_table_entries:
            return ZEROES, n
        e = self.pagetable[index]
        if e == UNALLOCATED:
            return ZEROES, n
        return SECTOR * e + self.bitmap_size + in_block, n

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.fixed:
            await self.file.write(offset, data, fua=fua)
            return
        for done, pos, n in pieces(offset, len(data), self.block_size):
            async with self._lock:
                host, _ = self._extent(pos, n)
                if host >= 0:
                    bitmap_offset = host - pos % self.block_size - self.bitmap_size
                    if bitmap_offset != self.last_bitmap_offset:
                        self.last_bitmap_offset = bitmap_offset
                        await self.pwrite_sync(bitmap_offset, b"\xff" * self.bitmap_size)
                else:
                    host = await self._alloc_block(pos)
            await self.file.write(host, data[done:done + n])
        if fua:
            await self.file.flush()

    async def _alloc_block(self, offset: int) -> int:
        """alloc_block: the new block goes where the footer was; the footer
        moves past it; then the BAT entry is written.  Called under _lock."""
        index = offset // self.block_size
        at = self.free_data_block_offset
        await self.pwrite_sync(at, b"\xff" * self.bitmap_size)
        end = at + self.bitmap_size + self.block_size
        await self.pwrite_sync(end, self.footer_raw)
        self.free_data_block_offset = end
        await self.pwrite_sync(self.bat_offset + 4 * index, struct.pack(">I", at // SECTOR))
        # mapped once the file reaches past the block, so that a concurrent
        # read of it finds the (zero) data inside the file
        self.pagetable[index] = at // SECTOR
        return at + self.bitmap_size + offset % self.block_size

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        flags = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
        if self.fixed:
            # DATA | OFFSET_VALID | RECURSE: the file says where zeroes are
            zero, n = await self.recurse_status(offset, length)
            return BlockStatus(flags | zero, n, 1, offset)
        host, n = self._extent(offset, length)
        if host >= 0:
            # one block at most: a bitmap lies between two blocks' data
            return BlockStatus(flags, n, 1, host)
        # unallocated blocks in a row are one answer; the generic layer
        # adds ALLOCATED to vpc_co_block_status's ZERO
        while n < length:
            host, m = self._extent(offset + n, length - n)
            if host >= 0:
                break
            n += m
        return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 1)


def make_footer(size: int, chs: tuple[int, int, int], disk_type: int,
                force_size: bool) -> bytes:
    """vpc_co_create's footer for ``size`` bytes, geometry ``chs``."""
    f = Footer(bytes(SECTOR))
    f["creator"] = b"conectix"
    f["creator_app"] = b"qem2" if force_size else b"qemu"
    f["creator_os"] = b"Wi2k"
    f["features"] = 2
    f["version"] = 0x00010000
    f["data_offset"] = SECTOR if disk_type == VHD_DYNAMIC else (1 << 64) - 1
    f["timestamp"] = (int(time.time()) - VHD_TIMESTAMP_BASE) & 0xFFFFFFFF
    f["major"], f["minor"] = 5, 3  # Virtual PC 2007
    f["orig_size"] = f["current_size"] = size
    f["cyls"], f["heads"], f["secs_per_cyl"] = chs
    f["type"] = disk_type
    f["uuid"] = uuid.UUID(bytes=os.urandom(16), version=4).bytes
    f["checksum"] = vpc_checksum(f.pack())
    return f.pack()


async def create_vpc(file: BlockNode, size: int, subformat: str = "dynamic",
                     force_size: bool = False) -> None:
    """vpc_co_create on an open ``file`` node (blockdev-create driver=vpc).

    ``size`` must be what the geometry gives (see :func:`rounded_size`) or,
    with ``force_size``, a whole number of sectors; otherwise QEMU's error.
    A dynamic image: the footer, the dynamic header at 512, the BAT (all
    unallocated) at 1536, the footer again after the BAT.  A fixed image:
    the file sized to ``size`` and the footer after it."""
    disk_type = VHD_FIXED if subformat == "fixed" else VHD_DYNAMIC
    total, chs = rounded_size(size, force_size)
    if size != total * SECTOR:
        raise GenericError("The requested image size cannot be represented in CHS geometry")
    footer = make_footer(size, chs, disk_type, force_size)
    if disk_type == VHD_FIXED:
        await file.truncate(size + SECTOR, exact=False)
        await file.write(size, footer)
        await file.flush()
        return
    try:
        entries = -(-total // (DEFAULT_BLOCK_SIZE // SECTOR))
        bat_size = -(-entries * 4 // SECTOR) * SECTOR
        await file.write(0, footer)
        await file.write(1536 + bat_size, footer)
        if bat_size:
            await file.write(1536, b"\xff" * bat_size)
        dyn = bytearray(DYN_HEADER_SIZE)
        _DYN.pack_into(dyn, 0, b"cxsparse", (1 << 64) - 1, 1536, 0x00010000, entries,
                       DEFAULT_BLOCK_SIZE, 0)
        struct.pack_into(">I", dyn, _DYN_CHECKSUM_AT, vpc_checksum(dyn))
        await file.write(SECTOR, dyn)
        await file.flush()
    except OSError:
        raise GenericError("Unable to create or write VHD header") from None
