"""L1/L2 mapping tables and the L2 table cache (qcow2.rst, "Cluster mapping").

L2 tables are kept as ``array('Q')`` in host byte order (one byteswap per
load/store, then plain indexing on the hot path).  With extended L2 entries a
table holds (entry, bitmap) pairs, so guest cluster ``i`` of a table is at
``2*i`` and its subcluster bitmap at ``2*i+1``.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeAlias, overload

from ...qapi import qemuopts
from ...qapi.errors import GenericError

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE

_SWAP = sys.byteorder == "little"

# compressed L2 entries count their data in 512-byte sectors
COMPRESSED_SECTOR = 512


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """The host offset and byte length of the compressed data a compressed
    L2 entry points at (qcow2.rst, "Compressed Clusters Descriptor"; QEMU's
    qcow2_parse_compressed_l2_entry).

    Bits 0..x-1 (x = 62 - (cluster_bits - 8)) are the host offset, bits
    x..61 the number of 512-byte sectors the data spans after the first.
    The length runs from the offset to the end of the last sector, so
    ``[offset, offset + length)`` is everything the entry holds: what is read
    and decompressed, and the clusters whose refcounts it accounts for.
    """
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * COMPRESSED_SECTOR - (offset & (COMPRESSED_SECTOR - 1))


def compressed_entry(offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for ``length`` bytes of compressed data at host
    ``offset``: the inverse of :func:`compressed_extent` (which gives back
    the length up to the end of the last sector)."""
    x = 62 - (cluster_bits - 8)
    sectors = ((offset + length - 1) >> 9) - (offset >> 9)
    return QCOW_OFLAG_COMPRESSED | (sectors << x) | offset


def unpack_table(buf: bytes | bytearray | memoryview) -> array[int]:
    a = array("Q")
    a.frombytes(buf)
    if _SWAP:
        a.byteswap()
    return a


def pack_table(a: array[int]) -> bytes:
    if _SWAP:
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


class L2Cache:
    """LRU cache of L2 table slices by host offset (QEMU's l2-cache-entry-size).

    The cache holds at most ``capacity`` slices of ``slice_bytes`` each,
    keyed by the host offset of the slice.  When a slice is a whole table
    (the default), the driver gets the table's array itself; with smaller
    slices it gets a :class:`TableView` over the slices it asked for, which
    marks the slices it changes dirty.

    Dirty slices are written back by the driver (which must first write the
    refcounts they depend on), so eviction only picks clean slices; when
    every slice is dirty the cache grows past its size until the next flush.
    """

    def __init__(self, capacity: int, *, table_bytes: int = 0, slice_bytes: int = 0):
        self.capacity = max(capacity, 2)
        self.table_bytes = table_bytes
        self.slice_bytes = slice_bytes or table_bytes
        self.sliced = bool(table_bytes) and self.slice_bytes < table_bytes
        self.slice_words = self.slice_bytes // 8
        self.tables: OrderedDict[int, array[int]] = OrderedDict()  # slices, by host offset
        self.dirty: set[int] = set()
        self.used: set[int] = set()  # looked up since the last clean_unused()

    # -- whole tables (slice == table) and views -------------------------------
    def get(self, offset: int) -> array[int] | None:
        """The cached table at ``offset`` when a slice is a whole table, else
        None (sliced tables are looked up with :meth:`fetch`, which touches
        only the slices a request needs)."""
        if self.sliced:
            return None
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            self.used.add(offset)
        return t

    def put(self, offset: int, table: array[int], *, dirty: bool = False) -> L2Table:
        """Cache a whole table read from disk (or a new one); returns what the
        driver must index from now on (the array, or a view of its slices).
        Slices already cached (possibly changed) are kept, not replaced."""
        if not self.sliced:
            self.tables[offset] = table
            self.tables.move_to_end(offset)
            self.used.add(offset)
            if dirty:
                self.dirty.add(offset)
            self._evict()
            return table
        w = self.slice_words
        parts: list[array[int] | None] = []
        for i, key in enumerate(range(offset, offset + self.table_bytes, self.slice_bytes)):
            t = self.tables.get(key)
            if t is None:
                t = table[i * w:(i + 1) * w]
                self.tables[key] = t
            self.tables.move_to_end(key)
            self.used.add(key)
            if dirty:
                self.dirty.add(key)
            parts.append(t)
        self._evict()
        return TableView(self, offset, parts)

    async def fetch(self, offset: int, read: ReadFn, first: int = 0,
                    stop: int | None = None) -> L2Table:
        """The table at ``offset``, reading the slices that are not cached
        (only those covering entries ``first``..``stop-1`` when given; the
        view then holds only those) with ``await read(offset, length)``."""
        if not self.sliced:
            t = self.get(offset)
            if t is not None:
                return t
            return self.put(offset, unpack_table(await read(offset, self.table_bytes)))
        w = self.slice_words
        nslices = self.table_bytes // self.slice_bytes
        s0 = first // w
        s1 = nslices if stop is None else -(-stop // w)
        parts: list[array[int] | None] = [None] * nslices
        si = s0
        while si < s1:
            key = offset + si * self.slice_bytes
            t = self.tables.get(key)
            if t is not None:
                self.tables.move_to_end(key)
                self.used.add(key)
                parts[si] = t
                si += 1
                continue
            # one read for a run of missing slices
            sj = si + 1
            while sj < s1 and offset + sj * self.slice_bytes not in self.tables:
                sj += 1
            buf = unpack_table(await read(key, (sj - si) * self.slice_bytes))
            for k in range(si, sj):
                kk = offset + k * self.slice_bytes
                t = self.tables.get(kk)  # cached meanwhile (and maybe changed): keep it
                if t is None:
                    t = buf[(k - si) * w:(k - si + 1) * w]
                    self.tables[kk] = t
                self.tables.move_to_end(kk)
                self.used.add(kk)
                parts[k] = t
            si = sj
        self._evict()
        return TableView(self, offset, parts)

    def _evict(self) -> None:
        """Drop least recently used slices beyond the capacity: only clean
        ones that nobody holds (a request that looked a table up and then
        awaited something may still change it; dropping it then would lose
        the change or have it land in a second copy)."""
        if len(self.tables) <= self.capacity:
            return
        tables = self.tables
        refcount = sys.getrefcount
        for off in list(tables):
            if len(tables) <= self.capacity:
                break
            if off in self.dirty:
                continue
            t = tables[off]
            if refcount(t) <= 3:  # the cache, ``t`` and the argument
                del tables[off]

    def shrink(self) -> None:
        """Back to the capacity once a writeback has made slices clean."""
        self._evict()

    def overfull(self) -> bool:
        """Dirty slices keep the cache past its size: only a writeback lets
        it evict again.  (QEMU writes a dirty entry back when it needs the
        slot, qcow2_cache_do_get; a cache that holds every table of the
        image, the default, never has to until a flush.)"""
        return bool(self.dirty) and len(self.tables) > self.capacity

    def _touch(self, key: int, part: array[int]) -> None:
        """A view changed slice ``key``: dirty, and cached again if evicted."""
        if self.tables.get(key) is not part:
            self.tables[key] = part
        self.dirty.add(key)

    def mark_dirty(self, offset: int) -> None:
        """The driver changed the table at ``offset`` (views mark their slices
        themselves as they are written)."""
        if not self.sliced:
            self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        for key in range(offset, offset + max(self.table_bytes, 1), self.slice_bytes or 1):
            self.tables.pop(key, None)
            self.dirty.discard(key)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()
        self.used.clear()

    def clean_unused(self) -> int:
        """cache-clean-interval: drop the clean slices nobody looked up since
        the previous call, returning how many were dropped (dirty ones stay
        until the next flush writes them)."""
        stale = [off for off in self.tables if off not in self.used and off not in self.dirty]
        for off in stale:
            del self.tables[off]
        self.used.clear()
        return len(stale)


class TableView:
    """An L2 table seen through its cached slices (l2-cache-entry-size below
    the cluster size).  Indexing is by entry, as on the table's array;
    writing an entry marks its slice dirty.  A view made for a range of
    entries holds only the slices of that range."""

    __slots__ = ("cache", "offset", "parts", "shift", "mask", "words")

    def __init__(self, cache: L2Cache, offset: int, parts: list[array[int] | None]):
        self.cache, self.offset, self.parts = cache, offset, parts
        self.words = cache.slice_words
        self.shift = self.words.bit_length() - 1
        self.mask = self.words - 1

    def __len__(self) -> int:
        return len(self.parts) * self.words

    def _part(self, si: int) -> array[int]:
        part = self.parts[si]
        if part is None:
            raise IndexError("L2 entry outside the slices of this view")
        return part

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self._part(i >> self.shift)[i & self.mask]

    def __setitem__(self, i: int, value: int) -> None:
        si = i >> self.shift
        part = self._part(si)
        part[i & self.mask] = value
        self.cache._touch(self.offset + si * self.cache.slice_bytes, part)

    def __iter__(self) -> Iterator[int]:
        for si in range(len(self.parts)):
            yield from self._part(si)


# what the cache hands the driver: the table's array, or a view of its slices
L2Table: TypeAlias = "array[int] | TableView"
# reads ``length`` bytes at ``offset`` of the image file
ReadFn: TypeAlias = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]


# qcow2.h: at least this many L2 slices and refcount blocks are cached
MIN_L2_CACHE_SIZE = 2
MIN_REFCOUNT_CACHE_SIZE = 4
DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20  # on Linux
INT_MAX = (1 << 31) - 1
UINT_MAX = (1 << 32) - 1


def read_cache_sizes(options: dict[str, Any], cluster_size: int, virtual_size: int,
                     l2_entry_bytes: int) -> tuple[int, int, int]:
    """QEMU's read_cache_sizes and the checks after it in
    qcow2_update_options_prepare, with their messages: (L2 cache slices,
    slice size in bytes, refcount cache blocks).  Raises GenericError."""
    qemuopts.absorb_sizes("qcow2", options)
    combined = options.get("cache-size")
    l2_set = options.get("l2-cache-size")
    rc_set = options.get("refcount-cache-size")
    entry = options.get("l2-cache-entry-size")
    max_l2_cache = -(-(-(-virtual_size // cluster_size) * l2_entry_bytes)
                     // cluster_size) * cluster_size
    l2_max_setting = l2_set if l2_set is not None else DEFAULT_L2_CACHE_MAX_SIZE
    refcount = rc_set or 0
    entry_size = entry if entry is not None else cluster_size
    l2 = min(max_l2_cache, l2_max_setting)
    min_refcount = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    if combined is not None:
        if l2_set is not None and rc_set is not None:
            raise GenericError("cache-size, l2-cache-size and refcount-cache-size may not "
                               "be set at the same time")
        if l2_set is not None and l2_max_setting > combined:
            raise GenericError("l2-cache-size may not exceed cache-size")
        if refcount > combined:
            raise GenericError("refcount-cache-size may not exceed cache-size")
        if l2_set is not None:
            refcount = combined - l2
        elif rc_set is not None:
            l2 = combined - refcount
        elif combined >= max_l2_cache + min_refcount:
            l2 = max_l2_cache
            refcount = combined - l2
        else:
            refcount = min(combined, min_refcount)
            l2 = combined - refcount
    # a cache that cannot cover the whole disk works in 4 KiB slices
    if l2 < max_l2_cache and entry is None:
        entry_size = min(cluster_size, 4096)
    if entry_size < 512 or entry_size > cluster_size or entry_size & (entry_size - 1):
        raise GenericError(f"L2 cache entry size must be a power of two between 512 "
                           f"and the cluster size ({cluster_size})")
    slices = max(l2 // entry_size, MIN_L2_CACHE_SIZE)
    if slices > INT_MAX:
        raise GenericError("L2 cache size too big")
    blocks = max(refcount // cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if blocks > INT_MAX:
        raise GenericError("Refcount cache size too big")
    interval = options.get("cache-clean-interval")
    if interval is not None and interval > UINT_MAX:
        raise GenericError("Cache clean interval too big")
    return slices, entry_size, blocks
