"""The backup job (blockdev-backup, drive-backup) and its copy-before-write.

The target must end up holding the source *as it was when the job started*.
Two things copy clusters from source to target:

* the job's loop, cluster by cluster through the copy map (everything for
  sync=full, what the top layer allocates for sync=top, the bitmap's dirty
  clusters for sync=incremental/bitmap, nothing for sync=none);
* copy-before-write: a before-write hook on the source that, before a guest
  write changes a cluster still in the copy map, copies the old contents.

A cluster is copied once: whoever starts it marks it in flight, others wait
for it.  QEMU puts this hook in a ``copy-before-write`` filter node above the
source; here it sits in the source node's before-write hooks, which every
write of every parent passes through, so the guarantee is the same without
changing the graph.

Bitmaps (bitmap-mode): at the start a successor bitmap begins to record
the writes made during the job; on success with ``on-success`` (and always
with ``always``) the user's bitmap becomes the successor plus, for a failed
``always`` job, the clusters not copied; otherwise it keeps every bit.
"""

from __future__ import annotations

from typing import Any

import trio

from ..nodes.bitmaps import DirtyBitmap
from ..nodes.node import BlockNode, Perm, Status
from .blockjob import BlockJob

CHUNK = 1 << 20


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(self, daemon: Any, job_id: str, source: BlockNode, target: BlockNode, *,
                 sync: str = "full", bitmap: DirtyBitmap | None = None,
                 bitmap_mode: str = "on-success", compress: bool = False,
                 on_source_error: str = "report", on_target_error: str = "report",
                 **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.source = source
        self.target = target
        self.sync = sync
        self.user_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.compress = compress
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        # BACKUP_CLUSTER_SIZE_DEFAULT, or the target's bigger cluster
        self.cluster = max(target.info_extra().get("cluster-size") or 0, 65536)
        length = source.length
        self.copy_map = DirtyBitmap(None, length, self.cluster)
        self.successor: DirtyBitmap | None = None
        self._succ_key = f"\x00backup-successor:{job_id}"
        self._in_flight: dict[int, trio.Event] = {}

    def attach_nodes(self) -> None:
        self.use(self.source, "source", Perm.CONSISTENT_READ, Perm.ALL)
        self.use(self.target, "target", Perm.WRITE,
                 Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.RESIZE)

    def blocked_nodes(self) -> list[BlockNode]:
        # QEMU's backup job sits on its copy-before-write filter, not on the
        # source: a second backup of the same source is allowed
        return [self.target]

    def start_tracking(self) -> None:
        """At creation, before any guest write can slip in: fix what to copy."""
        length = self.source.length
        if self.sync in ("full", "top", "none"):
            # top is narrowed in run(); none: only copy-before-write copies
            self.copy_map.set_dirty(0, length)
        elif self.sync in ("incremental", "bitmap") and self.user_bitmap is not None:
            for off, n, dirty in self.user_bitmap.dirty_extents():
                if dirty:
                    self.copy_map.set_dirty(off, n)
        if self.user_bitmap is not None:
            self.successor = DirtyBitmap(None, length, self.user_bitmap.granularity)
            self.source.bitmaps[self._succ_key] = self.successor
            self.user_bitmap.busy = True
        self.source.before_write.append(self._cbw)
        self.progress_total = self.copy_map.count()

    # -- copying ----------------------------------------------------------------------
    async def _copy_cluster(self, start: int, *, from_guest: bool) -> None:
        """Copy the cluster at ``start`` unless it is done; wait if it is in flight."""
        while start in self._in_flight:
            await self._in_flight[start].wait()
        if self.copy_map.get(start):
            await self._copy_range(start, self.cluster, from_guest=from_guest)

    def _claimable_run(self, start: int, limit: int) -> int:
        """Bytes from ``start`` (dirty, not in flight) to claim together, up to ``limit``."""
        c, end, pos = self.cluster, min(start + limit, self.source.length), start
        while pos < end and self.copy_map.get(pos) and pos not in self._in_flight:
            pos += c
        return min(pos, self.source.length) - start

    async def _copy_range(self, start: int, n: int, *, from_guest: bool) -> None:
        """Copy ``n`` bytes at ``start`` (whole clusters, all dirty and unclaimed)."""
        c = self.cluster
        n = min(n, self.source.length - start)
        ev = trio.Event()
        clusters = range(start, start + n, c)
        for cl in clusters:
            self._in_flight[cl] = ev
        try:
            while True:
                is_read = True
                try:
                    await self._transfer(start, n)
                    break
                except OSError as e:
                    if from_guest:
                        raise  # break-guest-write: the write that needed it fails
                    policy = self.on_source_error if is_read else self.on_target_error
                    action = self.error_action(policy, getattr(e, "is_read", True), e)
                    if action == "report":
                        raise
                    await self.pause_point()  # stop: wait for resume; ignore: retry
            self.copy_map.reset_dirty(start, n)
            self.progress_current += n
        finally:
            for cl in clusters:
                del self._in_flight[cl]
            ev.set()

    async def _transfer(self, start: int, n: int) -> None:
        pos, end = start, start + n
        while pos < end:
            try:
                st = await self.source.block_status(pos, end - pos)
                m = min(max(st.length, 1), end - pos)
                if st.flags & Status.ZERO:
                    await self._target_io(self.target.write_zeroes(pos, m))
                else:
                    data = await self.source.read(pos, m)
                    if self.compress:
                        await self._target_io(self._write_compressed(pos, data))
                    else:
                        await self._target_io(self.target.write(pos, data))
            except OSError as e:
                if not hasattr(e, "is_read"):
                    e.is_read = True
                raise
            pos += m

    async def _write_compressed(self, pos: int, data) -> None:
        c = self.cluster
        mv = memoryview(data)
        for i in range(0, len(mv), c):
            chunk = mv[i:i + c]
            if len(chunk) == c:
                await self.target.write_compressed(pos + i, chunk)
            else:
                await self.target.write(pos + i, chunk)

    @staticmethod
    async def _target_io(coro) -> None:
        try:
            await coro
        except OSError as e:
            e.is_read = False
            raise

    async def _cbw(self, node: BlockNode, offset: int, length: int) -> None:
        if self.copy_map is None or length <= 0:
            return
        c = self.cluster
        first = offset // c * c
        for start in range(first, min(offset + length, node.length), c):
            if self.copy_map.get(start) or start in self._in_flight:
                await self._copy_cluster(start, from_guest=True)

    async def run(self) -> None:
        length = self.source.length
        if self.target.length < length:
            await self.target.truncate(length)
        c = self.cluster
        if self.sync == "top":
            # copy only what the top layer allocates (depth 1)
            pos = 0
            while pos < length:
                st = await self.source.block_status(pos, length - pos)
                n = max(st.length, 1)
                if st.depth != 1:
                    a, b = -(-pos // c) * c, (pos + n) // c * c
                    if b > a and not any(s in self._in_flight for s in range(a, b, c)):
                        self.copy_map.reset_dirty(a, b - a)
                pos += n
                await self.pause_point()
            self.progress_total = self.progress_current + self.copy_map.count()
        if self.sync == "none":
            # fleecing: only copy-before-write copies; run until cancelled
            while True:
                await self.yield_()
        # block-copy: up to 1 MiB a request, several requests at once
        limit = trio.Semaphore(8)
        # passes until nothing is left: a range that copy-before-write held
        # while a worker came by is picked up by the next pass
        while self.copy_map.count():
            async with trio.open_nursery() as nursery:
                pos = 0
                while pos < length:
                    await self.pause_point()
                    if not self.copy_map.get(pos) or pos in self._in_flight:
                        pos += c
                        continue
                    n = self._claimable_run(pos, CHUNK)
                    await limit.acquire()
                    nursery.start_soon(self._worker, limit, pos, n)
                    await self.rate_limit(n)
                    pos += n
        self.progress_total = self.progress_current + self.copy_map.count()
        # the copy is complete only once it is on disk (metadata included)
        await self.target.flush()

    async def _worker(self, limit: trio.Semaphore, pos: int, n: int) -> None:
        try:
            # the range may have been copied by copy-before-write meanwhile
            while n > 0 and (pos in self._in_flight or not self.copy_map.get(pos)):
                if pos in self._in_flight:
                    await self._in_flight[pos].wait()
                    continue
                pos, n = pos + self.cluster, n - self.cluster
            if n > 0:
                n = self._claimable_run(pos, n)
                await self._copy_range(pos, n, from_guest=False)
        finally:
            limit.release()

    # -- completion -------------------------------------------------------------------
    def _stop_tracking(self) -> None:
        if self._cbw in self.source.before_write:
            self.source.before_write.remove(self._cbw)

    def commit(self) -> None:
        bm, succ = self.user_bitmap, self.successor
        if bm is not None and succ is not None and self.bitmap_mode in ("on-success", "always"):
            bm.bits[:] = succ.bits

    def abort(self) -> None:
        bm, succ = self.user_bitmap, self.successor
        if bm is not None and succ is not None and self.bitmap_mode == "always":
            # keep what was written since, and what is still to be copied
            bm.bits[:] = succ.bits
            bm.merge_from(self.copy_map) if self.copy_map.granularity == bm.granularity \
                else _merge_coarse(bm, self.copy_map)

    def clean(self) -> None:
        self._stop_tracking()
        if self.successor is not None:
            self.source.bitmaps.pop(self._succ_key, None)
        if self.user_bitmap is not None:
            self.user_bitmap.busy = False
        super().clean()


def _merge_coarse(bm: DirtyBitmap, other: DirtyBitmap) -> None:
    for off, n, dirty in other.dirty_extents():
        if dirty:
            bm.set_dirty(off, n)
