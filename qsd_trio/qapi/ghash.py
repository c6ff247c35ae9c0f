"""Which unexpected member QEMU names when there are several.

QEMU's input visitor copies an object's keys into a GLib ``GHashTable``,
removes each member it visits, and reports the first key an iterator finds
in what is left: "Parameter 'y' is unexpected" for ``{"x": 1, "y": 2}``.
That order is GLib's bucket order, fed in QDict bucket order.  Clients see
the name, so this module replays both tables (GLib 2.74 ghash.c, QEMU 7.2
qobject/qdict.c) for the few keys of one object.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .cstr import c_bytes

_M32 = 0xFFFFFFFF
_QDICT_BUCKETS = 512
_MIN_SHIFT = 3
_PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
              32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301,
              8388593, 16777213, 33554393, 67108859, 134217689, 268435399,
              536870909, 1073741789, 2147483647]
_UNUSED, _TOMBSTONE = 0, 1


def _tdb_hash(key: bytes) -> int:
    value = (0x238F13AF * len(key)) & _M32
    for i, c in enumerate(key):
        value = (value + (c << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Iteration order of a QDict the keys were put into in this order."""
    buckets: dict[int, list[str]] = {}
    for k in keys:
        b = buckets.setdefault(_tdb_hash(c_bytes(k)) % _QDICT_BUCKETS, [])
        if k not in b:
            b.insert(0, k)  # QLIST_INSERT_HEAD
    return [k for b in sorted(buckets) for k in buckets[b]]


def _str_hash(key: bytes) -> int:
    h = 5381
    for c in key:
        if c >= 0x80:  # GLib hashes 'signed char'
            c -= 0x100
        h = (h * 33 + c) & _M32
    return h if h >= 2 else 2  # 0 and 1 mark unused/tombstone slots


class HashSet:
    """A GHashTable used as a set of strings (insert, remove, iterate)."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & _M32) % self.mod

    def _lookup(self, key: str, h: int) -> int:
        i = self._index(h)
        step = 0
        tomb = None
        while self.hashes[i] != _UNUSED:
            if self.hashes[i] == h and self.keys[i] == key:
                return i
            if self.hashes[i] == _TOMBSTONE and tomb is None:
                tomb = i
            step += 1
            i = (i + step) & self.mask
        return tomb if tomb is not None else i

    def insert(self, key: str) -> None:
        h = _str_hash(c_bytes(key))
        i = self._lookup(key, h)
        old = self.hashes[i]
        if old >= 2:
            return
        self.hashes[i] = h
        self.keys[i] = key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        h = _str_hash(c_bytes(key))
        i = self._lookup(key, h)
        if self.hashes[i] < 2:
            return
        self.hashes[i] = _TOMBSTONE
        self.keys[i] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if ((self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT)
                or self.size <= self.noccupied + self.noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        # in-place rehash by eviction, as ghash.c's resize_map() does
        for i in range(old_size):
            h = self.hashes[i]
            if h < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                j = self._index(h)
                step = 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                replaced = self.hashes[j]
                self.hashes[j] = h
                if replaced < 2:
                    self.keys[j] = key
                    break
                h = replaced
                key, self.keys[j] = self.keys[j], key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self) -> Iterator[str]:
        """Keys in GHashTableIter order (slot order)."""
        return (k for h, k in zip(self.hashes, self.keys, strict=True) if h >= 2 and k is not None)

    def first(self) -> str | None:
        for h, k in zip(self.hashes, self.keys, strict=True):
            if h >= 2:
                return k
        return None


def first_unexpected(keys: Iterable[str], consumed: Iterable[str]) -> str | None:
    """The key QEMU reports as unexpected: ``keys`` in input order,
    ``consumed`` the members the visitor took, in the order it took them."""
    table = HashSet()
    for k in qdict_order(keys):
        table.insert(k)
    for k in consumed:
        table.remove(k)
    return table.first()
