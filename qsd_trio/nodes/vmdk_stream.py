"""streamOptimized VMDK: compressed grains and the footer, as QEMU 7.2's
block/vmdk.c (vmdk_read_extent, vmdk_write_extent, the footer part of
vmdk_open_vmdk4).

A compressed extent stores each grain as a *grain marker* (the grain's
first guest sector, u64; the size of what follows, u32) and a zlib stream
of the grain; the table entry gives the marker's sector.  QEMU reads two
grains' worth at that sector (a marker and a grain that did not compress
may take more than one), inflates at most one grain and refuses (EINVAL) a
marker of size 0 or beyond those two grains, a stream that does not end or
inflates to more than a grain, or a request past what it inflated to.

QEMU writes a grain only once, whole (or the image's last, partial one):
compressed with zlib's default level behind a marker, at
``next_cluster_sector``, which then moves to the sector after it, so
grains are packed sector by sector.  A write into a grain already written
fails with EIO ("Could not write to allocated cluster for
streamOptimized"); a partial grain with EINVAL.

An image whose header has the grain directory "at the end" (VMware's
streams) gives its real header in the footer, 1536 bytes before the end of
the file: a footer marker, the magic and the header, and an end-of-stream
marker.
"""

from __future__ import annotations

import struct
import zlib

from ..qapi.errors import GenericError
from .node import BlockNode
from .vmdk_extent import (
    SECTOR,
    U64,
    VMDK4_MAGIC,
    Extent,
    Vmdk4Header,
    einval,
    pread,
)

MARKER_END_OF_STREAM = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3
GRAIN_MARKER = struct.Struct("<QI")  # VmdkGrainMarker: lba, size
_MARKER = struct.Struct("<QII")  # a metadata marker: val, size, type


async def footer_header(file: BlockNode) -> Vmdk4Header:
    """The header in the footer of ``file`` (QEMU's bs->file: for an extent
    of a descriptor file it reads the descriptor's length)."""
    at = -(-file.length // SECTOR) * SECTOR - 1536
    try:
        raw = bytes(await pread(file, at & U64, 1536))
    except OSError as e:
        raise GenericError(f"Failed to read footer: {e.strerror}") from None
    _val, fsize, ftype = _MARKER.unpack_from(raw, 0)
    eval_, esize, etype = _MARKER.unpack_from(raw, 1024)
    if (raw[512:516] != VMDK4_MAGIC or fsize != 0 or ftype != MARKER_FOOTER
            or eval_ != 0 or esize != 0 or etype != MARKER_END_OF_STREAM):
        raise GenericError("Invalid footer")
    return Vmdk4Header(raw[516:516 + Vmdk4Header.STRUCT.size])


def inflate(data: bytes | memoryview, limit: int) -> bytes | None:
    """zlib's uncompress() into ``limit`` bytes: the data, or None where it
    would not return Z_OK (a bad or unfinished stream, too much output)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error:
        return None
    return out if d.eof else None


def grain_first(ext: Extent) -> int:
    """How much of a compressed grain to read first: a marker and a grain
    that did not compress (zlib's stored blocks add a few bytes)."""
    return min(ext.cluster_bytes * 2, ext.cluster_bytes + SECTOR)


def grain_span(ext: Extent, head: memoryview) -> int:
    """How many bytes from a compressed grain's start hold its stream, as
    far as the two grains QEMU reads there go; EINVAL for a bad marker."""
    cb = ext.cluster_bytes
    if not ext.has_marker:
        return cb
    size: int = GRAIN_MARKER.unpack_from(head, 0)[1]
    if not size or size > cb * 2:
        raise einval()
    return min(GRAIN_MARKER.size + size, cb * 2)


def grain_slice(ext: Extent, grain: memoryview, in_cluster: int, n: int) -> bytes:
    """``n`` bytes at ``in_cluster`` of the grain stored in ``grain`` (its
    marker, if any, and stream: grain_span's bytes); EINVAL if it does not
    inflate to that much."""
    data = grain[GRAIN_MARKER.size:] if ext.has_marker else grain
    out = inflate(data, ext.cluster_bytes)
    if out is None or in_cluster + n > len(out):
        raise einval()
    return out[in_cluster:in_cluster + n]


async def read_grain(ext: Extent, cluster_offset: int, in_cluster: int, n: int) -> bytes:
    """vmdk_read_extent for a compressed extent: ``n`` bytes at
    ``in_cluster`` of the grain whose marker is at ``cluster_offset``.

    QEMU reads two grains' worth there; this reads grain_first's bytes, and
    the rest of what the marker says only if it says more."""
    first = grain_first(ext)
    ext.file.debug_event("read_compressed")
    buf = memoryview(await pread(ext.file, cluster_offset, first))
    end = grain_span(ext, buf)
    if end > first:
        rest = await pread(ext.file, cluster_offset + first, end - first)
        buf = memoryview(bytes(buf) + bytes(rest))
    return grain_slice(ext, buf[:end], in_cluster, n)


def grain_record(ext: Extent, in_cluster: int, piece: bytes | bytearray | memoryview,
                 offset: int) -> bytes:
    """What vmdk_write_extent writes for a compressed extent: the marker and
    the compressed grain for the write of ``piece`` at guest ``offset``;
    EINVAL for a partial grain (but the image's last) or no markers."""
    n = len(piece)
    cb = ext.cluster_bytes
    if in_cluster or n > cb or (n < cb and offset + n != ext.end_sector * SECTOR):
        raise einval()
    if not ext.has_marker:
        raise einval()
    payload = zlib.compress(bytes(piece))
    if len(payload) > cb * 2:
        raise einval()
    return GRAIN_MARKER.pack(offset >> 9, len(payload)) + payload
