"""The ``qed`` format (QEMU Enhanced Disk), as QEMU 7.2's block/qed.c,
qed-table.c, qed-cluster.c, qed-l2-cache.c and qed-check.c
(docs/interop/qed_spec.txt).

Layout: a 64-byte little-endian header (:data:`_HEADER`) at offset 0 in a
header of ``header_size`` clusters, the backing file name inside it; the
L1 table at ``l1_table_offset``; L2 tables and data clusters after it, in
the order they were allocated.  Tables are ``table_size`` clusters of
64-bit offsets.  An L1 entry is 0 (no L2 table) or an L2 table's offset; an
L2 entry is 0 (unallocated: the backing file, else zeroes), 1 (a zero
cluster) or a data cluster's offset.  A table or cluster offset must be
cluster aligned, past the header and inside the file (its length rounded
down to whole clusters), else the request fails with EINVAL; so nothing is
read past the end of the file.

Writes to allocated clusters go to the file in place.  A write that needs
new clusters takes the allocation lock (QEMU's ``allocating_acb``: one
allocating request at a time, held to its end), looks its clusters up
again, takes clusters at the end of the file, writes them whole (the data
with the backing file's bytes, or zeroes, around it; flushed before the
table update when there is a backing file), then updates the L2 table (a
new one is written whole and flushed, then the L1 entry) writing only the
sectors that changed, as qed_aio_write_alloc.  Without a backing file the
header's QED_F_NEED_CHECK bit is set before the first allocation and
cleared when the node is next drained (QEMU's need-check timer, whose
virtual clock never runs in qemu-storage-daemon, fires then) and on close.  A
read-write open of an image with the bit set runs qed_check and repairs
the tables (invalid entries dropped), as QEMU does.

``blockdev-create`` with ``driver=qed`` is :func:`create_qed`.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import trio

from ..qapi.cstr import c_bytes
from ..qapi.errors import GenericError
from .backing import backing_info, backing_status, open_backing, read_backing
from .graph import register_driver
from .node import BlockNode, BlockStatus, Status, _in_request
from .packed import Packed
from .table_format import BACKING, ZEROES, Table, TableCache, TableFormatNode

SECTOR = 512
QED_MAGIC = 0x00444551  # "QED\0"
QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_COMPAT_FEATURE_MASK = 0
QED_AUTOCLEAR_FEATURE_MASK = 0
QED_MIN_CLUSTER_SIZE = 4 * 1024
QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024
QED_DEFAULT_CLUSTER_SIZE = 65536
QED_MIN_TABLE_SIZE = 1
QED_MAX_TABLE_SIZE = 16
QED_DEFAULT_TABLE_SIZE = 4
MAX_L2_CACHE_SIZE = 50  # qed-l2-cache.c
PATH_MAX = 4096  # sizeof(bs->auto_backing_file)
U64 = (1 << 64) - 1

# the find_cluster results (qed.h)
QED_CLUSTER_FOUND, QED_CLUSTER_ZERO, QED_CLUSTER_L2, QED_CLUSTER_L1 = range(4)

# QEDHeader: magic, cluster_size, table_size, header_size (u32), features,
# compat_features, autoclear_features, l1_table_offset, image_size (u64),
# backing_filename_offset, backing_filename_size (u32)
_HEADER = struct.Struct("<4I5Q2I")
assert _HEADER.size == 64
_FIELDS = ("magic", "cluster_size", "table_size", "header_size", "features",
           "compat_features", "autoclear_features", "l1_table_offset", "image_size",
           "backing_filename_offset", "backing_filename_size")


class QedHeader(Packed):
    """The header's fields by QEMU's names (all integers)."""

    STRUCT = _HEADER
    FIELDS = _FIELDS

    def __getitem__(self, name: str) -> int:
        value: int = self.fields[name]
        return value


def max_image_size(cluster_size: int, table_size: int) -> int:
    """qed_max_image_size (in uint64_t arithmetic)."""
    entries = table_size * cluster_size // 8
    return entries * cluster_size * entries & U64


def cluster_size_valid(cluster_size: int) -> bool:
    return (QED_MIN_CLUSTER_SIZE <= cluster_size <= QED_MAX_CLUSTER_SIZE
            and not cluster_size & (cluster_size - 1))


def table_size_valid(table_size: int) -> bool:
    return (QED_MIN_TABLE_SIZE <= table_size <= QED_MAX_TABLE_SIZE
            and not table_size & (table_size - 1))


def image_size_valid(size: int, cluster_size: int, table_size: int) -> bool:
    return size % SECTOR == 0 and size <= max_image_size(cluster_size, table_size)


@register_driver
class QedNode(TableFormatNode):
    """qed over a ``file`` child, with an optional ``backing`` child."""

    driver = "qed"
    # the need-check timer is armed; a clearing runs
    _need_check_armed = False
    _clearing = False
    _opened = False

    # -- opening (bdrv_qed_do_open) ---------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        await self.open_file(options)
        h = QedHeader(bytes(await self.pread(0, _HEADER.size)))
        if h["magic"] != QED_MAGIC:
            raise GenericError("Image not in QED format")
        if h["features"] & ~QED_FEATURE_MASK:
            raise GenericError(f"Unsupported QED features: {h['features'] & ~QED_FEATURE_MASK:x}")
        cs = h["cluster_size"]
        if not cluster_size_valid(cs):
            raise GenericError("QED cluster size is invalid")
        self.h = h
        self.cs = cs
        # the file's length rounded down to whole clusters; grows as clusters
        # are allocated (qed_alloc_clusters)
        # (bdrv_getlength: whole sectors, the last one padded with zeroes)
        self.file_size = -(-self.file.length // SECTOR) * SECTOR & ~(cs - 1)
        ts = h["table_size"]
        if not table_size_valid(ts):
            raise GenericError("QED table size is invalid")
        self.ts = ts
        if not image_size_valid(h["image_size"], cs, ts):
            raise GenericError("QED image size is invalid")
        if not self.check_table_offset(h["l1_table_offset"]):
            raise GenericError("QED table offset is invalid")
        self.table_nelems = cs * ts // 8
        self.l2_shift = cs.bit_length() - 1
        self.l2_mask = self.table_nelems - 1
        self.l1_shift = self.l2_shift + self.table_nelems.bit_length() - 1
        if h["header_size"] > 0xFFFFFFFF // cs:
            raise GenericError("QED header size is too large")

        self.backing_filename: str | None = None
        self.backing_format: str | None = None
        if h["features"] & QED_F_BACKING_FILE:
            off, size = h["backing_filename_offset"], h["backing_filename_size"]
            if off + size > cs * h["header_size"]:
                raise GenericError("QED backing filename offset is invalid")
            if size >= PATH_MAX:  # qed_read_string: -EINVAL
                raise GenericError("Failed to read backing filename")
            raw = bytes(await self.pread(off, size))
            # a C string: it ends at the first NUL
            self.backing_filename = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            if h["features"] & QED_F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"

        if h["autoclear_features"] & ~QED_AUTOCLEAR_FEATURE_MASK and not self.read_only:
            # older programs knock out the autoclear bits they do not know
            h["autoclear_features"] &= QED_AUTOCLEAR_FEATURE_MASK
            await self._write_header()
            await self.file.flush()

        self.l1 = await self.load_table(h["l1_table_offset"], self.table_nelems, "<Q")
        self._l2_cache = TableCache(MAX_L2_CACHE_SIZE)
        # QEMU's table_lock (lookups, table loads and updates) and its
        # allocating_acb / allocating_write_reqs (one allocating request at
        # a time, to its end; also taken by the need-check clearing)
        self._table_lock = trio.Lock()
        self._alloc_lock = trio.Lock()

        if h["features"] & QED_F_NEED_CHECK and not self.read_only:
            # not closed cleanly: check and repair the tables
            try:
                corruptions = await self._qed_check(fix=True)
            except OSError:
                raise GenericError("Image corrupted") from None
            if corruptions == 0 and h["features"] & QED_F_NEED_CHECK:
                # qed_check_mark_clean
                await self.file.flush()
                h["features"] &= ~QED_F_NEED_CHECK
                await self._write_header()

        await open_backing(self, options, self.backing_filename, self.backing_format)
        self.request_alignment = SECTOR  # a sector-based driver in QEMU
        self._opened = True
        if h["features"] & QED_F_NEED_CHECK:
            # bdrv_qed_attach_aio_context starts the need-check timer
            self._need_check_armed = True

    async def _write_header(self) -> None:
        """qed_write_header(_sync): the 64 bytes of the header, in place
        (the backing file name and anything after the header stay)."""
        await self.file.write(0, self.h.pack())

    # -- offsets (qed.h) ------------------------------------------------------------
    def check_cluster_offset(self, offset: int) -> bool:
        """qed_check_cluster_offset."""
        if offset & (self.cs - 1):
            return False
        return self.h["header_size"] * self.cs <= offset < self.file_size

    def check_table_offset(self, offset: int) -> bool:
        """qed_check_table_offset: both ends of the table are valid cluster
        offsets (with uint64 wrap-around; so a one-cluster table never is)."""
        end = (offset + (self.h["table_size"] - 1) * self.cs) & U64
        if end <= offset:
            return False
        return self.check_cluster_offset(offset) and self.check_cluster_offset(end)

    def _clusters(self, nbytes: int) -> int:
        """Clusters that ``nbytes`` bytes touch from a cluster's start (QEMU's
        qed_bytes_to_clusters divides by cluster_size - 1, which only differs
        from this for a request of more than cluster_size - 2 clusters)."""
        return -(-nbytes // self.cs)

    def _alloc_clusters(self, n: int) -> int:
        """qed_alloc_clusters: the offset of ``n`` new clusters at the end."""
        offset = self.file_size
        self.file_size += n * self.cs
        return offset

    # -- tables (qed-table.c, qed-l2-cache.c) -----------------------------------
    async def _l2_table(self, offset: int) -> Table:
        """The L2 table at ``offset`` from the cache, else read (under _table_lock)."""
        return await self.cached_table(self._l2_cache, offset, self.table_nelems, "<Q")

    async def _write_table(self, offset: int, t: Table, index: int, n: int,
                           flush: bool = False) -> None:
        """qed_write_table: the sectors holding entries index..index+n."""
        per = SECTOR // 8
        start = index & ~(per - 1)
        end = (index + n + per - 1) & ~(per - 1)
        await self.file.write(offset + start * 8, t.to_bytes(start, end - start))
        if flush:
            await self.file.flush()

    async def _find_cluster(self, pos: int, length: int) -> tuple[int, int, int]:
        """qed_find_cluster (under _table_lock): what backs ``pos`` and how
        many bytes from it are alike (never past an L2 table's reach):
        (QED_CLUSTER_*, cluster offset, bytes).  EINVAL for an entry that
        points where no table or cluster can be."""
        cs = self.cs
        length = min(length, (((pos >> self.l1_shift) + 1) << self.l1_shift) - pos)
        l2_offset = self.l1[pos >> self.l1_shift]
        if l2_offset == 0:
            return QED_CLUSTER_L1, 0, length
        if not self.check_table_offset(l2_offset):
            raise OSError(errno.EINVAL, "Invalid argument")
        table = await self._l2_table(l2_offset)
        index = (pos >> self.l2_shift) & self.l2_mask
        n = self._clusters(pos % cs + length)
        end = min(index + n, self.table_nelems)
        first = last = table[index]
        i = index + 1
        while i < end:
            e = table[i]
            if first in (0, 1):
                if e != first:
                    break
            else:
                if e != last + cs:
                    break
                last = e
            i += 1
        length = min(length, (i - index) * cs - pos % cs)
        if first == 0:
            return QED_CLUSTER_L2, 0, length
        if first == 1:
            return QED_CLUSTER_ZERO, 1, length
        if not self.check_cluster_offset(first):
            raise OSError(errno.EINVAL, "Invalid argument")
        return QED_CLUSTER_FOUND, first, length

    # -- information ----------------------------------------------------------------
    def _length(self) -> int:
        return self.h["image_size"]

    def info_extra(self) -> dict[str, Any]:
        # bdrv_qed_get_info: the cluster size and NEED_CHECK as the dirty
        # flag; nothing format-specific (QEMU has no get_specific_info)
        return {"cluster-size": self.cs,
                "dirty-flag": bool(self.h["features"] & QED_F_NEED_CHECK),
                **backing_info(self, self.backing_filename, self.backing_format)}

    # -- the mapping ----------------------------------------------------------------
    async def _map(self, pos: int, length: int) -> tuple[int, int]:
        async with self._table_lock:
            kind, cluster, n = await self._find_cluster(pos, length)
        if kind == QED_CLUSTER_FOUND:
            return cluster + pos % self.cs, n
        return (ZEROES if kind == QED_CLUSTER_ZERO else BACKING), n

    def _host(self, offset: int, length: int) -> int | None:
        # from the tables in memory: one cluster, its L2 table cached
        cs = self.cs
        if offset % cs + length > cs:
            return None
        l2_offset = self.l1[offset >> self.l1_shift]
        if l2_offset:
            t = self._l2_cache.get(l2_offset)
            if t is None:
                return None
            e = t[(offset >> self.l2_shift) & self.l2_mask]
        else:
            e = 0
        if e == 1 or (e == 0 and self.backing is None):
            return ZEROES
        host = e + offset % cs
        if e == 0 or not self.check_cluster_offset(e) or host + length > self.file.length:
            return None
        return host

    # -- writes ---------------------------------------------------------------------
    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._request(offset, len(data), data)
        if fua:
            await self.file.flush()

    async def _request(self, offset: int, length: int, data: memoryview | None) -> None:
        """qed_aio_next_io for a write of ``data`` (None: a zero write,
        QED_AIOCB_ZERO, of whole clusters)."""
        cs = self.cs
        allocating = False
        nclusters = 0
        try:
            done = 0
            while done < length:
                pos = offset + done
                async with self._table_lock:
                    kind, cluster, n = await self._find_cluster(pos, length - done)
                    if kind != QED_CLUSTER_FOUND and allocating:
                        nclusters = self._clusters(pos % cs + n)
                        if data is None:
                            if kind == QED_CLUSTER_ZERO:
                                done += n  # already zero
                                continue
                            cluster = 1
                        else:
                            cluster = self._alloc_clusters(nclusters)
                        if self.backing is None and not self.h["features"] & QED_F_NEED_CHECK:
                            self.h["features"] |= QED_F_NEED_CHECK
                            await self._write_header()
                if kind == QED_CLUSTER_FOUND:
                    piece = data[done:done + n] if data is not None else bytes(n)
                    await self.file.write(cluster + pos % cs, piece)
                    done += n
                    continue
                if not allocating:
                    # wait for the allocating request before us, then look
                    # the clusters up again (QEMU's -EAGAIN)
                    self._need_check_armed = False
                    await self._alloc_lock.acquire()
                    allocating = True
                    continue
                if data is not None:
                    await self._write_cow(pos, data[done:done + n], cluster,
                                          zero_cluster=kind == QED_CLUSTER_ZERO)
                async with self._table_lock:
                    await self._l2_update(kind, pos, nclusters, cluster)
                done += n
        finally:
            if allocating:
                self._alloc_lock.release()
                if (self._alloc_lock.statistics().tasks_waiting == 0
                        and self.h["features"] & QED_F_NEED_CHECK):
                    self._need_check_armed = True

    async def _write_cow(self, pos: int, piece: memoryview, cluster: int, *,
                         zero_cluster: bool) -> None:
        """qed_aio_write_cow: the new clusters whole, the bytes around the
        request from the backing file (zeroes without one, and zeroes where
        the clusters were zero clusters: QEMU 7.2 copies the backing file's
        bytes there too, bringing back data the guest had zeroed), then the
        request; with a backing file, flushed before the tables point at
        them."""
        cs = self.cs
        n = len(piece)
        head = pos % cs
        end = pos + n
        tail = -end % cs
        if head:
            await self.file.write(cluster, await self._cow_bytes(pos - head, head, zero_cluster))
        if tail:
            await self.file.write(cluster + head + n,
                                  await self._cow_bytes(end, tail, zero_cluster))
        await self.file.write(cluster + head, piece)
        if self.backing is not None:
            await self.file.flush()

    async def _cow_bytes(self, pos: int, n: int, zero_cluster: bool) -> bytearray:
        buf = bytearray(n)
        if not zero_cluster:
            await read_backing(self.backing, pos, n, buf, 0)
        return buf

    async def _l2_update(self, kind: int, pos: int, n: int, cluster: int) -> None:
        """qed_aio_write_l2_update (under _table_lock): point ``n`` entries
        from ``pos`` at ``cluster`` (or mark them zero); a new L2 table is
        written whole and flushed, then its L1 entry."""
        index = (pos >> self.l2_shift) & self.l2_mask
        l1_index = pos >> self.l1_shift
        if kind == QED_CLUSTER_L1:
            table = Table.zeroed("<Q", self.table_nelems)
            table_offset = self._alloc_clusters(self.ts)
        else:
            table_offset = self.l1[l1_index]
            table = await self._l2_table(table_offset)
        n = min(n, self.table_nelems - index)
        for i in range(index, index + n):
            table[i] = cluster
            if cluster > 1:
                cluster += self.cs
        if kind == QED_CLUSTER_L1:
            await self._write_table(table_offset, table, 0, self.table_nelems, flush=True)
            self._l2_cache.put(table_offset, table)
            self.l1[l1_index] = table_offset
            await self._write_table(self.h["l1_table_offset"], self.l1, l1_index, 1)
        else:
            await self._write_table(table_offset, table, index, n)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        # bdrv_co_do_pwrite_zeroes with pwrite_zeroes_alignment = cluster
        # size: whole clusters become zero clusters (bdrv_qed_co_pwrite_zeroes),
        # the unaligned head and tail are written as zeroes
        cs = self.cs
        end = offset + length
        tail = end % cs
        pos = offset
        while pos < end:
            num = end - pos
            if pos % cs:
                num = min(num, cs - pos % cs)
            elif tail and num > cs:
                num -= tail
            if pos % cs == 0 and num % cs == 0:
                await self._request(pos, num, None)
            elif no_fallback:
                raise OSError(errno.ENOTSUP, "Operation not supported")
            else:
                await self._co_pwritev(pos, memoryview(bytes(num)), False)
            pos += num
        if fua:
            await self.file.flush()

    # -- the need-check flag ------------------------------------------------------
    # QEMU arms a timer on QEMU_CLOCK_VIRTUAL 5 s after the last allocating
    # write.  That clock never runs in qemu-storage-daemon (there is no VM
    # to start), so there the flag stays set until a drain fires the timer
    # or the node closes: qsd-trio does the same, keeping only "armed".
    def drain_begin(self) -> None:
        # bdrv_qed_drain_begin: a pending timer fires now
        if self._need_check_armed:
            self._need_check_armed = False
            self._start_clear()

    def _start_clear(self) -> None:
        if self._clearing:
            return
        self._clearing = True
        self._begin()  # an in-flight request of this node: drains wait for it
        trio.lowlevel.spawn_system_task(self._clear_need_check, name=f"qed-{self.node_name}")

    async def _clear_need_check(self) -> None:
        """qed_need_check_timer_entry: unless an allocating request came in,
        flush, clear QED_F_NEED_CHECK, write the header, flush.  Errors are
        dropped as QEMU drops them (the flag then stays set on disk)."""
        token = _in_request.set(True)
        try:
            try:
                self._alloc_lock.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                writable = not self.read_only
                if writable:
                    await self.file.flush()
                self.h["features"] &= ~QED_F_NEED_CHECK
                if writable:
                    await self._write_header()
            finally:
                self._alloc_lock.release()
            if writable:
                await self.file.flush()
        except OSError:
            pass
        finally:
            _in_request.reset(token)
            self._clearing = False
            self._end()

    async def _close(self) -> None:
        # bdrv_qed_close: a clean shutdown needs no check on the next open
        self._need_check_armed = False
        if not self._opened:
            return
        async with self._alloc_lock:
            if self.h["features"] & QED_F_NEED_CHECK and not self.read_only:
                await self.file.flush()
                self.h["features"] &= ~QED_F_NEED_CHECK
                await self._write_header()
                await self.file.flush()

    # -- qed_check (fix=True, at open) -----------------------------------------------
    async def _qed_check(self, *, fix: bool) -> int:
        """qed_check: drop table entries that point outside the file, count
        clusters used twice (corruptions).  Raises OSError when a table
        cannot be read or written."""
        cs, ts = self.cs, self.ts
        used: set[int] = set()
        corruptions = 0

        def mark(offset: int, n: int) -> bool:
            nonlocal corruptions
            first = offset // cs
            dup = sum(1 for c in range(first, first + n) if c in used)
            used.update(range(first, first + n))
            corruptions += dup
            return dup == 0

        mark(self.h["l1_table_offset"], ts)
        invalid_l1 = 0
        for i, offset in enumerate(self.l1):
            if offset == 0:
                continue
            if not self.check_table_offset(offset):
                if fix:
                    self.l1[i] = 0
                else:
                    corruptions += 1
                invalid_l1 += 1
                continue
            if not mark(offset, ts):
                continue
            table = await self._l2_table(offset)
            invalid = 0
            for j, e in enumerate(table):
                if e in (0, 1):
                    continue
                if not self.check_cluster_offset(e):
                    if fix:
                        table[j] = 0
                    else:
                        corruptions += 1
                    invalid += 1
                    continue
                mark(e, 1)
            if invalid and fix:
                await self._write_table(offset, table, 0, self.table_nelems)
        if invalid_l1 and fix:
            await self._write_table(self.h["l1_table_offset"], self.l1, 0, self.table_nelems)
        return corruptions

    # -- block status -----------------------------------------------------------------
    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        async with self._table_lock:
            kind, cluster, n = await self._find_cluster(offset, length)
        if kind == QED_CLUSTER_FOUND:
            return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, n, 1,
                               cluster + offset % self.cs)
        if kind == QED_CLUSTER_ZERO:
            return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 1)
        # unallocated: the generic layer asks the backing file
        return await backing_status(self.backing, offset, n)

    # -- resize and header names -----------------------------------------------------
    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        """bdrv_qed_co_truncate: grow only, by rewriting the header."""
        if prealloc != "off":
            raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
        if not image_size_valid(size, self.cs, self.ts):
            raise GenericError("Invalid image size specified")
        if size < self.h["image_size"]:
            raise GenericError("Shrinking images is currently not supported")
        old = self.h["image_size"]
        self.h["image_size"] = size
        try:
            await self._write_header()
        except OSError as e:
            self.h["image_size"] = old
            raise GenericError(f"Failed to update the image size: {e.strerror}") from None

    async def set_header_names(self, *, backing_file: str | None,
                               backing_fmt: str | None) -> None:
        """bdrv_qed_change_backing_file: the header and the name after it,
        written and flushed at once."""
        h = self.h
        if backing_file and h["compat_features"] & ~QED_COMPAT_FEATURE_MASK:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        new = QedHeader(h.pack())
        new["features"] &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)
        name = c_bytes(backing_file or "")
        if backing_file:
            new["features"] |= QED_F_BACKING_FILE
            if backing_fmt == "raw":
                new["features"] |= QED_F_BACKING_FORMAT_NO_PROBE
        new["backing_filename_offset"] = _HEADER.size
        new["backing_filename_size"] = len(name)
        if _HEADER.size + len(name) > new["header_size"] * new["cluster_size"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.file.write(0, new.pack() + name)
        await self.file.flush()
        self.h = new
        self.backing_filename = backing_file or None
        self.backing_format = "raw" if backing_file and backing_fmt == "raw" else None
        self.auto_backing_file = backing_file or ""


async def create_qed(file: BlockNode, size: int, *, backing_file: str | None = None,
                     backing_fmt: str | None = None, cluster_size: int | None = None,
                     table_size: int | None = None) -> None:
    """bdrv_qed_co_create on an open ``file`` node (blockdev-create
    driver=qed): the file emptied, then the header (one cluster, the backing
    file name after the 64 header bytes) and an empty L1 table in the next
    ``table_size`` clusters, written as zeroes."""
    cs = QED_DEFAULT_CLUSTER_SIZE if cluster_size is None else cluster_size
    ts = QED_DEFAULT_TABLE_SIZE if table_size is None else table_size
    if not cluster_size_valid(cs):
        raise GenericError(f"QED cluster size must be within range "
                           f"[{QED_MIN_CLUSTER_SIZE}, {QED_MAX_CLUSTER_SIZE}] and power of 2")
    if not table_size_valid(ts):
        raise GenericError(f"QED table size must be within range "
                           f"[{QED_MIN_TABLE_SIZE}, {QED_MAX_TABLE_SIZE}] and power of 2")
    if not image_size_valid(size, cs, ts):
        raise GenericError(f"QED image size must be a non-zero multiple of cluster size "
                           f"and less than {max_image_size(cs, ts)} bytes")
    h = QedHeader(bytes(_HEADER.size))
    h["magic"] = QED_MAGIC
    h["cluster_size"] = cs
    h["table_size"] = ts
    h["header_size"] = 1
    h["l1_table_offset"] = cs
    h["image_size"] = size
    name = b""
    if backing_file is not None:
        name = c_bytes(backing_file)
        h["features"] |= QED_F_BACKING_FILE
        h["backing_filename_offset"] = _HEADER.size
        h["backing_filename_size"] = len(name)
        if backing_fmt == "raw":
            h["features"] |= QED_F_BACKING_FORMAT_NO_PROBE
    await file.truncate(0)
    await file.write(0, h.pack())
    if name:
        await file.write(_HEADER.size, name)
    await file.write(cs, bytes(cs * ts))
