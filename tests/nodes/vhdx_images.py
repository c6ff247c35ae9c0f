"""VHDX images for the vhdx tests, made and changed without the driver under
test: qemu-img and qemu-io make them, and the helpers here patch bytes with
the checksums made right again, write log entries, and mask what differs
between two correct images (random GUIDs and what covers them)."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import crc32c

from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20
HEADERS = (0x10000, 0x20000)
REGION_TABLES = (0x30000, 0x40000)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
LOG_SECTOR = 4096


def make_image(path: Path, size: int, *opts: str) -> None:
    qemu_img("create", "-q", "-f", "vhdx", *(("-o", ",".join(opts)) if opts else ()),
             str(path), str(size))


def convert(raw: Path, path: Path, *opts: str) -> None:
    qemu_img("convert", "-f", "raw", "-O", "vhdx", *(("-o", ",".join(opts)) if opts else ()),
             str(raw), str(path))


def crc(buf: bytes | bytearray, at: int = 4) -> int:
    """The CRC-32C of ``buf`` with its checksum field (at ``at``) as zero."""
    b = bytearray(buf)
    b[at:at + 4] = bytes(4)
    return crc32c.crc32c(bytes(b))


def fix_checksum(b: bytearray, start: int, size: int) -> None:
    b[start + 4:start + 8] = struct.pack("<I", crc(b[start:start + size]))


def patch(path: Path, changes: list[tuple[int, bytes]], *, fix: str | None = None) -> None:
    """Write each (offset, bytes); ``fix`` "headers" or "region" recomputes
    the checksums of both headers or of the first region table."""
    b = bytearray(path.read_bytes())
    for offset, data in changes:
        b[offset:offset + len(data)] = data
    if fix == "headers":
        for at in HEADERS:
            fix_checksum(b, at, 4096)
    elif fix == "region":
        fix_checksum(b, REGION_TABLES[0], 0x10000)
    path.write_bytes(bytes(b))


def current_header(b: bytes) -> int:
    """The offset of the header with the higher sequence number."""
    seqs = [struct.unpack_from("<Q", b, at + 8)[0] for at in HEADERS]
    return HEADERS[seqs.index(max(seqs))]


def bat_offset(b: bytes) -> int:
    count = struct.unpack_from("<I", b, REGION_TABLES[0] + 8)[0]
    for i in range(count):
        guid, offset = struct.unpack_from("<16sQ", b, REGION_TABLES[0] + 16 + 32 * i)
        if guid == BAT_GUID:
            return int(offset)
    raise AssertionError("no BAT region")


def bat(b: bytes, n: int) -> list[int]:
    return list(struct.unpack_from(f"<{n}Q", b, bat_offset(b)))


def normalise(data: bytes, *, created: bool = False) -> bytes:
    """Mask what two correct images differ in by chance: the headers'
    checksums and random file-write and data-write GUIDs, whether each
    header names a log (not which log GUID), and each log entry's GUID,
    checksum and the unused end of its descriptor sectors.  ``created``: also the creator (it names the QEMU version),
    the headers' random first sequence number and the page-83 GUID."""
    b = bytearray(data)
    for at in HEADERS:
        b[at + 4:at + 8] = bytes(4)
        b[at + 16:at + 48] = bytes(32)
        if b[at + 48:at + 64] != bytes(16):
            b[at + 48:at + 64] = b"G" * 16
        log_length, log_offset = struct.unpack_from("<IQ", data, at + 68)
        for s in range(log_offset, min(len(b), log_offset + log_length), LOG_SECTOR):
            if b[s:s + 4] == b"loge":
                b[s + 4:s + 8] = bytes(4)
                b[s + 32:s + 48] = bytes(16)
                # QEMU leaves the rest of the descriptor sectors as its
                # buffer held them (qemu_blockalign, not zeroed)
                count = struct.unpack_from("<I", data, s + 24)[0]
                end = s + -(-(count + 2) // 128) * LOG_SECTOR
                b[s + 64 + 32 * count:end] = bytes(end - s - 64 - 32 * count)
    if created:
        b[8:8 + 512] = bytes(512)
        for at in HEADERS:
            b[at + 8:at + 16] = bytes(8)
        md = struct.unpack_from("<Q", data, REGION_TABLES[0] + 48 + 16)[0]
        # the page-83 item is the third of QEMU's five, 16 bytes at 64 KiB + 16
        b[md + 0x10000 + 16:md + 0x10000 + 32] = bytes(16)
    return bytes(b)


def blkdebug_json(path: Path, sector: int) -> str:
    """A vhdx node over blkdebug over ``path`` whose first write touching
    ``sector`` fails (EIO), as qemu-io and qemu-img take it."""
    return "json:" + json.dumps({
        "driver": "vhdx", "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "pwritev", "iotype": "write", "sector": sector,
                              "once": True}],
            "image": {"driver": "file", "filename": str(path)}}})


def make_dirty(path: Path, writes: list[str]) -> None:
    """QEMU's own dirty log: qemu-io's allocating writes, the last of which
    fails where the log's BAT sector is written in place, so the header
    still names a log holding that entry."""
    for w in writes[:-1]:
        qemu_io("-f", "vhdx", "-c", w, str(path))
    bat_sector = bat_offset(path.read_bytes()) // 512
    r = qemu_io("-c", writes[-1], blkdebug_json(path, bat_sector), check=False)
    assert "write failed: Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr


def log_entry(sequence: int, guid: bytes, *, data: list[tuple[int, bytes]] = (),
              zero: list[tuple[int, int]] = (), tail: int = 0, flushed: int = 0,
              last: int = 0) -> bytes:
    """One log entry, written from MS-VHDX's layout: data descriptors for
    (file offset, 4 KiB) and zero descriptors for (file offset, length)."""
    count = len(data) + len(zero)
    desc_sectors = -(-(count + 2) // 128)
    length = (desc_sectors + len(data)) * LOG_SECTOR
    head = bytearray(desc_sectors * LOG_SECTOR)
    struct.pack_into("<4sIIIQII16sQQ", head, 0, b"loge", 0, length, tail, sequence, count, 0,
                     guid, flushed, last)
    sectors = bytearray()
    at = 64
    for offset, content in data:
        assert len(content) == LOG_SECTOR
        struct.pack_into("<4sI8sQQ", head, at, b"desc", struct.unpack_from("<I", content, 4092)[0],
                         content[:8], offset, sequence)
        sectors += struct.pack("<4sI", b"data", sequence >> 32) + content[8:4092] + \
            struct.pack("<I", sequence & 0xFFFFFFFF)
        at += 32
    for offset, n in zero:
        struct.pack_into("<4sIQQQ", head, at, b"zero", 0, n, offset, sequence)
        at += 32
    entry = bytearray(head + sectors)
    fix_checksum(entry, 0, len(entry))
    return bytes(entry)


def set_log(path: Path, guid: bytes, entries: list[tuple[int, bytes]]) -> None:
    """Name log ``guid`` in both headers and put ``entries`` (offset in the
    log, bytes; an entry may wrap at the log's end) into the log."""
    b = bytearray(path.read_bytes())
    log_length, log_offset = struct.unpack_from("<IQ", b, HEADERS[0] + 68)
    for at in HEADERS:
        b[at + 48:at + 64] = guid
        fix_checksum(b, at, 4096)
    for pos, entry in entries:
        for i in range(0, len(entry), LOG_SECTOR):
            s = (pos + i) % log_length
            b[log_offset + s:log_offset + s + LOG_SECTOR] = entry[i:i + LOG_SECTOR]
    path.write_bytes(bytes(b))
