"""The ``vdi`` format (VirtualBox Virtual Disk Image), as QEMU's block/vdi.c.

Layout: a 512-byte header at offset 0 (little-endian; the fields are
:data:`_HEADER`), a block map of ``blocks_in_image`` 32-bit entries at
``offset_bmap`` and the data blocks from ``offset_data``.  Entry ``i`` is
the index of the host block holding guest block ``i``, or
0xffffffff/0xfffffffe (unallocated/discarded, read as zeroes).  Blocks are
1 MiB, the only size QEMU opens.

A *dynamic* image (``image_type`` 1) allocates a block on its first write:
the new block is number ``blocks_allocated`` (it is then incremented), it is
written whole (the guest data, zeroes around it), and at the end of the
request the header and the block map sectors that changed are written back,
as vdi_co_pwritev.  A *static* image (2, ``preallocation=metadata`` at
creation) maps every block from the start.

Reads of a block mapped beyond the end of the file return zeroes for the
missing part, as QEMU's generic layer pads reads past the end of a file;
nothing is read past the file.  Block maps that reach past the end of the
file read as zero entries there (QEMU's pread pads the same way), and only
the part present in the file is kept in memory (table_format.Table).

``blockdev-create`` with ``driver=vdi`` is :func:`create_vdi`.
"""

from __future__ import annotations

import struct
import uuid
from array import array
from typing import Any

import trio

from ..qapi.errors import GenericError
from .graph import register_driver
from .node import BlockNode, BlockStatus, Status
from .packed import Packed
from .table_format import ZEROES, TableFormatNode, pack_entries, pieces

SECTOR = 512
BLOCK_SIZE = 1 << 20  # DEFAULT_CLUSTER_SIZE
VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
VDI_TYPE_DYNAMIC = 1
VDI_TYPE_STATIC = 2
VDI_UNALLOCATED = 0xFFFFFFFF
VDI_DISCARDED = 0xFFFFFFFE
# the block map, rounded up to whole sectors, must fit in an int
VDI_BLOCKS_IN_IMAGE_MAX = ((1 << 31) - 1 - (SECTOR - 1)) // 4
VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE
VDI_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"

# VdiHeader: text[64], signature, version, header_size, image_type,
# image_flags, description[256], offset_bmap, offset_data, cylinders, heads,
# sectors, sector_size, unused1, disk_size (u64), block_size, block_extra,
# blocks_in_image, blocks_allocated, four UUIDs, unused2[7] (u64)
_HEADER = struct.Struct("<64s5I256s7IQ4I16s16s16s16s56s")
assert _HEADER.size == SECTOR
_FIELDS = ("text", "signature", "version", "header_size", "image_type", "image_flags",
           "description", "offset_bmap", "offset_data", "cylinders", "heads", "sectors",
           "sector_size", "unused1", "disk_size", "block_size", "block_extra",
           "blocks_in_image", "blocks_allocated", "uuid_image", "uuid_last_snap",
           "uuid_link", "uuid_parent", "unused2")


def is_allocated(entry: int) -> bool:
    """VDI_IS_ALLOCATED."""
    return entry < VDI_DISCARDED


class VdiHeader(Packed):
    """The header's fields by QEMU's names."""

    STRUCT = _HEADER
    FIELDS = _FIELDS


def validate_header(h: VdiHeader) -> int:
    """vdi_open's checks, in its order, with its messages; returns the disk
    size rounded up to whole sectors."""
    disk_size: int = h["disk_size"]
    if disk_size > VDI_DISK_SIZE_MAX:
        raise GenericError(f"Unsupported VDI image size (size is {disk_size:#x}, "
                           f"max supported is {VDI_DISK_SIZE_MAX:#x})")
    # 'VBoxManage convertfromraw' writes odd sizes; QEMU rounds them up
    disk_size = -(-disk_size // SECTOR) * SECTOR
    version: int = h["version"]
    if h["signature"] != VDI_SIGNATURE:
        raise GenericError(f"Image not in VDI format (bad signature {h['signature']:08x})")
    if version != VDI_VERSION_1_1:
        raise GenericError(f"unsupported VDI image (version {version >> 16}.{version & 0xffff})")
    if h["offset_bmap"] % SECTOR:
        raise GenericError(f"unsupported VDI image (unaligned block map offset "
                           f"{h['offset_bmap']:#x})")
    if h["offset_data"] % SECTOR:
        raise GenericError(f"unsupported VDI image (unaligned data offset "
                           f"{h['offset_data']:#x})")
    if h["sector_size"] != SECTOR:
        raise GenericError(f"unsupported VDI image (sector size {h['sector_size']} "
                           f"is not {SECTOR})")
    if h["block_size"] != BLOCK_SIZE:
        raise GenericError(f"unsupported VDI image (block size {h['block_size']} "
                           f"is not {BLOCK_SIZE})")
    room = h["blocks_in_image"] * h["block_size"]
    if disk_size > room:
        raise GenericError(f"unsupported VDI image (disk size {disk_size}, "
                           f"image bitmap has room for {room})")
    if any(h["uuid_link"]):
        raise GenericError("unsupported VDI image (non-NULL link UUID)")
    if any(h["uuid_parent"]):
        raise GenericError("unsupported VDI image (non-NULL parent UUID)")
    if h["blocks_in_image"] > VDI_BLOCKS_IN_IMAGE_MAX:
        raise GenericError(f"unsupported VDI image (too many blocks {h['blocks_in_image']}, "
                           f"max is {VDI_BLOCKS_IN_IMAGE_MAX})")
    return disk_size


@register_driver
class VdiNode(TableFormatNode):
    driver = "vdi"

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
        self.header = VdiHeader(bytes(await self.pread(0, SECTOR)))
        self.disk_size = validate_header(self.header)
        self.header["disk_size"] = self.disk_size  # written back rounded, as QEMU
        self.offset_data: int = self.header["offset_data"]
        self.offset_bmap: int = self.header["offset_bmap"]
        # the block map, as far as the file holds it
        self.bmap = await self.load_table(self.offset_bmap, self.header["blocks_in_image"], "<I")
        # vdi's bmap_lock: one allocation at a time; header and block map
        # are written back under _meta_lock so the newest state lands last
        self._alloc_lock = trio.Lock()
        self._meta_lock = trio.Lock()
        self.request_alignment = 1

    @property
    def has_info(self) -> bool:
        return True

    def info_extra(self) -> dict[str, Any]:
        # vdi_get_info: the cluster size, no format-specific data
        return {"cluster-size": BLOCK_SIZE}

    def _length(self) -> int:
        return self.disk_size

    def _extent(self, pos: int, length: int) -> tuple[int, int]:
        # one block at a time: blocks need not follow each other in the file
        block, in_block = divmod(pos, BLOCK_SIZE)
        n = BLOCK_SIZE - in_block
        if n > length:
            n = length
        e = self.bmap[block]
        if e >= VDI_DISCARDED:  # not is_allocated
            return ZEROES, n
        return self.offset_data + e * BLOCK_SIZE + in_block, n

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        first = last = -1
        for done, pos, n in pieces(offset, len(data), BLOCK_SIZE):
            piece = data[done:done + n]
            block, in_block = divmod(pos, BLOCK_SIZE)
            e = self.bmap[block]
            if not is_allocated(e):
                async with self._alloc_lock:
                    e = self.bmap[block]
                    if not is_allocated(e):
                        e = self.header["blocks_allocated"]
                        self.header["blocks_allocated"] = e + 1
                        buf = bytearray(BLOCK_SIZE)
                        buf[in_block:in_block + n] = piece
                        await self.file.write(self.offset_data + e * BLOCK_SIZE, buf)
                        # mapped only once the block holds its data, so that
                        # a concurrent read sees zeroes rather than a hole
                        self.bmap[block] = e
                        first = block if first < 0 else first
                        last = block
                        continue
            await self.file.write(self.offset_data + e * BLOCK_SIZE + in_block, piece)
        if first >= 0:
            await self._write_metadata(first, last)
        if fua:
            await self.file.flush()

    async def _write_metadata(self, first: int, last: int) -> None:
        """Write the header and the block map sectors holding entries
        ``first``..``last``, as vdi_co_pwritev after an allocation."""
        async with self._meta_lock:
            await self.file.write(0, self.header.pack())
            per = SECTOR // 4
            s0, s1 = first // per, last // per
            await self.file.write(self.offset_bmap + s0 * SECTOR,
                                  self.bmap.to_bytes(s0 * per, (s1 + 1 - s0) * per))

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        host, n = self._extent(offset, length)
        if host < 0:
            # vdi_co_block_status says ZERO; the generic layer adds ALLOCATED
            return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 1)
        flags = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
        if self.header["image_type"] == VDI_TYPE_STATIC:
            # BDRV_BLOCK_RECURSE: a static image's blocks may be holes in the file
            zero, n = await self.recurse_status(host, n)
            flags |= zero
        return BlockStatus(flags, n, 1, host)


async def create_vdi(file: BlockNode, size: int, preallocation: str = "off") -> None:
    """vdi_co_do_create on an open ``file`` node (blockdev-create driver=vdi):
    the header and block map at the start of the file; with
    ``preallocation=metadata`` a static image, every block mapped and the
    file sized to hold them all."""
    if preallocation == "off":
        image_type = VDI_TYPE_DYNAMIC
    elif preallocation == "metadata":
        image_type = VDI_TYPE_STATIC
    else:
        raise GenericError("Preallocation mode not supported for vdi")
    if size > VDI_DISK_SIZE_MAX:
        raise GenericError(f"Unsupported VDI image size (size is {size:#x}, "
                           f"max supported is {VDI_DISK_SIZE_MAX:#x})")
    blocks = -(-size // BLOCK_SIZE)
    bmap_size = -(-blocks * 4 // SECTOR) * SECTOR
    h = VdiHeader(bytes(SECTOR))
    h["text"] = VDI_TEXT
    h["signature"] = VDI_SIGNATURE
    h["version"] = VDI_VERSION_1_1
    h["header_size"] = 0x180
    h["image_type"] = image_type
    h["offset_bmap"] = 0x200
    h["offset_data"] = 0x200 + bmap_size
    h["sector_size"] = SECTOR
    h["disk_size"] = size
    h["block_size"] = BLOCK_SIZE
    h["blocks_in_image"] = blocks
    h["blocks_allocated"] = blocks if image_type == VDI_TYPE_STATIC else 0
    h["uuid_image"] = uuid.uuid4().bytes_le
    h["uuid_last_snap"] = uuid.uuid4().bytes_le
    await file.write(0, h.pack())
    if bmap_size:
        bmap = array("I", range(blocks)) if image_type == VDI_TYPE_STATIC \
            else array("I", [VDI_UNALLOCATED]) * blocks
        bmap.extend([0] * (bmap_size // 4 - blocks))
        await file.write(SECTOR, pack_entries("<I", bmap))
    if image_type == VDI_TYPE_STATIC:
        try:
            await file.truncate(SECTOR + bmap_size + blocks * BLOCK_SIZE, exact=False)
        except GenericError as e:
            raise GenericError(f"Failed to statically allocate file: {e}") from None
    await file.flush()
