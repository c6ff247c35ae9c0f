"""The ``blklogwrites`` filter (BlockdevOptionsBlklogwrites, QEMU 7.2's
block/blklogwrites.c): every write, zero write, discard and flush that
reaches ``file`` is also appended to ``log``, in the format of Linux's
dm-log-writes target as QEMU writes it, so that a test can replay the
writes up to any flush and check what a crash there would have left.

The log (all fields little-endian), in log sectors of ``log-sector-size``
bytes (default 512):

- sector 0, the superblock: magic ``0x6a736677736872``, version 1, the
  number of entries, the sector size (u64, u64, u64, u32), then zeroes;
- from sector 1, the entries: each is one sector holding sector, number of
  sectors (both in log sectors), flags and data_len (u64 each; QEMU leaves
  data_len 0), then for a write its data, whole sectors.  A zero write is
  logged as a write of zeroes, a discard (flag 4) and a flush (flag 1; sector
  and count 0) carry no data.  QEMU never sets FUA (flag 2) or MARK (8).

The superblock is written (and the log flushed) after a flush entry and
after every ``log-super-update-interval`` entries (default 4096); a log
that was never flushed has none.  ``log-append=on`` continues an existing
log: it reads the superblock (an empty log counts as one with no entries)
and walks the entries to find the end.

What QEMU's block layer does around the driver is done here, so that the
same requests give the same log: requests are whole log sectors (the node's
request alignment; an unaligned write reads the sectors around it first,
and an unaligned zero write becomes data writes of its partial sectors
around a zero write of the rest, as bdrv_co_do_zero_pwritev); FUA is not
passed down but emulated with a flush after the write, and a flush logs an
entry only when something was written since the last flush (QEMU's
write_gen and flushed_gen), so a FUA write logs the flush of the writes
before it.  The file request is made first, then the log entry, even when
the file request failed; the log's error wins.

Two things differ from QEMU on purpose: a discard not aligned to the log
sector size is narrowed to the whole sectors inside it (QEMU 7.2 fails an
assertion and aborts), and the log space of a zero write's data is taken
together with its entry's (QEMU takes it once the entry is written, which
lets a concurrent request's entry land between the two).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..qapi.errors import GenericError
from .filter import FileFilter
from .graph import BDRV_MAX_LENGTH, register_driver
from .node import BdrvChild, Buffer, Perm, json_filename
from .perms import filter_perms, storage_perms

LOG_FLUSH_FLAG = 1
LOG_FUA_FLAG = 2
LOG_DISCARD_FLAG = 4
LOG_MARK_FLAG = 8
LOG_FLAG_MASK = LOG_FLUSH_FLAG | LOG_FUA_FLAG | LOG_DISCARD_FLAG | LOG_MARK_FLAG
WRITE_LOG_VERSION = 1
WRITE_LOG_MAGIC = 0x6A736677736872
SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len
U64 = (1 << 64) - 1
# the options bdrv_refresh_filename keeps in a json: file name, in QEMU's order
STRONG_OPTIONS = ("log-append", "log-sector-size")


def sector_size_valid(size: int) -> bool:
    """blk_log_writes_sector_size_valid: a power of two that holds the
    superblock and an entry, below 16 MiB."""
    return size > 0 and not size & (size - 1) and size >= ENTRY.size and size < 1 << 24


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


@register_driver
class BlklogwritesNode(FileFilter):
    driver = "blklogwrites"

    async def open(self, options: dict[str, Any]) -> None:
        self.file = await self.open_child(options, "file")
        self.log = await self.open_child(options, "log")
        if options.get("log-append", False):
            if "log-sector-size" in options:
                raise GenericError("log-append and log-sector-size are mutually exclusive")
            size, self.cur_sector, self.nr_entries = await self._find_log_end()
        else:
            size = options.get("log-sector-size", 512)
            self.cur_sector, self.nr_entries = 1, 0
        if not sector_size_valid(size):
            raise GenericError(f"Invalid log sector size {size}")
        self.sector_size = size
        self.sector_bits = size.bit_length() - 1
        self.update_interval = options.get("log-super-update-interval", 4096)
        if not self.update_interval:
            raise GenericError("Invalid log superblock update interval 0")
        self.request_alignment = size  # blk_log_writes_refresh_limits
        # QEMU's write_gen and flushed_gen of this node
        self._write_gen = self._flushed_gen = 0
        self._flush_lock = trio.Lock()
        # the generic layer's serialised padding of unaligned requests
        self._rmw_lock = trio.Lock()

    async def _log_read(self, offset: int, length: int) -> bytes:
        """Read the log as QEMU's bdrv_pread does: what lies past its end
        reads as zeroes."""
        end = min(offset + length, self.log.node.length)
        got = bytes(await self.log.node.read(offset, end - offset)) if end > offset else b""
        return got + bytes(length - len(got))

    async def _find_log_end(self) -> tuple[int, int, int]:
        """log-append: the superblock's sector size, and the sector after the
        last entry and the number of entries
        (blk_log_writes_find_cur_log_sector)."""
        if self.log.node.length == 0:
            magic, version, count, size = WRITE_LOG_MAGIC, WRITE_LOG_VERSION, 0, 512
        else:
            try:
                raw = await self._log_read(0, SUPER.size)
            except OSError as e:
                raise GenericError(f"Could not read log superblock: {e.strerror}") from None
            magic, version, count, size = SUPER.unpack(raw)
        if magic != WRITE_LOG_MAGIC:
            raise GenericError("Invalid log superblock magic")
        if version != WRITE_LOG_VERSION:
            raise GenericError(f"Unsupported log version {version}")
        if not sector_size_valid(size):
            return size, 1, 0  # refused by the caller, as QEMU
        bits = size.bit_length() - 1
        cur, idx = 1, 0
        log_end = self.log.node.length
        while idx < count:
            pos = cur << bits
            if pos >= log_end:
                # every entry from here reads as zeroes: one empty sector
                # each.  Counted at once, not read one by one, so that an
                # absurd count in a damaged superblock cannot hang the open
                fail_at = max(0, (BDRV_MAX_LENGTH - ENTRY.size) // size + 1 - cur)
                if fail_at < count - idx:
                    raise GenericError(f"Failed to read log entry {idx + fail_at}: "
                                       "Input/output error")
                cur = (cur + count - idx) & U64
                break
            try:
                _sector, nr_sectors, flags, _len = ENTRY.unpack(
                    await self._log_read(pos, ENTRY.size))
            except OSError as e:
                raise GenericError(f"Failed to read log entry {idx}: {e.strerror}") from None
            if flags & ~LOG_FLAG_MASK:
                raise GenericError(f"Invalid flags 0x{flags:x} in log entry {idx}")
            cur += 1
            if not flags & LOG_DISCARD_FLAG:
                cur = (cur + nr_sectors) & U64
            idx += 1
        return size, cur, count

    # -- graph and information ---------------------------------------------------------
    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # bdrv_default_perms: ``file`` is filtered, ``log`` is metadata
        if edge.name == "log":
            return storage_perms(perm, shared, writable=not self.read_only, data=False)
        return filter_perms(perm, shared)

    def full_open_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver}
        for key in STRONG_OPTIONS:
            if key in self.options:
                opts[key] = self.options[key]
        opts["file"] = self.file.node.full_open_options()
        opts["log"] = self.log.node.full_open_options()
        return opts

    @property
    def filename(self) -> str:
        # two children: QEMU can only spell the node out
        return json_filename(self.full_open_options())

    # -- the log -----------------------------------------------------------------------
    async def _logged(self, offset: int, length: int, flags: int,
                      file_op: Callable[[], Awaitable[None]],
                      data: Buffer | None = None, zero: bool = False) -> None:
        """blk_log_writes_co_log: ``file_op``, then its log entry (with
        ``data``, or ``length`` zeroes for a zero write); the log's error
        first, else the file's."""
        file_error: OSError | None = None
        try:
            await file_op()
        except OSError as e:
            file_error = e
        await self._append(offset, length, flags, data, zero)
        if file_error is not None:
            raise file_error

    async def _append(self, offset: int, length: int, flags: int, data: Buffer | None,
                      zero: bool) -> None:
        """blk_log_writes_co_do_log: the entry and its data at the end of
        the log; the superblock after a flush and every update interval."""
        ss, bits = self.sector_size, self.sector_bits
        payload = len(data) if data is not None else 0
        pos = self.cur_sector << bits
        self.nr_entries += 1
        self.cur_sector += _align_up(ss + payload, ss) >> bits
        zero_pos = self.cur_sector << bits
        if zero:
            self.cur_sector += _align_up(length, ss) >> bits
        buf = bytearray(ss + payload)
        ENTRY.pack_into(buf, 0, (offset >> bits) & U64, length >> bits, flags, 0)
        if data is not None:
            buf[ss:] = data
        await self.log.node.write(pos, buf)
        if zero and length:
            await self.log.node.write_zeroes(zero_pos, length)
        if flags & LOG_FLUSH_FLAG or self.nr_entries % self.update_interval == 0:
            sb = bytearray(ss)
            SUPER.pack_into(sb, 0, WRITE_LOG_MAGIC, WRITE_LOG_VERSION, self.nr_entries, ss)
            await self.log.node.write(0, sb)
            await self.log.node.flush()

    # -- requests ----------------------------------------------------------------------
    async def _pad(self, start: int, end: int) -> bytearray:
        """The log sectors from ``start`` to ``end`` as they are now, for a
        request that covers only part of the first or the last
        (bdrv_padding_rmw_read reads only those two)."""
        ss = self.sector_size
        buf = bytearray(end - start)
        buf[:ss] = await self.file.node.read(start, ss)
        if end - start > ss:
            buf[-ss:] = await self.file.node.read(end - ss, ss)
        return buf

    async def _write_sectors(self, offset: int, data: Buffer, fua: bool) -> None:
        """One aligned write as bdrv_aligned_pwritev makes it: logged, FUA
        emulated with a flush (before this write counts as written, so the
        flush logs an entry only for earlier writes), then counted."""
        try:
            await self._logged(offset, len(data), 0,
                               lambda: self.file.node.write(offset, data), data)
            if fua:
                await self.flush()
        finally:
            self._write_gen += 1

    async def _zero_sectors(self, offset: int, length: int, fua: bool) -> None:
        """One aligned zero write: the file's zero write (QEMU passes none of
        its flags: unmap and no-fallback stop here), logged as zeroes."""
        try:
            await self._logged(offset, length, 0,
                               lambda: self.file.node.write_zeroes(offset, length), zero=True)
            if fua:
                await self.flush()
        finally:
            self._write_gen += 1

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        ss = self.sector_size
        end = offset + len(data)
        if not offset % ss and not end % ss:
            await self._write_sectors(offset, data, fua)
            return
        start = offset - offset % ss
        async with self._rmw_lock:
            buf = await self._pad(start, _align_up(end, ss))
            buf[offset - start:end - start] = data
            await self._write_sectors(start, buf, fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        ss = self.sector_size
        head, end = offset % ss, offset + length
        if not head and not end % ss:
            await self._zero_sectors(offset, length, fua)
            return
        # bdrv_co_do_zero_pwritev: the partial sectors are written as data
        start, stop = offset - head, _align_up(end, ss)
        async with self._rmw_lock:
            span = stop - start
            if span == ss or (span == 2 * ss and head and end % ss):
                # one padding buffer covers it all: one data write
                buf = await self._pad(start, stop)
                buf[head:head + length] = bytes(length)
                await self._write_sectors(start, buf, fua)
                return
            if head:
                buf = await self._pad(start, start + ss)
                buf[head:] = bytes(ss - head)
                await self._write_sectors(start, buf, fua)
                offset = start + ss
            middle = (end - offset) // ss * ss
            if middle:
                await self._zero_sectors(offset, middle, fua)
                offset += middle
            if offset < end:
                buf = await self._pad(offset, offset + ss)
                buf[:end - offset] = bytes(end - offset)
                await self._write_sectors(offset, buf, fua)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        ss = self.sector_size
        start, stop = _align_up(offset, ss), (offset + length) // ss * ss
        try:
            if stop > start:
                await self._logged(start, stop - start, LOG_DISCARD_FLAG,
                                   lambda: self.file.node.discard(start, stop - start))
        finally:
            self._write_gen += 1

    async def _co_flush(self) -> None:
        """bdrv_co_flush: the driver's flush (a flush entry) only when
        something was written since the last one; else the children alone.
        Flushes run one at a time."""
        async with self._flush_lock:
            gen = self._write_gen
            if gen != self._flushed_gen:
                await self._logged(0, 0, LOG_FLUSH_FLAG, self.file.node.flush)
            else:
                await self.file.node.flush()
                await self.log.node.flush()
            self._flushed_gen = gen
