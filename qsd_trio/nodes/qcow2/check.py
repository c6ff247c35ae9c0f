"""Metadata consistency: corruption found while using an image, and the
refcount repair of a dirty one (QEMU's qcow2_signal_corruption, and the
check with BDRV_FIX_ERRORS of block/qcow2-refcount.c).

:class:`Corruption` is what the mapping and allocation code raises when a
table entry cannot be right (an unaligned offset, an invalid subcluster
bitmap, a refcount that would go below zero).  The driver turns it into
QEMU's reaction with :func:`signal_corruption`: one ``BLOCK_IMAGE_CORRUPTED``
event, the corrupt bit in the header, the node unusable (ENOMEDIUM), the
request failed with EIO.

:func:`repair_refcounts` runs at a read-write open of an image whose dirty
bit is set (lazy refcounts: refcount updates were not written before the
tables that depend on them): every cluster the metadata references gets at
least the refcount the references add up to.  Leaked clusters (a refcount
higher than the references) are left as they are; ``qemu-img check`` reports
them and they cost only space.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING

import trio

from ... import events
from . import snapshots as snapmod
from .header import INCOMPAT_CORRUPT
from .l2 import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    compressed_extent,
    unpack_table,
)

if TYPE_CHECKING:
    from .driver import Qcow2Node


class Corruption(Exception):
    """Metadata that cannot be right: ``msg`` is QEMU's text, ``offset`` and
    ``size`` the host range it concerns, when known (the event carries them)."""

    def __init__(self, msg: str, offset: int | None = None, size: int | None = None):
        super().__init__(msg)
        self.msg, self.offset, self.size = msg, offset, size


async def signal_corruption(node: Qcow2Node, c: Corruption, fatal: bool = True) -> OSError:
    """QEMU's qcow2_signal_corruption: the event and a line on stderr once
    per node; when ``fatal``, the node becomes unusable and a writable v3
    image gets its corrupt bit (best effort: a failed header write is
    ignored, as the request fails anyway).  Returns the EIO error the
    request fails with."""
    if not node._signaled:
        msg = ("Marking image as corrupt: " if fatal else "Image is corrupt: ") + c.msg
        print(f"qcow2: {msg}; further {'' if fatal else 'non-fatal '}corruption "
              "events will be suppressed", file=sys.stderr)
        data: dict[str, object] = {"device": "", "node-name": node.node_name, "msg": c.msg}
        if c.offset is not None:
            data["offset"] = c.offset
        if c.size is not None:
            data["size"] = c.size
        data["fatal"] = fatal
        events.emit("BLOCK_IMAGE_CORRUPTED", data)
        node._signaled = True
    if fatal:
        node._corrupt = True
        if not node.read_only and node.h.version >= 3:
            node.h.incompatible_features |= INCOMPAT_CORRUPT
            try:
                with trio.CancelScope(shield=True):
                    await node._write_v3_features()
            except OSError:
                pass
    return OSError(errno.EIO, "Input/output error")


async def repair_refcounts(node: Qcow2Node) -> None:
    """Raise every refcount to what the metadata references: the header,
    the refcount table and blocks, the snapshot table, the active and the
    snapshots' L1 tables, their L2 tables and the data clusters those point
    at (compressed data by the clusters its sectors touch; clusters of an
    external data file are not refcounted).  Writes the refcount blocks and
    flushes."""
    counts: dict[int, int] = {}
    cb, cs = node.cb, node.cs

    def ref(off: int, nbytes: int) -> None:
        for c in range(off >> cb, ((off + nbytes - 1) >> cb) + 1):
            counts[c] = counts.get(c, 0) + 1

    ref(0, cs)
    ref(node.h.refcount_table_offset, node.h.refcount_table_clusters * cs)
    for e in node.refs.table:
        if e & ~0x1FF:
            ref(e & ~0x1FF, cs)
    if node.h.nb_snapshots:
        ref(node.h.snapshots_offset, snapmod.table_size(node.snapshots))
    l1s = [(node.l1_offset, node.l1)] + [
        (s.l1_table_offset, list(unpack_table(await node._read_meta(
            s.l1_table_offset, s.l1_size * 8)))) for s in node.snapshots]
    step = 2 if node.extl2 else 1
    for l1off, l1 in l1s:
        if l1:
            ref(l1off, len(l1) * 8)
        for e in l1:
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            ref(off, cs)
            t = unpack_table(await node.file.read(off, cs))
            for i in range(0, len(t), step):
                le = t[i]
                if le & QCOW_OFLAG_COMPRESSED:
                    ref(*compressed_extent(le, cb))
                elif le & L2E_OFFSET_MASK and not node.has_data_file:
                    ref(le & L2E_OFFSET_MASK, cs)
    for c, n in sorted(counts.items()):
        have = await node.refs.get(c)
        if have < n:
            await node.refs.update(c, n - have)
    node.refs.free_hint = 0
    await node.refs.write_dirty()
    await node.file.flush()
