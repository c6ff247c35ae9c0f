"""Parallels images with a Format Extension, written from its specification
(QEMU's docs/interop/parallels.txt, "Format Extension"), since qemu-img
cannot make one: the extension cluster (magic 0xAB234CEF23DCEA87, the MD5 of
the rest of the cluster, features up to the end marker) and dirty bitmap
features (disk size in sectors, a 16-byte id, granularity in sectors, an L1
table of 64-bit entries: 0 a clear cluster of the serialized bitmap, 1 a
set one, else the sector where the cluster is stored).

The serialized bitmap is one bit per granule, in 64-bit little-endian
words; a model of it here is the set of dirty granule numbers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

EXT_MAGIC = 0xAB234CEF23DCEA87
BITMAP_MAGIC = 0x20385FAE252CB34A
SECTOR = 512


def geometry(img: Path) -> tuple[int, int]:
    """The image's cluster size in bytes and disk size in sectors."""
    head = img.read_bytes()[:64]
    return struct.unpack_from("<I", head, 28)[0] * SECTOR, struct.unpack_from("<Q", head, 36)[0]


def feature(magic: int, data: bytes = b"", *, flags: int = 0,
            data_size: int | None = None) -> bytes:
    """A feature: its header, then ``data`` padded to 8 bytes
    (``data_size`` overrides the size the header gives)."""
    size = len(data) if data_size is None else data_size
    return struct.pack("<QQII", magic, flags, size, 0) + data + bytes(-len(data) % 8)


def append_clusters(img: Path, clusters: list[bytes]) -> list[int]:
    """Each of ``clusters`` (zero-padded to a cluster) at the end of the
    file, which is first rounded up to a whole cluster; their sectors."""
    cs, _ = geometry(img)
    b = bytearray(img.read_bytes())
    b += bytes(-len(b) % cs)
    where = []
    for c in clusters:
        where.append(len(b) // SECTOR)
        b += c + bytes(cs - len(c))
    img.write_bytes(b)
    return where


def serialized(dirty: set[int], granules: int) -> bytes:
    """The bitmap with ``dirty`` granules set, as QEMU serializes it."""
    words = -(-granules // 64)
    v = sum(1 << g for g in dirty)
    return v.to_bytes(words * 8, "little")


def bitmap_feature(img: Path, uid: bytes, granularity: int, dirty: set[int], *,
                   l1: list[int] | None = None, size: int | None = None) -> bytes:
    """A dirty bitmap feature for ``img``: granularity in sectors, the
    ``dirty`` granules set; its clusters that are neither all clear nor all
    set appended to the file.  ``l1`` and ``size`` (sectors) override what
    the feature says."""
    cs, sectors = geometry(img)
    granules = -(-sectors // granularity) if granularity else 0
    bits = serialized(dirty, granules)
    entries: list[int] = []
    stored: list[tuple[int, bytes]] = []
    for i in range(0, len(bits), cs):
        part = bits[i:i + cs]
        if not any(part):
            entries.append(0)
        elif part == b"\xff" * len(part):
            entries.append(1)
        else:
            entries.append(-1)
            stored.append((len(entries) - 1, part))
    for (i, _), sector in zip(stored, append_clusters(img, [p for _, p in stored]),
                              strict=True):
        entries[i] = sector
    if l1 is not None:
        entries = l1
    data = struct.pack("<Q16sII", sectors if size is None else size, uid, granularity,
                       len(entries)) + struct.pack(f"<{len(entries)}Q", *entries)
    return feature(BITMAP_MAGIC, data)


def add_extension(img: Path, features: bytes, *, magic: int = EXT_MAGIC,
                  corrupt: bool = False) -> None:
    """The Format Extension cluster holding ``features`` (then zeroes, which
    read as the end marker) at the end of the file, and the header's
    ``ext_off`` pointing at it; ``corrupt`` spoils the checksum."""
    cs, _ = geometry(img)
    body = features + bytes(cs - 24 - len(features))
    cluster = bytearray(struct.pack("<Q", magic) + hashlib.md5(body).digest() + body)
    if corrupt:
        cluster[100] ^= 1
    (at,) = append_clusters(img, [bytes(cluster)])
    b = bytearray(img.read_bytes())
    struct.pack_into("<Q", b, 56, at)
    img.write_bytes(b)


def set_ext_off(img: Path, sectors: int) -> None:
    """Point the header's ``ext_off`` at ``sectors``."""
    b = bytearray(img.read_bytes())
    struct.pack_into("<Q", b, 56, sectors)
    img.write_bytes(b)


U1 = bytes.fromhex("123456781234567890abcdef01234567")
U2 = bytes.fromhex("00000000000000000000000000000001")
NAME1, NAME2 = "12345678-1234-5678-90ab-cdef01234567", "00000000-0000-0000-0000-000000000001"


def two_bitmaps(img: Path) -> dict[str, tuple[int, set[int]]]:
    """Two bitmaps in ``img`` (an image of 4 MiB + 512 bytes, 8193 sectors,
    in 512-byte clusters): NAME1 at 64 KiB granules in one stored cluster,
    NAME2 at one sector per granule over three clusters (all set, stored,
    all clear).  Their granularity in bytes and dirty granules."""
    d1 = {0, 3, 64}  # 64: the last granule, which the disk ends inside
    d2 = set(range(4096)) | {4097, 5000, 5001, 5002}
    add_extension(img, bitmap_feature(img, U1, 128, d1) + bitmap_feature(img, U2, 1, d2))
    return {NAME1: (65536, d1), NAME2: (512, d2)}


def model_extents(gran: int, dirty: set[int], size: int) -> list[tuple[int, int]]:
    """The dirty byte ranges of a disk of ``size`` bytes whose ``dirty``
    granules of ``gran`` bytes are set, merged."""
    out: list[tuple[int, int]] = []
    for g in sorted(dirty):
        start, end = g * gran, min((g + 1) * gran, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out
