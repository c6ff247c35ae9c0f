"""The ``vmdk`` format (VMware Virtual Disk), as QEMU 7.2's block/vmdk.c.

An image is a list of extents laid end to end (:mod:`.vmdk_extent`),
described by a text descriptor (:mod:`.vmdk_descriptor`):

* monolithicSparse and streamOptimized: one sparse (VMDK4) file, its
  descriptor embedded at sector 1; ``file`` is the only extent.
  streamOptimized grains are compressed (:mod:`.vmdk_stream`).
* monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse, vmfs,
  vmfsSparse, seSparse: ``file`` is a descriptor file naming the extent
  files, relative to its directory; each is opened as child
  ``extents.N`` with the node's options (read-only, cache, ...), as
  bdrv_open_child does with a file name.

The descriptor also gives the image's ``CID``, its parent's
(``parentCID``) and the parent's file name (``parentFileNameHint``), opened
as the ``backing`` node with driver vmdk.  Grains a sparse extent does not
map read from the backing node if the parent's CID is the one recorded
(else EINVAL), else as zeroes.

Writes: a grain is allocated at ``next_cluster_sector`` (the end of its
extent file), the rest of it filled from the backing node or with zeroes,
the data written, then the grain table entry (and the redundant table's);
the first write after open writes a random CID into the descriptor
(vmdk_write_cid, which rewrites 10240 bytes there, or the whole descriptor
file).  Zero writes of whole grains mark them zeroed when the extent has
the zeroed-grain flag; other zero writes write zeroes.  seSparse extents
are read-only.  QEMU holds one lock around every request; here allocating
writes hold it, and reads and writes into allocated grains do not need it
(a grain is mapped only once its data is written).

Reads and writes of a range that one extent maps to one stretch of a file
go straight to that file (the synchronous fast path and requests without a
task, :meth:`BlockNode.read_now`); the rest take the general path.

``blockdev-create`` with ``driver=vmdk`` is :func:`.vmdk_create.create_vmdk`.
"""

from __future__ import annotations

import bisect
import errno
import os
import random
import sys
from typing import Any

import trio

from ..qapi.errors import GenericError
from .backing import backing_info, backing_status, open_backing, read_backing
from .graph import BDRV_MAX_LENGTH, register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, ReadDone, Status, WriteDone
from .perms import storage_perms
from .table_format import TableFormatNode, eio
from .vmdk_descriptor import (
    DESC_SIZE,
    create_type,
    cstr,
    parent_file_name_hint,
    parse_extents,
    read_cid,
    write_cid,
)
from .vmdk_extent import (
    SECTOR,
    VMDK3_MAGIC,
    VMDK4_COMPRESSION_DEFLATE,
    VMDK4_FLAG_MARKER,
    VMDK4_FLAG_RGD,
    VMDK4_FLAG_ZERO_GRAIN,
    VMDK4_GD_AT_END,
    VMDK4_MAGIC,
    VMDK_ERROR,
    VMDK_EXTENT_MAX_SECTORS,
    VMDK_GTE_ZEROED,
    VMDK_OK,
    VMDK_UNALLOC,
    VMDK_ZEROED,
    Extent,
    MetaData,
    Vmdk4Header,
    add_extent,
    check_vmdk4,
    einval,
    open_se_sparse,
    open_vmfs_sparse,
    pread,
    signed64,
)
from .vmdk_stream import (
    footer_header,
    grain_first,
    grain_record,
    grain_slice,
    grain_span,
    read_grain,
)

MAX_DESC_READ = (1 << 20) - 1  # vmdk_read_desc's bound
MAX_DESC_FILE = 16 << 20  # vmdk_write_cid's bound on a descriptor file
INT_MAX = (1 << 31) - 1
MAX_BOUNCE_BUFFER = 32768 * SECTOR
# nested descriptors (a sparse extent whose header points at a descriptor):
# QEMU recurses without a bound, and one that names itself overflows its
# stack; deeper than this fails here
MAX_NESTING = 16


def enotsup() -> OSError:
    return OSError(errno.ENOTSUP, "Operation not supported")


@register_driver
class VmdkNode(TableFormatNode):
    """vmdk over a ``file`` child (a sparse extent or a descriptor), with
    ``extents.N`` children and an optional ``backing`` child.

    The table-mapped base holds the ``file`` and ``backing`` children; the
    request paths are this driver's own, as the extents are several files.

    Resources: the children, released by the graph when the node closes;
    no descriptors or tasks of its own.
    """

    driver = "vmdk"
    supports_compressed_writes = True
    # the file child is a descriptor (it holds no guest data)
    descriptor_file = False
    # extents.N child role -> whether the extent is flat (set in open())
    extent_roles: dict[str, bool]

    def child_perm(self, edge: BdrvChild, perm: Any, shared: Any) -> Any:
        # bdrv_default_perms by role: a descriptor file holds only metadata,
        # a flat extent only data, a sparse extent both
        writable = not self.read_only
        if edge.name == "file":
            return storage_perms(perm, shared, writable=writable, data=not self.descriptor_file)
        if edge.name in self.extent_roles:
            return storage_perms(perm, shared, writable=writable,
                                 metadata=not self.extent_roles[edge.name])
        return super().child_perm(edge, perm, shared)

    # -- opening (vmdk_open) ------------------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        self.extents: list[Extent] = []
        self._ends: list[int] = []  # each extent's end_sector, for bisect
        self._monotonic = True
        self.extent_roles: dict[str, bool] = {}  # child role -> flat
        self.descriptor_file = False
        self.create_type: str | None = None
        self.desc_offset = 0
        self.total_sectors = 0
        self.cid_updated = False
        self.cid_checked = False
        self._lock = trio.Lock()  # QEMU's s->lock, taken by writes
        await self.open_file(options)
        # QEMU names the node (bdrv_open_common) before the driver opens the
        # extents and the backing file: query-named-block-nodes lists them as newer
        self.graph.nodes.setdefault(self.node_name, self)
        try:
            await self._open(options)
        except BaseException:
            if self.graph.nodes.get(self.node_name) is self:
                del self.graph.nodes[self.node_name]
            raise
        self.request_alignment = 1

    async def _open(self, options: dict[str, Any]) -> None:
        buf = await self._read_desc(self.file, 0)
        if buf[:4] in (VMDK3_MAGIC, VMDK4_MAGIC):
            try:
                await self._open_sparse(self.file_edge, buf, 0, options)
            finally:
                self.desc_offset = 0x200
        else:
            # no data in the descriptor file (its child role loses DATA)
            self.descriptor_file = True
            self.file_edge.set_perm(*self.child_perm(self.file_edge, self.cum_perm,
                                                     self.cum_shared))
            await self._open_desc_file(buf, 0, options)
        try:
            desc = bytes(await pread(self.file, self.desc_offset, DESC_SIZE))
        except OSError as e:
            raise self._open_error(e.strerror or str(e)) from None
        try:
            hint = parent_file_name_hint(desc)
        except ValueError:
            raise self._open_error("Invalid argument") from None
        cid, parent_cid = read_cid(desc, False), read_cid(desc, True)
        if cid is None or parent_cid is None:
            raise self._open_error("Invalid argument")
        self.cid, self.parent_cid = cid, parent_cid
        self.backing_filename = hint
        # bdrv_refresh_total_sectors, before the backing file opens.  QEMU
        # multiplies in uint64_t: a product that wraps to a small number
        # passes there (and then every length query fails with EFBIG); here
        # it is refused at once
        size = self.total_sectors * SECTOR
        if not 0 <= size <= BDRV_MAX_LENGTH:
            raise GenericError("Could not refresh total sector count: File too large")
        # the parent is always opened as vmdk (vmdk_parent_open's backing_format)
        await open_backing(self, options, hint, "vmdk")

    def _open_error(self, strerror: str) -> GenericError:
        """A bare -errno from vmdk_open, as bdrv_open_driver words it."""
        return GenericError(f"Could not open '{self.file.filename}': {strerror}")

    async def _read_desc(self, file: BlockNode, offset: int) -> bytes:
        """vmdk_read_desc: up to 1 MiB (the file's length in whole sectors) at
        ``offset``, zeroes past the end of the file."""
        size = file.length
        if size < 4:
            raise GenericError("File is too small, not a valid image")
        try:
            return bytes(await pread(file, offset, min(size, MAX_DESC_READ)))
        except OSError as e:
            raise GenericError(f"Could not read from file: {e.strerror}") from None

    async def _open_sparse(self, edge: BdrvChild, buf: bytes, depth: int,
                           options: dict[str, Any]) -> None:
        """vmdk_open_sparse: the extent in ``edge`` by its magic."""
        if buf[:4] == VMDK3_MAGIC:
            self._append(await open_vmfs_sparse(edge))
        elif buf[:4] == VMDK4_MAGIC:
            await self._open_vmdk4(edge, depth, options)
        else:
            raise GenericError("Image not in VMDK format")

    async def _open_vmdk4(self, edge: BdrvChild, depth: int, options: dict[str, Any]) -> None:
        """vmdk_open_vmdk4: a hosted sparse or streamOptimized extent, or a
        header of capacity 0 pointing at a descriptor."""
        file = edge.node
        try:
            h = Vmdk4Header(bytes(await pread(file, 4, Vmdk4Header.STRUCT.size)))
        except OSError as e:
            raise GenericError(f"Could not read header from file '{file.filename}': "
                               f"{e.strerror}") from None
        if h["capacity"] == 0 and h["desc_offset"]:
            if depth >= MAX_NESTING:
                raise GenericError(f"Could not open '{file.filename}': VMDK descriptors "
                                   f"nested more than {MAX_NESTING} deep")
            buf = await self._read_desc(file, (h["desc_offset"] << 9) & ((1 << 64) - 1))
            await self._open_desc_file(buf, depth + 1, options)
            return
        if self.create_type is None:
            self.create_type = "monolithicSparse"
        if h["gd_offset"] == VMDK4_GD_AT_END:
            # the footer takes precedence over the header
            h = await footer_header(self.file)
        l1_size = check_vmdk4(h, not self.read_only)
        l1_backup_offset = h["rgd_offset"] << 9 if h["flags"] & VMDK4_FLAG_RGD else 0
        if -(-file.length // SECTOR) < h["grain_offset"]:
            raise GenericError(f"File truncated, expecting at least "
                               f"{signed64(h['grain_offset'] * SECTOR)} bytes")
        ext = add_extent(edge, flat=False, sectors=signed64(h["capacity"]),
                         l1_offset=h["gd_offset"] << 9, l1_backup_offset=l1_backup_offset,
                         l1_size=l1_size, l2_size=h["num_gtes_per_gt"],
                         cluster_sectors=h["granularity"])
        ext.compressed = h["compressAlgorithm"] == VMDK4_COMPRESSION_DEFLATE
        if ext.compressed:
            self.create_type = "streamOptimized"
        ext.has_marker = bool(h["flags"] & VMDK4_FLAG_MARKER)
        ext.version = h["version"]
        ext.has_zero_grain = bool(h["flags"] & VMDK4_FLAG_ZERO_GRAIN)
        await ext.init_tables()
        self._append(ext)

    async def _open_desc_file(self, buf: bytes, depth: int, options: dict[str, Any]) -> None:
        """vmdk_open_desc_file and vmdk_parse_extents: the create type, then
        each extent line's file opened and added, in order."""
        desc = cstr(buf)
        self.create_type = create_type(desc)
        self.desc_offset = 0
        base = None
        for line in parse_extents(desc):
            if os.path.isabs(line.fname):
                path = line.fname
            else:
                if base is None:
                    base = self.file.dirname()
                    if base is None:
                        raise GenericError(f"Cannot use relative paths with VMDK descriptor "
                                           f"file '{self.file.filename}': Cannot generate a "
                                           f"base directory for {self.file.driver} nodes")
                path = base + line.fname
            flat = line.type in ("FLAT", "VMFS")
            role = self._extent_role()
            self.extent_roles[role] = flat
            try:
                # the node's options are inherited as bdrv_open_child does
                edge = await self.open_child(
                    {**options, role: {"driver": "file", "filename": path}}, role)
            except BaseException:
                del self.extent_roles[role]
                raise
            if flat:
                ext = add_extent(edge, flat=True, sectors=line.sectors)
                ext.flat_start_offset = signed64(line.flat_offset << 9)
                self._append(ext)
            elif line.type == "SESPARSE":
                # the extent file is open (read-write if the node was) by now
                self._apply_auto_read_only("No write support for seSparse images available")
                self._append(await open_se_sparse(edge))
            else:
                await self._open_sparse(edge, await self._read_desc(edge.node, 0), depth, options)
                if not self.extents:
                    continue  # a nested descriptor without extents
            self.extents[-1].type = line.type

    def _extent_role(self) -> str:
        """``extents.N`` for the next extent (N its index, as QEMU names it;
        the first free one when a nested descriptor reuses N)."""
        n = len(self.extents)
        while f"extents.{n}" in self.children:
            n += 1
        return f"extents.{n}"

    def _apply_auto_read_only(self, message: str) -> None:
        """bdrv_apply_auto_read_only: a read-write node becomes read-only
        with ``auto-read-only``, else fails with ``message``."""
        if self.read_only:
            return
        if not self.auto_read_only:
            raise GenericError(message)
        self.read_only = True
        self.options = {**self.options, "read-only": True}
        # what the node takes of its children shrinks with it
        for edge in list(self.children.values()):
            edge.set_perm(*self.child_perm(edge, self.cum_perm, self.cum_shared))

    def _append(self, ext: Extent) -> None:
        """The rest of vmdk_add_extent: the extent follows the previous one."""
        prev = self.extents[-1].end_sector if self.extents else 0
        ext.end_sector = signed64(prev + ext.sectors)
        if ext.end_sector < prev:
            self._monotonic = False
        self.extents.append(ext)
        self._ends.append(ext.end_sector)
        self.total_sectors = ext.end_sector

    # -- information ----------------------------------------------------------------
    def _length(self) -> int:
        return self.total_sectors * SECTOR

    @property
    def has_info(self) -> bool:
        """vmdk_get_info succeeds: every extent of the first one's kind
        (flat, compressed, grain size); with none QEMU asserts."""
        if not self.extents:
            return False
        a = self.extents[0]
        return all(a.flat == b.flat and a.compressed == b.compressed
                   and (a.flat or a.cluster_sectors == b.cluster_sectors)
                   for b in self.extents[1:])

    def info_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.has_info and not self.extents[0].flat:
            extra["cluster-size"] = self.extents[0].cluster_bytes
        extents = []
        for e in self.extents:
            info: dict[str, Any] = {"filename": e.file.filename, "format": e.type or "",
                                    "virtual-size": signed64(e.sectors * SECTOR)}
            if e.compressed:
                info["compressed"] = True
            if not e.flat:
                info["cluster-size"] = e.cluster_bytes
            extents.append(info)
        extra["format-specific"] = {"type": "vmdk", "data": {
            "create-type": self.create_type or "", "cid": self.cid,
            "parent-cid": self.parent_cid, "extents": extents}}
        extra.update(backing_info(self, self.backing_filename, "vmdk"))
        return extra

    def actual_size(self) -> int | None:
        """vmdk_get_allocated_file_size: the file's and every other extent file's."""
        total = self.file.actual_size()
        if total is None:
            return None
        for e in self.extents:
            if e.edge is not self.file_edge:
                n = e.file.actual_size()
                if n is None:
                    return None
                total += n
        return total

    # -- where guest bytes are -----------------------------------------------------------
    def _find_extent(self, sector: int) -> Extent | None:
        """find_extent: the first extent ending after ``sector``."""
        if self._monotonic:
            i = bisect.bisect_right(self._ends, sector)
            return self.extents[i] if i < len(self.extents) else None
        return next((e for e in self.extents if sector < e.end_sector), None)

    def _extent_at(self, offset: int) -> Extent:
        """The extent of guest byte ``offset``; EIO past the last one."""
        ext = self._find_extent(offset >> 9)
        if ext is None:
            raise eio()
        return ext

    def _cid_valid(self) -> bool:
        """vmdk_is_cid_valid: the backing node is a vmdk image whose CID is
        the parentCID recorded here (checked once)."""
        if not self.cid_checked and self.backing is not None:
            b = self.backing
            if not isinstance(b, VmdkNode) or self.parent_cid != b.cid:
                return False
        self.cid_checked = True
        return True

    def _span(self, offset: int, length: int, write: bool) -> tuple[Extent, int] | None:
        """Where ``length`` bytes at ``offset`` are when one extent maps them
        to one stretch of its file that the file holds, without waiting:
        (extent, host offset), host -1 for bytes that read as zeroes; None
        otherwise (the general path decides)."""
        ext = self._find_extent(offset >> 9)
        if ext is None or offset + length > ext.end_sector * SECTOR:
            return None
        if ext.flat:
            host = ext.flat_start_offset + offset - ext.begin
        elif ext.compressed or (ext.sesparse and write):
            return None
        else:
            kind, sector, _t, _i = ext.lookup_cached(offset)
            cb = ext.cluster_bytes
            in_cluster = ext.offset_in_cluster(offset)
            if kind != VMDK_OK:
                zero = kind == VMDK_ZEROED or (kind == VMDK_UNALLOC and self.backing is None)
                if write or not zero or in_cluster + length > cb:
                    return None
                return ext, -1
            host = sector * SECTOR + in_cluster
            # further grains of the request must follow in the file
            pos, end = offset - in_cluster + cb, offset + length
            nxt = sector * SECTOR + cb
            while pos < end:
                kind, sector, _t, _i = ext.lookup_cached(pos)
                if kind != VMDK_OK or sector * SECTOR != nxt:
                    return None
                pos += cb
                nxt += cb
            if write and -(-(host + length) // SECTOR) > ext.next_cluster_sector:
                return None
        if host < 0 or host + length > ext.file.length:
            return None
        return ext, host

    # -- the fast path --------------------------------------------------------------------
    def _grain_now(self, offset: int, length: int) -> Buffer | None:
        """A read inside one compressed grain (streamOptimized) whose bytes
        the file has at hand: inflated right here, without a task.  None
        where the general path must decide, errors included (it reports
        them)."""
        ext = self._find_extent(offset >> 9)
        if (ext is None or not ext.compressed or ext.file._debug_events
                or offset + length > ext.end_sector * SECTOR):
            return None
        kind, sector, _t, _i = ext.lookup_cached(offset)
        in_cluster = ext.offset_in_cluster(offset)
        if kind != VMDK_OK or in_cluster + length > ext.cluster_bytes:
            return None
        host = sector * SECTOR
        first = grain_first(ext)
        head = ext.file.read_now(host, first)
        if head is None:
            return None
        try:
            grain = memoryview(head)
            end = grain_span(ext, grain)
            if end > first:
                rest = ext.file.read_now(host + first, end - first)
                if rest is None:
                    return None
                grain = memoryview(bytes(grain) + bytes(rest))
            return grain_slice(ext, grain[:end], in_cluster, length)
        except OSError:
            return None

    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        span = self._span(offset, length, False)
        if span is None:
            return self._grain_now(offset, length)
        ext, host = span
        if host < 0:
            return bytearray(length)
        return ext.file.read_now(host, length)

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        span = self._span(offset, length, False)
        if span is None or span[1] < 0:
            return False
        return span[0].file.read_now(span[1], length, into=views) is not None

    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        span = self._span(offset, length, False)
        return span is not None and span[1] >= 0 and span[0].file.read_submit(span[1], length, done)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        # the first write after open also writes a new CID: the long way
        if not self.cid_updated:
            return False
        span = self._span(offset, len(mv), True)
        return span is not None and span[0].file.write_now(span[1], mv)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        if not self.cid_updated:
            return False
        span = self._span(offset, len(mv), True)
        return span is not None and span[0].file.write_submit(span[1], mv, done)

    # -- reads (vmdk_co_preadv) ------------------------------------------------------------
    async def _run(self, ext: Extent, offset: int, length: int) -> tuple[int, int, int]:
        """What backs guest ``offset``: (VMDK_*, host offset, bytes alike
        from there), at most ``length``, within ``ext``.  Grains mapped to
        consecutive stretches of the file are one run, as are grains of the
        same other kind; a compressed grain is a run of its own."""
        end_byte = ext.end_sector * SECTOR
        if not ext.flat and not ext.usable():
            # QEMU divides by zero here; the extent maps nothing
            return VMDK_ERROR, 0, min(length, max(SECTOR, end_byte - offset))
        kind, sector = await ext.lookup(offset, None)
        in_cluster = ext.offset_in_cluster(offset)
        n = min(length, ext.cluster_bytes - in_cluster)
        host = sector * SECTOR + in_cluster if kind == VMDK_OK else 0
        if ext.flat or (kind == VMDK_OK and ext.compressed):
            return kind, host, n
        while n < length and offset + n < end_byte:
            k2, s2, _t, _i = ext.lookup_cached(offset + n)
            if _t is None and k2 != VMDK_UNALLOC:
                break  # table not cached (or an error): the next call looks
            if k2 != kind or (kind == VMDK_OK and s2 * SECTOR != host + n):
                break
            n = min(length, n + ext.cluster_bytes)
        return kind, host, n

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        if not length:
            return b""
        ext = self._extent_at(offset)
        kind, host, n = await self._run(ext, offset, length)
        if n >= length and kind == VMDK_OK and not ext.compressed:
            ext.file.debug_event("read_aio")
            return await pread(ext.file, host, length)  # one run: the file's buffer as it is
        out = bytearray(length)
        done = 0
        while True:
            pos = offset + done
            if kind != VMDK_OK:
                if self.backing is not None and kind != VMDK_ZEROED:
                    if not self._cid_valid():
                        raise einval()
                    self.file.debug_event("read_backing_aio")
                    await read_backing(self.backing, pos, n, out, done)
            elif ext.compressed:
                in_cluster = ext.offset_in_cluster(pos)
                out[done:done + n] = await read_grain(ext, host - in_cluster, in_cluster, n)
            else:
                ext.file.debug_event("read_aio")
                out[done:done + n] = await pread(ext.file, host, n)
            done += n
            if done >= length:
                return out
            ext = self._extent_at(offset + done)
            kind, host, n = await self._run(ext, offset + done, length - done)

    # -- block status (vmdk_co_block_status) ----------------------------------------------
    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        ext = self._extent_at(offset)
        kind, host, n = await self._run(ext, offset, length)
        if kind == VMDK_ERROR:
            raise eio()
        if kind == VMDK_ZEROED:
            return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 1)
        if kind == VMDK_OK:
            if ext.compressed:
                # the compressed grains that follow, as far as the cached
                # tables say: one answer, as no offset tells them apart (QEMU
                # answers a grain at a time; its NBD server and qemu-img map
                # merge them), so an NBD export learns a table's worth of
                # data at once and later small reads take _grain_now
                end_byte = ext.end_sector * SECTOR
                while n < length and offset + n < end_byte:
                    k2, _s2, table, _i = ext.lookup_cached(offset + n)
                    if table is None or k2 != VMDK_OK:
                        break
                    n = min(length, n + ext.cluster_bytes, end_byte - offset)
                return BlockStatus(Status.DATA | Status.ALLOCATED, n, 1)
            flags = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
            if ext.flat:
                # BDRV_BLOCK_RECURSE: the file says where its zeroes are
                end = ext.file.length
                if host < end:
                    st = await ext.file.block_status(host, min(n, end - host))
                    n = min(n, st.length)
                    flags |= st.flags & Status.ZERO
                else:
                    flags |= Status.ZERO
            return BlockStatus(flags, n, 1, host)
        # unallocated: zeroes without a backing node, else its status; past
        # its end the backing layer is where the zeroes are (QEMU's
        # bdrv_co_common_block_status_above: allocated at depth 2)
        b = self.backing
        if b is not None and offset >= b.length:
            return BlockStatus(Status.ZERO, n, 2)
        return await backing_status(b, offset, n)

    # -- writes (vmdk_pwritev) ---------------------------------------------------------------
    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        async with self._lock:
            await self._pwritev(offset, len(data), data, zeroed=False, dry_run=False)
        if fua:
            await self._co_flush()

    async def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """vmdk_co_pwritev_compressed: an ordinary write (compressed where the
        extent is); no bytes at all align every extent file's end to a sector."""
        if not len(data):
            for e in self.extents:
                size = -(-e.file.length // SECTOR) * SECTOR
                await e.file.truncate(size, exact=False)
            return
        await self._co_pwritev(offset, memoryview(data).cast("B"), False)

    async def _pwritev(self, offset: int, length: int, data: memoryview | None, *,
                       zeroed: bool, dry_run: bool) -> None:
        """vmdk_pwritev under the lock: ``data`` written, or with ``zeroed``
        whole grains marked zeroed (ENOTSUP for anything else, so that the
        caller writes zeroes)."""
        done = 0
        while done < length:
            pos = offset + done
            ext = self._extent_at(pos)
            if ext.sesparse:
                raise enotsup()
            if not ext.flat and not ext.usable():
                raise einval()  # QEMU divides by zero
            cb = ext.cluster_bytes
            in_cluster = ext.offset_in_cluster(pos)
            n = min(length - done, cb - in_cluster)
            m = MetaData()
            ret, cluster = await self._cluster_offset(ext, m, pos, not (ext.compressed or zeroed),
                                                      in_cluster, in_cluster + n)
            if ext.compressed:
                if ret == VMDK_OK:
                    print("qsd-trio: Could not write to allocated cluster for streamOptimized",
                          file=sys.stderr)
                    raise eio()
                if not zeroed:
                    ret, cluster = await self._cluster_offset(ext, m, pos, True, 0, 0)
            if ret == VMDK_ERROR:
                raise einval()
            if m.table is None and not ext.flat:
                # no grain table: QEMU goes on with an offset it never set
                raise eio()
            if zeroed:
                if not (ext.has_zero_grain and in_cluster == 0 and n >= cb):
                    raise enotsup()
                n = cb
                if not dry_run and ret != VMDK_ZEROED:
                    try:
                        await ext.l2_update(m, VMDK_GTE_ZEROED)
                    except OSError:
                        raise eio() from None
            else:
                assert data is not None
                await self._write_extent(ext, cluster, in_cluster, data[done:done + n], pos)
                if m.new_allocation:
                    try:
                        await ext.l2_update(m, cluster >> 9)
                    except OSError:
                        raise eio() from None
            done += n
            if not self.cid_updated:
                # a new CID on the first write after open
                await self._write_cid(random.getrandbits(32))
                self.cid_updated = True

    async def _cluster_offset(self, ext: Extent, m: MetaData, offset: int, allocate: bool,
                              skip_start: int, skip_end: int) -> tuple[int, int]:
        """get_cluster_offset: (VMDK_*, the grain's byte offset in the file);
        with ``allocate`` an unallocated or zeroed grain is taken at the end
        of the file and filled around ``skip_start``..``skip_end``."""
        if ext.flat:
            return VMDK_OK, ext.flat_start_offset
        ret, sector = await ext.lookup(offset, m)
        if ret == VMDK_OK:
            return VMDK_OK, sector * SECTOR
        if ret == VMDK_ERROR or m.table is None or not allocate:
            return ret, 0
        if ext.next_cluster_sector >= VMDK_EXTENT_MAX_SECTORS:
            return VMDK_ERROR, 0
        sector = ext.next_cluster_sector
        ext.next_cluster_sector += ext.cluster_sectors
        # the grain first, then the table that points at it
        if not await self._perform_cow(ext, sector * SECTOR, offset - ext.begin, skip_start,
                                       skip_end, ret == VMDK_ZEROED):
            return VMDK_ERROR, 0
        m.new_allocation = True
        return VMDK_OK, sector * SECTOR

    async def _perform_cow(self, ext: Extent, cluster_offset: int, rel: int, skip_start: int,
                           skip_end: int, zeroed: bool) -> bool:
        """vmdk_perform_cow: the new grain outside ``skip_start``..``skip_end``
        from the backing node (at the extent-relative offset, as QEMU reads
        it) or zeroes; False where QEMU returns VMDK_ERROR."""
        cb = ext.cluster_bytes
        rel = rel // cb * cb
        grain = bytearray(cb)
        copy = self.backing is not None and not zeroed
        if self.backing is not None and not self._cid_valid():
            return False
        try:
            if skip_start > 0:
                if copy:
                    ext.file.debug_event("cow_read")
                    await read_backing(self.backing, rel, skip_start, grain, 0)
                ext.file.debug_event("cow_write")
                await ext.file.write(cluster_offset, memoryview(grain)[:skip_start])
            if skip_end < cb:
                if copy:
                    ext.file.debug_event("cow_read")
                    await read_backing(self.backing, rel + skip_end, cb - skip_end, grain,
                                       skip_end)
                ext.file.debug_event("cow_write")
                await ext.file.write(cluster_offset + skip_end, memoryview(grain)[skip_end:])
        except OSError:
            return False
        return True

    async def _write_extent(self, ext: Extent, cluster_offset: int, in_cluster: int,
                            piece: memoryview, offset: int) -> None:
        """vmdk_write_extent: ``piece`` (compressed behind a grain marker in a
        compressed extent) at the grain; the extent's end moves past it."""
        if ext.compressed:
            out: Buffer = grain_record(ext, in_cluster, piece, offset)
            ext.file.debug_event("write_compressed")
        else:
            out = piece
            ext.file.debug_event("write_aio")
        at = cluster_offset + in_cluster
        end_sector = -(-(at + len(out)) // SECTOR)
        try:
            await ext.file.write(at, out)
        finally:
            if ext.compressed:
                ext.next_cluster_sector = end_sector
            else:
                ext.next_cluster_sector = max(ext.next_cluster_sector, end_sector)

    async def _write_cid(self, cid: int) -> None:
        """vmdk_write_cid: the descriptor read (10240 bytes in a sparse file,
        a descriptor file whole, in whole sectors, up to 16 MiB), the CID
        replaced, written back and flushed."""
        size = DESC_SIZE
        if self.desc_offset == 0:
            size = self.file.length
            if size > MAX_DESC_FILE:
                print("qsd-trio: VMDK description file too big", file=sys.stderr)
                raise OSError(errno.EFBIG, "File too large")
        raw = bytes(await pread(self.file, self.desc_offset, size))
        new = write_cid(raw, cid, size)
        if new is None:
            raise einval()
        await self.file.write(self.desc_offset, new)
        await self.file.flush()

    # -- zero writes (bdrv_co_do_pwrite_zeroes over vmdk_co_pwrite_zeroes) ------------------
    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        # pwrite_zeroes_alignment: the largest grain of a sparse extent
        align = max([e.cluster_bytes for e in self.extents if not e.flat] + [1])
        head = offset % align
        tail = (offset + length) % align
        max_zeroes = INT_MAX // align * align
        pos, end = offset, offset + length
        while pos < end:
            num = end - pos
            if head:
                num = min(num, MAX_BOUNCE_BUFFER, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            num = min(num, max_zeroes)
            try:
                async with self._lock:
                    # a dry run first: the grains change only if all of them can
                    await self._pwritev(pos, num, None, zeroed=True, dry_run=True)
                    await self._pwritev(pos, num, None, zeroed=True, dry_run=False)
            except OSError as e:
                if e.errno != errno.ENOTSUP or no_fallback:
                    raise
                num = min(num, MAX_BOUNCE_BUFFER)
                await self._co_pwritev(pos, memoryview(bytes(num)), False)
            pos += num
        if fua:
            await self._co_flush()
