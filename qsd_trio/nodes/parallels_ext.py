"""The parallels Format Extension and its dirty bitmaps, as QEMU 7.2's
block/parallels-ext.c (docs/interop/parallels.txt, "Format Extension").

The header's ``ext_off`` (in sectors) points at one cluster: a magic, the
MD5 of the rest of the cluster, then features, each a 24-byte header
(magic, flags, data size, padding) and its data padded to 8 bytes, up to
the end marker (magic 0).  QEMU knows one feature, dirty bitmaps: the disk
size in sectors, a 16-byte id (the bitmap's name is its UUID form), the
granularity in sectors, and an L1 table with one 64-bit entry per cluster
of the serialized bitmap (the bits of 64-bit little-endian words, one per
granule): 0 all clear, 1 all set, else the sector where that cluster is.

parallels.c reads the extension only when it opens the image read-only (a
read-write open warns and ignores it).  The bitmaps it loads are enabled,
read-only and not persistent: query-named-block-nodes and query-block list
them, an NBD export can serve them (``qemu:dirty-bitmap:NAME``), a merge can
read them; clearing or removing them fails.

QEMU reads past the cluster where its count of the bytes left forgets the
features' data, and asserts on a granularity that is no power of two of at
least 512 bytes or an ``ext_off`` whose byte offset wraps to zero or below;
qsd-trio refuses such images instead, with the errors QEMU gives for the
same conditions elsewhere (docs/formats.md).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from typing import TYPE_CHECKING

from ..qapi.errors import GenericError
from .table_format import SECTOR, eio

if TYPE_CHECKING:
    from .parallels import ParallelsNode

FORMAT_EXTENSION_MAGIC = 0xAB234CEF23DCEA87
END_OF_FEATURES_MAGIC = 0
DIRTY_BITMAP_FEATURE_MAGIC = 0x20385FAE252CB34A
_EXT_HEADER = struct.Struct("<Q16s")     # magic, check_sum (MD5)
_FEATURE = struct.Struct("<QQII")        # magic, flags, data_size, unused
_BITMAP = struct.Struct("<Q16sII")       # size (sectors), id, granularity (sectors), l1_size
_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """A uint64_t as C's int64_t takes it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


class _Bitmap:
    """A dirty bitmap the extension describes: its name, granularity in
    bytes and serialized bits, before it joins the node."""

    def __init__(self, name: str, granularity: int, bits: bytes) -> None:
        self.name = name
        self.granularity = granularity
        self.bits = bits


async def load_format_extension(node: ParallelsNode, ext_off: int) -> None:
    """parallels_read_format_extension for the header's ``ext_off`` (in
    sectors): check the cluster, then give ``node`` its dirty bitmaps (all
    or none).  Raises GenericError with QEMU's messages."""
    cs = node.tracks * SECTOR
    offset = _int64(ext_off << 9)
    try:
        if offset <= 0:  # QEMU asserts ext_off > 0; a read there fails
            raise eio()
        buf = bytes(await node.pread(offset, cs))
    except OSError as e:
        raise GenericError(f"Failed to read Format Extension cluster: {e.strerror}") from None
    magic, check_sum = _EXT_HEADER.unpack_from(buf)
    if magic != FORMAT_EXTENSION_MAGIC:
        raise GenericError(f"Wrong parallels Format Extension magic: {magic:#x}, "
                           f"expected: {FORMAT_EXTENSION_MAGIC:#x}")
    if hashlib.md5(buf[_EXT_HEADER.size:]).digest() != check_sum:
        raise GenericError("Wrong checksum in Format Extension header. Format "
                           "extension is corrupted.")
    pos = _EXT_HEADER.size
    # QEMU's count of the bytes left: it drops only the feature headers
    remaining = cs - pos
    bitmaps: list[_Bitmap] = []
    while True:
        if remaining < _FEATURE.size or pos + _FEATURE.size > cs:
            left = min(remaining, max(cs - pos, 0))
            raise GenericError(f"Can not read feature header, as remaining bytes ({left}) in "
                               f"Format Extension is less than Feature header size "
                               f"({_FEATURE.size})")
        fmagic, flags, data_size, _ = _FEATURE.unpack_from(buf, pos)
        pos += _FEATURE.size
        remaining -= _FEATURE.size
        if flags:
            raise GenericError("Flags for extension feature are unsupported")
        if data_size > remaining or pos + data_size > cs:
            raise GenericError("Feature data_size exceedes Format Extension cluster")
        if fmagic == END_OF_FEATURES_MAGIC:
            break
        if fmagic != DIRTY_BITMAP_FEATURE_MAGIC:
            raise GenericError(f"Unknown feature: {fmagic:#x}")
        bitmaps.append(await _load_bitmap(node, buf[pos:pos + data_size], cs,
                                          {b.name for b in bitmaps}))
        pos = -(-(pos + data_size) // 8) * 8
    for b in bitmaps:
        d = node.add_bitmap(b.name, b.granularity)
        d.load_bytes(b.bits)
        d.resize(node.length)  # drops what the last word holds past the end
        d.readonly = True  # bdrv_dirty_bitmap_set_readonly


async def _load_bitmap(node: ParallelsNode, data: bytes, cs: int, names: set[str]) -> _Bitmap:
    """parallels_load_bitmap and parallels_load_bitmap_data: the bitmap
    ``data`` (a feature's data) describes, with its bits read from the
    file; ``names`` are the bitmaps the extension gave before it."""
    if len(data) < _BITMAP.size:
        raise GenericError(f"Too small Bitmap Feature area in Parallels Format Extension: "
                           f"{len(data)} bytes, expected at least {_BITMAP.size} bytes")
    size, uid, granularity, l1_size = _BITMAP.unpack_from(data)
    granularity = (granularity << 9) & 0xFFFFFFFF  # a uint32_t in QEMU
    if size != node.total_sectors:
        raise GenericError(f"Bitmap size (in sectors) {_int64(size)} differs from disk size "
                           f"in sectors {node.total_sectors}")
    if l1_size * 8 > len(data) - _BITMAP.size:
        raise GenericError("Bitmaps feature corrupted: l1 table exceeds extension data_size")
    if granularity < SECTOR or granularity & (granularity - 1):
        # QEMU asserts this in bdrv_create_dirty_bitmap; the rule and the
        # words are block-dirty-bitmap-add's
        raise GenericError("Granularity must be power of 2, and at least 512")
    name = str(uuid.UUID(bytes=uid))  # qemu_uuid_unparse
    if name in names:
        raise GenericError(f"Bitmap already exists: {name}")
    # the bitmap serialized: whole 64-bit words, one bit per granule
    disk = node.length
    granules = -(-disk // granularity)
    serialized = -(-granules // 64) * 8
    expected = -(-serialized // cs)
    if l1_size != expected:
        raise GenericError(f"Bitmap table size {l1_size} does not correspond to bitmap size "
                           f"and cluster size. Expected {expected}")
    bits = bytearray(serialized)
    for i, entry in enumerate(struct.unpack_from(f"<{l1_size}Q", data, _BITMAP.size)):
        at = i * cs
        n = min(cs, serialized - at)
        if entry == 1:
            bits[at:at + n] = b"\xff" * n
        elif entry:
            try:
                cluster = await node.pread(_int64(entry << 9), cs)
            except OSError as e:
                raise GenericError(f"Failed to read bitmap data cluster: {e.strerror}") from None
            bits[at:at + n] = cluster[:n]
    return _Bitmap(name, granularity, bytes(bits))
