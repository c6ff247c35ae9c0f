"""The ``qcow`` format (QEMU's qcow version 1), as QEMU 7.2's block/qcow.c.

Layout: a 48-byte big-endian header (:data:`_HEADER`): magic "QFI\\xfb",
version 1, the backing file name's offset and length, the size in bytes,
``cluster_bits`` (9..16), ``l2_bits`` (6..13: L2 tables of 512 B..64 KiB),
``crypt_method`` (0 none, 1 AES) and the L1 table's offset.  The L1 table
has one 64-bit entry per L2 table's reach; an L2 entry is 0 (unallocated:
the backing file, else zeroes), a data cluster's offset, or with bit 63 a
compressed cluster (raw deflate, its length in the bits below 63 and above
the offset).

Tables and clusters are appended at the end of the file (rounded up to a
cluster), as get_cluster_offset: a new L2 table is written zeroed and
synced, then its L1 entry; a new data cluster grows the file by a cluster,
then its L2 entry is written (synced).  QEMU's qcow does no copy-on-write:
the rest of a new cluster reads as zeroes, not as the backing file (qemu-img
makes images with a backing file with 512-byte clusters, so a sector-aligned
write covers whole clusters).  Requests are whole sectors (QEMU's
``request_alignment`` 512): an unaligned write reads the sectors around it
first, through this node, as QEMU's generic layer pads it.

Encrypted images (``crypt_method`` 1, legacy AES-CBC: the key the first 16
bytes of ``encrypt.key-secret``, the IV the guest sector number) open,
read and write in qemu-storage-daemon 7.2 (only system emulators refuse
them), and here too.

``blockdev-create`` with ``driver=qcow`` is :func:`create_qcow`.
"""

from __future__ import annotations

import errno
import struct
import zlib
from typing import Any

import trio

from ..crypto import secrets as secretmod
from ..crypto.cipher import SectorCipher
from ..qapi.cstr import c_bytes
from ..qapi.errors import GenericError
from .backing import backing_info, backing_status, open_backing, read_backing
from .graph import register_driver
from .node import BlockNode, BlockStatus, Buffer, Status, json_filename
from .packed import Packed
from .table_format import ZEROES, Table, TableCache, TableFormatNode, eio, pieces

SECTOR = 512
QCOW_MAGIC = 0x514649FB
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63
L2_CACHE_SIZE = 16
INT_MAX = (1 << 31) - 1
U64 = (1 << 64) - 1

# QCowHeader: magic, version, backing_file_offset (u64), backing_file_size,
# mtime, size (u64), cluster_bits, l2_bits, padding (u16), crypt_method,
# l1_table_offset (u64)
_HEADER = struct.Struct(">IIQIIQBBHIQ")
assert _HEADER.size == 48
_FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size", "mtime", "size",
           "cluster_bits", "l2_bits", "padding", "crypt_method", "l1_table_offset")


class QcowHeader(Packed):
    """The header's fields by QEMU's names."""

    STRUCT = _HEADER
    FIELDS = _FIELDS


def _encrypt_opts(options: dict[str, Any]) -> tuple[str | None, str | None]:
    enc = options.get("encrypt")
    if enc is None:
        return None, None
    if not isinstance(enc, dict):  # a BlockdevQcowEncryption
        fmt = enc.format
        return (None if fmt is None else str(getattr(fmt, "value", fmt)),
                getattr(enc, "key_secret", None))
    return enc.get("format"), enc.get("key-secret")


@register_driver
class QcowNode(TableFormatNode):
    """qcow over a ``file`` child, with an optional ``backing`` child."""

    driver = "qcow"
    # writes go through _co_pwritev only: the paths without a task
    # (write_now, write_submit) would slip past its serialisation of
    # padded writes
    writes_in_place = False
    cipher: SectorCipher | None = None
    key_secret: str | None = None

    # -- qcow_open ------------------------------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
        h = QcowHeader(bytes(await self.pread(0, _HEADER.size)))
        if h["magic"] != QCOW_MAGIC:
            raise GenericError("Image not in qcow format")
        if h["version"] != QCOW_VERSION:
            hint = "Try the 'qcow2' driver instead." if h["version"] in (2, 3) else None
            raise GenericError(f"qcow (v{QCOW_VERSION}) does not support qcow version "
                               f"{h['version']}", hint=hint)
        if h["size"] <= 1:
            raise GenericError("Image size is too small (must be at least 2 bytes)")
        if not 9 <= h["cluster_bits"] <= 16:
            raise GenericError("Cluster size must be between 512 and 64k")
        if not 6 <= h["l2_bits"] <= 13:
            raise GenericError("L2 table size must be between 512 and 64k")
        fmt, secret_id = _encrypt_opts(options)
        method = h["crypt_method"]
        if method:
            if method != QCOW_CRYPT_AES:
                raise GenericError("invalid encryption method in qcow header")
            if fmt is not None and fmt != "aes":
                raise GenericError(f"Header reported 'aes' encryption format but options "
                                   f"specify '{fmt}'")
            if secret_id is None:
                raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
            password = secretmod.lookup_utf8(self.graph, secret_id)
            self.cipher = SectorCipher("aes-128", "cbc", "plain64",
                                       password[:16].ljust(16, b"\0"))
            self.key_secret = secret_id
            self.encrypted = True
        elif fmt is not None:
            raise GenericError(f"No encryption in image header, but options specified "
                               f"format '{fmt}'")
        self.h = h
        self.cluster_bits: int = h["cluster_bits"]
        self.cs = 1 << self.cluster_bits
        self.l2_bits: int = h["l2_bits"]
        self.l2_size: int = 1 << self.l2_bits
        self.size: int = h["size"] // SECTOR * SECTOR
        self.cluster_offset_mask = (1 << (63 - self.cluster_bits)) - 1
        shift = self.cluster_bits + self.l2_bits
        if h["size"] > U64 - (1 << shift):
            raise GenericError("Image too large")
        l1_size = (h["size"] + (1 << shift) - 1) >> shift
        if l1_size > INT_MAX // 8:
            raise GenericError("Image too large")
        self.l1_size = l1_size
        self.l1_table_offset: int = h["l1_table_offset"]
        # the L1 table, as far as the file holds it
        self.l1 = await self.load_table(self.l1_table_offset, l1_size, ">Q")
        self._l2_cache = TableCache(L2_CACHE_SIZE)
        self._cluster_cache: tuple[int, bytes] | None = None  # decompressed cluster
        self._lock = trio.Lock()  # s->lock
        # the generic layer's serialising requests: a padded write
        # (read-modify-write) waits for the whole-sector writes in flight
        # and holds new ones back until it is done, or it would write back
        # a sector as it read it over a write that landed in between
        self._rmw_lock = trio.Lock()
        self._rmw_busy = False
        self._writers = 0  # whole-sector writes in flight
        self._writes_changed = trio.Event()
        self.backing_filename: str | None = None
        if h["backing_file_offset"]:
            n = h["backing_file_size"]
            if n > 1023:
                raise GenericError("Backing file name too long")
            raw = bytes(await self.pread(h["backing_file_offset"], n))
            self.backing_filename = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.request_alignment = SECTOR  # qcow_refresh_limits
        await open_backing(self, options, self.backing_filename, None)

    @property
    def filename(self) -> str:
        if self.key_secret is not None:
            # encrypt.key-secret is a strong option: QEMU spells the node out
            return json_filename({"driver": "qcow", "file": self.file.full_open_options(),
                                  "encrypt.key-secret": self.key_secret})
        return super().filename

    def info_extra(self) -> dict[str, Any]:
        # qcow_get_info: the cluster size; nothing format-specific
        extra: dict[str, Any] = {"cluster-size": self.cs}
        if self.cipher is not None:
            extra["encrypted"] = True
        return extra | backing_info(self, self.backing_filename, None)

    def _length(self) -> int:
        return self.size

    # -- tables (get_cluster_offset) ----------------------------------------------
    async def _l2_table(self, l2_offset: int) -> Table:
        return await self.cached_table(self._l2_cache, l2_offset, self.l2_size, ">Q")

    async def _lookup(self, offset: int) -> int:
        """get_cluster_offset(allocate=0): the L2 entry of ``offset``'s cluster."""
        l2_offset = self.l1[offset >> (self.l2_bits + self.cluster_bits)]
        if not l2_offset:
            return 0
        t = await self._l2_table(l2_offset)
        return t[(offset >> self.cluster_bits) & (self.l2_size - 1)]

    def _host(self, offset: int, length: int) -> int | None:
        # from the tables in memory: one plain cluster whose L2 table is cached
        in_cluster = offset & (self.cs - 1)
        if in_cluster + length > self.cs or self.cipher is not None:
            return None
        l2_offset = self.l1[offset >> (self.l2_bits + self.cluster_bits)]
        if l2_offset:
            t = self._l2_cache.get(l2_offset)
            if t is None:
                return None
            entry = t[(offset >> self.cluster_bits) & (self.l2_size - 1)]
        else:
            entry = 0
        if not entry:
            return ZEROES if self.backing is None else None
        if entry & (QCOW_OFLAG_COMPRESSED | 511):
            return None
        host = entry + in_cluster
        return host if host + length <= self.file.length else None

    def _file_end(self) -> int:
        """bdrv_getlength of the file (whole sectors), rounded up to a cluster."""
        n = -(-self.file.length // SECTOR) * SECTOR
        return int(-(-n // self.cs) * self.cs)

    async def _allocate(self, offset: int, n_start: int, n_end: int) -> int:
        """get_cluster_offset(allocate=1) under the lock: the host offset of
        ``offset``'s cluster, allocating its L2 table and the cluster (a
        compressed one is decompressed into the new cluster when the write
        does not cover it)."""
        l1_index = offset >> (self.l2_bits + self.cluster_bits)
        l2_offset = self.l1[l1_index]
        new_l2 = False
        if not l2_offset:
            l2_offset = self._file_end()
            self.l1[l1_index] = l2_offset
            await self.pwrite_sync(self.l1_table_offset + l1_index * 8,
                                   struct.pack(">Q", l2_offset))
            new_l2 = True
        if new_l2:
            t = Table.zeroed(">Q", self.l2_size)
            self._l2_cache.put(l2_offset, t)
            await self.pwrite_sync(l2_offset, bytes(self.l2_size * 8))
        else:
            t = await self._l2_table(l2_offset)
        l2_index = (offset >> self.cluster_bits) & (self.l2_size - 1)
        cluster_offset = t[l2_index]
        if cluster_offset and not cluster_offset & QCOW_OFLAG_COMPRESSED:
            return cluster_offset
        if cluster_offset & QCOW_OFLAG_COMPRESSED and n_end - n_start < self.cs:
            data = await self._decompress(cluster_offset)
            cluster_offset = self._file_end()
            await self.pwrite(cluster_offset, data)
        else:
            cluster_offset = self._file_end()
            if cluster_offset + self.cs > (1 << 63) - 1:
                raise OSError(errno.E2BIG, "Argument list too long")
            await self.file.truncate(cluster_offset + self.cs, exact=False)
            if self.cipher is not None and n_end - n_start < self.cs:
                # the sectors the write leaves: encrypted zeroes
                start = offset & ~(self.cs - 1)
                for i in range(0, self.cs, SECTOR):
                    if i < n_start or i >= n_end:
                        await self.pwrite(cluster_offset + i,
                                           self.cipher.encrypt((start + i) // SECTOR,
                                                               bytes(SECTOR)))
        t[l2_index] = cluster_offset
        await self.pwrite_sync(l2_offset + l2_index * 8, struct.pack(">Q", cluster_offset))
        return cluster_offset

    async def _decompress(self, entry: int) -> bytes:
        """decompress_cluster: raw deflate (window 2^12) that must give a
        whole cluster, else EIO; the last cluster is kept."""
        coffset = entry & self.cluster_offset_mask
        if self._cluster_cache is not None and self._cluster_cache[0] == coffset:
            return self._cluster_cache[1]
        csize = (entry >> (63 - self.cluster_bits)) & (self.cs - 1)
        raw = bytes(await self.pread(coffset, csize))
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(raw, self.cs)
        except zlib.error:
            raise eio() from None
        if len(out) != self.cs:
            raise eio()
        self._cluster_cache = (coffset, out)
        return out

    # -- read -----------------------------------------------------------------------
    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        out = bytearray(length)
        for done, pos, n in pieces(offset, length, self.cs):
            in_cluster = pos & (self.cs - 1)
            async with self._lock:
                entry = await self._lookup(pos)
            if not entry:
                await read_backing(self.backing, pos, n, out, done)
            elif entry & QCOW_OFLAG_COMPRESSED:
                async with self._lock:
                    data = await self._decompress(entry)
                out[done:done + n] = data[in_cluster:in_cluster + n]
            else:
                if entry & 511:
                    raise eio()
                out[done:done + n] = await self._read_data(entry + in_cluster, pos, n)
        return out

    async def _read_data(self, host: int, pos: int, n: int) -> Buffer:
        if self.cipher is None:
            return await self.pread(host, n)
        a = pos - pos % SECTOR
        end = -(-(pos + n) // SECTOR) * SECTOR
        raw = bytes(await self.pread(host - (pos - a), end - a))
        return self.cipher.decrypt(a // SECTOR, raw)[pos - a:pos - a + n]

    # -- write ----------------------------------------------------------------------
    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        end = offset + len(data)
        a = offset - offset % SECTOR
        b = -(-end // SECTOR) * SECTOR
        if a == offset and b == end:
            while self._rmw_busy:
                await self._writes_changed.wait()
            self._writers += 1
            try:
                await self._write_sectors(offset, data)
            finally:
                self._writers -= 1
                self._wake_writes()
        else:
            # the generic layer's padding: the sectors around the data as
            # this node reads them, with no other write in between
            async with self._rmw_lock:
                self._rmw_busy = True
                try:
                    while self._writers:
                        await self._writes_changed.wait()
                    buf = bytearray(b - a)
                    if a < offset:
                        buf[:SECTOR] = await self._co_preadv(a, SECTOR)
                    if b > end and (a == offset or b - a > SECTOR):
                        buf[-SECTOR:] = await self._co_preadv(b - SECTOR, SECTOR)
                    buf[offset - a:end - a] = data
                    await self._write_sectors(a, memoryview(buf))
                finally:
                    self._rmw_busy = False
                    self._wake_writes()
        if fua:
            await self.file.flush()

    def _wake_writes(self) -> None:
        self._writes_changed.set()
        self._writes_changed = trio.Event()

    async def _write_sectors(self, offset: int, data: memoryview) -> None:
        """qcow_co_pwritev on whole sectors."""
        self._cluster_cache = None  # disable the compressed cache
        for done, pos, n in pieces(offset, len(data), self.cs):
            in_cluster = pos & (self.cs - 1)
            async with self._lock:
                host = await self._allocate(pos, in_cluster, in_cluster + n)
            if not host or host & 511:
                raise eio()
            piece: Buffer = data[done:done + n]
            if self.cipher is not None:
                piece = self.cipher.encrypt(pos // SECTOR, piece)
            await self.pwrite(host + in_cluster, piece)

    # -- block status -----------------------------------------------------------------
    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        async with self._lock:
            entry = await self._lookup(offset)
        in_cluster = offset & (self.cs - 1)
        n = min(length, self.cs - in_cluster)
        if not entry:
            return await backing_status(self.backing, offset, n)
        if entry & QCOW_OFLAG_COMPRESSED or self.cipher is not None:
            return BlockStatus(Status.DATA | Status.ALLOCATED, n, 1)
        return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, n, 1,
                           entry + in_cluster)


async def create_qcow(file: BlockNode, size: int, backing_file: str | None = None,
                      encrypt: dict[str, Any] | None = None) -> None:
    """qcow_co_create on an open ``file`` node (blockdev-create driver=qcow):
    the header, the backing file name after it, a zeroed L1 table (whole
    sectors) after that.  Without a backing file clusters are 4 KiB and L2
    tables 4 KiB; with one 512-byte clusters and 32 KiB tables."""
    if size == 0:
        raise GenericError("Image size is too small, cannot be zero length")
    if encrypt is not None and encrypt.get("format") != "qcow":
        raise GenericError("Unsupported encryption format")
    h = QcowHeader(bytes(_HEADER.size))
    h["magic"] = QCOW_MAGIC
    h["version"] = QCOW_VERSION
    h["size"] = size
    header_size = _HEADER.size
    name = b""
    if backing_file is not None:
        if backing_file != "fat:":
            name = c_bytes(backing_file)
            h["backing_file_offset"] = header_size
            h["backing_file_size"] = len(name)
            header_size += len(name)
        else:
            backing_file = None  # the special backing file of vvfat
        h["cluster_bits"], h["l2_bits"] = 9, 12
    else:
        h["cluster_bits"], h["l2_bits"] = 12, 9
    header_size = (header_size + 7) & ~7
    shift = h["cluster_bits"] + h["l2_bits"]
    # QEMU's total_size is an int64_t and l1_size an int
    total = size - (1 << 64) if size >= 1 << 63 else size
    l1_size = (total + (1 << shift) - 1) >> shift
    l1_size = (l1_size + (1 << 31)) % (1 << 32) - (1 << 31)
    h["l1_table_offset"] = header_size
    if encrypt is not None:
        if encrypt.get("key-secret") is None:
            raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
        secretmod.lookup_utf8(file.graph, encrypt["key-secret"])
        h["crypt_method"] = QCOW_CRYPT_AES
    await file.write(0, h.pack())
    if backing_file is not None:
        await file.write(_HEADER.size, name)
    sectors = -(-(8 * l1_size) // SECTOR)
    if sectors > 0:
        await file.write(header_size, bytes(SECTOR * sectors))
    await file.flush()
