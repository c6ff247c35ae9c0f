"""In-memory dirty bitmaps (QEMU's BdrvDirtyBitmap over an HBitmap).

One bit per ``granularity`` bytes of guest data.  The I/O layer (node.py)
marks every write, zero write and discard in every *enabled* bitmap of the
node.  Bits are stored little-endian in a bytearray so that the sha256 of the
buffer padded to 64-bit words equals what QEMU's
``x-debug-block-dirty-bitmap-sha256`` hashes (the last HBitmap level as an
array of unsigned longs on a little-endian host).

Persistence is a format driver's business: a driver that can store bitmaps
sets ``supports_persistent_bitmaps`` and reads/writes :attr:`DirtyBitmap.data`
(``to_bytes``/``load_bytes``) at open/close.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..qapi.errors import GenericError

if TYPE_CHECKING:
    from .graph import BlockGraph
    from .node import BlockNode

# The first byte with any bit set / any bit clear: the regex engine scans in C,
# straight over the bytearray (no copy), so finding the next dirty or clean
# granule costs a memchr-like pass instead of a Python loop per granule.
_ANY_SET = re.compile(rb"[^\x00]")
_ANY_CLEAR = re.compile(rb"[^\xff]")


class DirtyBitmap:
    def __init__(self, name: str | None, size: int, granularity: int, *,
                 persistent: bool = False, enabled: bool = True):
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.persistent = persistent
        self.enabled = enabled
        self.busy = False        # held by a job or an export
        self.readonly = False    # loaded read-only from an image
        self.inconsistent = False
        self.size = 0
        self.bits = bytearray()
        self.resize(size)

    # -- geometry ---------------------------------------------------------------
    def _nbits(self, size: int) -> int:
        return max((size + self.granularity - 1) >> self.shift, 1)

    def resize(self, size: int) -> None:
        nbits = self._nbits(size)
        nbytes = (nbits + 7) // 8
        if nbytes < len(self.bits):
            del self.bits[nbytes:]
        else:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        # clear bits past the new end within the last byte
        if nbits % 8:
            self.bits[-1] &= (1 << (nbits % 8)) - 1
        self.size = size

    # -- bits -------------------------------------------------------------------
    def _set_bits(self, first: int, last: int, value: bool) -> None:
        """Set or clear bits first..last inclusive."""
        b0, b1 = first >> 3, last >> 3
        if b0 == b1:
            mask = ((1 << (last - first + 1)) - 1) << (first & 7)
            if value:
                self.bits[b0] |= mask
            else:
                self.bits[b0] &= ~mask & 0xFF
            return
        head = (0xFF << (first & 7)) & 0xFF
        tail = (1 << ((last & 7) + 1)) - 1
        if value:
            self.bits[b0] |= head
            self.bits[b1] |= tail
            self.bits[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
        else:
            self.bits[b0] &= ~head & 0xFF
            self.bits[b1] &= ~tail & 0xFF
            self.bits[b0 + 1:b1] = bytes(b1 - b0 - 1)

    def _range(self, offset: int, length: int) -> tuple[int, int] | None:
        if length <= 0 or offset >= self.size:
            return None
        end = min(offset + length, self.size)
        return offset >> self.shift, (end - 1) >> self.shift

    def set_dirty(self, offset: int, length: int) -> None:
        r = self._range(offset, length)
        if r:
            self._set_bits(r[0], r[1], True)

    def reset_dirty(self, offset: int, length: int) -> None:
        # QEMU only clears whole granules (hbitmap_reset asserts alignment)
        r = self._range(offset, length)
        if r:
            self._set_bits(r[0], r[1], False)

    def get(self, offset: int) -> bool:
        i = offset >> self.shift
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def count(self) -> int:
        """Dirty bytes as QEMU reports them (hbitmap_count: whole granules,
        the last one too when the disk ends inside it)."""
        n = int.from_bytes(self.bits, "little").bit_count()
        return n << self.shift

    # -- search -----------------------------------------------------------------
    def _find_bit(self, start: int, stop: int, value: bool) -> int:
        """First bit index in [start, stop) equal to ``value``, else ``stop``."""
        if start >= stop:
            return stop
        bits = self.bits
        b = start >> 3
        byte = bits[b] if value else ~bits[b] & 0xFF
        byte &= (0xFF << (start & 7)) & 0xFF
        if not byte:
            m = (_ANY_SET if value else _ANY_CLEAR).search(bits, b + 1, (stop + 7) >> 3)
            if m is None:
                return stop
            b = m.start()
            byte = bits[b] if value else ~bits[b] & 0xFF
        # lowest set bit of the byte: x & -x isolates it
        return min((b << 3) + (byte & -byte).bit_length() - 1, stop)

    def _span(self, offset: int, length: int | None) -> tuple[int, int]:
        end = self.size if length is None else min(self.size, offset + length)
        return offset, end

    def next_dirty(self, offset: int, length: int | None = None) -> int | None:
        """Byte offset of the first dirty byte in [offset, offset+length), or None.

        As QEMU's bdrv_dirty_bitmap_next_dirty: ``offset`` itself when its
        granule is dirty, else the start of the next dirty granule.
        """
        offset, end = self._span(offset, length)
        if offset >= end:
            return None
        i = self._find_bit(offset >> self.shift, ((end - 1) >> self.shift) + 1, True)
        pos = max(i << self.shift, offset)
        return pos if pos < end else None

    def next_clean(self, offset: int, length: int | None = None) -> int | None:
        """Byte offset of the first clean byte in [offset, offset+length), or None."""
        offset, end = self._span(offset, length)
        if offset >= end:
            return None
        i = self._find_bit(offset >> self.shift, ((end - 1) >> self.shift) + 1, False)
        pos = max(i << self.shift, offset)
        return pos if pos < end else None

    def next_dirty_area(self, offset: int, length: int | None = None,
                        max_len: int | None = None) -> tuple[int, int] | None:
        """The first dirty run in [offset, offset+length) as (offset, length),
        at most ``max_len`` bytes long; None when that range is clean."""
        offset, end = self._span(offset, length)
        start = self.next_dirty(offset, end - offset)
        if start is None:
            return None
        if max_len is not None:
            end = min(end, start + max_len)
        stop = self.next_clean(start, end - start)
        return start, (end if stop is None else stop) - start

    def dirty_extents(self, offset: int = 0,
                      length: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """Yield (offset, length, dirty) runs covering [offset, offset+length)."""
        pos, end = self._span(offset, length)
        dirty = pos < end and self.get(pos)
        while pos < end:
            nxt = (self.next_clean if dirty else self.next_dirty)(pos, end - pos)
            nxt = end if nxt is None else nxt
            yield pos, nxt - pos, dirty
            pos = nxt
            dirty = not dirty

    def merge_from(self, other: DirtyBitmap) -> None:
        if other.granularity == self.granularity and other.size == self.size:
            v = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = v.to_bytes(len(self.bits), "little")
            return
        for off, ln, dirty in other.dirty_extents():
            if dirty:
                self.set_dirty(off, ln)

    # -- serialisation ----------------------------------------------------------
    def to_bytes(self) -> bytes:
        return bytes(self.bits)

    def load_bytes(self, data: bytes) -> None:
        self.bits[:] = data[:len(self.bits)].ljust(len(self.bits), b"\0")

    def sha256(self) -> str:
        words = (len(self.bits) + 7) // 8
        return hashlib.sha256(bytes(self.bits).ljust(words * 8, b"\0")).hexdigest()

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {} if self.name is None else {"name": self.name}  # anonymous: no name
        d |= {
            "recording": self.enabled,
            "persistent": self.persistent,
            "busy": self.busy,
            "granularity": self.granularity,
            "count": self.count(),
        }
        if self.inconsistent:
            d["inconsistent"] = True
        return d

    # -- QMP-level checks (bdrv_dirty_bitmap_check) -----------------------------
    def check(self, *, allow_ro: bool = False) -> None:
        if self.busy:
            raise GenericError(f"Bitmap '{self.name}' is currently in use by another "
                               "operation and cannot be used")
        if self.readonly and not allow_ro:
            raise GenericError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise GenericError(f"Bitmap '{self.name}' is inconsistent and cannot be used")


def lookup(graph: BlockGraph, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """block_dirty_bitmap_lookup: ``(node, bitmap)``, with QEMU's errors for
    a missing node or bitmap (the bitmap commands and copy-before-write's
    ``bitmap`` option share them)."""
    node = graph.nodes.get(node_name)
    if node is None:
        raise GenericError(f"Node '{node_name}' not found")
    bm = node.bitmaps.get(name)
    if bm is None:
        raise GenericError(f"Dirty bitmap '{name}' not found")
    return node, bm
