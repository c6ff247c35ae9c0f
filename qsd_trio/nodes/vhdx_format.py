"""VHDX on-disk structures (MS-VHDX), as QEMU 7.2's block/vhdx.h and vhdx.c
read and write them.

The first megabyte of an image is its *header section*: the file type
identifier ("vhdxfile" and a UTF-16 creator) at 0, two 4 KiB *headers* at
64 KiB and 128 KiB (the one with the higher sequence number is current; a
write updates the other one, which then becomes current), and two copies of
the 64 KiB *region table* at 192 KiB and 256 KiB, which say where the BAT
and the metadata region are.  The *metadata region* starts with a table of
items (file parameters: block size and flags; the virtual disk size; the
logical and physical sector sizes; a page-83 GUID; a parent locator for a
differencing image).  Everything is little-endian; headers, region tables
and log entries carry a CRC-32C of their whole size with the checksum field
taken as zero.

The *BAT* has one 64-bit entry per payload block (state in bits 0-2, file
offset in MiB from bit 20) with a sector-bitmap entry after every
``chunk_ratio`` of them (:func:`bat_index`).

Open refuses what QEMU refuses, with QEMU's errno where it sets no message
of its own (:class:`VhdxInvalid`, :class:`VhdxUnsupported`), and its
messages where it has them.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from typing import ClassVar

import crc32c

from ..qapi.errors import GenericError, error_report
from .packed import Packed

KiB, MiB = 1 << 10, 1 << 20
FILE_SIGNATURE = b"vhdxfile"
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_BLOCK_SIZE = 64 * KiB  # a region table, the metadata table
HEADER_SECTION_END = 1 * MiB
METADATA_TABLE_MAX_SIZE = 64 * KiB
BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_SECTORS_PER_BLOCK = 1 << 23
LOG_MIN_SIZE = 1 * MiB
MAX_IMAGE_SIZE = 64 << 40

# BAT entry states (payload blocks; a sector bitmap entry is 0 or 6)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
# the states a read answers with zeroes and a write allocates a block for
UNALLOCATED_STATES = frozenset((PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED,
                                PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED,
                                PAYLOAD_BLOCK_UNMAPPED_V095))
BAT_STATE_MASK = 0x7
BAT_FILE_OFF_MASK = 0xFFFFFFFFFFF00000

# metadata item flags; file parameter flags
META_IS_USER = 0x01
META_IS_VIRTUAL_DISK = 0x02
META_IS_REQUIRED = 0x04
PARAMS_LEAVE_BLOCKS_ALLOCED = 0x01
PARAMS_HAS_PARENT = 0x02
REGION_ENTRY_REQUIRED = 0x01

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1


def _guid(text: str) -> bytes:
    """A GUID as VHDX stores it (MSGUID: the first three fields little-endian)."""
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAM_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYS_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
NULL_GUID = bytes(16)


def new_guid() -> bytes:
    """vhdx_guid_generate: a random (version 4) UUID's bytes, as they are."""
    return uuid.uuid4().bytes


class VhdxInvalid(OSError):
    """What QEMU's vhdx_open fails with -EINVAL and no message of its own."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL, os.strerror(errno.EINVAL))


class VhdxUnsupported(OSError):
    """What QEMU's vhdx_open fails with -ENOTSUP and no message of its own."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, os.strerror(errno.ENOTSUP))


def checksum(buf: bytes | bytearray | memoryview, at: int) -> int:
    """vhdx_checksum_calc: the CRC-32C of ``buf`` with the four bytes at
    ``at`` (the checksum field) taken as zero."""
    mv = memoryview(buf)
    crc = crc32c.crc32c(mv[:at])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return int(crc32c.crc32c(mv[at + 4:], crc))


def checksum_is_valid(buf: bytes | bytearray | memoryview, at: int) -> bool:
    return bool(struct.unpack_from("<I", buf, at)[0] == checksum(buf, at))


def with_checksum(buf: bytes | bytearray, at: int) -> bytes:
    """vhdx_update_checksum: ``buf`` with its checksum field filled in."""
    out = bytearray(buf)
    struct.pack_into("<I", out, at, checksum(out, at))
    return bytes(out)


class Header(Packed):
    """VHDXHeader: one 4 KiB copy, reserved bytes included (they are kept
    and written back, and covered by the checksum)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4sIQ16s16s16sHHIQ4016s")
    FIELDS = ("signature", "checksum", "sequence_number", "file_write_guid",
              "data_write_guid", "log_guid", "log_version", "version", "log_length",
              "log_offset", "reserved")

    def packed(self) -> bytes:
        """The 4 KiB as vhdx_write_header writes them (checksum updated)."""
        return with_checksum(self.pack(), 4)


assert Header.STRUCT.size == HEADER_SIZE


def parse_headers(raw1: bytes, raw2: bytes) -> tuple[list[Header], int]:
    """vhdx_parse_header: both copies and the index of the current one.  A
    copy is valid with a good checksum, signature "head" and version 1; of
    two valid copies the higher sequence number wins, and equal numbers are
    accepted only for identical copies (as Disk2VHD writes them)."""
    headers = [Header(raw1), Header(raw2)]
    valid = [checksum_is_valid(raw, 4) and h["signature"] == b"head" and h["version"] == 1
             for raw, h in zip((raw1, raw2), headers, strict=True)]
    if valid[0] and valid[1]:
        s1, s2 = headers[0]["sequence_number"], headers[1]["sequence_number"]
        if s1 > s2 or (s1 == s2 and raw1 == raw2):
            return headers, 0
        if s2 > s1:
            return headers, 1
    elif valid[0] or valid[1]:
        return headers, 0 if valid[0] else 1
    raise GenericError("No valid VHDX header found")


class Regions:
    """The regions of the file known so far (the log, the region table's
    entries), checked for overlaps as vhdx_region_check: the newest first,
    and QEMU's message on stderr for the first one a new range overlaps."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def check(self, start: int, length: int) -> bool:
        end = (start + length) & MASK64
        for rs, re in self.ranges:
            if not (start >= re or end <= rs):
                error_report(f"VHDX region {start}-{end} overlaps with region {rs}-{re}")
                return False
        return True

    def register(self, start: int, length: int) -> None:
        self.ranges.insert(0, (start, (start + length) & MASK64))


_RT_HEADER = struct.Struct("<4sIII")
_RT_ENTRY = struct.Struct("<16sQII")


def parse_region_table(buf: bytes, regions: Regions) -> tuple[tuple[int, int], tuple[int, int]]:
    """vhdx_open_region_tables on the first table's 64 KiB: the (offset,
    length) of the BAT and of the metadata region.  Every entry is checked
    against the regions known and registered; an unknown entry marked
    required is not supported, as the specification says."""
    if not checksum_is_valid(buf, 4):
        raise VhdxInvalid()
    signature, _, entry_count, _ = _RT_HEADER.unpack_from(buf)
    if signature != b"regi" or entry_count > 2047:
        raise VhdxInvalid()
    bat = meta = None
    for i in range(entry_count):
        guid, offset, length, bits = _RT_ENTRY.unpack_from(buf, _RT_HEADER.size + i * _RT_ENTRY.size)
        if not regions.check(offset, length):
            raise VhdxInvalid()
        regions.register(offset, length)
        if guid == BAT_GUID:
            if bat is not None:
                raise VhdxInvalid()
            bat = (offset, length)
        elif guid == METADATA_GUID:
            if meta is not None:
                raise VhdxInvalid()
            meta = (offset, length)
        elif bits & REGION_ENTRY_REQUIRED:
            raise VhdxUnsupported()
    if bat is None or meta is None:
        raise VhdxInvalid()
    return bat, meta


_MD_HEADER = struct.Struct("<8sHH20s")
_MD_ENTRY = struct.Struct("<16sIIII")
# the items vhdx_parse_metadata needs, each at most once
_KNOWN_ITEMS = (FILE_PARAM_GUID, VIRTUAL_SIZE_GUID, PAGE83_GUID, LOGICAL_SECTOR_GUID,
                PHYS_SECTOR_GUID, PARENT_LOCATOR_GUID)
_ALL_PRESENT = frozenset(_KNOWN_ITEMS[:5])


def parse_metadata_table(buf: bytes) -> dict[bytes, int]:
    """The metadata table (its first 64 KiB): each known item's offset in
    the region.  Duplicates are invalid; an unknown item marked required is
    not supported, and so is a table without all five items QEMU reads, or
    with a parent locator (QEMU 7.2 opens no differencing image)."""
    signature, _, entry_count, _ = _MD_HEADER.unpack_from(buf)
    if signature != b"metadata":
        raise VhdxInvalid()
    if entry_count * _MD_ENTRY.size > METADATA_TABLE_MAX_SIZE - _MD_HEADER.size:
        raise VhdxInvalid()
    items: dict[bytes, int] = {}
    for i in range(entry_count):
        guid, offset, _, bits, _ = _MD_ENTRY.unpack_from(buf, _MD_HEADER.size + i * _MD_ENTRY.size)
        if guid in _KNOWN_ITEMS:
            if guid in items:
                raise VhdxInvalid()
            items[guid] = offset
        elif bits & META_IS_REQUIRED:
            raise VhdxUnsupported()
    if frozenset(items) != _ALL_PRESENT:
        raise VhdxUnsupported()
    return items


def check_geometry(block_size: int, logical_sector_size: int) -> int:
    """vhdx_parse_metadata's checks of the block and sector sizes; returns
    the chunk ratio (payload blocks per sector bitmap block)."""
    if not BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX:
        raise VhdxInvalid()
    if logical_sector_size != 512:
        raise VhdxUnsupported()
    sectors_per_block = block_size // logical_sector_size
    chunk_ratio = MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size
    for n in (sectors_per_block, chunk_ratio, block_size):
        if n & (n - 1):
            raise VhdxInvalid()
    return chunk_ratio


def bat_entries(virtual_disk_size: int, block_size: int, chunk_ratio: int) -> int:
    """vhdx_calc_bat_entries for an image without a parent, in QEMU's
    32-bit arithmetic (an empty disk still counts a chunk's worth)."""
    data_blocks = -(-virtual_disk_size // block_size) & MASK32
    chunk_bits = chunk_ratio.bit_length() - 1
    return (data_blocks + (((data_blocks - 1) & MASK32) >> chunk_bits)) & MASK32


def bat_index(block: int, chunk_bits: int) -> int:
    """The BAT entry of payload block ``block``: sector bitmap entries
    stand after every 2**chunk_bits payload entries (vhdx_block_translate)."""
    return block + (block >> chunk_bits)


def bat_entry_error(i: int, entry: int, block_size: int, disk_size: int,
                    file_size: int) -> str | None:
    """vhdx_check_bat_entries' complaint about fully present entry ``i``
    (index into the BAT, sector bitmap entries counted as QEMU counts them),
    or None: an offset that overflows, or a block starting or ending past
    the end of the file (the last block may lie partly past it)."""
    offset = entry & BAT_FILE_OFF_MASK
    block_length = min(block_size, (disk_size - i * block_size) & MASK64)
    if offset > INT64_MAX - block_size:
        return f"VHDX BAT entry {i} offset overflow."
    if offset >= file_size:
        return (f"VHDX BAT entry {i} start offset {offset} points after end of file "
                f"({file_size}). Image has probably been truncated.")
    if offset + block_length > file_size:
        return (f"VHDX BAT entry {i} end offset {offset + block_length - 1} points after end "
                f"of file ({file_size}). Image has probably been truncated.")
    return None
