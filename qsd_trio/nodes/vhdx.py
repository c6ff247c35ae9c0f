"""The ``vhdx`` format (Hyper-V's VHDX), as QEMU 7.2's block/vhdx.c and
vhdx-log.c.  The on-disk structures are in :mod:`.vhdx_format`, the log's
in :mod:`.vhdx_log`, creation in :mod:`.vhdx_create`.

Open reads and checks, in QEMU's order and with its errors: the file
signature, the two headers, the log (replayed when it holds a valid
sequence of entries: on a read-write node, or refused with QEMU's message
and hint on a read-only one), the first region table, the metadata
(differencing images are refused, as QEMU 7.2 does: "Operation not
supported"), the BAT, whose fully present blocks must lie inside the file
and outside the log, the BAT and the metadata.  A BAT region that reaches
past the end of the file reads as unallocated entries there, as QEMU's
padded read; only the part the file holds is kept.

Reads: a fully present block from the file (the part past its end as
zeroes), a block in any state without data as zeroes, a partially present
block (differencing) or an unknown state as EIO.  There is no block status
in QEMU's vhdx driver, so every range is data (the generic answer).

Writes, as vhdx_co_writev: the first write of a session updates both
headers (a new data-write GUID); a write to a block without data allocates
one at the end of the file rounded up to 1 MiB (the file grows by a block of
zeroes), writes the data there, then updates the BAT entry through the
log, as vhdx_log_write_and_flush: flush, a log entry with the BAT sector
(the headers name a new log GUID first), flush, the sector written in
place, flush, the headers cleared of the log GUID.  A crash anywhere leaves
an image QEMU opens (replaying the log when the entry is complete).  A
write to a fully present block goes straight to the file; once the session
has written, such a write inside one block takes the synchronous fast path.

Zero writes are written as data (QEMU's vhdx has no zero write), discards
do nothing, and the image cannot be resized, as in QEMU.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from dataclasses import replace
from typing import Any

import trio

from ..qapi.errors import GenericError, QapiError, error_report
from .graph import BDRV_MAX_LENGTH, register_driver
from .node import BlockNode, Buffer, ReadDone, WriteDone
from .vhdx_format import (
    BAT_FILE_OFF_MASK,
    BAT_STATE_MASK,
    FILE_PARAM_GUID,
    FILE_SIGNATURE,
    HEADER1_OFFSET,
    HEADER2_OFFSET,
    HEADER_BLOCK_SIZE,
    HEADER_SECTION_END,
    HEADER_SIZE,
    INT64_MAX,
    LOG_MIN_SIZE,
    LOGICAL_SECTOR_GUID,
    MASK32,
    MASK64,
    METADATA_TABLE_MAX_SIZE,
    NULL_GUID,
    PARAMS_HAS_PARENT,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PHYS_SECTOR_GUID,
    REGION_TABLE_OFFSET,
    UNALLOCATED_STATES,
    VIRTUAL_SIZE_GUID,
    Header,
    Regions,
    VhdxInvalid,
    bat_entries,
    bat_entry_error,
    check_geometry,
    new_guid,
    parse_headers,
    parse_metadata_table,
    parse_region_table,
)
from .vhdx_log import LOG_SECTOR, Log, LogReader, build_entry, search, split_sectors

SECTOR = 512
# bdrv_check_request32: a single request larger than this is -EIO
BDRV_REQUEST_MAX_BYTES = (2**31 - 1) // SECTOR * SECTOR
_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1)


def _eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def _check_request(offset: int, length: int) -> None:
    """bdrv_check_request32 for a 64-bit offset the image gives (read as
    QEMU's int64_t): -EIO beyond BDRV_MAX_LENGTH or for a huge length."""
    if offset >= 1 << 63:
        offset -= 1 << 64
    if (offset < 0 or length > BDRV_REQUEST_MAX_BYTES or offset > BDRV_MAX_LENGTH
            or length > BDRV_MAX_LENGTH - offset):
        raise _eio()


@register_driver
class VhdxNode(BlockNode):
    """A vhdx image over its ``file`` child.  Resources: the child, which
    the graph releases; the node holds no task or descriptor of its own."""

    driver = "vhdx"

    async def open(self, options: dict[str, Any]) -> None:
        self.file_edge = await self.open_child(options, "file")
        self.file: BlockNode = self.file_edge.node
        self.request_alignment = SECTOR  # a sector-based driver in QEMU
        # s->lock: header updates, allocations and the log, one at a time
        self._lock = trio.Lock()
        # the GUID every header written in this session carries
        self.session_guid = new_guid()
        self.first_visible_write = True
        # the fast path writes only once that first header update is done
        # (QEMU's writes wait for it on s->lock)
        self._headers_updated = False
        self.log_replayed_on_open = False
        try:
            await self._open()
        except OSError as e:
            raise GenericError(f"Could not open '{self.file.filename}': {e.strerror}") from None
        if self.total_sectors * SECTOR > BDRV_MAX_LENGTH:
            # refresh_total_sectors after the driver's open
            raise GenericError("Could not refresh total sector count: File too large")

    async def _open(self) -> None:
        """vhdx_open's steps in its order."""
        if bytes(await self._pread(0, 8)) != FILE_SIGNATURE:
            raise VhdxInvalid()
        self.headers, self.cur = parse_headers(bytes(await self._pread(HEADER1_OFFSET, HEADER_SIZE)),
                                               bytes(await self._pread(HEADER2_OFFSET, HEADER_SIZE)))
        hdr = self.headers[self.cur]
        regions = Regions()
        regions.register(hdr["log_offset"], hdr["log_length"])
        self.log = Log(hdr["log_offset"], hdr["log_length"])
        await self._parse_log()

        rt = bytes(await self._pread(REGION_TABLE_OFFSET, HEADER_BLOCK_SIZE))
        (self.bat_offset, bat_length), (md_offset, _) = parse_region_table(rt, regions)
        await self._parse_metadata(md_offset)
        self.bat_entries = bat_entries(self.virtual_disk_size, self.block_size, self.chunk_ratio)
        if self.bat_entries > bat_length // 8:
            raise VhdxInvalid()
        await self._read_bat(bat_length)
        self._check_bat_entries(regions)

    async def _parse_metadata(self, md_offset: int) -> None:
        """vhdx_parse_metadata: the items' values, the geometry checked."""
        items = parse_metadata_table(bytes(await self._pread(md_offset, METADATA_TABLE_MAX_SIZE)))

        async def item(guid: bytes, fmt: str) -> tuple[int, ...]:
            size = struct.calcsize(fmt)
            raw = await self._pread((md_offset + items[guid]) & MASK64, size)
            return struct.unpack(fmt, bytes(raw))

        self.block_size, data_bits = await item(FILE_PARAM_GUID, "<II")
        if data_bits & PARAMS_HAS_PARENT:
            # no parent locator (a table with one is refused above as
            # unsupported): an invalid combination
            raise VhdxInvalid()
        (self.virtual_disk_size,) = await item(VIRTUAL_SIZE_GUID, "<Q")
        (logical_sector_size,) = await item(LOGICAL_SECTOR_GUID, "<I")
        await item(PHYS_SECTOR_GUID, "<I")
        self.chunk_ratio = check_geometry(self.block_size, logical_sector_size)
        self.chunk_bits = self.chunk_ratio.bit_length() - 1
        self.total_sectors = self.virtual_disk_size >> 9

    async def _read_bat(self, bat_length: int) -> None:
        """The BAT's entries as far as the file holds them; the rest read as
        0 (not present), as QEMU's padded read gives them."""
        _check_request(self.bat_offset, bat_length)
        held = max(0, min(self.bat_entries * 8, self.file.length - self.bat_offset)) // 8
        self.bat = array("Q")
        if held:
            self.bat.frombytes(bytes(await self._pread(self.bat_offset, held * 8)))
            if not _LITTLE:
                self.bat.byteswap()
        self._bat_extra: dict[int, int] = {}

    def _check_bat_entries(self, regions: Regions) -> None:
        """vhdx_check_bat_entries at open: a fully present block must lie in
        the file, and (the first ``chunk_ratio`` of every ``chunk_ratio + 1``
        such entries, as QEMU counts them) outside the log, BAT and metadata."""
        file_size = self.file.length
        disk_size = self.total_sectors * SECTOR
        payblocks = self.chunk_ratio
        for i, e in enumerate(self.bat):
            if e & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT:
                continue
            msg = bat_entry_error(i, e, self.block_size, disk_size, file_size)
            if msg is not None:
                error_report(msg)
                raise VhdxInvalid()
            if payblocks:
                payblocks -= 1
                if not regions.check(e & BAT_FILE_OFF_MASK, self.block_size):
                    raise VhdxInvalid()
            else:
                payblocks = self.chunk_ratio

    # -- the log --------------------------------------------------------------------
    async def _parse_log(self) -> None:
        """vhdx_parse_log: replay a valid sequence of log entries, if any."""
        hdr = self.headers[self.cur]
        log = self.log
        if log.offset < LOG_MIN_SIZE or log.offset % LOG_MIN_SIZE or hdr["log_version"] != 0:
            raise VhdxInvalid()
        if hdr["log_guid"] == NULL_GUID or log.length == 0:
            return  # no log to replay
        if log.length % LOG_MIN_SIZE:
            raise VhdxInvalid()
        found = await search(self._log_pread, log, hdr["log_guid"])
        if found is None:
            return
        if self.read_only:
            name = self.file.filename
            raise GenericError(
                f"VHDX image file '{name}' opened read-only, but contains a log that needs "
                f"to be replayed",
                hint=f"To replay the log, run:\nqemu-img check -r all '{name}'")
        await self._log_flush(found.log, found.count)
        self.log_replayed_on_open = True

    async def _log_pread(self, offset: int, length: int) -> bytes:
        return bytes(await self._pread(offset, length))

    async def _log_flush(self, log: Log, count: int) -> None:
        """vhdx_log_flush: write ``count`` entries from ``log.read`` to their
        places in the file, then mark the log empty (the headers lose the
        log GUID).  ``log`` is a copy the caller may keep: its read index
        ends past the entries."""
        await self._user_visible_write()
        reader = LogReader(self._log_pread, self.headers[self.cur]["log_guid"])
        for _ in range(count):
            hdr = await reader.peek_header(log)
            file_length = self.file.length
            if hdr.flushed_file_offset > file_length:
                # the file was truncated since: refuse it
                raise VhdxInvalid()
            hdr, descs, _ = await reader.read_descriptors(log)
            for d in descs:
                if d.signature == b"desc":
                    got = await reader.read_sectors(log, 1)
                    if len(got) != 1:
                        raise VhdxInvalid()
                    data = got[0]
                    hi, lo = struct.unpack_from("<I", data, 4)[0], struct.unpack_from(
                        "<I", data, LOG_SECTOR - 4)[0]
                    if (hi << 32 | lo) != d.sequence_number:
                        raise VhdxInvalid()
                    await self._write_sync(d.file_offset, d.sector(data))
                elif d.zero_length:
                    await self.file.write_zeroes(d.file_offset, d.zero_length)
                    await self.file.flush()
            last = hdr.last_file_offset
            if file_length < last and last % (1 << 20):
                new_size = -(-last // (1 << 20)) << 20
                if new_size > INT64_MAX:
                    raise VhdxInvalid()
                await self._truncate_file(new_size)
        await self.file.flush()
        # vhdx_log_reset: an empty log, whose GUID is zero
        self.log.read = self.log.write = 0
        await self._update_headers_ignoring_errors(NULL_GUID)

    async def _log_write_and_flush(self, offset: int, data: bytes) -> None:
        """vhdx_log_write_and_flush: ``data`` for ``offset`` through the log."""
        await self.file.flush()
        await self._log_write(offset, data)
        logs = replace(self.log)
        await self.file.flush()
        await self._log_flush(logs, 1)
        self.log = logs

    async def _log_write(self, offset: int, data: bytes) -> None:
        """vhdx_log_write: one entry with the 4 KiB sectors ``data`` touches
        (merged with the file's bytes), at the log's write index."""
        if len(data) > self.headers[self.cur]["log_length"]:
            raise VhdxInvalid()
        if self.headers[self.cur]["log_guid"] != NULL_GUID:
            # QEMU flushes the log after every write, so it never appends
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        await self._update_headers_ignoring_errors(new_guid())
        if self.log.sequence == 0:
            self.log.sequence = 1
        sectors = []
        pos = 0
        for at, start, n in split_sectors(offset, data):
            if n == LOG_SECTOR:
                content = data[pos:pos + n]
            else:
                merged = bytearray(await self._pread(at, LOG_SECTOR))
                merged[start:start + n] = data[pos:pos + n]
                content = bytes(merged)
            sectors.append((at, content))
            pos += n
        entry = build_entry(sectors, sequence=self.log.sequence, tail=self.log.tail,
                            log_guid=self.headers[self.cur]["log_guid"],
                            file_length=self.file.length)
        await self._user_visible_write()
        written = 0
        log = self.log
        while written < entry.sector_count:
            nxt = log.inc(log.write)
            if nxt == log.read:
                break  # the log is full
            at = log.offset + log.write
            await self.file.write(at, entry.raw[written * LOG_SECTOR:(written + 1) * LOG_SECTOR])
            log.write = nxt
            written += 1
        if written != entry.sector_count:
            raise VhdxInvalid()
        log.sequence += 1
        log.tail = log.write

    # -- headers --------------------------------------------------------------------
    async def _update_header(self, generate_data_write_guid: bool, log_guid: bytes | None) -> None:
        """vhdx_update_header: the inactive copy gets the next sequence
        number, this session's file-write GUID, maybe a new data-write GUID
        and a log GUID, is written and synced, and becomes current."""
        idx = 1 - self.cur
        inactive: Header = self.headers[idx]
        inactive["sequence_number"] = (self.headers[self.cur]["sequence_number"] + 1) & MASK64
        inactive["file_write_guid"] = self.session_guid
        if generate_data_write_guid:
            inactive["data_write_guid"] = new_guid()
        if log_guid is not None:
            inactive["log_guid"] = log_guid
        await self._write_sync(HEADER1_OFFSET if idx == 0 else HEADER2_OFFSET, inactive.packed())
        self.cur = idx

    async def _update_headers(self, generate_data_write_guid: bool,
                              log_guid: bytes | None) -> None:
        """vhdx_update_headers: both copies, the inactive one first."""
        await self._update_header(generate_data_write_guid, log_guid)
        await self._update_header(generate_data_write_guid, log_guid)

    async def _update_headers_ignoring_errors(self, log_guid: bytes) -> None:
        """The log's header updates, whose failure QEMU does not check (the
        log entry, or the next write, then fails instead)."""
        try:
            await self._update_headers(False, log_guid)
        except OSError:
            pass

    async def _user_visible_write(self) -> None:
        """vhdx_user_visible_write: before the first write of a session the
        headers get a new data-write GUID."""
        if self.first_visible_write:
            self.first_visible_write = False
            await self._update_headers(True, None)
            self._headers_updated = True

    # -- file I/O -------------------------------------------------------------------
    async def _pread(self, offset: int, length: int) -> Buffer:
        """bdrv_pread on the file: -EIO beyond BDRV_MAX_LENGTH, zeroes for the
        part past the end of the file (nothing is read there)."""
        _check_request(offset, length)
        have = max(0, min(length, self.file.length - offset))
        data = await self.file.read(offset, have) if have else b""
        if have == length:
            return data
        return bytes(data) + bytes(length - have)

    async def _write_sync(self, offset: int, data: bytes) -> None:
        """bdrv_pwrite_sync: the write, then a flush of the file."""
        await self.file.write(offset, data)
        await self.file.flush()

    async def _truncate_file(self, size: int) -> None:
        """bdrv_truncate of the file (growing it with zeroes), its errors as
        the errno a request fails with."""
        try:
            await self.file.truncate(size, exact=False)
        except QapiError as e:
            cause = e.__cause__
            raise cause if isinstance(cause, OSError) else _eio() from None

    # -- the BAT --------------------------------------------------------------------
    def _bat_index(self, block: int) -> int:
        """vhdx_block_translate's BAT index (a uint32_t in QEMU)."""
        idx = block & MASK32
        return (idx + (idx >> self.chunk_bits)) & MASK32

    def _entry(self, idx: int) -> int:
        if idx < len(self.bat):
            return self.bat[idx]
        return self._bat_extra.get(idx, 0)

    def _set_entry(self, idx: int, value: int) -> None:
        if idx < len(self.bat):
            self.bat[idx] = value
        else:
            self._bat_extra[idx] = value

    @staticmethod
    def _data_offset(entry: int, in_block: int) -> int:
        """A fully present block's file offset for ``in_block``: QEMU adds
        nothing to a block at file offset 0 (vhdx_block_translate)."""
        base = entry & BAT_FILE_OFF_MASK
        return base + in_block if base else 0

    # -- information ----------------------------------------------------------------
    def info_extra(self) -> dict[str, Any]:
        # vhdx_get_info: the block size; no format-specific information
        return {"cluster-size": self.block_size}

    def _length(self) -> int:
        return self.total_sectors * SECTOR

    # -- requests -------------------------------------------------------------------
    def _host(self, offset: int, length: int) -> int | None:
        """The host offset of a request inside one fully present block that
        the file holds; -1 for a block without data; None otherwise (the
        request goes the long way)."""
        block, in_block = divmod(offset, self.block_size)
        if in_block + length > self.block_size:
            return None
        e = self._entry(self._bat_index(block))
        state = e & BAT_STATE_MASK
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            host = self._data_offset(e, in_block)
            return host if host >= HEADER_SECTION_END and host + length <= self.file.length \
                else None
        return -1 if state in UNALLOCATED_STATES else None

    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        host = self._host(offset, length)
        if host is None:
            return None
        if host < 0:
            return bytearray(length)
        return self.file.read_now(host, length)

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        host = self._host(offset, length)
        if host is None:
            return False
        if host < 0:
            for v in views:
                v[:] = bytes(len(v))
            return True
        return self.file.read_into_now(host, views)

    def _write_host(self, offset: int, length: int) -> int | None:
        """Where a write may go straight to the file: inside one fully
        present block, once the session's header update is done (QEMU's
        writes wait for it on s->lock)."""
        if not self._headers_updated:
            return None
        host = self._host(offset, length)
        return host if host is not None and host >= 0 else None

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        host = self._write_host(offset, len(mv))
        return host is not None and self.file.write_now(host, mv)

    # requests handed to the file's I/O engine without a task (node.py)
    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        host = self._host(offset, length)
        return host is not None and host >= 0 and self.file.read_submit(host, length, done)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        host = self._write_host(offset, len(mv))
        return host is not None and self.file.write_submit(host, mv, done)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        out = bytearray(length)
        done = 0
        while done < length:
            pos = offset + done
            block, in_block = divmod(pos, self.block_size)
            n = min(length - done, self.block_size - in_block)
            e = self._entry(self._bat_index(block))
            state = e & BAT_STATE_MASK
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                out[done:done + n] = await self._pread(self._data_offset(e, in_block), n)
            elif state not in UNALLOCATED_STATES:
                raise _eio()  # partially present (differencing) or unknown
            done += n
        return out

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        async with self._lock:
            await self._user_visible_write()
        length = len(data)
        done = 0
        while done < length:
            pos = offset + done
            block, in_block = divmod(pos, self.block_size)
            n = min(length - done, self.block_size - in_block)
            await self._write_block(block, in_block, data[done:done + n])
            done += n
        if fua:
            await self.file.flush()

    async def _write_block(self, block: int, in_block: int, piece: memoryview) -> None:
        """One block's part of vhdx_co_writev."""
        async with self._lock:
            idx = self._bat_index(block)
            old = self._entry(idx)
            state = old & BAT_STATE_MASK
            if state in UNALLOCATED_STATES:
                base = await self._allocate_block()
                new = base | PAYLOAD_BLOCK_FULLY_PRESENT
                self._set_entry(idx, new)
                host = base + in_block
            elif state == PAYLOAD_BLOCK_FULLY_PRESENT:
                new = None
                host = self._data_offset(old, in_block)
            else:
                raise _eio()
            if host < HEADER_SECTION_END:
                # a block in the header section: refused (-EFAULT)
                if new is not None:
                    self._set_entry(idx, old)
                raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        try:
            await self.file.write(host, piece)
        except BaseException:
            if new is not None:
                self._set_entry(idx, old)
            raise
        if new is not None:
            async with self._lock:
                await self._log_write_and_flush(self.bat_offset + idx * 8, struct.pack("<Q", new))

    async def _allocate_block(self) -> int:
        """vhdx_allocate_block: a new block at the end of the file rounded up
        to 1 MiB; the file grows past it (with zeroes)."""
        at = -(-self.file.length // (1 << 20)) << 20
        if at > INT64_MAX:
            raise VhdxInvalid()
        await self._truncate_file(at + self.block_size)
        return at
