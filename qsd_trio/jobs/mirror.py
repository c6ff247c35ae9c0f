"""The mirror job (blockdev-mirror, drive-mirror; commit of the active layer).

Tracking: a dirty bitmap on the source, which the I/O layer marks after
every completed write.  A copy clears the bits of its range *before* it
reads, so a guest write that lands during the copy sets them again and the
range is copied once more: the target never misses a write.

Phases (QEMU's mirror_run): initial dirtying by ``sync`` (full: everything,
top: what the top layer allocates, none: nothing), copying until the bitmap
is empty, READY (BLOCK_JOB_READY), then copying new writes every 100 ms until
job-complete or cancel.  On complete, the source is drained; if nothing is
dirty any more the job ends with the source still drained and the pivot
(every parent of the source now uses the target) happens in ``prepare``, so
no guest write can fall between the last copy and the switch.  A soft cancel
(block-job-cancel after READY) ends the same way without a pivot and reports
BLOCK_JOB_COMPLETED.

The graph, as QEMU 7.2 builds it (mirror_start_job): a ``mirror_top`` filter
(nodes/job_filters.py; ``filter-node-name``, else an automatic name) goes
above the source, and every user of the source moves to it; the job holds
the filter ("main node"), the source and the target (and, for an active
commit, the nodes in between) as a block job does, and writes the target
through a BlockBackend of its own ("root" edge).  When the job ends
(``_exit_common``, from prepare or abort), the source is drained (``run``
always ends holding that drain, like mirror_run), the pivot replaces the
source by the target, and the filter is dropped so its users go back to
whatever sits below it.

Copying, as QEMU's mirror_iteration: from the dirty chunk after the last
copy, contiguous dirty chunks are merged up to ``buf-size``; block status
splits that into operations: data is copied (read, then written) in
requests of at most max(buf-size / 16, 1 MiB), zeroes and holes become
one zero write or discard each.  At most 16 operations are in flight, and
the copies among them hold at most ``buf-size`` bytes.  A block status
answer of "data" is kept for the extent it covers (QEMU's block status
cache does the same below the format), until a write to the source
touches it, so a fully allocated source costs one query per extent, not
one per request; zeroes and holes are asked about again each time.

copy-mode=write-blocking (active mirroring): once the initial dirtying is
done, a write through the filter is also written to the target before it
completes, for its granularity-aligned part (an unaligned head or tail stays
dirty and is copied in the background, as do_sync_target_write leaves it).
Writes and background copies of overlapping chunks wait for each other
(QEMU's in-flight operations), so the target sees them in the source's order.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..nodes import job_filters  # noqa: F401 - registers mirror_top
from ..nodes.bitmaps import DirtyBitmap
from ..nodes.block_copy import CountedBitmap
from ..nodes.node import BlockNode, Perm, Status
from ..nodes.perms import refresh
from ..qapi.errors import GenericError
from . import chain
from .blockjob import BlockJob

if TYPE_CHECKING:
    from ..daemon import Daemon

SLICE = 0.1           # BLOCK_JOB_SLICE_TIME: the poll period once READY
MAX_IN_FLIGHT = 16    # operations in flight at once (QEMU's MAX_IN_FLIGHT)
MAX_CHUNK = 1 << 20   # one copy request at most, for the default buf-size (MAX_IO_BYTES)
# Larger requests were tried (issue 11, reverted): 4 MiB took 14-35% less
# CPU per MiB on tmpfs (fewer Python operations per MiB), but 2-2.5 times
# more on ext4 in the page cache, at a third of the throughput.  That is the
# kernel, not us: a copy through a buffer larger than the 1 MiB L2 cache of
# each core here runs at half speed (dd of a cached 1 GiB file to a new file
# on ext4, system time: bs=1M 0.39 s, 2M 0.87-1.21 s, 4M 1.15 s; on tmpfs
# 0.5-0.6 s either way).  Backup's block-copy tasks behaved the same.
STATUS_SPAN = 64 << 20  # what one block status query asks about at least


@attrs.define(eq=False)
class MirrorOp:
    """A copy or an active write in flight (QEMU's MirrorOp)."""

    offset: int
    length: int
    active: bool
    done: trio.Event = attrs.field(factory=trio.Event)


class MirrorJob(BlockJob):
    job_type = "mirror"

    def __init__(self, daemon: Daemon, job_id: str, source: BlockNode, target: BlockNode, *,
                 sync: str = "full", granularity: int = 0, buf_size: int = 0,
                 copy_mode: str = "background", unmap: bool = True,
                 on_source_error: str = "report", on_target_error: str = "report",
                 replaces: BlockNode | None = None, pivot: bool = True,
                 base: BlockNode | None = None, job_type: str | None = None,
                 filter_node_name: str | None = None, zero_target: bool = False,
                 **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        if job_type:
            self.job_type = job_type
        self.source = source
        self.target = target
        self.sync = sync
        self.granularity = granularity or target.default_bitmap_granularity()
        g = self.granularity
        # mirror_start_job: a whole number of chunks
        self.buf_size = -(-(buf_size or (16 << 20)) // g) * g
        # mirror_iteration's max_io_bytes, in whole chunks
        self.max_io = max(max(self.buf_size // MAX_IN_FLIGHT, MAX_CHUNK) // g * g, g)
        self.copy_mode = copy_mode
        self.unmap = unmap
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.replaces = replaces or source
        self.pivot = pivot
        self.base = base
        self.should_complete = False
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.buf_in_use = 0  # bytes of copies in flight (zero writes hold no buffer)
        self.max_in_flight = 0  # statistics, for tests: the most operations at once
        self._data_extent: tuple[int, int] | None = None  # known data: [start, end)
        self._after_data = True  # the last answer was data (or none yet)
        self.bitmap: DirtyBitmap | None = None
        self._cursor = 0  # where the search for the next dirty chunk starts
        self._bitmap_key = f"\x00mirror:{job_id}"
        self.converged = False
        self.waiting_for_io = False
        self.error: BaseException | None = None
        self.filter_node_name = filter_node_name
        self.zero_target = zero_target  # the target may hold data: zero it first
        self.filter: job_filters.MirrorTopNode | None = None
        self.ops: list[MirrorOp] = []
        self.prepared = False
        self.active_ready = False  # initial dirtying done: active writes may start

    async def attach_nodes(self) -> None:
        """mirror_start_job's graph changes; on failure nothing is left behind."""
        src, tgt = self.source, self.target
        graph = src.graph
        is_commit = tgt in chain.chain(src)[1:]
        opts: dict[str, Any] = {"driver": "mirror_top", "backing": src.node_name,
                                "x-is-commit": is_commit}
        if self.filter_node_name is not None:
            opts["node-name"] = self.filter_node_name
        filt = await graph.insert_filter(src, opts)
        assert isinstance(filt, job_filters.MirrorTopNode)
        self.filter = filt
        filt.active = self._active_write
        try:
            self.use(filt, "main node", Perm.CONSISTENT_READ,
                     Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE)
            # the target BlockBackend: the job alone writes it; an active
            # commit's base stays readable (and grows if it is smaller)
            perm, shared = Perm.WRITE, Perm.WRITE_UNCHANGED
            if is_commit:
                if tgt.length < src.length:
                    perm |= Perm.RESIZE
                shared |= Perm.CONSISTENT_READ | Perm.WRITE
            self.backend(tgt, perm, shared)
            self.use(src, "source", Perm(0),
                     Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.CONSISTENT_READ)
            self.use(tgt, "target", Perm(0), Perm.ALL)
            if is_commit:
                # the nodes between go away with the commit: block them
                for node in chain.chain(src)[1:chain.chain(src).index(tgt)]:
                    self.use(node, "intermediate node", Perm(0),
                             Perm.WRITE_UNCHANGED | Perm.WRITE)
        except BaseException:
            self.detach_all()
            filt.stop = True
            refresh(filt)
            async with src.drained():
                graph.drop_filter(filt)
            raise
        # the job's dirty bitmap exists from the start, as QEMU's
        bm = _WatchedBitmap(None, src.length, self.granularity)  # anonymous, as QEMU's
        bm.on_dirty = self._forget_status
        if self.copy_mode == "write-blocking":
            # the filter marks what it does not copy itself
            bm.enabled = False
        self.bitmap = bm
        src.bitmaps[self._bitmap_key] = bm

    # -- job hooks ---------------------------------------------------------------------
    def on_cancel(self, force: bool) -> bool:
        # before READY any cancel is a force cancel
        return force or not self.is_ready

    def on_complete(self) -> None:
        self.should_complete = True

    async def run(self) -> None:
        src, tgt = self.source, self.target
        length = src.length
        if tgt.length != length:
            await tgt.truncate(length)
        bm = self.bitmap
        assert bm is not None
        try:
            await self._dirty_init(length)
            await self.pause_point()
            self.progress_total = bm.count()
            # only now guest writes are copied to the target as they happen
            self.active_ready = True
            async with trio.open_nursery() as nursery:
                await self._loop(nursery)
        finally:
            # mirror_run ends with the source drained on every path; the
            # graph changes (prepare/abort) happen inside that section
            if self._drain_release is None:
                with trio.CancelScope(shield=True) as scope:
                    if self.cancel_scope.cancel_called:
                        scope.cancel()  # the daemon's deadline: no more waiting
                    await self.hold_drain(src)

    async def _dirty_init(self, length: int) -> None:
        bm = self.bitmap
        assert bm is not None
        if self.sync == "none":
            return
        if self.sync == "full":
            tgt = self.target
            # mirror_dirty_init: a target that can write zeroes by unmapping
            # (qcow2 v3 opened with discard=unmap) is zeroed first, then only
            # what some layer allocates is copied; otherwise everything is
            if not (self.zero_target and tgt.can_write_zeroes_with_unmap()):
                bm.set_dirty(0, length)
                return
            await tgt.write_zeroes(0, length, may_unmap=True)  # not counted as progress
            limit = len(chain.chain(self.source)) + 1
        else:
            # top: only what the top layer allocates; active commit: what
            # the layers above base allocate
            limit = chain.depth_of(self.source, self.base) if self.base is not None else 2
        pos = 0
        while pos < length:
            st = await self.source.block_status(pos, length - pos)
            n = max(st.length, 1)
            if 0 < st.depth < limit and st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED):
                bm.set_dirty(pos, n)
            pos += n
            await self.pause_point()

    # -- operations in flight ------------------------------------------------------
    def _chunks(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granularity
        return offset // g, -(-(offset + length) // g)

    def _conflict(self, offset: int, length: int, me: MirrorOp | None = None) -> MirrorOp | None:
        """mirror_wait_on_conflicts: an operation on an overlapping chunk."""
        a, b = self._chunks(offset, length)
        for op in self.ops:
            if op is not me:
                c, d = self._chunks(op.offset, op.length)
                if c < b and a < d:
                    return op
        return None

    def _start_op(self, offset: int, length: int, active: bool) -> MirrorOp:
        op = MirrorOp(offset, length, active)
        self.ops.append(op)
        return op

    def _end_op(self, op: MirrorOp) -> None:
        self.ops.remove(op)
        op.done.set()

    # -- active mirroring (write-blocking) ------------------------------------------
    def _copy_to_target(self) -> bool:
        """should_copy_to_target"""
        return (self.copy_mode == "write-blocking" and self.active_ready
                and self.error is None and not self.is_cancelled and not self.prepared)

    async def _active_write(self, method: str, offset: int, length: int, data: Any, fua: bool,
                            do_write: Callable[[], Awaitable[None]]) -> None:
        """A guest write through mirror_top (bdrv_mirror_top_do_write)."""
        if not self._copy_to_target():
            try:
                await do_write()
            finally:
                self._forget_status(offset, length)
                bm = self.bitmap
                if bm is not None and not bm.enabled and not self.prepared:
                    bm.set_dirty(offset, length)  # write-blocking keeps it disabled
            return
        if data is not None:
            data = bytes(data)  # the caller may change its buffer: copy what we write
        while (other := self._conflict(offset, length)) is not None:
            await other.done.wait()
        op = self._start_op(offset, length, True)
        try:
            try:
                await do_write()
            finally:
                self._forget_status(offset, length)
            if self._copy_to_target():
                await self._sync_target_write(method, offset, length, data)
        finally:
            self._end_op(op)

    async def _sync_target_write(self, method: str, offset: int, length: int,
                                 data: bytes | None) -> None:
        """do_sync_target_write: the aligned part goes to the target now; a
        dirty unaligned head or tail is left to the background copy."""
        bm = self.bitmap
        assert bm is not None
        g = self.granularity
        skip = 0
        if offset % g and bm.get(offset):
            skip = -(-offset // g) * g - offset
            if length <= skip:
                return
            offset, length = offset + skip, length - skip
        end = offset + length
        if end % g and bm.get(end - 1):
            tail = end % g
            if length <= tail:
                return
            length -= tail
        a, b = -(-offset // g) * g, (offset + length) // g * g
        if a < b:
            bm.reset_dirty(a, b - a)
        self.progress_total += length
        try:
            if method == "copy":
                assert data is not None  # a copy carries the guest's data
                await self.target.write(offset, memoryview(data)[skip:skip + length])
            elif method == "zero":
                await self.target.write_zeroes(offset, length, may_unmap=self.unmap)
            else:
                await self.target.discard(offset, length)
        except OSError as e:
            bm.set_dirty(offset // g * g, -(-(offset + length) // g) * g - offset // g * g)
            if self.error_action(self.on_target_error, False, e) == "report":
                if self.error is None:
                    self.error = e
                self.kick()
            return
        self.progress_current += length

    async def _loop(self, nursery: trio.Nursery) -> None:
        bm = self.bitmap
        assert bm is not None
        while True:
            cnt = bm.count()
            self.progress_total = self.progress_current + cnt + self.in_flight_bytes
            if self.error is not None:
                raise self.error
            if cnt > 0 and self.in_flight < MAX_IN_FLIGHT and self.buf_in_use < self.buf_size:
                offset, n = self._next_chunk(bm)
                if n:
                    other = self._conflict(offset, 1)
                    if other is not None:
                        # a copy or a guest write is busy there: wait for it
                        await other.done.wait()
                        continue
                    n = self._clip(offset, n)
                    op = self._start_op(offset, n, False)
                    method, n = await self._method(offset, n)
                    if method == "copy":
                        # one request, and no more than the free buffer
                        g = self.granularity
                        n = min(n, self.max_io,
                                max((self.buf_size - self.buf_in_use) // g * g, g))
                        self.buf_in_use += n
                    op.length = n
                    bm.reset_dirty(offset, n)
                    self._cursor = offset + n
                    self.in_flight += 1
                    self.in_flight_bytes += n
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    nursery.start_soon(self._copy, offset, n, method, op)
                    # only copied data counts against the speed (as QEMU's)
                    await self.rate_limit(n if method == "copy" else 0)
                    continue
            if cnt == 0 and self.in_flight == 0:
                if not self.is_ready and not self.ready_reached:
                    # READY promises a copy that survives a crash of the
                    # host: what was copied is flushed first (mirror_flush)
                    if not await self._flush_target():
                        await self.sleep(SLICE)  # stopped, or retried after a while
                        continue
                    self.set_ready()
                if self.cancelled and self.is_ready:
                    return  # soft cancel after READY: a consistent copy, no pivot
                if self.should_complete:
                    await self.hold_drain(self.source)
                    if bm.count() == 0:
                        if await self._flush_target():
                            self.converged = True
                            return
                        self.release_drain()
                        await self.sleep(SLICE)
                        continue
                    self.release_drain()
                    continue
                await self.sleep(SLICE)
            else:
                # wait for a copy to finish (or a verb)
                self.waiting_for_io = True
                try:
                    await self.yield_()
                finally:
                    self.waiting_for_io = False

    async def _flush_target(self) -> bool:
        """mirror_flush: False if the flush failed (the error is handled by
        on-target-error: reported, or the job stops, or it is retried)."""
        try:
            await self.target.flush()
        except OSError as e:
            if self.error_action(self.on_target_error, False, e) == "report":
                if self.error is None:
                    self.error = e
            return False
        return True

    def _next_chunk(self, bm: DirtyBitmap) -> tuple[int, int]:
        # Like QEMU's dirty iterator: carry on after the last copy and wrap
        # round at the end, so that each step is a search from the cursor
        # rather than a rescan of the clean front of the bitmap.
        # contiguous dirty chunks, up to buf-size (mirror_iteration's nb_chunks)
        n = self.buf_size
        area = bm.next_dirty_area(self._cursor, None, n)
        if area is None and self._cursor:
            area = bm.next_dirty_area(0, self._cursor, n)
        if area is None:
            return 0, 0
        return area

    def _clip(self, offset: int, n: int) -> int:
        """Stop short of the first chunk an operation in flight is using."""
        g = self.granularity
        end = offset + n
        for op in self.ops:
            start = op.offset // g * g
            if offset < start < end:
                end = start
        return end - offset

    def _forget_status(self, offset: int, length: int) -> None:
        """A write to the source: what block status said there may be stale."""
        ext = self._data_extent
        if ext is not None and offset < ext[1] and ext[0] < offset + length:
            self._data_extent = None

    async def _method(self, offset: int, n: int) -> tuple[str, int]:
        """copy, zero or discard, for as much of the range as has one status."""
        g = self.granularity
        ext = self._data_extent
        if ext is not None and ext[0] <= offset < ext[1]:
            known = ext[1] - offset
            return "copy", (min(n, max(known // g * g, g)) if known < n else n)
        src = self.source
        # after data, ask about the rest of the disk: one answer may cover
        # it all (a file system's SEEK_HOLE costs the same either way)
        span = src.length - offset if self._after_data else min(max(n, STATUS_SPAN),
                                                                src.length - offset)
        try:
            st = await src.block_status(offset, span)
        except OSError:
            return "copy", n  # the read will report it
        self._after_data = bool(st.flags & Status.DATA)
        if st.flags & Status.DATA:
            self._data_extent = (offset, offset + st.length)
        m = min(n, max(st.length // g * g, g)) if st.length < n else n
        if st.flags & Status.DATA or st.length < min(n, g):
            # a status shorter than a chunk (a hole, then data in the same
            # chunk) copies the chunk, as mirror_iteration does: zeroing it
            # would lose the data after the hole
            return "copy", m
        if st.flags & Status.ZERO or not self.unmap:
            return "zero", m
        return "discard", m

    # Copies without a task were tried (issue 11, not kept).  (a) The
    # source's read_submit, and from its completion the target's
    # write_submit: on tmpfs (raw mirror, 512 MiB, 8 rounds, load 6) user
    # CPU 215 -> 117 us/MiB and in all 1094 -> 957, but on the cold disk
    # file 465 -> 216 MiB/s in 5 rounds of 5 (its 1 MiB reads are then
    # started with RWF_NOWAIT on trio's thread, file.py's _started_read).
    # (b) The read in this task, the write by write_submit: tmpfs 679 ->
    # 950 MiB/s, 850 -> 801 us/MiB (6 rounds); page cache 420 -> 566
    # us/MiB (4 rounds, all worse); cold 801 -> 986 us/MiB (6 rounds,
    # same MiB/s).  Neither was a gain on every place.
    async def _copy(self, offset: int, n: int, method: str, op: MirrorOp) -> None:
        src, tgt = self.source, self.target
        try:
            while True:
                is_read = False
                try:
                    if method == "zero":
                        await tgt.write_zeroes(offset, n, may_unmap=self.unmap)
                    elif method == "discard":
                        await tgt.discard(offset, n)
                    else:
                        is_read = True
                        data = await src.read(offset, n)
                        is_read = False
                        await tgt.write(offset, data)
                    self.progress_current += n
                    return
                except OSError as e:
                    policy = self.on_source_error if is_read else self.on_target_error
                    action = self.error_action(policy, is_read, e)
                    if action == "report":
                        if self.error is None:
                            self.error = e
                        return
                    # ignore / stop: the range is copied again later
                    assert self.bitmap is not None
                    self.bitmap.set_dirty(offset, n)
                    return
        finally:
            self._end_op(op)
            self.in_flight -= 1
            self.in_flight_bytes -= n
            if method == "copy":
                self.buf_in_use -= n
            if self.waiting_for_io:
                self.kick()

    # -- completion ---------------------------------------------------------------------
    def prepare(self) -> None:
        self._exit_common(abort=False)

    def abort(self) -> None:
        self._exit_common(abort=True)

    def _exit_common(self, abort: bool) -> None:
        """mirror_exit_common, with the source drained (``run`` left it so):
        the target BlockBackend goes, the filter stops forwarding, the pivot
        (on completion) makes the target take the source's place, and the
        filter leaves the graph, its users going to the node below it."""
        if self.prepared:
            return
        self.prepared = True
        if self.bitmap is not None:
            self.source.bitmaps.pop(self._bitmap_key, None)
            self.bitmap = None
        self.detach_backends()
        filt = self.filter
        if filt is None:
            return
        filt.active = None
        filt.stop = True
        refresh(filt)
        graph = filt.graph
        error = None
        if self.converged and self.pivot and not self.cancelled and not abort:
            try:
                graph.replace_node(self.replaces, self.target)
            except GenericError as e:
                error = e
        # the job lets go of its nodes before the filter goes (block_job_remove_all_bdrv)
        self.detach_all()
        graph.drop_filter(filt)
        self.daemon.job_nursery.start_soon(_close_filter, filt)
        if error is not None:
            raise error

    def clean(self) -> None:
        if self.bitmap is not None:
            self.source.bitmaps.pop(self._bitmap_key, None)
            self.bitmap = None
        if not self.prepared:
            self._exit_common(abort=True)
        super().clean()


class _WatchedBitmap(CountedBitmap):
    """The job's dirty bitmap, which also tells the job where the source
    was written (its block status answers there may be stale)."""

    on_dirty: Callable[[int, int], None] | None = None

    def set_dirty(self, offset: int, length: int) -> None:
        super().set_dirty(offset, length)
        if self.on_dirty is not None:
            self.on_dirty(offset, length)


async def _close_filter(filt: BlockNode) -> None:
    # requests that waited at the filter go on to the node below, then it closes
    with trio.CancelScope(shield=True):
        await filt.close()


def check_granularity(granularity: int | None) -> None:
    if granularity is None:
        return
    if granularity < 512 or granularity > 64 << 20:
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")


__all__ = ["MirrorJob", "check_granularity", "errno"]
