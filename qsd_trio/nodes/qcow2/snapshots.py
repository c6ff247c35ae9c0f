"""Internal snapshots (qcow2.rst, "Snapshots"): the table, create and delete.

Creating a snapshot copies the active L1 table and adds one reference to
every L2 table and data cluster it reaches; the active tables lose their
COPIED flags, so the next write to any of them copies first.  Deleting drops
those references again and gives COPIED back to whatever is left with a
refcount of one.  Both run under the driver's metadata lock, after a
writeback, and write the new snapshot table before the header points at it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ...qapi.cstr import c_bytes
from ...qapi.errors import GenericError
from .header import Header
from .l2 import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    L2Table,
    compressed_extent,
    pack_table,
    unpack_table,
)

if TYPE_CHECKING:
    from .driver import Qcow2Node

ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes


@attrs.define
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes  # kept verbatim (vm state size, disk size, icount, unknown fields)
    disk_size: int | None = None
    icount: int | None = None

    def info(self) -> dict[str, Any]:
        """SnapshotInfo as query-named-block-nodes shows it."""
        d: dict[str, Any] = {
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount is not None and self.icount != 0xFFFFFFFFFFFFFFFF:
            d["icount"] = self.icount
        return d

    def pack(self) -> bytes:
        idb, nb = c_bytes(self.id), c_bytes(self.name)
        b = ENTRY.pack(self.l1_table_offset, self.l1_size, len(idb), len(nb), self.date_sec,
                       self.date_nsec, self.vm_clock_nsec,
                       min(self.vm_state_size, 0xFFFFFFFF), len(self.extra))
        b += self.extra + idb + nb
        return b + bytes(-len(b) % 8)


def parse_table(buf: bytes, count: int) -> list[Snapshot]:
    out = []
    pos = 0
    for _ in range(count):
        (l1o, l1s, idl, nl, ds, dns, vmc, vms, exl) = ENTRY.unpack_from(buf, pos)
        pos += ENTRY.size
        extra = buf[pos:pos + exl]
        pos += exl
        sid = buf[pos:pos + idl].decode("utf-8", "surrogateescape")
        pos += idl
        name = buf[pos:pos + nl].decode("utf-8", "surrogateescape")
        pos += nl
        pos += -pos % 8
        s = Snapshot(l1o, l1s, sid, name, ds, dns, vmc, vms, bytes(extra))
        if exl >= 8:
            s.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if exl >= 16:
            s.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if exl >= 24:
            s.icount = struct.unpack_from(">Q", extra, 16)[0]
        out.append(s)
    return out


def table_size(snaps: list[Snapshot]) -> int:
    return sum(len(s.pack()) for s in snaps)


async def read_snapshots(read: Callable[[int, int], Awaitable[bytes]],
                         h: Header) -> list[Snapshot]:
    # each entry is at most 40 + 64K extra + 64K id + 64K name; read generously
    # but stay within what the table can hold
    n = h.nb_snapshots
    guess = n * 1024
    buf = await read(h.snapshots_offset, guess)
    try:
        return parse_table(buf, n)
    except struct.error:
        buf = await read(h.snapshots_offset, n * (40 + 3 * 65536))
        return parse_table(buf, n)


async def _l2_entries(node: Qcow2Node, off: int) -> L2Table:
    return await node.l2cache.fetch(off, node.file.read)


async def _adjust_tree(node: Qcow2Node, l1: list[int], delta: int) -> None:
    """Add ``delta`` to the refcount of every L2 table and cluster ``l1`` reaches."""
    step = 2 if node.extl2 else 1
    for e in l1:
        l2off = e & L1E_OFFSET_MASK
        if not l2off:
            continue
        t = await _l2_entries(node, l2off)
        for i in range(0, len(t), step):
            le = t[i]
            if le & QCOW_OFLAG_COMPRESSED:
                coff, csize = compressed_extent(le, node.cb)
                first = coff >> node.cb
                last = (coff + csize - 1) >> node.cb
                for c in range(first, last + 1):
                    await node.refs.update(c, delta)
            elif le & L2E_OFFSET_MASK and not node.has_data_file:
                await node.refs.update((le & L2E_OFFSET_MASK) >> node.cb, delta)
        await node.refs.update(l2off >> node.cb, delta)


async def _fix_copied(node: Qcow2Node) -> None:
    """Set/clear COPIED in the active tables from the refcounts (qcow2.rst bit 63)."""
    step = 2 if node.extl2 else 1
    for i, e in enumerate(node.l1):
        l2off = e & L1E_OFFSET_MASK
        if not l2off:
            continue
        l2_copied = await node.refs.get(l2off >> node.cb) == 1
        t = await _l2_entries(node, l2off)
        changed = False
        for j in range(0, len(t), step):
            le = t[j]
            host = le & L2E_OFFSET_MASK
            if le & QCOW_OFLAG_COMPRESSED or (not host and not node.has_data_file):
                continue
            want = node.has_data_file or await node.refs.get(host >> node.cb) == 1
            new = (le | QCOW_OFLAG_COPIED) if want else (le & ~QCOW_OFLAG_COPIED)
            if new != le:
                t[j] = new
                changed = True
        if changed:
            node.l2cache.mark_dirty(l2off)
        new_l1 = (e | QCOW_OFLAG_COPIED) if l2_copied else (e & ~QCOW_OFLAG_COPIED)
        if new_l1 != e:
            node.l1[i] = new_l1
            node._l1_dirty = True


async def _write_table(node: Qcow2Node, snaps: list[Snapshot]) -> None:
    """Write a new snapshot table, point the header at it, free the old one."""
    old_off, old_n = node.h.snapshots_offset, node.h.nb_snapshots
    old_size = table_size(node.snapshots) if old_n else 0
    blob = b"".join(s.pack() for s in snaps)
    new_off = 0
    if snaps:
        new_off = await node.refs.alloc(-(-len(blob) // node.cs))
        await node.refs.write_dirty()
        await node._overlap_check(0, new_off, len(blob))
        await node.file.write(new_off, blob)
        await node.file.flush()
    await node.file.write(60, struct.pack(">IQ", len(snaps), new_off))
    await node.file.flush()
    node.h.nb_snapshots, node.h.snapshots_offset = len(snaps), new_off
    node.snapshots = snaps
    if old_n and old_size:
        for c in range(old_off >> node.cb, ((old_off + old_size - 1) >> node.cb) + 1):
            await node.refs.update(c, -1)


async def create(node: Qcow2Node, name: str, *, vm_clock_nsec: int = 0,
                 date_ns: int | None = None) -> Snapshot:
    """Take an internal snapshot of the active state called ``name``.

    ``date_ns`` is the creation time (default: now).
    """
    if node.has_data_file:
        raise GenericError("Can't create a snapshot in an image with a data file")
    ids = [int(s.id) for s in node.snapshots if s.id.isdigit()]
    sid = str(max(ids, default=0) + 1)
    async with node._lock:
        await node._writeback()
        await _adjust_tree(node, node.l1, +1)
        await _fix_copied(node)
        # refcounts up first, then the tables without COPIED
        await node._writeback()
        l1_bytes = len(node.l1) * 8
        l1_off = await node.refs.alloc(max(1, -(-l1_bytes // node.cs))) if l1_bytes else 0
        await node.refs.write_dirty()
        if l1_bytes:
            from array import array
            await node._overlap_check(0, l1_off, l1_bytes)
            await node.file.write(l1_off, pack_table(array("Q", node.l1)))
        await node.file.flush()
        now = time.time_ns() if date_ns is None else date_ns
        # QEMU writes all three extra fields (vm_state_size_large, disk_size,
        # icount = -1) whatever the image version
        extra = struct.pack(">QQQ", 0, node.size, 0xFFFFFFFFFFFFFFFF)
        snap = Snapshot(l1_off, len(node.l1), sid, name, now // 1_000_000_000,
                        now % 1_000_000_000, vm_clock_nsec, 0, extra, node.size,
                        0xFFFFFFFFFFFFFFFF)
        await _write_table(node, node.snapshots + [snap])
        await node.refs.write_dirty()
        await node.file.flush()
    return snap


def find(node: Qcow2Node, id: str | None, name: str | None) -> Snapshot | None:
    for s in node.snapshots:
        if (id is None or s.id == id) and (name is None or s.name == name):
            return s
    return None


async def delete(node: Qcow2Node, snap: Snapshot) -> None:
    """Delete ``snap`` (found with :func:`find`)."""
    async with node._lock:
        await node._writeback()
        await _write_table(node, [s for s in node.snapshots if s is not snap])
        l1 = list(unpack_table(await node.file.read(snap.l1_table_offset, snap.l1_size * 8))) \
            if snap.l1_size else []
        await _adjust_tree(node, l1, -1)
        if snap.l1_size:
            first = snap.l1_table_offset >> node.cb
            for c in range(first, first + -(-snap.l1_size * 8 // node.cs)):
                await node.refs.update(c, -1)
        await _fix_copied(node)
        # COPIED may only appear once the lower refcounts are on disk
        await node.refs.write_dirty()
        await node.file.flush()
        await node._writeback()
        node.refs.free_hint = 0
