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
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from ..nodes.bitmaps import DirtyBitmap
from ..nodes.node import BlockNode, Perm, Status
from .blockjob import BlockJob, replace_node

SLICE = 0.1           # BLOCK_JOB_SLICE_TIME: the poll period once READY
MAX_CHUNK = 1 << 20   # one copy request at most (QEMU's MAX_IO_BYTES)


class MirrorJob(BlockJob):
    job_type = "mirror"

    def __init__(self, daemon: Any, job_id: str, source: BlockNode, target: BlockNode, *,
                 sync: str = "full", granularity: int = 0, buf_size: int = 0,
                 copy_mode: str = "background", unmap: bool = True,
                 on_source_error: str = "report", on_target_error: str = "report",
                 replaces: BlockNode | None = None, pivot: bool = True,
                 base: BlockNode | None = None, job_type: str | None = None,
                 **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        if job_type:
            self.job_type = job_type  # active commit is a mirror named "commit"
        self.source = source
        self.target = target
        self.sync = sync
        self.granularity = granularity or target.default_bitmap_granularity()
        self.buf_size = buf_size or (16 << 20)
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
        self.bitmap: DirtyBitmap | None = None
        self._cursor = 0  # where the search for the next dirty chunk starts
        self._bitmap_key = f"\x00mirror:{job_id}"
        self.converged = False
        self.waiting_for_io = False
        self.error: BaseException | None = None

    def attach_nodes(self) -> None:
        # the source keeps its guest users; the target is ours alone to write
        self.use(self.source, "source", Perm.CONSISTENT_READ if self.sync != "none"
                 else Perm(0), Perm.ALL)
        self.use(self.target, "target", Perm.WRITE | Perm.RESIZE,
                 Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE)

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
        bm = DirtyBitmap(None, length, self.granularity)  # anonymous, as QEMU's
        self.bitmap = bm
        src.bitmaps[self._bitmap_key] = bm
        if self.copy_mode == "write-blocking":
            src.before_write.append(self._on_guest_write)
        await self._dirty_init(length)
        await self.pause_point()
        self.progress_total = bm.count()

        try:
            async with trio.open_nursery() as nursery:
                await self._loop(nursery)
        finally:
            if self._on_guest_write in src.before_write:
                src.before_write.remove(self._on_guest_write)

    async def _dirty_init(self, length: int) -> None:
        bm = self.bitmap
        assert bm is not None
        if self.sync == "none":
            return
        if self.sync == "full":
            bm.set_dirty(0, length)
            return
        # top: only what the top layer allocates; active commit: what the
        # layers above base allocate
        from . import chain

        limit = chain.depth_of(self.source, self.base) if self.base is not None else 2
        pos = 0
        while pos < length:
            st = await self.source.block_status(pos, length - pos)
            n = max(st.length, 1)
            if 0 < st.depth < limit and st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED):
                bm.set_dirty(pos, n)
            pos += n
            await self.pause_point()

    async def _on_guest_write(self, node: BlockNode, offset: int, length: int) -> None:
        # write-blocking: wake the job at once instead of at its next poll
        self.kick()

    async def _loop(self, nursery: trio.Nursery) -> None:
        bm = self.bitmap
        assert bm is not None
        while True:
            cnt = bm.count()
            self.progress_total = self.progress_current + cnt + self.in_flight_bytes
            if self.error is not None:
                raise self.error
            if cnt > 0 and self.in_flight_bytes < self.buf_size:
                offset, n = self._next_chunk(bm)
                if n:
                    method, n = await self._method(offset, n)
                    bm.reset_dirty(offset, n)
                    self._cursor = offset + n
                    self.in_flight += 1
                    self.in_flight_bytes += n
                    nursery.start_soon(self._copy, offset, n, method)
                    # only copied data counts against the speed (as QEMU's)
                    await self.rate_limit(n if method == "copy" else 0)
                    continue
            if cnt == 0 and self.in_flight == 0:
                if not self.is_ready and not self.ready_reached:
                    self.set_ready()
                if self.cancelled and self.is_ready:
                    return  # soft cancel after READY: a consistent copy, no pivot
                if self.should_complete:
                    await self.hold_drain(self.source)
                    if bm.count() == 0:
                        self.converged = True
                        return
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

    def _next_chunk(self, bm: DirtyBitmap) -> tuple[int, int]:
        # Like QEMU's dirty iterator: carry on after the last copy and wrap
        # round at the end, so that each step is a search from the cursor
        # rather than a rescan of the clean front of the bitmap.
        n = min(MAX_CHUNK, max(self.buf_size - self.in_flight_bytes, bm.granularity))
        area = bm.next_dirty_area(self._cursor, None, n)
        if area is None and self._cursor:
            area = bm.next_dirty_area(0, self._cursor, n)
        if area is None:
            return 0, 0
        return area

    async def _method(self, offset: int, n: int) -> tuple[str, int]:
        """copy, zero or discard, for as much of the range as has one status."""
        try:
            st = await self.source.block_status(offset, n)
        except OSError:
            return "copy", n  # the read will report it
        g = self.granularity
        m = min(n, max(st.length // g * g, g)) if st.length < n else n
        if st.flags & Status.DATA:
            return "copy", m
        if st.flags & Status.ZERO or not self.unmap:
            return "zero", m
        return "discard", m

    async def _copy(self, offset: int, n: int, method: str) -> None:
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
            self.in_flight -= 1
            self.in_flight_bytes -= n
            if self.waiting_for_io:
                self.kick()

    # -- completion ---------------------------------------------------------------------
    def prepare(self) -> None:
        if self.converged and self.pivot and not self.cancelled:
            replace_node(self.replaces, self.target, keep=self.edges)

    def clean(self) -> None:
        if self.bitmap is not None:
            self.source.bitmaps.pop(self._bitmap_key, None)
            self.bitmap = None
        super().clean()


def check_granularity(granularity: int | None) -> None:
    from ..qapi.errors import GenericError

    if granularity is None:
        return
    if granularity < 512 or granularity > 64 << 20:
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")


__all__ = ["MirrorJob", "check_granularity", "errno"]
