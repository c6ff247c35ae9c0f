"""The ``parallels`` format, as QEMU 7.2's block/parallels.c
(docs/interop/parallels.txt).

Layout: a 64-byte little-endian header (:data:`_HEADER`) at offset 0, the
BAT (``bat_entries`` 32-bit entries) right after it, the data clusters of
``tracks`` sectors from ``data_off`` (in sectors).  A BAT entry times
``off_multiplier`` is the sector of the cluster in the file (the old magic
"WithoutFreeSpace" counts sectors, multiplier 1; "WithouFreSpacExt" counts
clusters, multiplier ``tracks``), 0 is unallocated (zeroes: QEMU's
qemu-storage-daemon never gives a parallels node a backing file).

QEMU's driver is sector based (``bdrv_co_readv``/``writev``); its generic
layer pads a request to whole sectors, so a write into a new cluster
writes whole sectors (zeroes around the data) and leaves the rest of the
cluster as the file has it.  Clusters are taken at ``data_end``; when the
file is too short, it is first grown by the clusters plus ``prealloc-size``
(128 MiB) by writing zeroes (``prealloc-mode=falloc``) or truncating
(``truncate``), as allocate_clusters.  Changed BAT entries are written back
at the next flush (parallels_co_flush_to_os, in 16 KiB blocks of the
header); a read-write open sets the header's ``inuse`` flag, and closing
clears it and truncates the file to ``data_end`` (parallels_close).

Reads of clusters mapped beyond the end of the file return zeroes for the
missing part, as QEMU's generic layer pads reads past the end of a file;
nothing is read past the file.  The header and BAT are kept only as far as
the file holds them.

An image opened read-only loads the dirty bitmaps of its Format Extension
(parallels_ext.py); a read-write open warns and ignores the extension.

``blockdev-create`` with ``driver=parallels`` is :func:`create_parallels`.
"""

from __future__ import annotations

import struct
from typing import Any

import trio

from ..qapi.errors import GenericError, QapiError, warn_report
from .graph import register_driver
from .node import BlockNode, BlockStatus, Status
from .packed import Packed
from .parallels_ext import load_format_extension
from .table_format import ZEROES, PartialTable, Table, TableFormatNode, eio

SECTOR = 512
HEADER_MAGIC = b"WithoutFreeSpace"
HEADER_MAGIC2 = b"WithouFreSpacExt"
HEADER_VERSION = 2
HEADER_INUSE_MAGIC = 0x746F6E59
HEADS_NUMBER = 16
SEC_IN_CYL = 32
DEFAULT_CLUSTER_SIZE = 1 << 20
MAX_PARALLELS_IMAGE_FACTOR = 1 << 32
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
MEM_ALIGN = 4096  # bdrv_opt_mem_align of a file node (the host page)
BAT_DIRTY_BLOCK = 4 * 4096  # s->bat_dirty_block: 4 host pages
DEFAULT_PREALLOC_SIZE = 128 << 20

# ParallelsHeader: magic[16], version, heads, cylinders, tracks,
# bat_entries, nb_sectors (u64), inuse, data_off, flags, ext_off (u64)
_HEADER = struct.Struct("<16s5IQ3IQ")
assert _HEADER.size == 64
_FIELDS = ("magic", "version", "heads", "cylinders", "tracks", "bat_entries", "nb_sectors",
           "inuse", "data_off", "flags", "ext_off")
_INUSE_OFFSET = 44


class ParallelsHeader(Packed):
    """The header's fields by QEMU's names."""

    STRUCT = _HEADER
    FIELDS = _FIELDS


def bat_entry_off(idx: int) -> int:
    return _HEADER.size + 4 * idx


def _fail_format() -> GenericError:
    return GenericError("Image not in Parallels format")


@register_driver
class ParallelsNode(TableFormatNode):
    driver = "parallels"

    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
        self._opened = False
        ph = ParallelsHeader(bytes(await self.pread(0, _HEADER.size)))
        total_sectors: int = ph["nb_sectors"]
        if ph["version"] != HEADER_VERSION:
            raise _fail_format()
        if ph["magic"] == HEADER_MAGIC:
            self.off_multiplier = 1
            total_sectors &= 0xFFFFFFFF
        elif ph["magic"] == HEADER_MAGIC2:
            self.off_multiplier = ph["tracks"]
        else:
            raise _fail_format()
        self.tracks: int = ph["tracks"]
        if self.tracks == 0:
            raise GenericError("Invalid image: Zero sectors per track")
        if self.tracks > INT_MAX // 513:
            raise GenericError("Invalid image: Too big cluster")
        self.bat_size: int = ph["bat_entries"]
        if self.bat_size > INT_MAX // 4:
            raise GenericError("Catalog too large")
        self.total_sectors = total_sectors
        size = bat_entry_off(self.bat_size)
        self.header_size = -(-size // MEM_ALIGN) * MEM_ALIGN
        # data_end counts sectors; QEMU compares it with header_size (bytes)
        # and, for data_off 0, sets it to a byte count: kept as it is
        data_end: int = ph["data_off"]
        if data_end == 0:
            data_end = -(-size // SECTOR) * SECTOR
        if data_end < self.header_size:
            self.header_size = size
        # the header and BAT as far as the file holds them (the last entry
        # the file cuts padded with zeroes, as QEMU's pread pads it); entries
        # past that read as 0 and those set since are kept in the Table
        present = max(_HEADER.size, min(self.header_size, self.file.length))
        self.hdr = bytearray(await self.pread(0, present))
        if present < bat_entry_off(self.bat_size):
            self.hdr += bytes(-(present - _HEADER.size) % 4)
        self.bat = Table.of("<I", self.bat_size, self.hdr[_HEADER.size:])
        mult, tracks = self.off_multiplier, self.tracks
        for e in self.bat:
            if e:
                off = e * mult
                if off >= data_end:
                    data_end = off + tracks
        self.data_end = data_end
        self.header_unclean = ph["inuse"] == HEADER_INUSE_MAGIC
        if self.header_unclean and not self.read_only:
            raise GenericError("parallels: Image was not closed correctly; "
                               "cannot be opened read/write")
        # runtime options (parallels_runtime_opts); qemu-storage-daemon's QAPI
        # (BlockdevOptionsGenericFormat) refuses them, the graph API takes them
        prealloc_size = int(options.get("prealloc-size", DEFAULT_PREALLOC_SIZE))
        self.prealloc_size = max(self.tracks, prealloc_size >> 9)
        mode = options.get("prealloc-mode", "falloc")
        if mode not in ("falloc", "truncate"):
            raise GenericError(f"Parameter 'prealloc-mode' does not accept value '{mode}'")
        self.prealloc_mode: str = mode
        if ph["ext_off"]:
            if not self.read_only:
                warn_report("Format Extension ignored in RW mode")
            else:
                await load_format_extension(self, ph["ext_off"])
        self._dirty: set[int] = set()  # bat_dirty_bmap: dirty 16 KiB blocks
        self._lock = trio.Lock()  # s->lock
        self._pending: list[tuple[int, int]] = []  # BAT entries to enter
        self.request_alignment = SECTOR  # a sector-based driver in QEMU
        if not self.read_only:
            self._set_header_u32(_INUSE_OFFSET, HEADER_INUSE_MAGIC)
            await self._update_header()
        self._opened = True

    def _set_header_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.hdr, off, value)

    def _header_bytes(self, off: int, n: int) -> bytes:
        """``n`` bytes of the in-memory header at ``off``: the part read
        from the file, then zeroes with the BAT entries set since."""
        out = bytearray(self.hdr[off:off + n])
        if len(out) < n:
            out += bytes(n - len(out))
            extra = self.bat.extra if isinstance(self.bat, PartialTable) else {}
            for idx, value in extra.items():
                pos = bat_entry_off(idx) - off
                if 0 <= pos < n:
                    struct.pack_into("<I", out, pos, value)
        return bytes(out)

    async def _update_header(self) -> None:
        """parallels_update_header: the first page of the header, synced."""
        size = min(max(MEM_ALIGN, _HEADER.size), self.header_size)
        await self.file.write(0, self._header_bytes(0, size))
        await self.file.flush()

    def _set_entry(self, idx: int, value: int) -> None:
        """parallels_set_bat_entry: the entry, and its block marked dirty."""
        self.bat[idx] = value
        off = bat_entry_off(idx)
        if off < len(self.hdr):  # else _header_bytes takes it from the Table
            struct.pack_into("<I", self.hdr, off, value)
        self._dirty.add(off // BAT_DIRTY_BLOCK)

    @property
    def has_info(self) -> bool:
        return False  # parallels has no bdrv_get_info

    def _length(self) -> int:
        return self.total_sectors * SECTOR

    def _seek_to_sector(self, sector: int) -> int:
        index, offset = divmod(sector, self.tracks)
        if index >= self.bat_size:
            return -1
        e = self.bat[index]
        if e == 0:
            return -1
        return e * self.off_multiplier + offset

    def _extent(self, pos: int, length: int) -> tuple[int, int]:
        """block_status in bytes: the host offset of the guest bytes at
        ``pos`` (or ZEROES) and how many of the ``length`` from there are
        alike, cluster after cluster (contiguous on the host, or all
        unallocated)."""
        tracks = self.tracks
        first, within = divmod(pos, SECTOR)
        end = -(-(pos + length) // SECTOR)
        start = self._seek_to_sector(first)
        sector = first + tracks - first % tracks  # the next cluster's first
        expect = start + sector - first if start > 0 else start
        while sector < end and self._seek_to_sector(sector) == expect:
            sector += tracks
            if start > 0:
                expect += tracks
        n = (sector - first) * SECTOR - within
        if n > length:
            n = length
        return (start * SECTOR + within if start > 0 else ZEROES), n

    # -- write --------------------------------------------------------------------
    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        length = len(data)
        done = 0
        while done < length:
            pos = offset + done
            host, n = self._extent(pos, length - done)
            if host < 0:
                async with self._lock:
                    host, n = self._extent(pos, length - done)
                    if host < 0:
                        await self._write_new(pos, data[done:done + n])
                        done += n
                        continue
            await self.pwrite(host, data[done:done + n])
            done += n
        if fua:
            await self.file.flush()

    async def _write_new(self, pos: int, piece: memoryview) -> None:
        """``piece`` into unallocated clusters (under the lock): the
        generic layer's padding makes it whole sectors, the new clusters
        read as zeroes around the data."""
        head = pos % SECTOR
        tail = -(pos + len(piece)) % SECTOR
        host = await self._allocate(pos // SECTOR, (head + len(piece) + tail) // SECTOR)
        buf = bytearray(head + len(piece) + tail)
        buf[head:head + len(piece)] = piece
        await self.pwrite(host, buf)
        self._publish()

    async def _allocate(self, sector: int, n: int) -> int:
        """allocate_clusters for ``n`` unallocated sectors from ``sector``
        (under the lock): grows the file when it is too short, takes the
        clusters at data_end and returns the host byte offset of
        ``sector``'s start.  The BAT entries are entered by :meth:`_publish`
        once the data is written, so a concurrent read sees zeroes until
        then."""
        idx = sector // self.tracks
        to_allocate = -(-(sector + n) // self.tracks) - idx
        if idx + to_allocate > self.bat_size:
            # QEMU asserts here (an image larger than its BAT): an I/O error
            raise eio()
        space = to_allocate * self.tracks
        if self.data_end + space > self.file.length >> 9:
            space += self.prealloc_size
            if self.prealloc_mode == "truncate":
                try:
                    await self.file.truncate((self.data_end + space) * SECTOR, exact=False)
                except QapiError:
                    self.prealloc_mode = "falloc"
            if self.prealloc_mode == "falloc":
                await self.file.write_zeroes(self.data_end * SECTOR, space * SECTOR)
        first = self.data_end
        self._pending = [(idx + i, (first + i * self.tracks) // self.off_multiplier)
                         for i in range(to_allocate)]
        self.data_end = first + to_allocate * self.tracks
        return (first + sector % self.tracks) * SECTOR

    def _publish(self) -> None:
        for idx, value in self._pending:
            self._set_entry(idx, value)
        self._pending = []

    # -- flush, close ---------------------------------------------------------------
    async def _flush_bat(self) -> None:
        """parallels_co_flush_to_os: the dirty blocks of the header."""
        async with self._lock:
            for bit in sorted(self._dirty):
                off = bit * BAT_DIRTY_BLOCK
                n = min(BAT_DIRTY_BLOCK, self.header_size - off)
                await self.file.write(off, self._header_bytes(off, n))
            self._dirty.clear()

    async def _co_flush(self) -> None:
        if not self.read_only:
            await self._flush_bat()
        await super()._co_flush()

    async def _close(self) -> None:
        if not self._opened or self.read_only:
            return
        # parallels_close: a clean header, the file cut at data_end
        self._set_header_u32(_INUSE_OFFSET, 0)
        try:
            await self._update_header()
            await self.file.truncate(self.data_end * SECTOR, exact=True)
        except (OSError, QapiError):
            pass  # QEMU ignores both errors

    # -- block status -----------------------------------------------------------------
    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        # at most INT_MAX bytes' sectors (QEMU's int nb_sectors)
        host, n = self._extent(offset, min(length, INT_MAX // SECTOR * SECTOR
                                           - offset % SECTOR))
        if host < 0:
            # parallels_co_block_status says 0; without a backing file the
            # generic layer makes it ZERO
            return BlockStatus(Status.ZERO, n, 0)
        return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, n, 1, host)


async def create_parallels(file: BlockNode, size: int, cluster_size: int | None = None) -> None:
    """parallels_co_create on an open ``file`` node (blockdev-create
    driver=parallels): the header in the first sector, zeroes to the end of
    the BAT's clusters."""
    cl_size = DEFAULT_CLUSTER_SIZE if cluster_size is None else cluster_size
    if cl_size >= INT64_MAX // MAX_PARALLELS_IMAGE_FACTOR:
        raise GenericError("Cluster size is too large")
    if size >= MAX_PARALLELS_IMAGE_FACTOR * cl_size:
        raise GenericError("Image size is too large for this cluster size")
    if size % SECTOR:
        raise GenericError("Image size must be a multiple of 512 bytes")
    if cl_size % SECTOR:
        raise GenericError("Cluster size must be a multiple of 512 bytes")
    bat_entries = -(-size // cl_size)
    bat_sectors = -(-bat_entry_off(bat_entries) // cl_size)
    bat_sectors = (bat_sectors * cl_size) >> 9
    h = ParallelsHeader(bytes(_HEADER.size))
    h["magic"] = HEADER_MAGIC2
    h["version"] = HEADER_VERSION
    h["heads"] = HEADS_NUMBER
    h["cylinders"] = (size // SECTOR // HEADS_NUMBER // SEC_IN_CYL) & 0xFFFFFFFF
    h["tracks"] = (cl_size >> 9) & 0xFFFFFFFF
    h["bat_entries"] = bat_entries & 0xFFFFFFFF
    h["nb_sectors"] = -(-size // SECTOR)
    h["data_off"] = bat_sectors & 0xFFFFFFFF
    await file.write(0, h.pack() + bytes(SECTOR - _HEADER.size))
    if bat_sectors > 1:
        await file.write_zeroes(SECTOR, (bat_sectors - 1) * SECTOR)
    await file.flush()
