"""Cluster mapping and allocation (qcow2.rst, "Cluster mapping"; QEMU's
block/qcow2-cluster.c): which host cluster a guest offset maps to, and how
clusters, subclusters and L2 tables are allocated, copied on write, zeroed
and discarded.

Every function takes the open :class:`~.driver.Qcow2Node`, whose state it
reads and changes: the L1 table (``node.l1``), the L2 cache, the refcounts,
the queue of clusters to free after the next writeback
(``node._pending_free``) and the guest clusters being allocated outside the
metadata lock (``node._allocating``).  Nothing here writes metadata to disk:
changed L2 tables are marked dirty in the cache and the L1 table as
``node._l1_dirty``; the driver's writeback writes them in dependency order.
Inconsistent entries raise :class:`~.check.Corruption`; :func:`mapped` and
the driver's entry points turn that into the corruption signal.

Standard L2 entries map a whole cluster; extended ones (``extended_l2``)
are (entry, bitmap) pairs whose bitmap says, for each of 32 subclusters,
whether it is allocated (low half) or reads as zeroes (high half).
"""

from __future__ import annotations

import struct
from array import array
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from itertools import repeat
from operator import is_not
from typing import TYPE_CHECKING

import attrs
import trio

from ...qapi.errors import GenericError
from .check import Corruption, signal_corruption
from .l2 import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    L2Table,
    compressed_extent,
    pack_table,
    unpack_table,
)
from .payload import Payload, copy_into, part, size

if TYPE_CHECKING:
    from .driver import Qcow2Node

# segment kinds of a mapped guest range
DATA, ZERO, UNALLOC, COMPRESSED = 0, 1, 2, 3

ALL_ALLOC = 0xFFFFFFFF
# the L2 entry bits that decide how a cluster reads (not COPIED)
_MAP_BITS = L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
ALL_ZERO = 0xFFFFFFFF << 32
# ``x is not None`` as a C callable (events refuse to be truth-tested)
_is_event = partial(is_not, None)


# -- L2 tables ---------------------------------------------------------------
async def l2_table(node: Qcow2Node, l1i: int, first: int = 0,
                   stop: int | None = None) -> L2Table | None:
    """The L2 table for L1 index ``l1i`` (array or view) or None when
    unallocated; with ``first``/``stop``, only entries first..stop-1 are
    needed (with sliced caching only their slices are read)."""
    if l1i >= len(node.l1):
        return None
    off = node.l1[l1i] & L1E_OFFSET_MASK
    if not off:
        return None
    return await _l2_at(node, l1i, off, first, stop)


async def _l2_at(node: Qcow2Node, l1i: int, off: int, first: int = 0,
                 stop: int | None = None) -> L2Table:
    """The L2 table at host offset ``off`` that L1 entry ``l1i`` points at."""
    t = node.l2cache.get(off)
    if t is not None:
        return t
    if off & (node.cs - 1):
        raise Corruption(f"L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})",
                         off, node.cs)
    return await node.l2cache.fetch(off, node.file.read, first, stop)


async def l2_for_write(node: Qcow2Node, l1i: int) -> L2Table:
    """An L2 table this image owns alone, allocated or copied as needed."""
    e = node.l1[l1i]
    off = e & L1E_OFFSET_MASK
    if off and e & QCOW_OFLAG_COPIED:
        return await _l2_at(node, l1i, off)
    if off:
        old = await _l2_at(node, l1i, off)
        fresh = array("Q", old)  # copy-on-write of a table shared with a snapshot
    else:
        fresh = unpack_table(bytes(node.cs))
    await node._set_dirty()
    new = await node.refs.alloc(1)
    t = node.l2cache.put(new, fresh, dirty=True)
    node.l1[l1i] = new | QCOW_OFLAG_COPIED
    node._l1_gen += 1
    node._l1_dirty = True
    if off:
        node._pending_free.append((off, node.cs, "other"))
    return t


async def l2_entry(node: Qcow2Node, gc: int) -> int:
    """The L2 entry of guest cluster ``gc`` (0 when its table is not allocated)."""
    idx = gc & (node.l2_entries - 1)
    i = 2 * idx if node.extl2 else idx
    t = await l2_table(node, gc >> node.l2_bits, i, i + 1)
    if t is None:
        return 0
    return t[i]


# -- mapping -----------------------------------------------------------------
async def map_range(node: Qcow2Node, offset: int, length: int, *,
                    merge_compressed: bool = False) -> list[list[int]]:
    """Segments [kind, guest offset, length, host] covering the range: DATA
    (host is the offset of the first byte), ZERO, UNALLOC (host 0) or
    COMPRESSED (host is the L2 entry; a segment per cluster unless
    ``merge_compressed``)."""
    segs: list[list[int]] = []
    cb, cs = node.cb, node.cs
    pos, end = offset, offset + length
    l2_span_bits = node.l2_bits + cb
    l2_mask = node.l2_entries - 1
    extl2 = node.extl2
    df = node.has_data_file
    v3 = node.version >= 3

    def add(kind: int, start: int, n: int, host: int) -> None:
        if segs:
            last = segs[-1]
            if (last[0] == kind and last[1] + last[2] == start
                    and (kind in (ZERO, UNALLOC)
                         or (kind == DATA and last[3] + last[2] == host)
                         or (kind == COMPRESSED and merge_compressed))):
                last[2] += n
                return
        segs.append([kind, start, n, host])

    step = 2 if extl2 else 1
    while pos < end:
        l1i = pos >> l2_span_bits
        tend = min(end, (l1i + 1) << l2_span_bits)
        table = await l2_table(node, l1i, step * ((pos >> cb) & l2_mask),
                               step * ((((tend - 1) >> cb) & l2_mask) + 1))
        if table is None:
            add(UNALLOC, pos, tend - pos, 0)
            pos = tend
            continue
        while pos < tend:
            gc = pos >> cb
            in_cl = pos & (cs - 1)
            cl_end = min(tend, (gc + 1) << cb)
            idx = gc & l2_mask
            if not extl2:
                e = table[idx]
                if e & QCOW_OFLAG_COMPRESSED:
                    add(COMPRESSED, pos, cl_end - pos, e)
                    pos = cl_end
                    continue
                # extend over the following clusters of the same kind in
                # one step (contiguous hosts for data): one segment per
                # run, not one Python round per cluster
                last = min(((tend - 1) >> cb) & l2_mask, l2_mask)
                j = idx + 1
                if e & QCOW_OFLAG_ZERO and v3:
                    kind, host = ZERO, 0
                    while j <= last and table[j] == e:
                        j += 1
                else:
                    host = e & L2E_OFFSET_MASK
                    if host or (df and e & QCOW_OFLAG_COPIED):
                        if host & (cs - 1):
                            raise Corruption(
                                f"Cluster allocation offset {host:#x} unaligned "
                                f"(L2 offset: {node.l1[l1i] & L1E_OFFSET_MASK:#x}, "
                                f"L2 index: {idx:#x})", host, cs)
                        kind = DATA
                        if host:
                            want = host + cs
                            while j <= last and table[j] & _MAP_BITS == want:
                                j += 1
                                want += cs
                        host += in_cl
                    else:
                        kind = UNALLOC
                        while j <= last and table[j] == e:
                            j += 1
                run_end = min(tend, (gc + j - idx) << cb)
                add(kind, pos, run_end - pos, host)
                pos = run_end
                continue
            e = table[2 * idx]
            bm = table[2 * idx + 1]
            if e & QCOW_OFLAG_COMPRESSED:
                add(COMPRESSED, pos, cl_end - pos, e)
                pos = cl_end
                continue
            host = e & L2E_OFFSET_MASK
            if bm & (bm >> 32) & ALL_ALLOC or (bm & ALL_ALLOC and not host and not df):
                raise Corruption(
                    f"Invalid cluster entry found  (L2 offset: "
                    f"{node.l1[l1i] & L1E_OFFSET_MASK:#x}, L2 index: {idx:#x})")
            if host & (cs - 1):
                raise Corruption(
                    f"Cluster allocation offset {host:#x} unaligned "
                    f"(L2 offset: {node.l1[l1i] & L1E_OFFSET_MASK:#x}, "
                    f"L2 index: {idx:#x})", host, cs)
            base = gc << cb
            sb = node.sc_bits
            while pos < cl_end:
                sc = (pos - base) >> sb
                sc_end = min(cl_end, base + ((sc + 1) << sb))
                if bm >> sc & 1:
                    add(DATA, pos, sc_end - pos, host + (pos - base))
                elif bm >> (32 + sc) & 1:
                    add(ZERO, pos, sc_end - pos, 0)
                else:
                    add(UNALLOC, pos, sc_end - pos, 0)
                pos = sc_end
    return segs


async def mapped(node: Qcow2Node, offset: int, length: int, *,
                 merge_compressed: bool = False) -> list[list[int]]:
    """:func:`map_range`, with corruption it finds signalled (the node
    becomes unusable and the error raised is EIO)."""
    try:
        return await map_range(node, offset, length, merge_compressed=merge_compressed)
    except Corruption as c:
        raise await signal_corruption(node, c) from None


def data_host(node: Qcow2Node, offset: int, length: int, owned: bool) -> int:
    """The host offset of a guest range that lies in standard data
    clusters of this image, one after the other on the host, found in one
    cached L2 table without a wait; with ``owned``, only if every cluster
    may be written in place (COPIED: refcount 1).  -1 when the range needs
    the general path (extended L2, an L2 table not cached, two L2 tables,
    any other kind of cluster, clusters not contiguous on the host, an
    entry that looks corrupt: map_range reports those).

    This is the hot path of 4 KiB random I/O on an allocated image (one
    dict lookup and a few bit tests instead of a mapping pass), and it
    lets a large request over contiguous clusters (a 1 MiB sequential read
    covers 16 of 64 KiB) go to the file as one request without a task, as
    QEMU's qcow2_co_preadv_part reads a run of contiguous clusters at once:
    on a cold image that keeps the host reads in the clients' order, which
    the kernel's readahead follows."""
    cb = node.cb
    gc = offset >> cb
    last = (offset + length - 1) >> cb
    if node.extl2 or length <= 0:
        return -1
    l1i = gc >> node.l2_bits
    l1 = node.l1
    if l1i >= len(l1) or last >> node.l2_bits != l1i:
        return -1
    l2off = l1[l1i] & L1E_OFFSET_MASK
    if not l2off:
        return -1
    table = node.l2cache.get(l2off)
    if table is None:
        return -1
    cs = node.cs
    idx = gc & (node.l2_entries - 1)
    e = table[idx]
    host = e & L2E_OFFSET_MASK
    if (not host or host & (cs - 1) or e & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO)
            or (owned and not e & QCOW_OFLAG_COPIED)):
        return -1
    if last != gc:
        # every further cluster the next one on the host, plain data (and
        # COPIED for a write); map_range merges runs by the same test
        mask = (_MAP_BITS | QCOW_OFLAG_COPIED) if owned else _MAP_BITS
        want = host | (QCOW_OFLAG_COPIED if owned else 0)
        for j in range(idx + 1, idx + last - gc + 1):
            want += cs
            if table[j] & mask != want:
                return -1
    return host | (offset & (cs - 1))


def owned(node: Qcow2Node, e: int) -> bool:
    """A standard cluster with a host offset and refcount 1 (may be written in place)."""
    if e & QCOW_OFLAG_COMPRESSED or not e & QCOW_OFLAG_COPIED:
        return False
    if not node.extl2 and e & QCOW_OFLAG_ZERO:
        return False
    return bool(e & L2E_OFFSET_MASK) or node.has_data_file


async def inplace_plan(node: Qcow2Node, offset: int,
                       length: int) -> list[tuple[int, int, int]] | None:
    """[(guest, n, host)] when the whole range is owned data; else None."""
    if not node.extl2:
        # the first cluster unallocated (a mirror/commit target): no plan,
        # without a mapping pass over the request (an entry of 0 is never
        # corrupt, so nothing map_range would report is skipped)
        gc = offset >> node.cb
        l1i = gc >> node.l2_bits
        if l1i >= len(node.l1) or not node.l1[l1i] & L1E_OFFSET_MASK:
            return None
        cached = node.l2cache.get(node.l1[l1i] & L1E_OFFSET_MASK)
        if cached is not None and not cached[gc & (node.l2_entries - 1)]:
            return None
    segs = await mapped(node, offset, length)
    plan = []
    for kind, goff, n, host in segs:
        if kind != DATA:
            return None
        plan.append((goff, n, host))
    # DATA in a standard cluster also needs COPIED (refcount 1); map_range
    # loaded every table of the range, so this reads the cache only
    gc, last = offset >> node.cb, (offset + length - 1) >> node.cb
    step = 2 if node.extl2 else 1
    mask = node.l2_entries - 1
    while gc <= last:
        stop = min(last, gc | mask)
        table = await l2_table(node, gc >> node.l2_bits, step * (gc & mask),
                               step * ((stop & mask) + 1))
        if table is None:
            return None
        for i in range(step * (gc & mask), step * ((stop & mask) + 1), step):
            if not table[i] & QCOW_OFLAG_COPIED:
                return None
        gc = stop + 1
    return plan


# -- allocating writes -------------------------------------------------------
@asynccontextmanager
async def locked(node: Qcow2Node, offset: int, length: int) -> AsyncIterator[None]:
    """The metadata lock, taken once no allocating write in flight overlaps
    the guest range (their clusters are not linked into L2 yet)."""
    await lock_range(node, offset >> node.cb, (offset + max(length, 1) - 1) >> node.cb)
    try:
        yield
    finally:
        node._lock.release()


async def lock_range(node: Qcow2Node, first: int, last: int) -> None:
    """Acquire the metadata lock once no allocating write in flight holds
    any of the guest clusters ``first``..``last``; the caller releases it.
    (What :func:`locked` does, without a context manager's generator and
    its three extra calls: the allocating write takes it once per request.)"""
    lock = node._lock
    while True:
        await acquire(lock)
        ev = allocation_in(node, first, last)
        if ev is None:
            return
        lock.release()
        await ev.wait()


async def acquire(lock: trio.Lock) -> None:
    """``lock.acquire()`` without its scheduling round when the lock is free
    (trio's acquire yields to the run loop even then: two trips per
    allocating write).  Fair as acquire: acquire_nowait refuses while
    others wait.  The request checkpoints anyway at its data write."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def allocation_in(node: Qcow2Node, first: int, last: int) -> trio.Event | None:
    """The event of an allocating write in flight on any of the guest
    clusters ``first``..``last`` (set once it is linked or given up), or None."""
    allocating = node._allocating
    if not allocating:
        return None
    if last - first < len(allocating):
        # fewer clusters than in flight (64 backup workers of 1 MiB hold
        # 1024): look the request's clusters up, the loop in C
        return next(filter(_is_event, map(allocating.get, range(first, last + 1))), None)
    for gc, ev in allocating.items():
        if first <= gc <= last:
            return ev
    return None


def hold_runs(node: Qcow2Node, runs: list[NewRun], ev: trio.Event) -> None:
    """Mark the guest clusters of ``runs`` in flight until ``ev`` is set."""
    allocating = node._allocating
    for r in runs:
        allocating.update(zip(range(r.gc, r.gc + r.n), repeat(ev)))


def release_runs(node: Qcow2Node, runs: list[NewRun], ev: trio.Event) -> None:
    """Unmark the guest clusters :func:`hold_runs` marked for ``ev`` (those
    still marked for it: this also runs after a failure part way)."""
    allocating = node._allocating
    for r in runs:
        for gc in range(r.gc, r.gc + r.n):
            if allocating.get(gc) is ev:
                del allocating[gc]


@attrs.define(eq=False)
class NewRun:
    """Fresh host clusters for guest clusters gc..gc+n-1: the bytes a..b of the
    run are the request's, ``payload`` is what goes to ``host``."""

    gc: int
    n: int
    a: int
    b: int
    olds: list[int]  # the L2 entries the run replaces
    host: int
    payload: Payload
    linked: bool = False


async def write_allocating(node: Qcow2Node, offset: int, data: Payload,
                           length: int) -> None:
    """A write that needs new clusters: allocate and copy-on-write under the
    lock, write the data with the lock released (so allocating writes run
    in parallel, as in QEMU), then link the clusters into L2 under the lock.

    The L2 entries change only after their data is written, so a flush in
    between never puts an entry on disk that points at unwritten data; a
    failed or cancelled data write gives its clusters back (they were
    never referenced, at worst their refcount leaks on a crash).
    """
    runs: list[NewRun] = []
    lock = node._lock
    ev = trio.Event()
    await lock_range(node, offset >> node.cb, (offset + max(length, 1) - 1) >> node.cb)
    try:
        await write_locked(node, offset, data, length, runs)
        hold_runs(node, runs, ev)
    except Corruption as c:
        drop_runs(node, runs)
        raise await signal_corruption(node, c) from None
    except BaseException:
        drop_runs(node, runs)
        raise
    finally:
        lock.release()
    if not runs:
        return
    linked = False
    try:
        for r in runs:
            await node._data_write(r.gc << node.cb, r.host, r.payload)
        await acquire(lock)
        try:
            try:
                for r in runs:
                    await link_run(node, r)
                linked = True
            except Corruption as c:
                raise await signal_corruption(node, c) from None
            finally:
                if linked:
                    # still all ours (nothing else marks a marked cluster):
                    # unmarked in C
                    for r in runs:
                        deque(map(node._allocating.pop, range(r.gc, r.gc + r.n)), maxlen=0)
                else:
                    release_runs(node, runs, ev)
                ev.set()
            if node.l2cache.overfull():
                await node._writeback()
        finally:
            lock.release()
    finally:
        if not linked:
            drop_runs(node, runs)
            release_runs(node, runs, ev)
            ev.set()


def drop_runs(node: Qcow2Node, runs: list[NewRun]) -> None:
    """Give back the clusters of runs that were never linked."""
    if not node.has_data_file:
        for r in runs:
            if not r.linked:
                node._pending_free.append((r.host, r.n * node.cs, "other"))
                r.linked = True  # given back once


async def write_locked(node: Qcow2Node, offset: int, data: Payload, length: int,
                       runs: list[NewRun] | None = None) -> None:
    """Write ``length`` bytes of ``data`` under the lock; with ``runs``,
    fresh clusters are only prepared (allocated, edges copied) and left
    for the caller to write and link."""
    cb = node.cb
    end = offset + length
    pos = offset
    while pos < end:
        gc = pos >> cb
        # gather a run of clusters that all need a new host cluster
        e = await l2_entry(node, gc)
        if owned(node, e):
            cl_end = min(end, (gc + 1) << cb)
            await write_owned(node, gc, e, pos, part(data, pos - offset, cl_end - pos))
            pos = cl_end
            continue
        # a run must fit between refblocks (small clusters, wide refcounts)
        # and stay inside one L2 table
        max_run = min(2048, max(1, (1 << node.refs.block_bits) // 2),
                      ((end - 1) >> cb) - gc + 1,
                      node.l2_entries - (gc & (node.l2_entries - 1)))
        table = await l2_table(node, gc >> node.l2_bits)
        if table is None:
            n = max_run
        else:
            step = 2 if node.extl2 else 1
            i = step * (gc & (node.l2_entries - 1))
            if isinstance(table, array) and not any(table[i:i + step * max_run:step]):
                # all unallocated (a fresh target: the common case): none owned
                n = max_run
            else:
                n = 1
                while n < max_run and not owned(node, table[i + step * n]):
                    n += 1
        run_end = min(end, (gc + n) << cb)
        r = await write_new(node, gc, n, pos, part(data, pos - offset, run_end - pos),
                            run_end - pos)
        if runs is None:
            await node._data_write(r.gc << node.cb, r.host, r.payload)
            await link_run(node, r)
        else:
            runs.append(r)
        pos = run_end


async def write_owned(node: Qcow2Node, gc: int, e: int, pos: int, chunk: Payload) -> None:
    """Write into a cluster we own; with subclusters, allocate the touched ones."""
    base = gc << node.cb
    host = e & L2E_OFFSET_MASK
    n = size(chunk)
    if node.overlap_mask:
        await node._overlap_check(0, host + (pos - base), n, True)
    if not node.extl2:
        await node._data_write(pos, host + (pos - base), chunk)
        return
    table = await l2_for_write(node, gc >> node.l2_bits)
    idx = gc & (node.l2_entries - 1)
    bm = table[2 * idx + 1]
    sb = node.sc_bits
    a, b = pos - base, pos - base + n
    s0, s1 = a >> sb, (b - 1) >> sb
    touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
    if bm & touched == touched:
        await node._data_write(base + a, host + a, chunk)
        return
    # fill the partial subclusters at the edges from the current view
    ra, rb = s0 << sb, min((s1 + 1) << sb, node.cs)
    buf = await node._view(base + ra, rb - ra)
    copy_into(buf, a - ra, chunk)
    await node._data_write(base + ra, host + ra, buf)
    table[2 * idx + 1] = (bm | touched) & ~(touched << 32)
    node.l2cache.mark_dirty(node.l1[gc >> node.l2_bits] & L1E_OFFSET_MASK)


async def alloc_data(node: Qcow2Node, gc: int, n: int) -> int:
    """Host offset of ``n`` contiguous new data clusters for guest cluster
    ``gc`` on: refcounted clusters of the image file, or the fixed place
    in an external data file."""
    if node.has_data_file:
        return gc << node.cb  # guest offset == host offset in a data file
    await node._set_dirty()
    return await node.refs.alloc(n)


async def write_new(node: Qcow2Node, gc: int, n: int, pos: int, chunk: Payload,
                    length: int) -> NewRun:
    """Prepare ``chunk`` (``length`` bytes) for ``n`` fresh host clusters
    (copy-on-write at the edges): allocate them; the caller writes the
    payload and links the run."""
    cb, cs = node.cb, node.cs
    base = gc << cb
    a = pos - base
    b = a + length
    table = await l2_table(node, gc >> node.l2_bits)
    if table is None:
        olds = [0] * n
    else:
        first = gc & (node.l2_entries - 1)
        olds = list(table[2 * first:2 * (first + n):2] if node.extl2
                    else table[first:first + n])
    if node.extl2:
        sb = node.sc_bits
        lo = (a >> sb) << sb
        hi = min(((b - 1) >> sb) + 1 << sb, n * cs)
        # copy the rest of the cluster if its old data must move along
        for i in (0, n - 1):
            e = olds[i]
            if e & QCOW_OFLAG_COMPRESSED or e & L2E_OFFSET_MASK:
                if i == 0:
                    lo = 0
                if i == n - 1:
                    hi = n * cs
    else:
        lo, hi = 0, n * cs
    if (a, b) != (0, n * cs):
        buf = bytearray(n * cs)
        if lo < a:
            buf[lo:a] = await node._view(base + lo, a - lo)
        if b < hi:
            buf[b:hi] = await node._view(base + b, hi - b)
        copy_into(buf, a, chunk)
        payload: Payload = memoryview(buf)
    else:
        payload = chunk
    await l2_for_write(node, gc >> node.l2_bits)
    host = await alloc_data(node, gc, n)
    if node.overlap_mask:
        try:
            await node._overlap_check(0, host + a, b - a, True)
        except OSError:
            if not node.has_data_file:
                node._pending_free.append((host, n * cs, "other"))
            raise
    return NewRun(gc, n, a, b, olds, host, payload)


async def link_run(node: Qcow2Node, r: NewRun) -> None:
    """Point the L2 entries of a written run at its new clusters."""
    cs = node.cs
    table = await l2_for_write(node, r.gc >> node.l2_bits)
    a, b, host = r.a, r.b, r.host
    first = r.gc & (node.l2_entries - 1)
    if not node.extl2 and isinstance(table, array) and not any(r.olds):
        # nothing to free, no bitmaps: the run's entries in one slice
        # assignment (host, host+cs, ... all COPIED), not a round per cluster
        start = host | QCOW_OFLAG_COPIED
        table[first:first + r.n] = array("Q", range(start, start + r.n * cs, cs))
        r.linked = True
        node.l2cache.mark_dirty(node.l1[r.gc >> node.l2_bits] & L1E_OFFSET_MASK)
        return
    for i in range(r.n):
        idx = first + i
        e = r.olds[i]
        new_e = (host + i * cs) | QCOW_OFLAG_COPIED
        if node.extl2:
            old_bm = table[2 * idx + 1] if not e & QCOW_OFLAG_COMPRESSED else 0
            ca, cb_ = max(a - i * cs, 0), min(b - i * cs, cs)
            s0, s1 = ca >> node.sc_bits, (cb_ - 1) >> node.sc_bits
            touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
            if e & QCOW_OFLAG_COMPRESSED:
                bm = ALL_ALLOC
            else:
                bm = (old_bm | touched) & ~(touched << 32)
                if e & L2E_OFFSET_MASK:
                    bm |= old_bm & ALL_ALLOC
            table[2 * idx] = new_e
            table[2 * idx + 1] = bm
        else:
            table[idx] = new_e
        if e & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK):
            free_entry_host(node, e)
    r.linked = True
    node.l2cache.mark_dirty(node.l1[r.gc >> node.l2_bits] & L1E_OFFSET_MASK)


def free_entry_host(node: Qcow2Node, e: int, dtype: str = "request") -> None:
    """Queue the host clusters an L2 entry holds for freeing (after the L2 is on disk)."""
    if e & QCOW_OFLAG_COMPRESSED:
        coff, csize = compressed_extent(e, node.cb)
        node._pending_free.append((coff, csize, dtype))
        return
    host = e & L2E_OFFSET_MASK
    if node.has_data_file:
        return  # data-file clusters are not refcounted
    if host:
        node._pending_free.append((host, node.cs, dtype))


# -- zero clusters and discard -----------------------------------------------
async def zero_clusters(node: Qcow2Node, a: int, b: int, may_unmap: bool) -> None:
    """Make guest bytes ``a``..``b`` (whole subclusters, or up to the end of
    the image) read as zeroes with the zero flag or subcluster bits (QEMU's
    zero_in_l2_slice); clusters are freed when ``may_unmap``, or when they
    are shared or compressed, else kept allocated (an external data file
    keeps its fixed mapping).  A partial zero write in
    a shared or compressed cluster with subclusters is written as data.
    Caller holds :func:`locked`."""
    cb, cs = node.cb, node.cs
    pos = a
    while pos < b:
        gc = pos >> cb
        base = gc << cb
        cl_end = min(b, base + cs)
        full = pos == base and (cl_end == base + cs or cl_end == node.size)
        table = await l2_for_write(node, gc >> node.l2_bits)
        idx = gc & (node.l2_entries - 1)
        l2_off = node.l1[gc >> node.l2_bits] & L1E_OFFSET_MASK
        if not node.extl2:
            e = table[idx]
            if node.has_data_file:
                # the data file keeps its fixed mapping; only the flag changes
                new = (e | QCOW_OFLAG_ZERO) if e & QCOW_OFLAG_COPIED else QCOW_OFLAG_ZERO
            elif may_unmap or not owned(node, e & ~QCOW_OFLAG_ZERO):
                if e & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                    free_entry_host(node, e)
                new = QCOW_OFLAG_ZERO
            else:
                new = e | QCOW_OFLAG_ZERO  # keep the preallocated cluster
            table[idx] = new
        else:
            e, bm = table[2 * idx], table[2 * idx + 1]
            if full and (may_unmap or e & QCOW_OFLAG_COMPRESSED
                         or not e & QCOW_OFLAG_COPIED):
                if e & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                    free_entry_host(node, e)
                table[2 * idx], table[2 * idx + 1] = 0, ALL_ZERO
            elif e & QCOW_OFLAG_COMPRESSED or (e & L2E_OFFSET_MASK
                                               and not e & QCOW_OFLAG_COPIED):
                # a partial zero in a shared/compressed cluster: write it out
                await write_locked(node, pos, memoryview(bytes(cl_end - pos)), cl_end - pos)
            else:
                sb = node.sc_bits
                s0, s1 = (pos - base) >> sb, (cl_end - base - 1) >> sb
                touched = ((1 << (s1 + 1)) - 1) & ~((1 << s0) - 1)
                table[2 * idx + 1] = (bm & ~touched) | (touched << 32)
        node.l2cache.mark_dirty(l2_off)
        pos = cl_end


async def discard_clusters(node: Qcow2Node, a: int, b: int, *, full: bool, dtype: str) -> None:
    """Drop the clusters of guest bytes ``a``..``b`` (whole clusters) from L2
    (QEMU's discard_in_l2_slice): with ``full`` (a shrink) the entries become
    unallocated, else they read as zeroes when a backing file would show
    through or the cluster was allocated.  Their host clusters are freed
    after the next writeback, discarded as ``dtype`` asks (pass-discard-*).
    Caller holds :func:`locked`."""
    cb = node.cb
    gc = a >> cb
    while (gc << cb) < b:
        l1i = gc >> node.l2_bits
        if await l2_table(node, l1i) is None and (full or node.backing is None):
            gc = (l1i + 1) << node.l2_bits
            continue
        table = await l2_for_write(node, l1i)
        idx = gc & (node.l2_entries - 1)
        i = 2 * idx if node.extl2 else idx
        e = table[i]
        allocated = bool(e & (QCOW_OFLAG_COMPRESSED | L2E_OFFSET_MASK)) or (
            node.has_data_file and e & QCOW_OFLAG_COPIED)
        if full:
            new, bm = 0, 0
        elif node.backing is not None or allocated:
            if node.extl2:
                new, bm = 0, ALL_ZERO
            else:
                new, bm = (QCOW_OFLAG_ZERO if node.version >= 3 else 0), 0
        else:
            gc += 1
            continue
        if allocated and not (node.has_data_file and not e & QCOW_OFLAG_COMPRESSED):
            free_entry_host(node, e, dtype)
        table[i] = new
        if node.extl2:
            table[i + 1] = bm
        node.l2cache.mark_dirty(node.l1[l1i] & L1E_OFFSET_MASK)
        gc += 1


# -- L1 growth, preallocation, compressed data -------------------------------
async def grow_l1(node: Qcow2Node, need: int) -> None:
    """Move the L1 table to new clusters with room for ``need`` entries
    (QEMU's qcow2_grow_l1_table): metadata written back first, the new table
    written and flushed before the header points at it, the old one freed
    after the next writeback."""
    if need <= len(node.l1):
        return
    await node._writeback()
    new_l1 = node.l1 + [0] * (need - len(node.l1))
    nbytes = need * 8
    clusters = -(-nbytes // node.cs)
    off = await node.refs.alloc(clusters)
    await node.refs.write_dirty()
    if node.overlap_mask:
        await node._overlap_check(0, off, nbytes)
    await node.file.write(off, pack_table(array("Q", new_l1)))
    await node.file.flush()
    old_off, old_n = node.l1_offset, len(node.l1)
    node.h.l1_table_offset, node.h.l1_size = off, need
    await node.file.write(36, struct.pack(">IQ", need, off))
    await node.file.flush()
    node.l1, node.l1_offset = new_l1, off
    if old_n and old_off:
        node._pending_free.append((old_off, old_n * 8, "other"))


async def preallocate(node: Qcow2Node, start: int, end: int, mode: str) -> None:
    """preallocation=metadata/falloc/full: give every cluster in range a host cluster."""
    cs = node.cs
    pos = (start // cs) * cs
    last = 0
    async with locked(node, start, end - start):
        while pos < end:
            gc = pos >> node.cb
            e = await l2_entry(node, gc)
            if not e & L2E_OFFSET_MASK:
                table = await l2_for_write(node, gc >> node.l2_bits)
                host = await alloc_data(node, gc, 1)
                idx = gc & (node.l2_entries - 1)
                if mode == "full":
                    if node.overlap_mask:
                        await node._overlap_check(0, host, cs, True)
                    await node.data.write(host, bytes(cs))
                if node.extl2:
                    # the clusters read as zeroes without being written
                    table[2 * idx] = host | QCOW_OFLAG_COPIED
                    table[2 * idx + 1] = ALL_ZERO
                else:
                    table[idx] = host | QCOW_OFLAG_COPIED
                last = max(last, host + cs)
                node.l2cache.mark_dirty(node.l1[gc >> node.l2_bits] & L1E_OFFSET_MASK)
            pos += cs
        if last > node.data.length:
            # a sparse file that covers every preallocated cluster (reads zero)
            try:
                await node.data.truncate(last, exact=False,
                                         prealloc="falloc" if mode == "falloc" else "off")
            except (OSError, GenericError):
                await node.data.write(last - 1, b"\0")
        await node._writeback()


async def alloc_bytes(node: Qcow2Node, n: int) -> int:
    """Byte-granular allocation for compressed data (QEMU's free_byte_offset)."""
    cs = node.cs
    fb = node._free_byte
    if fb and (fb & (cs - 1)) and (fb & (cs - 1)) + n <= cs:
        await node.refs.update(fb >> node.cb, 1)
        node._free_byte = fb + n
        return fb
    off = await node.refs.alloc(-(-n // cs))
    node._free_byte = off + n
    return off
