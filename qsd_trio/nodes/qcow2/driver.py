"""The qcow2 format driver: a BlockNode over a ``file`` child (qcow2.rst).

Reads map guest ranges through L1/L2 (cached) into runs that are read with one
child request each.  Writes to clusters this image owns alone (the COPIED
flag) go straight to the host cluster, concurrently; everything else
(allocation, copy-on-write from a backing file, a shared or compressed
cluster, zero flags, discard) runs under one metadata lock.

The driver holds the node's state and its entry points (open, the request
hooks, flush and writeback, resize, close).  Beside it: ``cluster.py`` maps
guest offsets to host clusters and allocates clusters, subclusters and L2
tables; ``check.py`` signals corruption and repairs a dirty image's
refcounts; ``l2.py``, ``refcount.py`` and ``header.py`` are the on-disk
structures; ``snapshots.py``, ``bitmaps.py``, ``crypt.py``, ``reopen.py``
and ``create.py`` the features they are named after.

Crash safety: changed metadata stays in memory (dirty refcount blocks, L2
tables, L1 entries) until a flush, which writes it in dependency order:
data -> flush -> refcount blocks -> flush -> L2 tables -> flush -> L1 ->
flush, and only then the refcount decrements of clusters that were freed.
A crash at any point therefore leaves clusters at worst leaked, never
referenced with a refcount of zero, and freed clusters are not reused before
the tables that stopped pointing at them are on disk.

Resources: none of its own beyond memory; its children are closed by the
graph.  Errors: I/O errors are ``OSError``; open errors are ``GenericError``
with QEMU's text; inconsistent metadata marks the image corrupt, emits
``BLOCK_IMAGE_CORRUPTED`` and fails the request with EIO.
"""

from __future__ import annotations

import errno
import os.path
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ...qapi.cstr import c_bytes
from ...qapi.errors import GenericError
from ..backing import backing_info, backing_status, open_backing, read_backing
from ..graph import register_driver
from ..node import BdrvChild, BlockNode, BlockStatus, Buffer, ReadDone, Status, WriteDone
from . import bitmaps as bitmapmod
from . import crypt as qcrypt
from . import overlap, reopen
from . import snapshots as snapmod
from .check import Corruption, repair_refcounts, signal_corruption
from .cluster import (
    COMPRESSED,
    DATA,
    UNALLOC,
    ZERO,
    alloc_bytes,
    data_host,
    discard_clusters,
    grow_l1,
    inplace_plan,
    l2_entry,
    l2_for_write,
    locked,
    map_range,
    mapped,
    preallocate,
    write_allocating,
    zero_clusters,
)
from .compress import CompressionError, compress, decompress
from .header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    Header,
    HeaderError,
    parse_header,
)
from .l2 import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    L2Cache,
    compressed_entry,
    compressed_extent,
    pack_table,
    read_cache_sizes,
    unpack_table,
)
from .payload import Payload, part, scatter
from .refcount import RefcountError, Refcounts, write_batch


@register_driver
class Qcow2Node(BlockNode):
    """qcow2 over a ``file`` child, with optional ``backing`` and ``data-file``."""

    driver = "qcow2"
    supports_persistent_bitmaps = True
    supports_compressed_writes = True
    # open() got as far as the refcounts: closing has metadata to store
    _metadata_loaded = False
    file_edge: BdrvChild
    file: BlockNode
    data_edge: BdrvChild | None = None
    data: BlockNode  # where data clusters live: ``file``, or the data file
    backing_edge: BdrvChild | None
    backing: BlockNode | None

    def child_attached(self, edge: BdrvChild) -> None:
        # the request path uses the child nodes directly: keep them right
        # when the graph links or moves an edge (a filter inserted, a pivot,
        # a new backing node); without a data-file, data lives in ``file``
        if edge.name == "file":
            if self.data_edge is None:
                self.data = edge.node
            self.file_edge, self.file = edge, edge.node
        elif edge.name == "data-file":
            self.data_edge, self.data = edge, edge.node
        elif edge.name == "backing":
            self.backing_edge, self.backing = edge, edge.node

    def child_detached(self, edge: BdrvChild) -> None:
        if edge.name == "backing":
            self.backing_edge, self.backing = None, None

    def can_write_zeroes_with_unmap(self) -> bool:
        # qcow2 v3 zero clusters read back as zeroes once unmapped
        return self.discard_unmap and self.version >= 3

    # -- opening ---------------------------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        self.file_edge = await self.open_child(options, "file")
        self.file = self.file_edge.node
        try:
            hdr_buf = await self.file.read(0, min(max(self.file.length, 0), 1 << 21) or 0)
            h = parse_header(hdr_buf)
        except HeaderError as e:
            raise GenericError(str(e)) from None
        self.h = h
        await self._check_header(h, options)
        # encrypt.* (LUKS or legacy AES): every data cluster goes through it
        # (the cryptography package is loaded then, by crypto/cipher.py)
        self.crypto = None
        if h.crypt_method or options.get("encrypt") is not None:
            self.crypto = await qcrypt.open_encryption(self, h, options)
        self.encrypted = self.crypto is not None
        cs = self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.version = h.version
        self.size = h.size
        self.extl2 = bool(h.incompatible_features & INCOMPAT_EXTL2)
        self.l2_bits = self.cb - 3 - (1 if self.extl2 else 0)
        self.l2_entries = 1 << self.l2_bits
        self.sc_bits = self.cb - 5 if self.extl2 else self.cb
        self.sc_size = 1 << self.sc_bits
        self.ctype = h.compression_type
        self.request_alignment = 1
        self.lazy_refcounts = bool(options.get(
            "lazy-refcounts", bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)))
        if self.lazy_refcounts and h.version < 3:
            raise GenericError("Lazy refcounts require a qcow2 image with at least "
                               "qemu 1.1 compatibility level")
        self.pass_discard = {
            "request": options.get("pass-discard-request", self.discard_unmap),
            "snapshot": options.get("pass-discard-snapshot", True),
            "other": options.get("pass-discard-other", False),
        }
        self._corrupt = False
        self._signaled = False
        self._lock = trio.Lock()
        self._inplace = 0  # in-place data writes in flight (see _apply_frees)
        # guest clusters whose new host clusters are being written outside the
        # lock (QEMU's in-flight l2meta): anything else touching them waits
        self._allocating: dict[int, trio.Event] = {}
        self._pending_free: list[tuple[int, int, str]] = []  # (offset, nbytes, discard type)
        self._l1_dirty = False
        self._dirty_set = False
        self._decomp_cache: tuple[int, bytes] | None = None
        # where the next compressed cluster may start inside a partly filled
        # host cluster (QEMU's free_byte_offset); 0 when none is
        self._free_byte = 0
        # the bitmap directory as stored (bitmaps.py)
        self.qcow2_bitmaps: list[bitmapmod.DirEntry] = []
        # overlap-check: the structures checked, and the index of where they lie
        self.overlap_mask = overlap.parse_option(options.get("overlap-check"))
        self._l1_gen = 0  # bumped when an L1 entry points at a new L2 table
        self._ol_layout: tuple[object, ...] | None = None
        self._ol_index: overlap.OverlapIndex | None = None

        # data file: external clusters live there, not in `file`
        self.data_edge = None
        self.data = self.file
        self.has_data_file = bool(h.incompatible_features & INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        if self.has_data_file:
            edge: BdrvChild | None
            if options.get("data-file") is not None:
                edge = await self.open_child(options, "data-file")
            elif h.data_file:
                edge = await self.graph.open_child(
                    self, {"data-file": self._implicit_file(h.data_file),
                           "read-only": self.read_only}, "data-file")
            else:
                raise GenericError("Missing data_file option")
            assert edge is not None  # a required child: open_child raises
            self.data_edge, self.data = edge, edge.node
        elif options.get("data-file") is not None:
            raise GenericError("'data-file' can only be set for images with an "
                               "external data file")

        # cache sizes (qcow2_update_options_prepare, before the L1 table is read)
        l2_slices, l2_slice_bytes, refcount_blocks = read_cache_sizes(
            options, cs, h.size, 16 if self.extl2 else 8)

        # L1 table
        if h.l1_size > (32 << 20) // 8:
            raise GenericError("Active L1 table too large")
        need = self._l1_needed(h.size)
        if h.l1_size < need:
            raise GenericError("L1 table is too small")
        if h.l1_size and h.l1_table_offset & (cs - 1):
            raise GenericError("Invalid L1 table offset")
        self.l1_offset = h.l1_table_offset
        self.l1 = list(unpack_table(await self._read_meta(h.l1_table_offset, h.l1_size * 8))) \
            if h.l1_size else []

        # refcounts
        if h.refcount_table_offset & (cs - 1):
            raise GenericError("Invalid reference count table offset")
        rt_entries = h.refcount_table_clusters * cs // 8
        rt = await self._read_meta(h.refcount_table_offset, rt_entries * 8)
        self.refs = Refcounts(
            cluster_bits=self.cb, order=h.refcount_order,
            table=Refcounts.parse_table(rt, rt_entries),
            table_offset=h.refcount_table_offset, table_clusters=h.refcount_table_clusters,
            read=self._read_meta, write=self._write_meta, flush=self.file.flush,
            on_table_moved=self._reftable_moved, cache_blocks=refcount_blocks)
        self._metadata_loaded = True

        # L2 cache: by default it covers the whole image, up to 32 MiB
        self.l2cache = L2Cache(l2_slices, table_bytes=cs, slice_bytes=l2_slice_bytes)
        # QEMU's default on Linux: free cache entries unused for 10 minutes
        self.cache_clean_interval = options.get("cache-clean-interval", 600)
        self._next_clean = None

        self.snapshots = await snapmod.read_snapshots(self._read_meta, h) \
            if h.nb_snapshots else []

        # backing file
        self.backing_edge = await open_backing(self, options, h.backing_file or None,
                                               h.backing_format)
        self.backing = self.backing_edge.node if self.backing_edge else None

        if not self.read_only:
            await self._open_rw(h)
        await bitmapmod.load(self)

    async def _check_header(self, h: Header, options: dict[str, Any]) -> None:
        if h.incompatible_features & ~INCOMPAT_KNOWN:
            unknown = h.incompatible_features & ~INCOMPAT_KNOWN
            bits = ", ".join(f"Unknown incompatible feature: {1 << i:x}"
                             for i in range(64) if unknown >> i & 1)
            raise GenericError(f"Unsupported qcow2 feature(s): {bits}")
        if h.incompatible_features & INCOMPAT_CORRUPT and not self.read_only:
            raise GenericError("qcow2: Image is corrupt; cannot be opened read/write")
        if h.incompatible_features & INCOMPAT_EXTL2 and h.cluster_bits < 14:
            raise GenericError("The cluster size must be at least 16 KiB (for extended L2 entries)")
        if h.incompatible_features & INCOMPAT_COMPRESSION:
            if h.compression_type not in (0, 1):
                raise GenericError(f"Unknown compression type '{h.compression_type}'")
        elif h.compression_type != 0:
            raise GenericError("Compression type incompatible feature bit must be set "
                               "for non-zlib compression")

    def _implicit_file(self, name: str) -> dict[str, Any]:
        """A nested file node for a name stored in the image (relative to it)."""
        base = self.file.filename
        if not os.path.isabs(name) and base and "://" not in name:
            name = os.path.join(os.path.dirname(base), name)
        return {"driver": "file", "filename": name}

    async def _open_rw(self, h: Header) -> None:
        changed = False
        if h.autoclear_features & ~(AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS):
            # autoclear bits we do not keep up to date must go
            h.autoclear_features &= AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS
            changed = True
        if h.incompatible_features & INCOMPAT_DIRTY:
            await repair_refcounts(self)
            h.incompatible_features &= ~INCOMPAT_DIRTY
            changed = True
        if changed:
            await self._write_v3_features()

    # -- small helpers --------------------------------------------------------
    def _l1_needed(self, size: int) -> int:
        per = self.h.cluster_size * ((self.h.cluster_size // 8) >>
                                     (1 if self.h.incompatible_features & INCOMPAT_EXTL2 else 0))
        return -(-size // per)

    async def _read_meta(self, offset: int, length: int) -> bytes:
        return bytes(await self.file.read(offset, length))

    async def _write_meta(self, offset: int, data: bytes) -> None:
        """Refcount metadata writes (blocks, table entries, a new table)."""
        if self.overlap_mask:
            t = self.refs.table_offset
            in_table = t <= offset < t + self.refs.table_clusters * self.cs
            await self._overlap_check(
                overlap.REFCOUNT_TABLE if in_table else overlap.REFCOUNT_BLOCK,
                offset, len(data))
        await self.file.write(offset, data)

    # -- overlap checks (overlap.py) --------------------------------------------
    def _layout(self) -> tuple[object, ...]:
        """What the metadata layout depends on; the index is rebuilt when it
        changes (the lists compare by identity first, then by content)."""
        h, refs = self.h, self.refs
        return (self.l1, self._l1_gen, self.l1_offset, refs.version, refs.table_offset,
                refs.table_clusters, self.snapshots, h.snapshots_offset,
                h.autoclear_features, h.generation)

    async def _overlap_index(self) -> overlap.OverlapIndex:
        ix = overlap.OverlapIndex(self.cb)
        cs = self.cs
        if self.l1:
            ix.add_range(overlap.ACTIVE_L1, self.l1_offset, len(self.l1) * 8)
        ix.add_range(overlap.REFCOUNT_TABLE, self.refs.table_offset,
                     self.refs.table_clusters * cs)
        if self.snapshots:
            ix.add_range(overlap.SNAPSHOT_TABLE, self.h.snapshots_offset,
                         snapmod.table_size(self.snapshots))
        for sn in self.snapshots:
            ix.add_range(overlap.INACTIVE_L1, sn.l1_table_offset, sn.l1_size * 8)
        for e in self.l1:
            ix.add_cluster(overlap.ACTIVE_L2, e & L1E_OFFSET_MASK)
        # the table is mostly empty (a cluster of entries for a small image):
        # skip the zeroes in C, the index is rebuilt at every new L2 table
        for e in filter(None, self.refs.table):
            ix.add_cluster(overlap.REFCOUNT_BLOCK, e & ~0x1FF)
        if self.overlap_mask & overlap.INACTIVE_L2:
            for sn in self.snapshots:
                if sn.l1_size:
                    for e in unpack_table(await self._read_meta(sn.l1_table_offset,
                                                                sn.l1_size * 8)):
                        ix.add_cluster(overlap.INACTIVE_L2, e & L1E_OFFSET_MASK)
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS:
            ix.add_range(overlap.BITMAP_DIRECTORY,
                         *overlap.bitmap_directory(self.h.ext(EXT_BITMAPS)))
        return ix

    def _overlap_clear(self, offset: int, size: int) -> bool:
        """True when the overlap index is current and a data write of
        ``size`` bytes at ``offset`` touches no metadata: the common case,
        answered without a coroutine.  False means: ask _overlap_check (it
        rebuilds the index, or raises)."""
        ix = self._ol_index
        return (ix is not None and self._layout() == self._ol_layout
                and not ix.check(self.overlap_mask, offset, size))

    async def _overlap_check(self, ign: int, offset: int, size: int,
                             data_file: bool = False) -> None:
        """qcow2_pre_write_overlap_check: a write that would land on metadata
        marks the image corrupt and fails with EIO (data written to an
        external data file is never checked)."""
        mask = self.overlap_mask & ~ign
        if not mask or not size or (data_file and self.has_data_file):
            return
        layout = self._layout()
        ix = self._ol_index
        if ix is None or layout != self._ol_layout:
            ix = self._ol_index = await self._overlap_index()
            self._ol_layout = layout
        bit = ix.check(mask, offset, size)
        if bit:
            raise await signal_corruption(
                self, Corruption(overlap.message(bit), offset, size)) from None

    async def _reftable_moved(self, offset: int, clusters: int) -> None:
        self.h.refcount_table_offset, self.h.refcount_table_clusters = offset, clusters
        await self.file.write(48, struct.pack(">QI", offset, clusters))

    async def _write_v3_features(self) -> None:
        if self.h.version >= 3:
            await self.file.write(72, struct.pack(">QQQ", self.h.incompatible_features,
                                                  self.h.compatible_features,
                                                  self.h.autoclear_features))
            await self.file.flush()

    def _length(self) -> int:
        return self.size

    def periodic(self, now: float) -> None:
        """Called about once a second by the graph's timer task."""
        if not self.cache_clean_interval:
            return
        if self._next_clean is None:
            self._next_clean = now + self.cache_clean_interval
        elif now >= self._next_clean:
            self.l2cache.clean_unused()
            self.refs.clean_unused()
            self._next_clean = now + self.cache_clean_interval

    # -- blockdev-reopen (reopen.py) ----------------------------------------------
    reopenable = reopen.REOPENABLE

    async def reopen_prepare(self, options: dict[str, Any]) -> Callable[[], None]:
        """qcow2_reopen_prepare: check the new options, flush the caches;
        returns the commit.  Raises GenericError with QEMU's texts."""
        return await reopen.prepare(self, options)

    def reopen_check(self, options: dict[str, Any]) -> None:
        """The checks of reopen_prepare alone, before any node changes."""
        reopen.check(self, options)

    @property
    def filename(self) -> str:
        if self.crypto is not None:
            return self.crypto.json_filename(self.file)
        return super().filename

    def info_extra(self) -> dict[str, Any]:
        h = self.h
        spec: dict[str, Any]
        if h.version == 2:
            spec = {"compat": "0.10", "refcount-bits": 1 << h.refcount_order}
        else:
            spec = {"compat": "1.1",
                    "compression-type": "zstd" if self.ctype == 1 else "zlib",
                    "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
                    "refcount-bits": 1 << h.refcount_order,
                    "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
                    "extended-l2": self.extl2}
            if self.has_data_file:
                if h.data_file:
                    spec["data-file"] = h.data_file
                spec["data-file-raw"] = self.data_file_raw
            if self.qcow2_bitmaps:
                # qcow2_get_bitmap_info_list: the directory as stored, not
                # the bitmaps added since (they are stored when the node closes)
                spec["bitmaps"] = [bitmapmod.info(e) for e in self.qcow2_bitmaps]
        if self.crypto is not None:
            spec = qcrypt.with_encrypt_info(spec, self.crypto)
        extra = {"cluster-size": self.cs, "format-specific": {"type": "qcow2", "data": spec}}
        if self.crypto is not None:
            extra["encrypted"] = True
        extra |= backing_info(self, h.backing_file, h.backing_format)
        if self.snapshots:
            extra["snapshots"] = [s.info() for s in self.snapshots]
        return extra

    # -- corruption (check.py) ------------------------------------------------------
    @property
    def ejected(self) -> bool:
        """QEMU drops the driver of a fatally corrupt node (bs->drv = NULL)."""
        return self._corrupt

    def _check_usable(self) -> None:
        if self._corrupt:
            # QEMU drops the driver of a fatally corrupt node: no medium
            raise OSError(errno.ENOMEDIUM, "No medium found")

    # -- reads ---------------------------------------------------------------------
    async def _read_compressed(self, entry: int) -> bytes:
        if self._decomp_cache is not None and self._decomp_cache[0] == entry:
            return self._decomp_cache[1]
        coff, csize = compressed_extent(entry, self.cb)
        avail = max(0, self.file.length - coff)
        raw = await self.file.read(coff, min(csize, avail)) if avail else b""
        try:
            data = decompress(raw, self.cs, self.ctype)
        except CompressionError:
            raise OSError(errno.EIO, "Input/output error") from None
        self._decomp_cache = (entry, data)
        return data

    async def _data_read(self, goff: int, host: int, n: int) -> Buffer:
        """Guest bytes ``goff``..``goff+n`` of a data cluster at ``host``."""
        if self.crypto is not None:
            return await self.crypto.read(self.data, goff, host, n)
        return await self.data.read(host, n)

    async def _data_write(self, goff: int, host: int, buf: Payload) -> None:
        """Guest bytes at ``goff`` into a data cluster at ``host`` (encrypted
        images: whole sectors, always one buffer: the vectored paths gather
        what they encrypt)."""
        if self.crypto is not None:
            assert not isinstance(buf, list)
            buf = self.crypto.encrypt(goff, host, buf)
        await self.data.write(host, buf)

    # the fast path (BlockNode.read_now/write_now): a run of clusters one
    # after the other on the host, mapped in the cache, data at a plain host
    # offset; anything else goes the long way
    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        if self.crypto is not None or self._corrupt:
            return None
        host = data_host(self, offset, length, False)
        return None if host < 0 else self.data.read_now(host, length)

    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        # as _co_preadv's first branch: one mapped run of clusters, read from the file
        if self.crypto is not None or self._corrupt:
            return False
        host = data_host(self, offset, length, False)
        return host >= 0 and self.data.read_submit(host, length, done)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        return self._submit_inplace(offset, mv, done)

    def _pwritev_submit_vec(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return self._submit_inplace(offset, views, done, length)

    def _submit_inplace(self, offset: int, data: memoryview | list[memoryview],
                        done: WriteDone, length: int = -1) -> bool:
        """As _co_pwritev's first branch, without a task: in place, into a
        run of clusters we own, as one request of the data child (a list of
        views: one pwritev of them); False where that does not apply."""
        if self.crypto is not None or self._corrupt:
            return False
        if length < 0:
            length = len(data)
        host = data_host(self, offset, length, True)
        if host < 0 or (self.overlap_mask and not self._overlap_clear(host, length)):
            return False

        def finished(res: Any, err: OSError | None) -> None:
            self._inplace -= 1
            done(res, err)

        self._inplace += 1  # frees wait for it (_apply_frees), as in _co_pwritev
        if (self.data.write_submit(host, data, finished) if isinstance(data, memoryview)
                else self.data.writev_submit(host, data, finished)):
            return True
        self._inplace -= 1
        return False

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        if self.crypto is not None or self._corrupt:
            return False
        host = data_host(self, offset, length, False)
        return host >= 0 and self.data.read_into_now(host, views)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        if self.crypto is not None or self._corrupt:
            return False
        host = data_host(self, offset, len(mv), True)
        if host < 0 or (self.overlap_mask and not self._overlap_clear(host, len(mv))):
            return False
        return self.data.write_now(host, mv)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        self._check_usable()
        if self.crypto is None:
            host = data_host(self, offset, length, False)
            if host >= 0:
                return await self.data.read(host, length)
        segs = await mapped(self, offset, length)
        if len(segs) == 1:
            # one run: hand the child's buffer up as it is (no second buffer, no copy)
            kind, _, _, host = segs[0]
            if kind == DATA:
                if self.crypto is not None:
                    return await self.crypto.read(self.data, offset, host, length)
                return await self.data.read(host, length)
            b = self.backing
            if kind == UNALLOC and b is not None and offset + length <= b.length:
                return await b.read(offset, length)
        buf = bytearray(length)
        await self._fill(segs, offset, buf)
        return buf

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        # a run of data clusters contiguous on the host is read straight
        # into the views (one preadv); the rest of the range as _co_preadv
        # reads it, then copied into its views
        if self.crypto is not None:
            return await super()._co_preadv_into(offset, length, views)
        self._check_usable()
        host = data_host(self, offset, length, False)
        if host >= 0:
            return await self.data.read_into(host, views)
        for seg in await mapped(self, offset, length):
            kind, goff, n, host = seg
            at = part(views, goff - offset, n)
            assert isinstance(at, list)
            if kind == DATA:
                await self.data.read_into(host, at)
            else:
                buf = bytearray(n)
                await self._fill([seg], goff, buf)
                scatter(at, buf)

    async def _fill(self, segs: list[list[int]], offset: int, buf: bytearray) -> None:
        for kind, goff, n, host in segs:
            at = goff - offset
            if kind == DATA:
                buf[at:at + n] = await self._data_read(goff, host, n)
            elif kind == UNALLOC:
                await read_backing(self.backing, goff, n, buf, at)
            elif kind == COMPRESSED:
                # unmerged: one segment never leaves its cluster
                cl = await self._read_compressed(host)
                in_cl = goff & (self.cs - 1)
                buf[at:at + n] = cl[in_cl:in_cl + n]

    async def _view(self, offset: int, length: int) -> bytearray:
        """The guest's current view of a range (for copy-on-write), zero past the end."""
        buf = bytearray(length)
        n = min(length, max(0, self.size - offset))
        if n:
            await self._fill(await mapped(self, offset, n, merge_compressed=False), offset, buf)
        return buf

    # -- writes ------------------------------------------------------------------------
    async def _set_dirty(self) -> None:
        """With lazy refcounts, mark the image dirty before the first metadata change."""
        if self.lazy_refcounts and not self._dirty_set and self.version >= 3:
            self.h.incompatible_features |= INCOMPAT_DIRTY
            await self._write_v3_features()
            self._dirty_set = True

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool,
                          _sectors: bool = False) -> None:
        self._check_usable()
        if self.crypto is not None and not _sectors:
            # whole sectors only: partial ones are read, merged and rewritten
            return await self.crypto.pwritev(self, offset, data, fua)
        await self._write(offset, len(data), data, fua)

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        if self.crypto is not None:
            # encrypted in one buffer of whole sectors: gathered
            return await super()._co_pwritev_vec(offset, length, views, fua)
        self._check_usable()
        await self._write(offset, length, views, fua)

    async def _write(self, offset: int, length: int, data: Payload, fua: bool) -> None:
        """``length`` bytes of ``data`` (a buffer, or views written as they
        are) at ``offset``: in place where every cluster is ours, else
        allocating."""
        if not length:
            return
        # fast path: every byte lands in a cluster we own; no metadata changes
        # (counted before planning: frees must not land between plan and write)
        self._inplace += 1
        try:
            host = data_host(self, offset, length, True) if self.crypto is None else -1
            if host >= 0:
                # one run of clusters, found in the cache: no plan, no metadata, no lock
                if self.overlap_mask and not self._overlap_clear(host, length):
                    await self._overlap_check(0, host, length, True)
                await self.data.write(host, data)
                plan: Sequence[tuple[int, int, int]] | None = ()
            else:
                plan = await inplace_plan(self, offset, length)
            if plan is not None:
                for goff, n, host in plan:
                    if self.overlap_mask:
                        await self._overlap_check(0, host, n, True)
                    await self._data_write(goff, host, part(data, goff - offset, n))
        finally:
            self._inplace -= 1
        if plan is None:
            await write_allocating(self, offset, data, length)
        if fua:
            await self._co_flush()

    # -- zero writes and discard ---------------------------------------------------
    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        self._check_usable()
        unit = self.sc_size
        end = offset + length
        if self.version < 3:
            # no zero flag before v3 (QEMU's supported_zero_flags are 0)
            return await super()._co_pwrite_zeroes(offset, length, may_unmap, fua, no_fallback)
        a = -(-offset // unit) * unit
        b = end if end == self.size else (end // unit) * unit
        if a > b:  # inside one subcluster
            await self._zero_partial(offset, length, may_unmap, no_fallback)
        else:  # head, whole subclusters, tail (QEMU's generic layer splits the same way)
            if offset < a:
                await self._zero_partial(offset, a - offset, may_unmap, no_fallback)
            if a < b:
                async with locked(self, a, b - a):
                    try:
                        await zero_clusters(self, a, b, may_unmap)
                    except Corruption as c:
                        raise await signal_corruption(self, c) from None
                    if self.data_file_raw:
                        # the raw data file must read the same as the image
                        await self.data.write_zeroes(a, b - a, may_unmap=may_unmap,
                                                     no_fallback=no_fallback)
            if b < end:
                await self._zero_partial(b, end - b, may_unmap, no_fallback)
        if fua:
            await self._co_flush()

    async def _zero_partial(self, offset: int, length: int, may_unmap: bool,
                            no_fallback: bool) -> None:
        """Zero part of one subcluster (the head/tail case of QEMU's
        qcow2_co_pwrite_zeroes): when the rest of the subcluster already reads
        as zeroes (backing files included) and it is unallocated or zero in
        this image, the whole subcluster becomes a zero one; otherwise the part
        is written as data, or refused with ENOTSUP under ``no_fallback``."""
        unit = self.sc_size
        start = offset - offset % unit
        stop = min(start + unit, self.size)
        end = offset + length
        if await self._reads_zero(start, offset - start) and await self._reads_zero(end, stop - end):
            async with locked(self, start, stop - start):
                # checked again under the lock: a write may have come in between
                try:
                    segs = await map_range(self, start, stop - start)
                    if all(kind in (ZERO, UNALLOC) for kind, *_ in segs):
                        await zero_clusters(self, start, stop, may_unmap)
                        done = True
                    else:
                        done = False
                except Corruption as c:
                    raise await signal_corruption(self, c) from None
                if done and self.data_file_raw:
                    await self.data.write_zeroes(start, stop - start, may_unmap=may_unmap,
                                                 no_fallback=no_fallback)
            if done:
                return
        if no_fallback:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await self._zero_explicit(offset, length, False)

    async def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether the range reads as zeroes, backing chain included (QEMU's is_zero)."""
        end = min(offset + length, self.size)
        while offset < end:
            st = await self._co_block_status(offset, end - offset)
            if not st.flags & Status.ZERO:
                return False
            offset += max(st.length, 1)
        return True

    async def _zero_explicit(self, offset: int, length: int, fua: bool) -> None:
        await self._co_pwritev(offset, memoryview(bytes(length)), fua)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        self._check_usable()
        cs = self.cs
        end = offset + length
        a = -(-offset // cs) * cs
        b = end if end == self.size else (end // cs) * cs
        if a >= b:
            return
        async with locked(self, a, b - a):
            try:
                await discard_clusters(self, a, b, full=False, dtype="request")
            except Corruption as c:
                raise await signal_corruption(self, c) from None
            if self.has_data_file and (self.data_file_raw or self.pass_discard["request"]):
                # data-file clusters are not refcounted: discard goes straight down
                await self.data.discard(a, min(b, self.data.length) - a) \
                    if a < self.data.length else None

    # -- flush and metadata writeback ------------------------------------------------------
    async def _co_flush(self) -> None:
        if self._corrupt:
            return
        async with self._lock:
            await self._writeback()
        if self.data is not self.file:
            await self.data.flush()
        await self.file.flush()

    async def _writeback(self) -> None:
        """Write dirty metadata in dependency order (see the module docstring)."""
        if not (self.refs.dirty or self.l2cache.dirty or self._l1_dirty or self._pending_free):
            return
        if self.data is not self.file:
            await self.data.flush()
        await self.file.flush()
        if self.refs.dirty:
            await self.refs.write_dirty()
            await self.file.flush()
        if self.l2cache.dirty:
            batch = []
            for off in sorted(self.l2cache.dirty):
                blob = pack_table(self.l2cache.tables[off])
                if self.overlap_mask:
                    await self._overlap_check(overlap.ACTIVE_L2, off, len(blob))
                batch.append((off, blob))
            await write_batch(self.file.write, batch)
            self.l2cache.dirty.clear()
            self.l2cache.shrink()
            await self.file.flush()
        if self._l1_dirty:
            await self._write_l1()
            await self.file.flush()
        await self._apply_frees()

    async def _write_l1(self) -> None:
        if self.l1:
            if self.overlap_mask:
                await self._overlap_check(overlap.ACTIVE_L1, self.l1_offset, len(self.l1) * 8)
            await self.file.write(self.l1_offset, pack_table(array("Q", self.l1)))
        self._l1_dirty = False

    async def _apply_frees(self) -> None:
        # a data write already planned against a freed cluster may still be in
        # flight; keep the frees for a later writeback then
        if not self._pending_free or self._inplace:
            return
        frees, self._pending_free = self._pending_free, []
        self._free_byte = 0  # a freed cluster may be the one compressed data was filling
        discards = []
        cs = self.cs
        for off, nbytes, dtype in frees:
            first = off >> self.cb
            last = (off + nbytes - 1) >> self.cb
            for c in range(first, last + 1):
                try:
                    if await self.refs.update(c, -1) == 0 and self.pass_discard.get(dtype):
                        discards.append(c << self.cb)
                except RefcountError as e:
                    raise await signal_corruption(self, Corruption(str(e), c << self.cb, cs)) \
                        from None
        await self.refs.write_dirty()
        for off in discards:
            try:
                await self.file.discard(off, cs)
            except OSError:
                pass

    # -- block status --------------------------------------------------------------------
    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        self._check_usable()
        segs = await mapped(self, offset, length, merge_compressed=True)
        kind, _, n, host = segs[0]
        if kind == DATA:
            return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, n, 1, host)
        if kind == ZERO:
            return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 1)
        if kind == COMPRESSED:
            return BlockStatus(Status.DATA | Status.ALLOCATED, n, 1)
        return await backing_status(self.backing, offset, n)

    # -- resize -------------------------------------------------------------------------
    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        self._check_usable()
        if size % 512:
            raise GenericError("The new size must be a multiple of 512")
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
        if self.snapshots and size < self.size:
            raise GenericError("Can't shrink an image which has snapshots") \
                if self.version >= 3 else GenericError(
                    "Can't resize a v2 image which has snapshots")
        async with locked(self, 0, max(self.size, size)):
            old = self.size
            if size < old:
                await discard_clusters(self, -(-size // self.cs) * self.cs,
                                       -(-old // self.cs) * self.cs,
                                       full=True, dtype="other")
                self.size = size
            else:
                if self._l1_needed(size) > (32 << 20) // 8:  # QCOW_MAX_L1_SIZE
                    raise GenericError("Failed to grow the L1 table: File too large")
                await grow_l1(self, self._l1_needed(size))
                self.size = size
            self.h.size = size
            await self._writeback()
            await self.file.write(24, struct.pack(">Q", size))
            await self.file.flush()
        if size > old:
            # what lies past the old end must read as zeroes (old tail, backing)
            tail_end = min(size, -(-old // self.cs) * self.cs)
            blen = self.backing.length if self.backing is not None else 0
            z_end = max(tail_end, min(size, blen))
            if z_end > old:
                await self._co_pwrite_zeroes(old, z_end - old, False, False)
            if prealloc != "off":
                await preallocate(self, old, size, prealloc)

    # -- persistent bitmaps (monitor/block.py calls these) ---------------------------
    def check_persistent_bitmap(self, name: str, granularity: int) -> None:
        bitmapmod.check_new(self, name, granularity)

    async def remove_persistent_bitmap(self, name: str) -> None:
        return None  # the next store (at close) leaves it out and frees its clusters

    # -- header rewrites (change-backing-file, image creation) -----------------------
    async def rewrite_header(self) -> None:
        """Write the whole header cluster from ``self.h`` (QEMU's qcow2_update_header)."""
        blob = self.h.pack()
        if len(blob) > self.cs:
            raise GenericError("Header too large")
        await self.file.write(0, blob.ljust(self.cs, b"\0"))
        await self.file.flush()

    async def set_header_names(self, *, backing_file: str | None,
                               backing_fmt: str | None) -> None:
        """Record a backing file name and format in the header (change-backing-file)."""
        if backing_file and self.data_file_raw:
            raise GenericError("Cannot use a backing file with a raw external data file")
        if backing_file is not None and len(c_bytes(backing_file)) > 1023:
            raise GenericError("Backing file name too long")
        async with self._lock:
            # what the image holds (data, then the metadata pointing at it)
            # is on disk before the header names another backing file:
            # block-stream drops the backing file once the data is copied up,
            # and a crash must not leave a header without it over L2 tables
            # that do not point at the copy yet (QEMU's qcow2_update_header
            # writes the header alone)
            if not self._corrupt:
                await self._writeback()
            self.h.backing_file = backing_file or None
            self.auto_backing_file = backing_file or ""
            self.h.set_ext(EXT_BACKING_FORMAT,
                           c_bytes(backing_fmt) if backing_file and backing_fmt else None)
            # QEMU puts the backing format first among the extensions
            exts = self.h.extensions
            exts.sort(key=lambda e: 0 if e.type == EXT_BACKING_FORMAT else 1)
            await self.rewrite_header()

    # -- compressed writes (qemu-img convert -c, backup compress=on) ---------------------
    async def write_compressed(self, offset: int, data: Buffer) -> None:
        """Write one whole cluster compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED)."""
        self._check_writable()
        self._check_usable()
        mv = memoryview(data).cast("B")
        self._check(offset, len(mv))
        if self.has_data_file or self.crypto is not None:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        if offset % self.cs or (len(mv) != self.cs and offset + len(mv) != self.size):
            raise OSError(errno.EINVAL, "Invalid argument")
        raw = bytes(mv).ljust(self.cs, b"\0")
        comp = compress(raw, self.ctype)
        if len(comp) >= self.cs:
            await self.write(offset, mv)  # does not compress: store as is
            return
        self._begin()
        try:
            async with locked(self, offset, len(mv)):
                gc = offset >> self.cb
                old = await l2_entry(self, gc)
                if old & L2E_OFFSET_MASK:
                    # compression can't overwrite anything
                    # (qcow2_alloc_compressed_cluster_offset)
                    raise OSError(errno.EIO, "Input/output error")
                table = await l2_for_write(self, gc >> self.l2_bits)
                await self._set_dirty()
                coff = await alloc_bytes(self, len(comp))
                if self.overlap_mask:
                    await self._overlap_check(0, coff, len(comp), True)
                await self.file.write(coff, comp)
                e = compressed_entry(coff, len(comp), self.cb)
                idx = gc & (self.l2_entries - 1)
                if self.extl2:
                    table[2 * idx], table[2 * idx + 1] = e, 0
                else:
                    table[idx] = e
                self.l2cache.mark_dirty(self.l1[gc >> self.l2_bits] & L1E_OFFSET_MASK)
            self._mark_write(offset, len(mv))
        finally:
            self._end()

    # -- closing --------------------------------------------------------------------
    async def _close(self) -> None:
        await self._store_while_writable()

    async def _store_while_writable(self) -> None:
        """Metadata, persistent bitmaps, then a clean header: what a
        writable image must leave on disk before it is closed or becomes
        read-only."""
        if not self._metadata_loaded or self.read_only or self._corrupt:
            return
        async with self._lock:
            await self._writeback()
            await bitmapmod.store(self)
        await self.file.flush()
        if self._dirty_set:
            self.h.incompatible_features &= ~INCOMPAT_DIRTY
            await self._write_v3_features()
            self._dirty_set = False

    async def prepare_read_only(self) -> None:
        # qcow2_reopen_prepare going read-only: store the persistent bitmaps
        # (else the image loses them: nothing stores them at close) and
        # mark the image clean; the bitmaps stay, read-only
        await self._store_while_writable()
        for bm in self.bitmaps.values():
            if bm.persistent:
                bm.readonly = True

    async def became_writable(self) -> None:
        for bm in self.bitmaps.values():
            if bm.persistent:
                bm.readonly = False
        if not self._corrupt:
            await bitmapmod.mark_in_use(self)




__all__ = ["Qcow2Node", "EXT_BITMAPS", "AUTOCLEAR_BITMAPS"]
