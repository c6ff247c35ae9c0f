"""``blockdev-create`` with ``driver=vhdx``: :func:`create_vhdx`, as QEMU
7.2's vhdx_co_create lays an image out.

The file: the signature and the creator ("QEMU v7.2.0", UTF-16) at 0, two
headers (a random sequence number, the second one higher; the log at
1 MiB), the BAT after the log (rounded up to 1 MiB, its length the entries
rounded up to 1 MiB), the 1 MiB metadata region after it, and the data from
5 MiB past the BAT.  A dynamic image ends there; a fixed one reserves the
disk's size after it, its blocks mapped in order.  With
``block-state-zero`` (the default) every entry is ZERO instead, a fixed
image's too, as QEMU writes them (non-standard, but QEMU's default).
"""

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Awaitable

from .. import QEMU_VERSION
from ..qapi.errors import GenericError
from .node import BlockNode
from .vhdx_format import (
    BAT_GUID,
    BLOCK_SIZE_MAX,
    FILE_PARAM_GUID,
    FILE_SIGNATURE,
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    HEADER_BLOCK_SIZE,
    HEADER_SECTION_END,
    HEADER_SIZE,
    LOGICAL_SECTOR_GUID,
    MAX_IMAGE_SIZE,
    MAX_SECTORS_PER_BLOCK,
    META_IS_REQUIRED,
    META_IS_VIRTUAL_DISK,
    METADATA_GUID,
    NULL_GUID,
    PAGE83_GUID,
    PARAMS_LEAVE_BLOCKS_ALLOCED,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_ZERO,
    PHYS_SECTOR_GUID,
    REGION_TABLE2_OFFSET,
    REGION_TABLE_OFFSET,
    VIRTUAL_SIZE_GUID,
    Header,
    bat_entries,
    bat_index,
    new_guid,
    with_checksum,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
DEFAULT_LOG_SIZE = 1 * MiB
SECTOR = 512
CREATOR = "QEMU v{}.{}.{}".format(*QEMU_VERSION)


def default_block_size(size: int) -> int:
    """vhdx_co_create's choice, to keep the BAT small."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


def check_options(size: int, log_size: int | None, block_size: int | None) -> tuple[int, int]:
    """vhdx_co_create's checks, in its order, with its messages; the log
    and block sizes to use."""
    if size > MAX_IMAGE_SIZE:
        raise GenericError("Image size too large; max of 64TB")
    if log_size is None:
        log_size = DEFAULT_LOG_SIZE
    elif log_size > 0xFFFFFFFF:
        raise GenericError("Log size must be smaller than 4 GB")
    if log_size < MiB or log_size % MiB:
        raise GenericError("Log size must be a multiple of 1 MB")
    if block_size is None:
        block_size = default_block_size(size)
    if block_size < MiB or block_size % MiB:
        raise GenericError("Block size must be a multiple of 1 MB")
    if block_size & (block_size - 1):
        raise GenericError("Block size must be a power of two")
    if block_size > BLOCK_SIZE_MAX:
        raise GenericError(f"Block size must not exceed {BLOCK_SIZE_MAX}")
    return log_size, block_size


async def _step(what: str, op: Awaitable[None]) -> None:
    """One write of the creation, failing with QEMU's words for it."""
    try:
        await op
    except OSError as e:
        raise GenericError(f"{what}: {e.strerror}") from None


async def create_vhdx(file: BlockNode, size: int, *, log_size: int | None = None,
                      block_size: int | None = None, subformat: str = "dynamic",
                      block_state_zero: bool = True) -> None:
    """vhdx_co_create on an open ``file`` node (blockdev-create driver=vhdx)."""
    log_size, block_size = check_options(size, log_size, block_size)
    fixed = subformat == "fixed"

    await _step("Failed to write file signature", file.write(0, FILE_SIGNATURE))
    await _step("Failed to write creator field",
                file.write(len(FILE_SIGNATURE), CREATOR.encode("utf-16-le")))

    # vhdx_create_new_headers: each copy written and synced
    h = Header(bytes(HEADER_SIZE))
    h["signature"] = b"head"
    h["sequence_number"] = random.getrandbits(32)
    h["file_write_guid"] = new_guid()
    h["data_write_guid"] = new_guid()
    h["log_guid"] = NULL_GUID
    h["version"] = 1
    h["log_length"] = log_size
    h["log_offset"] = HEADER_SECTION_END
    for at in (HEADER1_OFFSET, HEADER2_OFFSET):
        await _step("Failed to write image headers", _write_sync(file, at, h.packed()))
        h["sequence_number"] += 1

    # vhdx_create_new_region_table, with the BAT (vhdx_create_bat) first
    chunk_ratio = MAX_SECTORS_PER_BLOCK * SECTOR // block_size
    entries = bat_entries(size, block_size, chunk_ratio)
    bat_offset = -(-(HEADER_SECTION_END + log_size) // MiB) * MiB
    bat_length = -(-(entries * 8) // MiB) * MiB
    md_offset = -(-(bat_offset + bat_length) // MiB) * MiB
    rt = bytearray(HEADER_BLOCK_SIZE)
    struct.pack_into("<4sIII", rt, 0, b"regi", 0, 2, 0)
    struct.pack_into("<16sQII", rt, 16, BAT_GUID, bat_offset, bat_length, 0)
    struct.pack_into("<16sQII", rt, 48, METADATA_GUID, md_offset, MiB, 0)
    region_table = with_checksum(rt, 4)

    data_offset = bat_offset + bat_length + 5 * MiB
    await file.truncate(data_offset + size if fixed else data_offset, exact=False)
    # a plain file reads as zeroes once grown (bdrv_has_zero_init): a
    # dynamic BAT of NOT_PRESENT entries need not be written there
    if fixed or block_state_zero or file.driver != "file":
        await _write_bat(file, size, block_size, chunk_ratio, bat_offset, bat_length,
                         data_offset, fixed, block_state_zero)
    await _step("Failed to write first region table", file.write(REGION_TABLE_OFFSET, region_table))
    await _step("Failed to write second region table",
                file.write(REGION_TABLE2_OFFSET, region_table))
    await _step("Failed to initialize metadata",
                _write_metadata(file, md_offset, size, block_size, fixed))


async def _write_sync(file: BlockNode, offset: int, data: bytes) -> None:
    await file.write(offset, data)
    await file.flush()


async def _write_bat(file: BlockNode, size: int, block_size: int, chunk_ratio: int,
                     bat_offset: int, bat_length: int, data_offset: int, fixed: bool,
                     zero: bool) -> None:
    """vhdx_create_bat's BAT, ``bat_length`` bytes written a MiB at a time:
    every payload block ZERO, fully present at its place after
    ``data_offset`` (fixed), or not present."""
    state = PAYLOAD_BLOCK_ZERO if zero else (
        PAYLOAD_BLOCK_FULLY_PRESENT if fixed else PAYLOAD_BLOCK_NOT_PRESENT)
    chunk_bits = chunk_ratio.bit_length() - 1
    blocks = -(-(size // SECTOR) // (block_size // SECTOR))
    per = MiB // 8
    entry = 0
    for start in range(0, bat_length, MiB):
        part = array("Q", bytes(min(MiB, bat_length - start)))
        while entry < blocks:
            idx = bat_index(entry, chunk_bits) - start // 8
            if idx >= per:
                break
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                at = -(-(data_offset + entry * block_size) // MiB) * MiB
                part[idx] = at | state
            else:
                part[idx] = state
            entry += 1
        if struct.pack("=H", 1) != struct.pack("<H", 1):
            part.byteswap()
        await _step("Failed to write the BAT", file.write(bat_offset + start, part.tobytes()))


async def _write_metadata(file: BlockNode, md_offset: int, size: int, block_size: int,
                          fixed: bool) -> None:
    """vhdx_create_new_metadata: the table of the five items, and their
    values 64 KiB into the region."""
    values = [
        (FILE_PARAM_GUID, struct.pack("<II", block_size,
                                      PARAMS_LEAVE_BLOCKS_ALLOCED if fixed else 0),
         META_IS_REQUIRED),
        (VIRTUAL_SIZE_GUID, struct.pack("<Q", size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_GUID, new_guid(), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_GUID, struct.pack("<I", SECTOR), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYS_SECTOR_GUID, struct.pack("<I", SECTOR), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    table = bytearray(HEADER_BLOCK_SIZE)
    struct.pack_into("<8sHH", table, 0, b"metadata", 0, len(values))
    offset = 64 * KiB
    for i, (guid, value, bits) in enumerate(values):
        struct.pack_into("<16sIIII", table, 32 + 32 * i, guid, offset, len(value), bits, 0)
        offset += len(value)
    await file.write(md_offset, bytes(table))
    await file.write(md_offset + 64 * KiB, b"".join(v for _, v, _ in values))
