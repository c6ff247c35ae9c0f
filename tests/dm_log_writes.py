"""A reader of the write logs QEMU's blklogwrites filter keeps (the format of
Linux's dm-log-writes target), and a replay of them against a model.

QEMU has no reader; this one follows the format as QEMU 7.2 writes it,
independently of qsd-trio's writer: a superblock in sector 0 (magic, version,
number of entries, sector size: little-endian u64, u64, u64, u32), then from
sector 1 one sector per entry (sector, number of sectors, flags, data length:
u64 each; sectors counted in log sectors) followed by the data of a write in
whole sectors.  Discards (flag 4) and flushes (flag 1) carry no data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8


@dataclass(frozen=True)
class Entry:
    sector: int
    nr_sectors: int
    flags: int
    data: bytes  # b"" for a discard or a flush


@dataclass(frozen=True)
class Log:
    sector_size: int
    entries: list[Entry]  # as many as the superblock counts


def parse(log: bytes) -> Log:
    """The superblock and the entries it counts; fails on anything that is
    not a log as QEMU writes it."""
    magic, version, count, ss = struct.unpack_from("<QQQI", log, 0)
    assert magic == MAGIC and version == 1, (hex(magic), version)
    assert ss >= 32 and not ss & (ss - 1), ss
    assert log[28:ss] == bytes(ss - 28), "superblock sector not zero-padded"
    entries = []
    pos = ss
    for i in range(count):
        sector, nr, flags, data_len = struct.unpack_from("<QQQQ", log, pos)
        assert not flags & ~(FLUSH | FUA | DISCARD | MARK), (i, flags)
        assert data_len == 0, (i, data_len)  # QEMU never fills it in
        assert log[pos + 32:pos + ss] == bytes(ss - 32), f"entry {i} not zero-padded"
        pos += ss
        n = 0 if flags & (DISCARD | FLUSH) else nr * ss
        data = log[pos:pos + n]
        assert len(data) == n, f"entry {i}: log ends inside its data"
        if flags & FLUSH:
            assert (sector, nr) == (0, 0), i
        entries.append(Entry(sector, nr, flags, data))
        pos += n
    return Log(ss, entries)


def replay(log: Log, image: bytearray, *, flushes: int | None = None) -> bytearray:
    """Apply the logged writes and discards (as zeroes) to ``image`` in
    order; with ``flushes``, stop at that many flush entries (what a crash
    right after that flush would have left)."""
    seen = 0
    for e in log.entries:
        if e.flags & FLUSH:
            seen += 1
            if flushes is not None and seen == flushes:
                break
            continue
        start, n = e.sector * log.sector_size, e.nr_sectors * log.sector_size
        if start + n > len(image):
            image.extend(bytes(start + n - len(image)))
        image[start:start + n] = bytes(n) if e.flags & DISCARD else e.data
    return image


def marks(log: Log) -> list[tuple[str, int, int]]:
    """The entries as ("write" | "discard" | "flush", sector, sectors)."""
    kind = {FLUSH: "flush", DISCARD: "discard", 0: "write"}
    return [(kind[e.flags], e.sector, e.nr_sectors) for e in log.entries]
