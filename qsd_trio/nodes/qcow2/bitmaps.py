"""Persistent dirty bitmaps: the bitmaps header extension (qcow2.rst, "Bitmaps").

Loaded at open into the node's in-memory :class:`DirtyBitmap` objects; when
the image is opened read-write they are flagged ``in_use`` on disk (as QEMU
does) so that a crash leaves them marked inconsistent rather than stale.  At
close the persistent ones are written anew (data clusters, bitmap tables, a
new directory), the header is pointed at the new directory, and only then are
the old clusters freed.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import attrs

from ...qapi.cstr import c_bytes
from ...qapi.errors import GenericError
from . import overlap
from .header import AUTOCLEAR_BITMAPS, EXT_BITMAPS
from .l2 import pack_table, unpack_table

if TYPE_CHECKING:
    from .driver import Qcow2Node

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
EXT = struct.Struct(">IIQQ")
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00


@attrs.define
class DirEntry:
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes

    def pack(self) -> bytes:
        nb = c_bytes(self.name)
        b = ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                       self.granularity_bits, len(nb), len(self.extra)) + self.extra + nb
        return b + bytes(-len(b) % 8)


def info(entry: DirEntry) -> dict[str, Any]:
    """Qcow2BitmapInfo of a stored bitmap (query-named-block-nodes,
    qemu-img info): its flags in QEMU's order."""
    flags = [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
             if entry.flags & bit]
    return {"name": entry.name, "granularity": 1 << entry.granularity_bits, "flags": flags}


def parse_directory(buf: bytes | bytearray | memoryview, count: int) -> list[DirEntry]:
    out: list[DirEntry] = []
    pos = 0
    for _ in range(count):
        to, ts, flags, typ, gb, nl, el = ENTRY.unpack_from(buf, pos)
        pos += ENTRY.size
        extra = bytes(buf[pos:pos + el])
        pos += el
        name = bytes(buf[pos:pos + nl]).decode("utf-8", "surrogateescape")
        pos += nl
        pos += -pos % 8
        out.append(DirEntry(to, ts, flags, typ, gb, name, extra))
    return out


async def load(node: Qcow2Node) -> None:
    """Read the bitmaps extension into ``node.bitmaps``; flag them in use when writable."""
    node.qcow2_bitmaps = []
    ext = node.h.ext(EXT_BITMAPS)
    if ext is None or not node.h.autoclear_features & AUTOCLEAR_BITMAPS or len(ext) < EXT.size:
        return
    nb, _, dsize, doff = EXT.unpack_from(ext)
    if not nb:
        return
    entries = parse_directory(await node.file.read(doff, dsize), nb)
    node.qcow2_bitmaps = entries
    cs = node.cs
    for e in entries:
        gran = 1 << e.granularity_bits
        bm = node.add_bitmap(e.name, gran, persistent=True, enabled=bool(e.flags & FLAG_AUTO))
        if e.flags & FLAG_IN_USE:
            bm.inconsistent = True
            continue
        table = unpack_table(await node.file.read(e.table_offset, e.table_size * 8)) \
            if e.table_size else []
        data = bytearray(len(bm.bits))
        for i, te in enumerate(table):
            at = i * cs
            if at >= len(data):
                break
            n = min(cs, len(data) - at)
            off = te & TABLE_OFFSET_MASK
            if off:
                data[at:at + n] = (await node.file.read(off, cs))[:n]
            elif te & 1:
                data[at:at + n] = b"\xff" * n
        bm.load_bytes(bytes(data))
        bm.resize(node.size)  # clears bits past the end
        if node.read_only:
            bm.readonly = True
    if not node.read_only:
        await mark_in_use(node)


async def mark_in_use(node: Qcow2Node) -> None:
    """Flag the stored bitmaps in use on disk, before anything is written
    that they would have to record: a crash then leaves them marked
    inconsistent rather than stale (at open read-write, and on reopen)."""
    entries = node.qcow2_bitmaps
    ext = node.h.ext(EXT_BITMAPS)
    if not entries or ext is None:
        return
    _, _, _, doff = EXT.unpack_from(ext)
    for e in entries:
        e.flags |= FLAG_IN_USE
    blob = b"".join(e.pack() for e in entries)
    # rewritten in place: the directory itself is not an overlap (QEMU's in_place)
    await node._overlap_check(overlap.BITMAP_DIRECTORY, doff, len(blob))
    await node.file.write(doff, blob)
    await node.file.flush()


def check_new(node: Qcow2Node, name: str, granularity: int) -> None:
    """qcow2_co_can_store_new_dirty_bitmap, with QEMU's messages."""
    if node.read_only:
        raise GenericError(f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
                           "Cannot store dirty bitmaps in a read-only node")
    if node.h.version < 3:
        raise GenericError(f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
                           "Cannot store dirty bitmaps in qcow2 v2 files")
    if len(c_bytes(name)) > 1023:
        raise GenericError("Bitmap name too long")


async def store(node: Qcow2Node) -> None:
    """Write every persistent bitmap and a new directory; free the old ones."""
    old = node.qcow2_bitmaps
    persistent = [bm for bm in node.bitmaps.values() if bm.persistent]
    if not old and not persistent:
        return
    cs = node.cs
    entries = []
    for bm in persistent:
        name = bm.name
        if name is None:  # persistent bitmaps are named (block-dirty-bitmap-add)
            continue
        data = bm.to_bytes()
        nclusters = -(-len(data) // cs) if data else 0
        table = [0] * nclusters
        for i in range(nclusters):
            chunk = data[i * cs:(i + 1) * cs]
            if chunk.count(0) == len(chunk):
                continue  # all-zero clusters are not stored
            off = await node.refs.alloc(1)
            await node._overlap_check(0, off, cs)
            await node.file.write(off, chunk.ljust(cs, b"\0"))
            table[i] = off
        toff = 0
        if table:
            from array import array
            toff = await node.refs.alloc(-(-len(table) * 8 // cs))
            await node._overlap_check(0, toff, len(table) * 8)
            await node.file.write(toff, pack_table(array("Q", table)))
        flags = FLAG_AUTO if bm.enabled else 0
        entries.append(DirEntry(toff, len(table), flags, 1, bm.shift, name, b""))
    doff, blob = 0, b"".join(e.pack() for e in entries)
    if entries:
        doff = await node.refs.alloc(-(-len(blob) // cs))
        await node._overlap_check(0, doff, len(blob))
        await node.file.write(doff, blob)
    await node.refs.write_dirty()
    await node.file.flush()
    old_ext = node.h.ext(EXT_BITMAPS)
    if entries:
        node.h.set_ext(EXT_BITMAPS, EXT.pack(len(entries), 0, len(blob), doff))
        node.h.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        node.h.set_ext(EXT_BITMAPS, None)
        node.h.autoclear_features &= ~AUTOCLEAR_BITMAPS
    await node.rewrite_header()
    node.qcow2_bitmaps = entries
    # the old bitmaps' clusters are unreferenced now
    if old_ext is not None and old:
        _, _, odsize, odoff = EXT.unpack_from(old_ext)
        for e in old:
            if e.table_size:
                t = unpack_table(await node.file.read(e.table_offset, e.table_size * 8))
                for te in t:
                    if te & TABLE_OFFSET_MASK:
                        await node.refs.update((te & TABLE_OFFSET_MASK) >> node.cb, -1)
                first = e.table_offset >> node.cb
                for c in range(first, first + -(-e.table_size * 8 // cs)):
                    await node.refs.update(c, -1)
        first = odoff >> node.cb
        for c in range(first, first + -(-odsize // cs)):
            await node.refs.update(c, -1)
    await node.refs.write_dirty()
    await node.file.flush()
