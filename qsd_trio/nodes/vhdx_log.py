"""The VHDX metadata log (MS-VHDX's log), as QEMU 7.2's block/vhdx-log.c.

The log is a circular buffer of 4 KiB sectors in the file, at the header's
``log_offset`` for ``log_length`` bytes, whose entries are valid only
while the current header's ``log_guid`` is theirs.  An entry is a 64-byte
header ("loge", CRC-32C of the whole entry, length, tail, sequence number,
descriptor count, log GUID, flushed and last file offsets) with 32-byte
descriptors after it, filling whole sectors, then one data sector per data
descriptor.  A data descriptor ("desc") names a 4 KiB-aligned file offset
and holds the first 8 and the last 4 bytes of the sector to write there;
its data sector ("data") holds the 4084 bytes between and the sequence
number split around them.  A zero descriptor ("zero") zeroes a length.

This module reads entries (:class:`LogReader`, :func:`search`,
:func:`read_descriptors`) and builds them (:func:`build_entry`); the node
replays and writes them (``vhdx.VhdxNode``), since both take its header
updates and its file.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from .vhdx_format import VhdxInvalid, checksum, with_checksum

LOG_SECTOR = 4096
_ENTRY = struct.Struct("<4sIIIQII16sQQ")
_DESC = struct.Struct("<4sI8sQQ")
_DATA = struct.Struct("<4sI4084sI")
assert _ENTRY.size == 64 and _DESC.size == 32 and _DATA.size == LOG_SECTOR
DESCS_PER_SECTOR = LOG_SECTOR // _DESC.size

Pread = Callable[[int, int], Awaitable[bytes]]


@dataclass
class EntryHeader:
    """VHDXLogEntryHeader."""

    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> EntryHeader:
        return cls(*_ENTRY.unpack_from(raw))

    def pack(self) -> bytes:
        return _ENTRY.pack(self.signature, self.checksum, self.entry_length, self.tail,
                           self.sequence_number, self.descriptor_count, self.reserved,
                           self.log_guid, self.flushed_file_offset, self.last_file_offset)


@dataclass
class Descriptor:
    """VHDXLogDescriptor: a data descriptor's ``trailing``/``leading`` are
    the last 4 and first 8 bytes of its sector; a zero descriptor's
    ``leading`` is its zero length (little-endian)."""

    signature: bytes
    trailing: int
    leading: bytes
    file_offset: int
    sequence_number: int

    @property
    def zero_length(self) -> int:
        return int.from_bytes(self.leading, "little")

    def sector(self, data: bytes) -> bytes:
        """vhdx_log_flush_desc: the 4 KiB a data descriptor writes, from its
        data sector ``data``."""
        return self.leading + data[8:LOG_SECTOR - 4] + struct.pack("<I", self.trailing)


@dataclass
class Log:
    """VHDXLogEntries: where the log is, the read and write indexes into it
    (byte offsets, whole sectors), the tail and the next sequence number."""

    offset: int
    length: int
    read: int = 0
    write: int = 0
    tail: int = 0
    sequence: int = 0

    def inc(self, idx: int) -> int:
        """vhdx_log_inc_idx: the next sector, wrapping at the end."""
        idx += LOG_SECTOR
        return 0 if idx >= self.length else idx


@dataclass
class Sequence:
    """VHDXLogSequence: ``count`` entries from ``log.read`` to ``log.write``,
    the first one's header in ``hdr``."""

    log: Log
    count: int
    hdr: EntryHeader


def desc_sectors(count: int) -> int:
    """vhdx_compute_desc_sectors: the entry header takes two descriptors' room."""
    return -(-(count + 2) // DESCS_PER_SECTOR)


def header_is_valid(log: Log, hdr: EntryHeader, log_guid: bytes) -> bool:
    """vhdx_log_hdr_is_valid against the current header's log GUID."""
    return (hdr.signature == b"loge" and hdr.entry_length <= log.length
            and hdr.entry_length % LOG_SECTOR == 0 and hdr.sequence_number != 0
            and hdr.log_guid == log_guid
            and hdr.descriptor_count * _DESC.size <= hdr.entry_length)


def descriptor_is_valid(desc: Descriptor, hdr: EntryHeader) -> bool:
    """vhdx_log_desc_is_valid."""
    if desc.sequence_number != hdr.sequence_number or desc.file_offset % LOG_SECTOR:
        return False
    if desc.signature == b"zero":
        return desc.zero_length % LOG_SECTOR == 0
    return desc.signature == b"desc"


class LogReader:
    """Reads the log's sectors for one pass over it; with ``cached_log`` (the
    log's region) it keeps a window of it, so that the search, which looks
    at every sector, reads the log in large pieces (nothing writes to it
    meanwhile), never beyond the region."""

    WINDOW = 1 << 20

    def __init__(self, pread: Pread, log_guid: bytes, *, cached_log: Log | None = None):
        self.pread = pread
        self.log_guid = log_guid
        self.end = cached_log.offset + cached_log.length if cached_log else None
        self._at = -1
        self._buf = b""

    async def read(self, offset: int, length: int) -> bytes:
        if self.end is None:
            return await self.pread(offset, length)
        if not (self._at <= offset and offset + length <= self._at + len(self._buf)):
            self._at = offset
            self._buf = await self.pread(offset, max(length, min(self.WINDOW, self.end - offset)))
        return self._buf[offset - self._at:offset - self._at + length]

    async def peek_header(self, log: Log) -> EntryHeader:
        """vhdx_log_peek_hdr: the entry header at the read index."""
        read = log.read
        if read + _ENTRY.size > log.length:
            read = 0
        if read == log.write:
            raise VhdxInvalid()
        return EntryHeader.unpack(await self.read(log.offset + read, _ENTRY.size))

    async def read_sectors(self, log: Log, count: int) -> list[bytes]:
        """vhdx_log_read_sectors: up to ``count`` sectors from the read
        index, stopping at the write index; the read index moves past them."""
        out = []
        while count and log.read != log.write:
            out.append(await self.read(log.offset + log.read, LOG_SECTOR))
            log.read = log.inc(log.read)
            count -= 1
        return out

    async def read_descriptors(self, log: Log) -> tuple[EntryHeader, list[Descriptor], bytes]:
        """vhdx_log_read_desc: the entry header at the read index, its
        descriptors (each must be valid) and the raw descriptor sectors;
        the read index moves past them."""
        hdr = await self.peek_header(log)
        if not header_is_valid(log, hdr, self.log_guid):
            raise VhdxInvalid()
        n = desc_sectors(hdr.descriptor_count)
        sectors = await self.read_sectors(log, n)
        if len(sectors) != n:
            raise VhdxInvalid()
        raw = b"".join(sectors)
        descs = [Descriptor(*_DESC.unpack_from(raw, _ENTRY.size + i * _DESC.size))
                 for i in range(hdr.descriptor_count)]
        if not all(descriptor_is_valid(d, hdr) for d in descs):
            raise VhdxInvalid()
        return hdr, descs, raw

    async def validate_entry(self, log: Log, seq: int) -> EntryHeader | None:
        """vhdx_validate_log_entry: the entry at the read index if it is
        valid (and, with ``seq``, numbered ``seq + 1``), its checksum
        covering every sector; the read index moves one sector on past
        an invalid header, or past the entry's sectors read otherwise."""
        hdr = await self.peek_header(log)
        if not header_is_valid(log, hdr, self.log_guid) or (
                seq > 0 and hdr.sequence_number != seq + 1):
            log.read = log.inc(log.read)
            return None
        n = desc_sectors(hdr.descriptor_count)
        _, _, raw = await self.read_descriptors(log)
        parts = [raw]
        for _ in range(max(0, hdr.entry_length // LOG_SECTOR - n)):
            got = await self.read_sectors(log, 1)
            if not got:
                return None
            parts.append(got[0])
        whole = b"".join(parts)
        return hdr if checksum(whole, 4) == hdr.checksum else None


async def search(pread: Pread, log: Log, log_guid: bytes) -> Sequence | None:
    """vhdx_log_search: the whole log, sector by sector, for runs of valid
    entries; the run whose first entry has the highest sequence number, or
    None.  ``log.sequence`` becomes the number after it."""
    reader = LogReader(pread, log_guid, cached_log=log)
    curr = replace(log, read=0, write=log.length)  # as if full
    candidate: Sequence | None = None
    while True:
        curr_seq = 0
        tail = curr.read
        hdr = await reader.validate_entry(curr, curr_seq)
        current = None
        if hdr is not None:
            current = Sequence(replace(curr, read=tail, write=curr.read), 1, hdr)
            while True:
                nxt = await reader.validate_entry(curr, curr_seq)
                if nxt is None:
                    break
                current.log.write = curr.read
                current.count += 1
                curr_seq = nxt.sequence_number
        if current is not None and (
                candidate is None or current.hdr.sequence_number > candidate.hdr.sequence_number):
            candidate = current
        if curr.read < tail:
            break
    if candidate is not None:
        log.sequence = candidate.hdr.sequence_number + 1
    return candidate


@dataclass
class Entry:
    """A log entry as vhdx_log_write builds it: the bytes to write to the
    log and the 4 KiB sectors it carries, by file offset."""

    raw: bytes
    sectors: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def sector_count(self) -> int:
        return len(self.raw) // LOG_SECTOR


def split_sectors(offset: int, data: bytes) -> list[tuple[int, int, int]]:
    """vhdx_log_write's cut of ``data`` at ``offset`` into 4 KiB sectors:
    (file offset of the sector, where the data starts in it, how many bytes
    of it are data).  A partial first or last sector is merged with what
    the file holds."""
    out = []
    in_sector = offset % LOG_SECTOR
    at = offset - in_sector
    length = len(data)
    lead = 0
    if in_sector:
        lead = min(LOG_SECTOR - in_sector, length)
        out.append((at, in_sector, lead))
        at += LOG_SECTOR
    rest = length - lead
    for _ in range(rest // LOG_SECTOR):
        out.append((at, 0, LOG_SECTOR))
        at += LOG_SECTOR
    if rest % LOG_SECTOR:
        out.append((at, 0, rest % LOG_SECTOR))
    return out


def build_entry(sectors: list[tuple[int, bytes]], *, sequence: int, tail: int,
                log_guid: bytes, file_length: int) -> Entry:
    """vhdx_log_write's entry for whole 4 KiB ``sectors`` (file offset,
    content): one data descriptor and data sector each, the flushed and
    last file offsets the file's length, the checksum over all of it."""
    n = desc_sectors(len(sectors))
    hdr = EntryHeader(b"loge", 0, (n + len(sectors)) * LOG_SECTOR, tail, sequence,
                      len(sectors), 0, log_guid, file_length, file_length)
    descs = bytearray(n * LOG_SECTOR)
    descs[:_ENTRY.size] = hdr.pack()
    data = bytearray()
    hi, lo = sequence >> 32, sequence & 0xFFFFFFFF
    for i, (file_offset, content) in enumerate(sectors):
        _DESC.pack_into(descs, _ENTRY.size + i * _DESC.size, b"desc",
                        struct.unpack_from("<I", content, LOG_SECTOR - 4)[0], content[:8],
                        file_offset, sequence)
        data += _DATA.pack(b"data", hi, content[8:LOG_SECTOR - 4], lo)
    raw = with_checksum(bytes(descs) + bytes(data), 4)
    return Entry(raw, sectors)
