"""Compressed clusters: raw deflate (QEMU's "zlib", window 2**12, no header) and zstd.

Compressed data is followed by whatever shares its last sector, so decoding
stops once a whole cluster has come out.
"""

from __future__ import annotations

import zlib

import zstandard

from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


class CompressionError(Exception):
    """Compressed data that does not decode to a whole cluster."""


def decompress(data: bytes | bytearray | memoryview, cluster_size: int, ctype: int) -> bytes:
    """One cluster of output from ``data``; raises CompressionError when short/bad."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(bytes(data), cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            # QEMU writes one frame per cluster; stop at the frame's end
            out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(data))
        else:
            raise CompressionError(f"unknown compression type {ctype}")
    except (zlib.error, ValueError, zstandard.ZstdError) as e:
        raise CompressionError(str(e)) from e
    if len(out) < cluster_size:
        raise CompressionError("short compressed cluster")
    return out[:cluster_size]


def compress(data: bytes | memoryview, ctype: int) -> bytes:
    """Compressed form of one cluster (may be longer than the input)."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(bytes(data)) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(data))
    raise CompressionError(f"unknown compression type {ctype}")
