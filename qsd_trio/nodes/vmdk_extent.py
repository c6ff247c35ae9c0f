"""VMDK extents: the headers that open them and the tables that map them,
as QEMU 7.2's block/vmdk.c (VmdkExtent, vmdk_add_extent, vmdk_init_tables,
vmdk_open_vmdk4, vmdk_open_vmfs_sparse, vmdk_open_se_sparse and the table
half of get_cluster_offset).

An image is a list of extents laid end to end.  A *flat* extent is a
window of a file (from ``flat_start_offset``), one cluster as large as the
extent.  A *sparse* extent maps grains (clusters of ``cluster_sectors``)
through two levels: the grain directory (QEMU's L1 table, at
``l1_table_offset``) holds the sector of each grain table (L2), a grain
table the sector of each grain, 0 when it is unallocated and 1 when it is
a zeroed grain (VMDK4 with the zeroed-grain flag).  Three headers describe
sparse extents:

* VMDK4 ("KDMV", hosted sparse and streamOptimized): 32-bit entries,
  ``num_gtes_per_gt`` per table, an optional redundant directory
  (``rgd_offset``) whose tables writes update too;
* VMDK3 ("COWD", vmfsSparse): 32-bit entries, 4096 per table;
* seSparse (ESXi's space-efficient sparse, read-only): 64-bit entries, 4096
  per table, directory entries ``0x1000000000000000 | table index`` and
  table entries whose top nibble says unallocated (0), unmapped or zero (1,
  2) or allocated (3, the grain index split over the other bits).

Tables are read with ``bdrv_pread``: past the end of the file they read as
zeroes and nothing is read there; an offset beyond BDRV_MAX_LENGTH is EIO.
They are :mod:`.table_format`'s: the directory a :class:`~.table_format.Table`
(a partial one when the file holds only part of it), grain tables in a
:class:`~.table_format.TableCache` (QEMU keeps 16; more are kept here, which
changes nothing but speed: tables are only changed through it).  Unlike the
formats :class:`~.table_format.TableFormatNode` serves, an image's extents
are several files, so each extent reads its own.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from ..qapi.errors import GenericError
from .node import BdrvChild, BlockNode, Buffer
from .packed import Packed
from .table_format import Table, TableCache, check_request

SECTOR = 512
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
VMDK4_COMPRESSION_DEFLATE = 1
VMDK4_FLAG_NL_DETECT = 1 << 0
VMDK4_FLAG_RGD = 1 << 1
VMDK4_FLAG_ZERO_GRAIN = 1 << 2
VMDK4_FLAG_COMPRESS = 1 << 16
VMDK4_FLAG_MARKER = 1 << 17
VMDK4_GD_AT_END = U64
VMDK_EXTENT_MAX_SECTORS = 1 << 32
VMDK_GTE_ZEROED = 1
SESPARSE_CONST_HEADER_MAGIC = 0x00000000CAFEBABE
SESPARSE_VOLATILE_HEADER_MAGIC = 0x00000000CAFECAFE
SESPARSE_VERSION = 0x0000000200000001
MAX_L1_SIZE = 32 * 1024 * 1024
MAX_CLUSTER_SECTORS = 0x200000  # 1 GiB

# get_cluster_offset's results
VMDK_OK, VMDK_ERROR, VMDK_UNALLOC, VMDK_ZEROED = 0, -1, -2, -3

# VMDK4Header after the 4-byte magic: version, flags, capacity, granularity,
# desc_offset, desc_size, num_gtes_per_gt, rgd_offset, gd_offset,
# grain_offset, filler, check_bytes[4], compressAlgorithm (75 bytes)
_VMDK4 = struct.Struct("<IIQQQQIQQQc4sH")
# VMDK3Header after the magic: version, flags, disk_sectors, granularity,
# l1dir_offset, l1dir_size, file_sectors, cylinders, heads, sectors_per_track
_VMDK3 = struct.Struct("<10I")
# VMDKSESparseConstHeader: 26 u64 fields and 304 bytes of padding
_SE_CONST = struct.Struct("<26Q304s")
# VMDKSESparseVolatileHeader: magic, free_gt_number, next_txn_seq_number,
# replay_journal, 480 bytes of padding
_SE_VOLATILE = struct.Struct("<4Q480s")
assert _VMDK4.size == 75 and _SE_CONST.size == _SE_VOLATILE.size == SECTOR


class Vmdk4Header(Packed):
    """The VMDK4 header's fields by QEMU's names."""

    STRUCT = _VMDK4
    FIELDS = ("version", "flags", "capacity", "granularity", "desc_offset", "desc_size",
              "num_gtes_per_gt", "rgd_offset", "gd_offset", "grain_offset", "filler",
              "check_bytes", "compressAlgorithm")


class SeSparseConstHeader(Packed):
    STRUCT = _SE_CONST
    FIELDS = ("magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
              "reserved1", "reserved2", "reserved3", "reserved4", "volatile_header_offset",
              "volatile_header_size", "journal_header_offset", "journal_header_size",
              "journal_offset", "journal_size", "grain_dir_offset", "grain_dir_size",
              "grain_tables_offset", "grain_tables_size", "free_bitmap_offset",
              "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset",
              "grains_size", "pad")


def einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


def signed64(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def round_up(n: int, d: int) -> int:
    """QEMU's ROUND_UP, a mask (``(n + d - 1) & -d``), which is only a
    rounding for powers of two; kept as it is because it places grains."""
    return signed64((n + d - 1) & -d)


async def pread(file: BlockNode, offset: int, length: int) -> Buffer:
    """bdrv_pread on one extent's ``file`` (TableFormatNode.pread reads its
    one file): check_request's EIO, zeroes past the end of the file."""
    check_request(offset, length)
    offset = signed64(offset)
    have = max(0, min(length, file.length - offset))
    data = await file.read(offset, have) if have else b""
    if have == length:
        return data
    return bytes(data) + bytes(length - have)


@dataclass
class MetaData:
    """VmdkMetaData: where the entry of the grain being written lives."""

    l1_index: int = 0
    l2_index: int = 0
    l2_offset: int = 0
    table: Table | None = None  # the cached table holding the entry
    new_allocation: bool = False


@dataclass(eq=False)
class Extent:
    """VmdkExtent.  Built by :func:`add_extent`; the node sets ``end_sector``."""

    edge: BdrvChild
    flat: bool
    sectors: int
    l1_table_offset: int
    l1_backup_table_offset: int
    l1_size: int
    l2_size: int
    cluster_sectors: int
    next_cluster_sector: int
    end_sector: int = 0
    flat_start_offset: int = 0
    compressed: bool = False
    has_marker: bool = False
    has_zero_grain: bool = False
    sesparse: bool = False
    sesparse_l2_tables_offset: int = 0
    sesparse_clusters_offset: int = 0
    entry_size: int = 4
    version: int = 0
    type: str | None = None  # the descriptor's word (FLAT, SPARSE, ...)
    l1: Table = field(default_factory=lambda: Table.of("<I", 0))
    l1_backup: Table | None = None
    l2_cache: TableCache = field(default_factory=lambda: TableCache(16))

    @property
    def file(self) -> BlockNode:
        return self.edge.node

    @property
    def l1_entry_sectors(self) -> int:
        return (self.l2_size * self.cluster_sectors) & U32

    @property
    def cluster_bytes(self) -> int:
        return self.cluster_sectors * SECTOR

    @property
    def begin(self) -> int:
        """The guest offset where the extent starts."""
        return (self.end_sector - self.sectors) * SECTOR

    def offset_in_cluster(self, offset: int) -> int:
        """vmdk_find_offset_in_cluster for guest ``offset``."""
        cb = self.cluster_bytes
        return (offset - self.begin) % cb if cb else 0

    # -- tables ---------------------------------------------------------------------
    @property
    def fmt(self) -> str:
        """The struct format of a table entry."""
        return "<I" if self.entry_size == 4 else "<Q"

    async def init_tables(self) -> None:
        """vmdk_init_tables: the directory and its redundant copy, each as far
        as the file holds it (the rest reads as zero entries)."""
        self.l1 = await self._read_dir(self.l1_table_offset, "l1 table")
        if self.l1_backup_table_offset:
            self.l1_backup = await self._read_dir(self.l1_backup_table_offset,
                                                  "l1 backup table")
        # as many tables as 1 MiB of entries holds, at least QEMU's 16
        self.l2_cache = TableCache(max(16, (1 << 20) // max(1, self.l2_size)))

    async def _read_dir(self, offset: int, what: str) -> Table:
        """A directory: the whole of it checked as bdrv_pread checks it,
        then what the file holds of it read."""
        file = self.file
        size = self.l1_size * self.entry_size
        try:
            check_request(offset, size)
            offset = signed64(offset)
            have = max(0, min(size, file.length - offset)) // self.entry_size * self.entry_size
            raw = await file.read(offset, have) if have else b""
        except OSError as e:
            raise GenericError(f"Could not read {what} from extent '{file.filename}': "
                               f"{e.strerror}") from None
        return Table.of(self.fmt, self.l1_size, raw)

    def l2_offset_of(self, l1_index: int) -> int | None:
        """The grain table's sector for directory entry ``l1_index``; 0 for
        none, None when the entry is invalid (VMDK_ERROR)."""
        e: int = self.l1[l1_index]
        if not self.sesparse:
            return e
        if e == 0:
            return 0
        # the top 32 bits must be 0x10000000: at most 64 TB of 16 MB tables
        if e & 0xFFFFFFFF00000000 != 0x1000000000000000:
            return None
        off = self.sesparse_l2_tables_offset + (e & U32) * self.l2_size * 8 // SECTOR
        return off if off <= U32 else None

    async def l2_table(self, l2_offset: int) -> Table | None:
        """The grain table at sector ``l2_offset``, from the cache or read;
        None when it cannot be read (VMDK_ERROR)."""
        t = self.l2_cache.lookup(l2_offset)
        if t is not None:
            return t
        self.file.debug_event("l2_load")
        try:
            raw = await pread(self.file, l2_offset * SECTOR, self.l2_size * self.entry_size)
        except OSError:
            return None
        t = Table.of(self.fmt, self.l2_size, raw)
        self.l2_cache.put(l2_offset, t)
        return t

    def indexes(self, rel: int) -> tuple[int, int]:
        """(directory index, table index) of extent-relative byte ``rel``;
        the caller has checked that l1_entry_sectors is not zero."""
        sector = rel >> 9
        l1_index = sector // self.l1_entry_sectors
        l2_index = (sector // self.cluster_sectors) % self.l2_size
        return l1_index, l2_index

    def grain(self, raw: int) -> tuple[int, int]:
        """A table entry as (VMDK_OK/VMDK_UNALLOC/VMDK_ZEROED/VMDK_ERROR,
        the grain's sector for VMDK_OK)."""
        if self.sesparse:
            top = raw & 0xF000000000000000
            if top == 0:
                if raw:
                    return VMDK_ERROR, 0
            elif top in (0x1000000000000000, 0x2000000000000000):
                return VMDK_ZEROED, 0  # unmapped or zero
            elif top == 0x3000000000000000:
                index = ((raw & 0x0FFF000000000000) >> 48) | ((raw & 0x0000FFFFFFFFFFFF) << 12)
                raw = self.sesparse_clusters_offset + index * self.cluster_sectors
                return VMDK_OK, raw & U64
            else:
                return VMDK_ERROR, 0
        if self.has_zero_grain and raw == VMDK_GTE_ZEROED:
            return VMDK_ZEROED, 0
        if raw == 0:
            return VMDK_UNALLOC, 0
        return VMDK_OK, raw

    def usable(self) -> bool:
        """Whether the geometry can map anything: QEMU divides by these (a
        zero granularity in a COWD header makes it crash)."""
        return self.l1_entry_sectors != 0 and self.cluster_sectors != 0 and self.l2_size != 0

    async def lookup(self, offset: int, m: MetaData | None) -> tuple[int, int]:
        """The table half of get_cluster_offset for guest ``offset``:
        (VMDK_*, grain sector).  Fills ``m`` once a table is found."""
        if m is not None:
            m.new_allocation = False
        if self.flat:
            return VMDK_OK, self.flat_start_offset >> 9
        if not self.usable():
            return VMDK_ERROR, 0
        l1_index, l2_index = self.indexes(offset - self.begin)
        if l1_index >= self.l1_size:
            return VMDK_ERROR, 0
        l2_offset = self.l2_offset_of(l1_index)
        if l2_offset is None:
            return VMDK_ERROR, 0
        if not l2_offset:
            return VMDK_UNALLOC, 0
        table = await self.l2_table(l2_offset)
        if table is None:
            return VMDK_ERROR, 0
        if m is not None:
            m.l1_index, m.l2_index, m.l2_offset, m.table = l1_index, l2_index, l2_offset, table
        return self.grain(table[l2_index])

    def lookup_cached(self, offset: int) -> tuple[int, int, Table | None, int]:
        """:meth:`lookup` without waiting: (VMDK_*, grain sector, table,
        table index); VMDK_ERROR with table None also when the table is not
        cached (the caller then takes the long way)."""
        if self.flat:
            return VMDK_OK, self.flat_start_offset >> 9, None, 0
        if not self.usable():
            return VMDK_ERROR, 0, None, 0
        l1_index, l2_index = self.indexes(offset - self.begin)
        if l1_index >= self.l1_size:
            return VMDK_ERROR, 0, None, 0
        l2_offset = self.l2_offset_of(l1_index)
        if not l2_offset:
            return (VMDK_UNALLOC if l2_offset == 0 else VMDK_ERROR), 0, None, 0
        table = self.l2_cache.get(l2_offset)
        if table is None:
            return VMDK_ERROR, 0, None, 0
        kind, sector = self.grain(table[l2_index])
        return kind, sector, table, l2_index

    async def l2_update(self, m: MetaData, value: int) -> None:
        """vmdk_L2update: entry ``m.l2_index`` of the grain table (and of the
        redundant directory's table, wherever that directory points) set to
        ``value``; OSError if a write fails."""
        raw = struct.pack("<I", value & U32)
        self.file.debug_event("l2_update")
        await self.file.write(m.l2_offset * SECTOR + m.l2_index * 4, raw)
        if self.l1_backup_table_offset:
            backup = self.l1_backup[m.l1_index] if self.l1_backup is not None else 0
            await self.file.write(backup * SECTOR + m.l2_index * 4, raw)
        if m.table is not None:
            m.table[m.l2_index] = value & U32


def add_extent(edge: BdrvChild, *, flat: bool, sectors: int, l1_offset: int = 0,
               l1_backup_offset: int = 0, l1_size: int = 0, l2_size: int = 0,
               cluster_sectors: int = 0) -> Extent:
    """vmdk_add_extent's checks and fields (the node lays the extents end to
    end).  ``l1_size`` is QEMU's uint32_t, ``l2_size`` its int."""
    if cluster_sectors > MAX_CLUSTER_SECTORS:
        # 1 GiB grains are unrealistic
        raise GenericError("Invalid granularity, image may be corrupt")
    l1_size &= U32
    if l1_size > MAX_L1_SIZE:
        raise GenericError("L1 size too big")
    nb_sectors = -(-edge.node.length // SECTOR)
    return Extent(edge, flat, sectors, signed64(l1_offset), signed64(l1_backup_offset), l1_size,
                  l2_size, sectors if flat else cluster_sectors,
                  round_up(nb_sectors, cluster_sectors))


# -- sparse extents' headers --------------------------------------------------------------
async def open_vmfs_sparse(edge: BdrvChild) -> Extent:
    """vmdk_open_vmfs_sparse: a COWD (VMDK3) extent."""
    try:
        raw = bytes(await pread(edge.node, 4, _VMDK3.size))
    except OSError as e:
        raise GenericError(f"Could not read header from file '{edge.node.filename}': "
                           f"{e.strerror}") from None
    (_version, _flags, disk_sectors, granularity, l1dir_offset, l1dir_size,
     *_rest) = _VMDK3.unpack(raw)
    ext = add_extent(edge, flat=False, sectors=disk_sectors, l1_offset=l1dir_offset << 9,
                     l1_size=l1dir_size, l2_size=4096, cluster_sectors=granularity)
    await ext.init_tables()
    return ext


def check_vmdk4(h: Vmdk4Header, read_write: bool) -> int:
    """vmdk_open_vmdk4's checks of the header, in its order; returns
    l1_size (QEMU's uint32_t)."""
    compressed = h["compressAlgorithm"] == VMDK4_COMPRESSION_DEFLATE
    version = h["version"]
    if version > 3:
        raise GenericError(f"Unsupported VMDK version {version}")
    if version == 3 and read_write and not compressed:
        # changed block tracking (VMware KB 2064959): readable as version 1
        raise GenericError("VMDK version 3 must be read only")
    if h["num_gtes_per_gt"] > 512:
        raise GenericError("L2 table size too big")
    l1_entry_sectors: int = (h["num_gtes_per_gt"] * h["granularity"]) & U32
    if l1_entry_sectors == 0:
        raise GenericError("L1 entry size is invalid")
    capacity: int = h["capacity"]
    return ((capacity + l1_entry_sectors - 1) & U64) // l1_entry_sectors & U32


async def open_se_sparse(edge: BdrvChild) -> Extent:
    """vmdk_open_se_sparse: an ESXi seSparse extent (the caller made the
    node read-only first), with QEMU's checks of both headers."""
    file = edge.node
    try:
        c = SeSparseConstHeader(bytes(await pread(file, 0, SECTOR)))
    except OSError as e:
        raise GenericError(f"Could not read const header from file '{file.filename}': "
                           f"{e.strerror}") from None
    if c["magic"] != SESPARSE_CONST_HEADER_MAGIC:
        raise GenericError(f"Bad const header magic: 0x{c['magic']:016x}")
    if c["version"] != SESPARSE_VERSION:
        raise GenericError(f"Unsupported version: 0x{c['version']:016x}")
    if c["grain_size"] != 8:
        raise GenericError(f"Unsupported grain size: {c['grain_size']}")
    if c["grain_table_size"] != 64:
        raise GenericError(f"Unsupported grain table size: {c['grain_table_size']}")
    if c["flags"] != 0:
        raise GenericError(f"Unsupported flags: 0x{c['flags']:016x}")
    reserved = [c[f"reserved{i}"] for i in range(1, 5)]
    if any(reserved):
        raise GenericError("Unsupported reserved bits: " + " ".join(f"0x{r:016x}" for r in reserved))
    if any(c["pad"]):
        raise GenericError("Unsupported non-zero const header padding")
    try:
        raw = bytes(await pread(file, (c["volatile_header_offset"] * SECTOR) & U64, SECTOR))
    except OSError as e:
        raise GenericError(f"Could not read volatile header from file '{file.filename}': "
                           f"{e.strerror}") from None
    magic, _free, _seq, replay, pad = _SE_VOLATILE.unpack(raw)
    if magic != SESPARSE_VOLATILE_HEADER_MAGIC:
        raise GenericError(f"Bad volatile header magic: 0x{magic:016x}")
    if replay:
        raise GenericError("Image is dirty, Replaying journal not supported")
    if any(pad):
        raise GenericError("Unsupported non-zero volatile header padding")
    ext = add_extent(edge, flat=False, sectors=signed64(c["capacity"]),
                     l1_offset=c["grain_dir_offset"] * SECTOR,
                     l1_size=((c["grain_dir_size"] * SECTOR) & U64) // 8,
                     l2_size=c["grain_table_size"] * SECTOR // 8,
                     cluster_sectors=c["grain_size"])
    ext.sesparse = True
    ext.sesparse_l2_tables_offset = c["grain_tables_offset"]
    ext.sesparse_clusters_offset = c["grains_offset"]
    ext.entry_size = 8
    await ext.init_tables()
    return ext
