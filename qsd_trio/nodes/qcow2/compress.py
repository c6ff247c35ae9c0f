"""Compressed clusters: raw deflate (QEMU's "zlib", window 2**12, no header) and zstd.

Compressed data is followed by whatever shares its last sector, so decoding
stops once a whole cluster has come out.
"""

from __future__ import annotations

import zlib

from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:
    import zstandard
except ImportError:  # pragma: no cover - zstandard is a dependency
    zstandard = None


class CompressionError(Exception):
    pass


def decompress(data: bytes | memoryview, cluster_size: int, ctype: int) -> bytes:
    """One cluster of output from ``data``; raises CompressionError when short/bad."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(bytes(data), cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            if zstandard is None:
                raise CompressionError("zstd support is not available")
            # QEMU writes one frame per cluster; stop at the frame's end
            out = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(data))
        else:
            raise CompressionError(f"unknown compression type {ctype}")
    except (zlib.error, ValueError) as e:
        raise CompressionError(str(e)) from e
    except Exception as e:
        if zstandard is not None and isinstance(e, zstandard.ZstdError):
            raise CompressionError(str(e)) from e
        raise
    if len(out) < cluster_size:
        raise CompressionError("short compressed cluster")
    return out[:cluster_size]


def compress(data: bytes | memoryview, ctype: int) -> bytes:
    """Compressed form of one cluster (may be longer than the input)."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(bytes(data)) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        if zstandard is None:
            raise CompressionError("zstd support is not available")
        return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(data))
    raise CompressionError(f"unknown compression type {ctype}")
