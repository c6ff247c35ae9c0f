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

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE

_SWAP = sys.byteorder == "little"


def unpack_table(buf: bytes | memoryview) -> array:
    a = array("Q")
    a.frombytes(buf)
    if _SWAP:
        a.byteswap()
    return a


def pack_table(a: array) -> bytes:
    if _SWAP:
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


class L2Cache:
    """LRU cache of L2 tables by host offset.

    Dirty tables are written back by the driver (which must first write the
    refcounts they depend on), so eviction only picks clean tables; when
    every table is dirty the cache grows past its size until the next flush.
    """

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 2)
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()
        self.used: set[int] = set()  # looked up since the last clean_unused()

    def get(self, offset: int) -> array | None:
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            self.used.add(offset)
        return t

    def put(self, offset: int, table: array, *, dirty: bool = False) -> None:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        self.used.add(offset)
        if dirty:
            self.dirty.add(offset)
        if len(self.tables) > self.capacity:
            for off in list(self.tables):
                if len(self.tables) <= self.capacity:
                    break
                if off not in self.dirty and off != offset:
                    del self.tables[off]

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()
        self.used.clear()

    def clean_unused(self) -> int:
        """cache-clean-interval: drop the clean tables nobody looked up since
        the previous call, returning how many were dropped (dirty ones stay
        until the next flush writes them)."""
        stale = [off for off in self.tables if off not in self.used and off not in self.dirty]
        for off in stale:
            del self.tables[off]
        self.used.clear()
        return len(stale)
