"""Refcount table and refcount blocks of any width (qcow2.rst, "Host cluster management").

:class:`Refcounts` keeps every refcount block it has loaded in memory (one
cluster each) and marks changed ones dirty; :meth:`Refcounts.write_dirty`
writes them back.  The driver decides *when* (after data, before the L2
tables that reference new clusters), which is what keeps a crash down to
leaked clusters.  Cluster allocation lives here too: a free run is found by
scanning from a hint; missing refcount blocks are created self-describing
(the block sits in the first cluster it covers) and the refcount table is
moved to a bigger place when it is full.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio


async def write_batch(write: Callable[[int, bytes], Awaitable[None]],
                      items: list[tuple[int, bytes]]) -> None:
    """Write metadata blocks that do not depend on each other concurrently,
    so the I/O engine submits them together (one io_uring_enter or
    io_submit) instead of one round trip each.  The first error is raised
    once every write has ended; a caller flushes only after that."""
    if len(items) <= 1:
        for off, blob in items:
            await write(off, blob)
        return
    errors: list[Exception] = []

    async def one(off: int, blob: bytes) -> None:
        try:
            await write(off, blob)
        except Exception as e:  # noqa: BLE001 - the first is raised below
            errors.append(e)

    # shielded: a writeback is not abandoned half way (the engine would
    # finish the writes anyway); a cancellation arrives at the next checkpoint
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for off, blob in items:
                nursery.start_soon(one, off, blob)
    if errors:
        raise errors[0]


class RefcountError(Exception):
    """Metadata that cannot be right; the driver turns it into corruption."""


def get_entry(block: bytearray, idx: int, order: int) -> int:
    """Entry ``idx`` of a refcount block with 2**order-bit entries."""
    if order == 4:
        return (block[2 * idx] << 8) | block[2 * idx + 1]
    if order < 3:
        bits = 1 << order
        bitpos = idx * bits
        return (block[bitpos >> 3] >> (bitpos & 7)) & ((1 << bits) - 1)
    n = 1 << (order - 3)
    return int.from_bytes(block[idx * n:(idx + 1) * n], "big")


def set_entry(block: bytearray, idx: int, order: int, value: int) -> None:
    if order < 3:
        bits = 1 << order
        bitpos = idx * bits
        mask = ((1 << bits) - 1) << (bitpos & 7)
        b = bitpos >> 3
        block[b] = (block[b] & ~mask) | ((value << (bitpos & 7)) & mask)
        return
    n = 1 << (order - 3)
    block[idx * n:(idx + 1) * n] = value.to_bytes(n, "big")


class Refcounts:
    """Refcounts of one image file.

    ``read``/``write`` are the file child's I/O; ``on_table_moved`` is called
    with (offset, clusters) after a new refcount table has been written, so
    the driver can update its header.
    """

    def __init__(self, *, cluster_bits: int, order: int, table: list[int],
                 table_offset: int, table_clusters: int,
                 read: Callable[[int, int], Awaitable[bytes]],
                 write: Callable[[int, bytes], Awaitable[None]],
                 flush: Callable[[], Awaitable[None]],
                 on_table_moved: Callable[[int, int], Awaitable[None]],
                 cache_blocks: int = 0):
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = order
        self.max_refcount = (1 << (1 << order)) - 1
        self.table = table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.block_bits = cluster_bits + 3 - order  # log2(entries per block)
        # the refcount block cache (refcount-cache-size): refblock index ->
        # contents, least recently used first; only clean blocks are evicted,
        # so dirty ones may exceed the capacity until write_dirty()
        self.blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.capacity = cache_blocks or 1 << 62
        self.used: set[int] = set()  # looked up since the last clean_unused()
        self.dirty: set[int] = set()
        self._read, self._write, self._flush = read, write, flush
        self._on_table_moved = on_table_moved
        # where the search for free clusters starts (QEMU's free_cluster_index):
        # moved past each allocation, moved back when a cluster below it is freed
        self.free_hint = 0
        self.scanned = 0  # clusters the free-cluster search has passed over (statistics)
        self.version = 0  # bumped when a refcount block is added or the table moves

    @classmethod
    def parse_table(cls, buf: bytes, entries: int) -> list[int]:
        return list(struct.unpack_from(f">{entries}Q", buf))

    # -- lookup ------------------------------------------------------------
    async def _block(self, bidx: int) -> bytearray | None:
        blk = self.blocks.get(bidx)
        if blk is not None:
            self.blocks.move_to_end(bidx)
            self.used.add(bidx)
            return blk
        if bidx >= len(self.table):
            return None
        off = self.table[bidx] & ~0x1FF
        if not off:
            return None
        if off & (self.cluster_size - 1):
            raise RefcountError(f"Refblock offset {off:#x} unaligned (reftable index: {bidx:#x})")
        blk = bytearray(await self._read(off, self.cluster_size))
        cached = self.blocks.get(bidx)  # loaded by another task meanwhile: keep that one
        if cached is not None:
            return cached
        self._store(bidx, blk)
        return blk

    def _store(self, bidx: int, blk: bytearray) -> None:
        """Cache refblock ``bidx``, evicting the least recently used clean ones."""
        self.blocks[bidx] = blk
        self.blocks.move_to_end(bidx)
        self.used.add(bidx)
        if len(self.blocks) > self.capacity:
            for b in list(self.blocks):
                if len(self.blocks) <= self.capacity:
                    break
                if b != bidx and b not in self.dirty:
                    del self.blocks[b]

    async def get(self, cluster: int) -> int:
        blk = await self._block(cluster >> self.block_bits)
        if blk is None:
            return 0
        return get_entry(blk, cluster & ((1 << self.block_bits) - 1), self.order)

    async def update(self, cluster: int, delta: int) -> int:
        """Add ``delta`` to the refcount of ``cluster``; returns the new value."""
        bidx = cluster >> self.block_bits
        blk = await self._block(bidx)
        if blk is None:
            if delta < 0:
                raise RefcountError(f"refcount underflow for cluster {cluster:#x}")
            await self._new_block(bidx)
            blk = await self._block(bidx)
            if blk is None:  # created just now: cannot happen
                raise RefcountError(f"refcount block {bidx:#x} missing after creation")
        idx = cluster & ((1 << self.block_bits) - 1)
        value = get_entry(blk, idx, self.order) + delta
        if value < 0:
            raise RefcountError(f"refcount underflow for cluster {cluster:#x}")
        if value > self.max_refcount:
            raise OverflowError("refcount overflow")
        set_entry(blk, idx, self.order, value)
        self.dirty.add(bidx)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    # -- allocation -----------------------------------------------------------
    def _free_span(self, blk: bytearray, i: int, limit: int) -> tuple[int, int]:
        """First free entry at or after ``i`` in ``blk`` and the length of its free
        run (capped at ``limit`` entries); (per_block, 0) when none is free.

        Whole-byte entries (8 bits and up) are searched with bytes.find and
        bytes.lstrip, so a scan costs C time, not one Python step per entry.
        """
        per_block = 1 << self.block_bits
        if self.order >= 3:
            w = 1 << (self.order - 3)
            zero = bytes(w)
            pos = i * w
            while True:
                pos = blk.find(zero, pos)
                if pos < 0:
                    return per_block, 0
                if pos % w == 0:
                    break
                pos += w - pos % w  # a zero spanning two entries: skip to the next entry
            j = pos // w
            stop = min(per_block, j + limit) * w
            tail = blk[pos:stop]
            run = (len(tail) - len(tail.lstrip(b"\0"))) // w
            return j, run
        order = self.order
        j = i
        while j < per_block and get_entry(blk, j, order):
            j += 1
        k = j
        stop = min(per_block, j + limit)
        while k < stop and not get_entry(blk, k, order):
            k += 1
        return j, k - j

    async def _find_free_run(self, n: int) -> int:
        """First cluster of a run of ``n`` free clusters at or after ``free_hint``.

        Reads whole refcount blocks (one await per block, not per cluster);
        ``self.scanned`` counts the clusters passed over, so a test can tell
        a scan that restarts from the beginning from one that moves on.
        """
        bits = self.block_bits
        per_block = 1 << bits
        # the first cluster of a missing refblock is where that block will go:
        # keep runs off it so creating the block cannot break the run
        reserve = n < per_block
        c = self.free_hint
        run_start, run = c, 0
        while True:
            bidx = c >> bits
            bend = (bidx + 1) << bits
            blk = await self._block(bidx)
            if blk is None:
                if reserve and c == bidx << bits:
                    run = 0
                    c += 1
                if not run:
                    run_start = c
                if bend - c >= n - run:
                    self.scanned += n - run
                    return run_start
                self.scanned += bend - c
                run += bend - c
                c = bend
                continue
            i = c & (per_block - 1)
            j, free = self._free_span(blk, i, n)
            if j != i:
                run = 0  # a used cluster ended the run carried over from before
            if not free:
                self.scanned += per_block - i
                run = 0
                c = bend
                continue
            if not run:
                run_start = (bidx << bits) + j
            run += free
            self.scanned += j - i + free
            if run >= n:
                return run_start
            c = (bidx << bits) + j + free
            if c < bend:
                run = 0  # the run stopped at a used cluster inside this block

    async def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the first host offset.

        As QEMU's free_cluster_index, ``free_hint`` moves past every run it
        hands out and is moved back only when a cluster below it is freed, so
        allocating a whole image costs one pass over its refcounts.
        """
        while True:
            start = await self._find_free_run(n)
            # every refblock covering the run must exist before we count on it
            missing = None
            blks: dict[int, bytearray] = {}
            for b in range(start >> self.block_bits, ((start + n - 1) >> self.block_bits) + 1):
                blk = await self._block(b)
                if blk is None:
                    missing = b
                    break
                blks[b] = blk
            if missing is None:
                break
            await self._new_block(missing)
        self._set_run(start, n, 1, blks)
        self.free_hint = start + n
        return start << self.cluster_bits

    def _set_run(self, start: int, n: int, value: int, blks: dict[int, bytearray]) -> None:
        """Set the refcounts of clusters start..start+n-1 in their refblocks
        ``blks`` (cached again if a later load evicted them meanwhile)."""
        bits = self.block_bits
        mask = (1 << bits) - 1
        c, end = start, start + n
        while c < end:
            bidx = c >> bits
            blk = blks[bidx]
            self.dirty.add(bidx)
            if self.blocks.get(bidx) is not blk:
                self._store(bidx, blk)
            i = c & mask
            m = min(end - c, (1 << bits) - i)
            if self.order >= 3:
                w = 1 << (self.order - 3)
                blk[i * w:(i + m) * w] = value.to_bytes(w, "big") * m
            else:
                for k in range(i, i + m):
                    set_entry(blk, k, self.order, value)
            self.dirty.add(bidx)
            c += m

    async def _new_block(self, bidx: int) -> None:
        """Create refblock ``bidx`` in the first cluster it covers (all free)."""
        first = bidx << self.block_bits
        blk = bytearray(self.cluster_size)
        set_entry(blk, 0, self.order, 1)  # the block describes itself
        off = first << self.cluster_bits
        await self._write(off, bytes(blk))
        self._store(bidx, blk)
        self.version += 1
        if bidx >= self.table_clusters * self.cluster_size // 8:
            while len(self.table) <= bidx:
                self.table.append(0)
            self.table[bidx] = off
            await self._grow_table()
        else:
            while len(self.table) <= bidx:
                self.table.append(0)
            self.table[bidx] = off
            # the block must be on disk before the table points at it
            await self._flush()
            await self._write(self.table_offset + bidx * 8, struct.pack(">Q", off))

    async def _grow_table(self) -> None:
        """Write the refcount table to a bigger place and tell the header."""
        old_off, old_clusters = self.table_offset, self.table_clusters
        per_cluster = self.cluster_size // 8
        while True:
            need = len(self.table) + 2  # room for the table's own refblock, if new
            clusters = max(-(-need // per_cluster), old_clusters * 2 if old_clusters else 1)
            # reserve the clusters: they may need refblocks of their own, which
            # only extends self.table (in memory), so loop until it fits
            start = await self._find_free_run(clusters)
            for b in range(start >> self.block_bits,
                           ((start + clusters - 1) >> self.block_bits) + 1):
                if await self._block(b) is None:
                    blk = bytearray(self.cluster_size)
                    set_entry(blk, 0, self.order, 1)
                    boff = b << self.block_bits << self.cluster_bits
                    await self._write(boff, bytes(blk))
                    self._store(b, blk)
                    while len(self.table) <= b:
                        self.table.append(0)
                    self.table[b] = boff
                    self.version += 1
                    if start <= (b << self.block_bits) < start + clusters:
                        start = -1  # the run now overlaps the new block; search again
            if start < 0 or len(self.table) > clusters * per_cluster:
                continue
            for c in range(start, start + clusters):
                await self.update(c, 1)
            break
        new_off = start << self.cluster_bits
        # refblocks first, then the new table, then the header, then free the old table
        await self.write_dirty()
        buf = bytearray(clusters * self.cluster_size)
        struct.pack_into(f">{len(self.table)}Q", buf, 0, *self.table)
        await self._write(new_off, bytes(buf))
        await self._flush()
        self.table_offset, self.table_clusters = new_off, clusters
        self.version += 1
        await self._on_table_moved(new_off, clusters)
        await self._flush()
        if old_clusters:
            for c in range(old_off >> self.cluster_bits, (old_off >> self.cluster_bits) + old_clusters):
                await self.update(c, -1)
            await self.write_dirty()

    def clean_unused(self) -> int:
        """cache-clean-interval: drop the clean blocks nobody looked up since
        the previous call; returns how many were dropped."""
        stale = [b for b in self.blocks if b not in self.used and b not in self.dirty]
        for b in stale:
            del self.blocks[b]
        self.used.clear()
        return len(stale)

    async def write_dirty(self) -> None:
        """Write every changed refcount block (no flush), all at once."""
        await write_batch(self._write, [(self.table[bidx] & ~0x1FF, bytes(self.blocks[bidx]))
                                        for bidx in sorted(self.dirty)])
        self.dirty.clear()
