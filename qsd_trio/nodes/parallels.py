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

``blockdev-create`` with ``driver=parallels`` is :func:`create_parallels`.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from array import array
from typing import Any

import trio

from ..qapi.errors import GenericError, QapiError, warn_report
from .graph import register_driver
from .node import BlockNode, BlockStatus, Buffer, Status
from .packed import Packed

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
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
MEM_ALIGN = 4096  # bdrv_opt_mem_align of a file node (the host page)
BAT_DIRTY_BLOCK = 4 * 4096  # s->bat_dirty_block: 4 host pages
DEFAULT_PREALLOC_SIZE = 128 << 20
FORMAT_EXTENSION_MAGIC = 0xAB234CEF23DCEA87
END_OF_FEATURES_MAGIC = 0
DIRTY_BITMAP_FEATURE_MAGIC = 0x20385FAE252CB34A

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
class ParallelsNode(BlockNode):
    driver = "parallels"

    async def open(self, options: dict[str, Any]) -> None:
        self.file_edge = await self.open_child(options, "file")
        self.file: BlockNode = self.file_edge.node
        self._opened = False
        ph = ParallelsHeader(bytes(await self._pread(0, _HEADER.size)))
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
        # the header and BAT as far as the file holds them; entries past the
        # end of the file read as 0 (QEMU's pread pads), set ones go to _extra
        present = max(_HEADER.size, min(self.header_size, self.file.length))
        self.hdr = bytearray(await self._pread(0, present))
        self._extra: dict[int, int] = {}
        n_present = max(0, min(self.bat_size, (present - _HEADER.size) // 4))
        bat = array("I")
        bat.frombytes(bytes(self.hdr[_HEADER.size:_HEADER.size + 4 * n_present]))
        if struct.pack("=I", 1) != struct.pack("<I", 1):
            bat.byteswap()
        self.bat = bat
        mult, tracks = self.off_multiplier, self.tracks
        for e in bat:
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
                await self._read_format_extension(ph["ext_off"] * SECTOR)
        self._dirty: set[int] = set()  # bat_dirty_bmap: dirty 16 KiB blocks
        self._lock = trio.Lock()  # s->lock
        self._pending: list[tuple[int, int]] = []  # BAT entries to enter
        self.request_alignment = SECTOR  # a sector-based driver in QEMU
        if not self.read_only:
            self._set_header_u32(_INUSE_OFFSET, HEADER_INUSE_MAGIC)
            await self._update_header()
        self._opened = True

    async def _read_format_extension(self, ext_off: int) -> None:
        """parallels_read_format_extension's checks (parallels-ext.c): the
        magic, the MD5 of the rest of the cluster, then the features up to
        the end marker.  Dirty bitmaps are not loaded (see docs/formats.md)."""
        cs = self.tracks * SECTOR
        buf = bytes(await self._pread(ext_off, cs))
        magic = struct.unpack_from("<Q", buf)[0]
        if magic != FORMAT_EXTENSION_MAGIC:
            raise GenericError(f"Wrong parallels Format Extension magic: {magic:#x}, "
                               f"expected: {FORMAT_EXTENSION_MAGIC:#x}")
        if hashlib.md5(buf[24:]).digest() != buf[8:24]:
            raise GenericError("Wrong checksum in Format Extension header. Format "
                               "extension is corrupted.")
        # the first feature: the end marker, a dirty bitmap (not loaded here,
        # so the walk ends at it) or an unknown one
        if 48 > cs:
            raise GenericError("Format Extension: unexpected end of cluster")
        fmagic = struct.unpack_from("<Q", buf, 24)[0]
        if fmagic == DIRTY_BITMAP_FEATURE_MAGIC:
            raise GenericError("qsd-trio: parallels dirty bitmaps are not supported")
        if fmagic != END_OF_FEATURES_MAGIC:
            raise GenericError(f"Unknown feature: {fmagic:#x}")

    async def _pread(self, offset: int, length: int) -> Buffer:
        """Read from the file, never past its end: the missing part reads as
        zeroes, as QEMU's generic layer pads a read past the end of a file."""
        if offset + length > BDRV_MAX_LENGTH:
            raise OSError(errno.EIO, "Input/output error")
        have = max(0, min(length, self.file.length - offset))
        data = await self.file.read(offset, have) if have else b""
        if have == length:
            return data
        return bytes(data) + bytes(length - have)

    def _set_header_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.hdr, off, value)

    def _header_bytes(self, off: int, n: int) -> bytes:
        """``n`` bytes of the in-memory header at ``off``: the part read
        from the file, then zeroes with the BAT entries set since."""
        out = bytearray(self.hdr[off:off + n])
        if len(out) < n:
            out += bytes(n - len(out))
            for idx, value in self._extra.items():
                pos = bat_entry_off(idx) - off
                if 0 <= pos < n:
                    struct.pack_into("<I", out, pos, value)
        return bytes(out)

    async def _update_header(self) -> None:
        """parallels_update_header: the first page of the header, synced."""
        size = min(max(MEM_ALIGN, _HEADER.size), self.header_size)
        await self.file.write(0, self._header_bytes(0, size))
        await self.file.flush()

    def entry(self, idx: int) -> int:
        if idx < len(self.bat):
            return self.bat[idx]
        return self._extra.get(idx, 0)

    def _set_entry(self, idx: int, value: int) -> None:
        """parallels_set_bat_entry: the entry, and its block marked dirty."""
        if idx < len(self.bat):
            self.bat[idx] = value
            struct.pack_into("<I", self.hdr, bat_entry_off(idx), value)
        else:
            self._extra[idx] = value
        self._dirty.add(bat_entry_off(idx) // BAT_DIRTY_BLOCK)

    @property
    def has_info(self) -> bool:
        return False  # parallels has no bdrv_get_info

    def _length(self) -> int:
        return self.total_sectors * SECTOR

    def _seek_to_sector(self, sector: int) -> int:
        index, offset = divmod(sector, self.tracks)
        if index >= self.bat_size:
            return -1
        e = self.entry(index)
        if e == 0:
            return -1
        return e * self.off_multiplier + offset

    def _block_status(self, sector: int, nb: int) -> tuple[int, int]:
        """block_status: the host sector of ``sector`` (-1 unallocated) and
        how many sectors from it are alike (contiguous on the host, or all
        unallocated)."""
        start = prev_end = -2
        pnum = 0
        while nb > 0 or start == -2:
            off = self._seek_to_sector(sector)
            if start == -2:
                start = prev_end = off
            elif off != prev_end:
                break
            to_end = min(nb, self.tracks - sector % self.tracks)
            nb -= to_end
            sector += to_end
            pnum += to_end
            if off > 0:
                prev_end += to_end
        return start, pnum

    # -- read ---------------------------------------------------------------------
    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        sector = offset // SECTOR
        nb = -(-(offset + length) // SECTOR) - sector
        pos, n = self._block_status(sector, nb)
        if n < nb:
            return None
        if pos < 0:
            return bytearray(length)
        host = pos * SECTOR + offset % SECTOR
        if host + length > self.file.length:
            return None
        return self.file.read_now(host, length)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        sector = offset // SECTOR
        nb = -(-(offset + len(mv)) // SECTOR) - sector
        pos, n = self._block_status(sector, nb)
        if pos <= 0 or n < nb:
            return False
        host = pos * SECTOR + offset % SECTOR
        return host + len(mv) <= self.file.length and self.file.write_now(host, mv)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        out = bytearray(length)
        done = 0
        while done < length:
            pos_b = offset + done
            sector = pos_b // SECTOR
            nb = -(-(offset + length) // SECTOR) - sector
            pos, n = self._block_status(sector, nb)
            n_bytes = min(length - done, n * SECTOR - pos_b % SECTOR)
            if pos >= 0:
                host = pos * SECTOR + pos_b % SECTOR
                out[done:done + n_bytes] = await self._pread(host, n_bytes)
            done += n_bytes
        return out

    # -- write --------------------------------------------------------------------
    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        length = len(data)
        end = offset + length
        done = 0
        while done < length:
            pos_b = offset + done
            sector = pos_b // SECTOR
            nb = -(-end // SECTOR) - sector
            pos, n = self._block_status(sector, nb)
            if pos > 0:
                n_bytes = min(length - done, n * SECTOR - pos_b % SECTOR)
                await self._write_host(pos * SECTOR + pos_b % SECTOR, data[done:done + n_bytes])
                done += n_bytes
                continue
            async with self._lock:
                pos, n = self._block_status(sector, nb)
                n_bytes = min(length - done, n * SECTOR - pos_b % SECTOR)
                if pos > 0:
                    piece: Buffer = data[done:done + n_bytes]
                    host = pos * SECTOR + pos_b % SECTOR
                else:
                    host = await self._allocate(sector, n)
                    # the generic layer's padding: whole sectors, the new
                    # clusters read as zeroes around the data
                    head = pos_b % SECTOR
                    tail = -(pos_b + n_bytes) % SECTOR
                    buf = bytearray(head + n_bytes + tail)
                    buf[head:head + n_bytes] = data[done:done + n_bytes]
                    piece = buf
                    await self._write_host(host, piece)
                    self._publish()
                    done += n_bytes
                    continue
            await self._write_host(host, piece)
            done += n_bytes
        if fua:
            await self.file.flush()

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
            raise OSError(errno.EIO, "Input/output error")
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

    async def _write_host(self, host: int, piece: Buffer) -> None:
        if host + len(piece) > BDRV_MAX_LENGTH:
            raise OSError(errno.EIO, "Input/output error")
        await self.file.write(host, piece)

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
        sector = offset // SECTOR
        nb = min(-(-(offset + length) // SECTOR) - sector, INT_MAX // SECTOR)
        pos, n = self._block_status(sector, nb)
        n_bytes = min(length, n * SECTOR - offset % SECTOR)
        if pos < 0:
            # parallels_co_block_status says 0; without a backing file the
            # generic layer makes it ZERO
            return BlockStatus(Status.ZERO, n_bytes, 0)
        return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, n_bytes, 1,
                           pos * SECTOR + offset % SECTOR)


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
