"""Metadata overlap checks (QEMU's qcow2_check_metadata_overlap, ``overlap-check``).

Before the driver writes data or metadata to the image file it asks whether
the write would land on a metadata structure; if it would, the image is
marked corrupt ("Preventing invalid write on metadata (overlaps with ...)")
and the write fails.  Which structures are checked is QEMU's
Qcow2OverlapChecks: a template (``none``, ``constant``, ``cached``, the
default, or ``all``) and per-structure booleans that override it.

The structures are looked up in an index by host cluster, rebuilt only
when the metadata layout changes (the driver's ``_layout``), so a check on
the write path is a dictionary lookup per cluster written.
"""

from __future__ import annotations

import struct
from typing import Any

# QCOW2_OL_*_BITNR, in QEMU's order (also the order checks are made in,
# except that QEMU tests L2 tables and refcount blocks after the inactive L1)
MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

# Qcow2OverlapChecks member -> bit
OPTION_BITS = {
    "main-header": MAIN_HEADER,
    "active-l1": ACTIVE_L1,
    "active-l2": ACTIVE_L2,
    "refcount-table": REFCOUNT_TABLE,
    "refcount-block": REFCOUNT_BLOCK,
    "snapshot-table": SNAPSHOT_TABLE,
    "inactive-l1": INACTIVE_L1,
    "inactive-l2": INACTIVE_L2,
    "bitmap-directory": BITMAP_DIRECTORY,
}

NAMES = {
    MAIN_HEADER: "qcow2_header",
    ACTIVE_L1: "active L1 table",
    ACTIVE_L2: "active L2 table",
    REFCOUNT_TABLE: "refcount table",
    REFCOUNT_BLOCK: "refcount block",
    SNAPSHOT_TABLE: "snapshot table",
    INACTIVE_L1: "inactive L1 table",
    INACTIVE_L2: "inactive L2 table",
    BITMAP_DIRECTORY: "bitmap directory",
}

# qcow2.h: what each template checks
CONSTANT = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY
CACHED = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1
ALL = CACHED | INACTIVE_L2
TEMPLATES = {"none": 0, "constant": CONSTANT, "cached": CACHED, "all": ALL}

# the order qcow2_check_metadata_overlap tests structures in (the first hit names the overlap)
_ORDER = (MAIN_HEADER, ACTIVE_L1, REFCOUNT_TABLE, SNAPSHOT_TABLE, INACTIVE_L1,
          ACTIVE_L2, REFCOUNT_BLOCK, INACTIVE_L2, BITMAP_DIRECTORY)


def parse_option(value: str | dict[str, Any] | None) -> int:
    """The bit mask an ``overlap-check`` option selects (default "cached")."""
    if value is None:
        return CACHED
    if isinstance(value, str):
        return TEMPLATES[value]
    mask = TEMPLATES[value.get("template") or "cached"]
    for key, bit in OPTION_BITS.items():
        flag = value.get(key)
        if flag is not None:
            mask = (mask | bit) if flag else (mask & ~bit)
    return mask


def bitmap_directory(ext: bytes | None) -> tuple[int, int]:
    """(offset, size) of the bitmap directory from the bitmaps extension."""
    if ext is None or len(ext) < 24:
        return 0, 0
    _nb, size, offset = struct.unpack_from(">I4xQQ", ext)
    return offset, size


class OverlapIndex:
    """Where the metadata lies, for one layout of the image: the bits of the
    structures in each host cluster (QEMU widens a write to whole clusters
    before comparing, so cluster granularity loses nothing)."""

    def __init__(self, cluster_bits: int):
        self.cb = cluster_bits
        self.clusters: dict[int, int] = {0: MAIN_HEADER}

    def add_range(self, bit: int, start: int, length: int) -> None:
        if length > 0:
            cl = self.clusters
            for c in range(start >> self.cb, ((start + length - 1) >> self.cb) + 1):
                cl[c] = cl.get(c, 0) | bit

    def add_cluster(self, bit: int, offset: int) -> None:
        if offset:
            c = offset >> self.cb
            self.clusters[c] = self.clusters.get(c, 0) | bit

    def check(self, mask: int, offset: int, size: int) -> int:
        """The bit of the first structure (in QEMU's order) a write of
        ``size`` bytes at ``offset`` would overlap, among ``mask``; else 0."""
        if not size or not mask:
            return 0
        cl = self.clusters
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        if first == last:
            hits = cl.get(first, 0) & mask
        elif last - first < len(cl):
            # the common case, a data write of 16 clusters that hits nothing,
            # answered with the loop in C
            if not any(map(cl.get, range(first, last + 1))):
                return 0
            hits = 0
            for c in range(first, last + 1):
                hits |= cl.get(c, 0)
            hits &= mask
        else:
            hits = 0
            for c, bits in cl.items():
                if first <= c <= last:
                    hits |= bits
            hits &= mask
        if not hits:
            return 0
        for bit in _ORDER:
            if hits & bit:
                return bit
        return 0


def message(bit: int) -> str:
    return f"Preventing invalid write on metadata (overlaps with {NAMES[bit]})"

