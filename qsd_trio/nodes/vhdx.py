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
import sys
from dataclasses import replace
from typing import Any

import trio

from ..qapi.errors import GenericError, QapiError, error_report
from .graph import BDRV_MAX_LENGTH, register_driver
from .node import WriteDone
from .table_format import ZEROES, Table, TableFormatNode, check_request, eio, pieces
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
_LITTLE = sys.byteorder == "little"
# a BAT entry's low byte -> 1 if its state is FULLY_PRESENT, else 0
_FULLY_PRESENT = bytes(int(b & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT) for b in range(256))


@register_driver
class VhdxNode(TableFormatNode):
    """A vhdx image over its ``file`` child.  Resources: the child, which
    the graph releases; the node holds no task or descriptor of its own."""

    driver = "vhdx"

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
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
        if bytes(await self.pread(0, 8)) != FILE_SIGNATURE:
            raise VhdxInvalid()
        self.headers, self.cur = parse_headers(bytes(await self.pread(HEADER1_OFFSET, HEADER_SIZE)),
                                               bytes(await self.pread(HEADER2_OFFSET, HEADER_SIZE)))
        hdr = self.headers[self.cur]
        regions = Regions()
        regions.register(hdr["log_offset"], hdr["log_length"])
        self.log = Log(hdr["log_offset"], hdr["log_length"])
        await self._parse_log()

        rt = bytes(await self.pread(REGION_TABLE_OFFSET, HEADER_BLOCK_SIZE))
        (self.bat_offset, bat_length), (md_offset, _) = parse_region_table(rt, regions)
        await self._parse_metadata(md_offset)
        self.bat_entries = bat_entries(self.virtual_disk_size, self.block_size, self.chunk_ratio)
        if self.bat_entries > bat_length // 8:
            raise VhdxInvalid()
        self._check_bat_entries(regions, await self._read_bat(bat_length))

    async def _parse_metadata(self, md_offset: int) -> None:
        """vhdx_parse_metadata: the items' values, the geometry checked."""
        items = parse_metadata_table(bytes(await self.pread(md_offset, METADATA_TABLE_MAX_SIZE)))

        async def item(guid: bytes, fmt: str) -> tuple[int, ...]:
            size = struct.calcsize(fmt)
            raw = await self.pread((md_offset + items[guid]) & MASK64, size)
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

    async def _read_bat(self, bat_length: int) -> bytes:
        """The BAT (QEMU reads its whole region, whose size must pass
        bdrv_check_request32); entries past the end of the file read as 0,
        not present.  Returns each entry's low byte."""
        check_request(self.bat_offset, bat_length)
        self.bat: Table = await self.load_table(self.bat_offset, self.bat_entries, "<Q")
        return bytes(memoryview(self.bat).cast("B")[0 if _LITTLE else 7::8])

    def _check_bat_entries(self, regions: Regions, low: bytes) -> None:
        """vhdx_check_bat_entries at open: a fully present block must lie in
        the file, and (the first ``chunk_ratio`` of every ``chunk_ratio + 1``
        such entries, as QEMU counts them) outside the log, BAT and metadata.
        ``low``, the entries' low bytes, says which are fully present without
        a look at every entry."""
        file_size = self.file.length
        disk_size = self.total_sectors * SECTOR
        payblocks = self.chunk_ratio
        present = low.translate(_FULLY_PRESENT)
        i = present.find(1)
        while i >= 0:
            e = self.bat[i]
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
            i = present.find(1, i + 1)

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
        return bytes(await self.pread(offset, length))

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
                    await self.pwrite_sync(d.file_offset, d.sector(data))
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
                merged = bytearray(await self.pread(at, LOG_SECTOR))
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
        await self.pwrite_sync(HEADER1_OFFSET if idx == 0 else HEADER2_OFFSET, inactive.packed())
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
    async def _truncate_file(self, size: int) -> None:
        """bdrv_truncate of the file (growing it with zeroes), its errors as
        the errno a request fails with."""
        try:
            await self.file.truncate(size, exact=False)
        except QapiError as e:
            cause = e.__cause__
            raise cause if isinstance(cause, OSError) else eio() from None

    # -- the BAT --------------------------------------------------------------------
    def _bat_index(self, block: int) -> int:
        """vhdx_block_translate's BAT index: a uint32_t in QEMU, which a disk
        of more than 2**32 blocks (its block count wraps in QEMU's 32-bit
        arithmetic) takes beyond its BAT, past QEMU's memory: EIO here."""
        idx = block & MASK32
        idx = (idx + (idx >> self.chunk_bits)) & MASK32
        if idx >= self.bat_entries:
            raise eio()
        return idx

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
    def _extent(self, pos: int, length: int) -> tuple[int, int]:
        """vhdx_block_translate: a fully present block's data in the file (a
        block at file offset 0 read from the file's start, as QEMU reads it),
        zeroes for a block without data, EIO for a partially present
        (differencing) block or an unknown state; at most to the block's end."""
        block, in_block = divmod(pos, self.block_size)
        n = min(length, self.block_size - in_block)
        e = self.bat[self._bat_index(block)]
        state = e & BAT_STATE_MASK
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            return self._data_offset(e, in_block), n
        if state in UNALLOCATED_STATES:
            return ZEROES, n
        raise eio()

    def _host(self, offset: int, length: int) -> int | None:
        """:meth:`_extent` for the paths without a task, inline (they serve
        most 4 KiB requests): a block QEMU fails (EIO), or a block at file
        offset 0, goes the coroutine path, which reports or reads it."""
        bs = self.block_size
        block, in_block = divmod(offset, bs)
        if in_block + length > bs:
            return None
        idx = block + (block >> self.chunk_bits)
        if idx >= self.bat_entries or block > MASK32:
            return None
        e = self.bat[idx]
        state = e & BAT_STATE_MASK
        if state == PAYLOAD_BLOCK_FULLY_PRESENT:
            base = e & BAT_FILE_OFF_MASK
            host = base + in_block
            return host if base and host + length <= self.file.length else None
        return ZEROES if state in UNALLOCATED_STATES else None

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
        present block past the header section, once the session's header
        update is done (QEMU's writes wait for it on s->lock)."""
        if not self._headers_updated:
            return None
        host = self._host(offset, length)
        return host if host is not None and host >= HEADER_SECTION_END else None

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        host = self._write_host(offset, len(mv))
        return host is not None and self.file.write_now(host, mv)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        host = self._write_host(offset, len(mv))
        return host is not None and self.file.write_submit(host, mv, done)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        async with self._lock:
            await self._user_visible_write()
        for done, pos, n in pieces(offset, len(data), self.block_size):
            block, in_block = divmod(pos, self.block_size)
            await self._write_block(block, in_block, data[done:done + n])
        if fua:
            await self.file.flush()

    async def _write_block(self, block: int, in_block: int, piece: memoryview) -> None:
        """One block's part of vhdx_co_writev."""
        async with self._lock:
            idx = self._bat_index(block)
            old = self.bat[idx]
            state = old & BAT_STATE_MASK
            if state in UNALLOCATED_STATES:
                base = await self._allocate_block()
                new = base | PAYLOAD_BLOCK_FULLY_PRESENT
                self.bat[idx] = new
                host = base + in_block
            elif state == PAYLOAD_BLOCK_FULLY_PRESENT:
                new = None
                host = self._data_offset(old, in_block)
            else:
                raise eio()
            if host < HEADER_SECTION_END:
                # a block in the header section: refused (-EFAULT)
                if new is not None:
                    self.bat[idx] = old
                raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        try:
            await self.file.write(host, piece)
        except BaseException:
            if new is not None:
                self.bat[idx] = old
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
