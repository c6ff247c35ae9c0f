"""The backup job (blockdev-backup, drive-backup), QEMU's block/backup.c.

The target must end up holding the source *as it was when the job was
created*.  As in QEMU, the job inserts a ``copy-before-write`` filter above
the source (named ``filter-node-name``, else ``#blockNNN``); every parent of
the source (an NBD export, a format node) now writes through it, and a
write first copies the clusters it would change to the target.  The job
copies everything else through the filter's block-copy state, so each
cluster is copied once, by whoever comes first:

* what to copy: everything for sync=full; what the top layer allocates for
  sync=top (the bitmap is narrowed by block status first); the bitmap's
  dirty clusters for sync=bitmap/incremental; nothing for sync=none, where
  only copy-before-write copies, until the job is cancelled;
* how: up to ``x-perf.max-workers`` (64) tasks at once, each claiming a run
  of up to 1 MiB (``x-perf.max-chunk``) of dirty clusters; zero runs of the
  source (by block status) become zero writes; ``speed`` paces new tasks;
* the end: the target is flushed (data and metadata on disk) before the
  job completes (QEMU 7.2 does not: its filter's flush reaches only the
  source); every 64 MiB copied, the files under the target start writing
  back (write_behind.py), so that flush finds little left;
* errors: a failed task puts its clusters back; the pass stops starting
  tasks, lets the others finish, and ``on-source-error``/``on-target-error``
  decide (report: fail; stop: pause, then retry; ignore: retry).

The job's edges are "main node" (the filter) and "target"; both carry QEMU's
op blockers, the source does not (a second backup of it may run).  The
filter leaves the graph in ``clean``, before BLOCK_JOB_COMPLETED/CANCELLED.

Bitmaps (bitmap-mode): a successor bitmap records the writes made during
the job; on success with ``on-success`` (and always with ``always``) the
user's bitmap becomes the successor, plus for a failed ``always`` job the
clusters not copied; otherwise it keeps every bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..nodes.bitmaps import DirtyBitmap
from ..nodes.block_copy import MAX_WORKERS, BlockCopyState, Task
from ..nodes.copy_before_write import CopyBeforeWriteNode
from ..nodes.node import BlockNode, Perm
from ..qapi.errors import GenericError
from .blockjob import BlockJob
from .job import JobCancelled, failed_reading
from .write_behind import WriteBehind

if TYPE_CHECKING:
    from ..daemon import Daemon


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(self, daemon: Daemon, job_id: str, source: BlockNode, target: BlockNode, *,
                 sync: str = "full", bitmap: DirtyBitmap | None = None,
                 bitmap_mode: str = "on-success", compress: bool = False,
                 on_source_error: str = "report", on_target_error: str = "report",
                 filter_node_name: str | None = None, max_workers: int = MAX_WORKERS,
                 max_chunk: int = 0, **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.source = source
        self.target = target
        self.sync = sync
        self.user_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.compress = compress
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.filter_node_name = filter_node_name
        self.max_workers = max_workers
        self.max_chunk = max_chunk
        self.cbw: CopyBeforeWriteNode | None = None
        self.bcs: BlockCopyState | None = None
        self.successor: DirtyBitmap | None = None
        self._succ_key = f"\x00backup-successor:{job_id}"
        self._error: OSError | None = None
        self.write_behind: WriteBehind | None = None

    # -- setup (the transaction's prepare) -------------------------------------------------
    async def insert_filter(self) -> None:
        """backup_job_create up to block_job_create: the successor bitmap
        and the copy-before-write filter above the source.

        On failure everything done here is undone and the error raised.
        """
        if self.user_bitmap is not None:
            # created before the filter's copy bitmap, as in QEMU (the order
            # query-named-block-nodes lists the source's bitmaps in)
            self.successor = DirtyBitmap(None, self.source.length,
                                         self.user_bitmap.granularity)
            self.source.bitmaps[self._succ_key] = self.successor
            self.user_bitmap.busy = True
        opts = {"driver": "copy-before-write", "file": self.source.node_name,
                "target": self.target.node_name}
        if self.filter_node_name is not None:
            opts["node-name"] = self.filter_node_name
        try:
            cbw = await self.source.graph.insert_filter(self.source, opts)
            assert isinstance(cbw, CopyBeforeWriteNode)
            self.cbw = cbw
            self.bcs = cbw.bcs
            cs = self.bcs.cluster_size
            if self.max_chunk and self.max_chunk < cs:
                raise GenericError(f"Required max-chunk ({self.max_chunk}) is less than "
                                   f"backup cluster size ({cs})")
        except BaseException:
            self.clean()
            raise

    def attach_nodes(self) -> None:
        """The job's edges (after its creation): "main node" and "target"."""
        assert self.cbw is not None  # insert_filter() came first
        self.use(self.cbw, "main node", Perm(0), Perm.ALL)
        self.use(self.target, "target", Perm(0), Perm.ALL)
        self._init_copy_bitmap()

    def _init_copy_bitmap(self) -> None:
        """backup_init_bcs_bitmap: what is left to copy, fixed at creation."""
        bcs = self._bcs()
        bcs.compress = self.compress
        bcs.on_done = self._progress_done
        bcs.on_remaining = self._progress_remaining
        if self.sync == "bitmap" and self.user_bitmap is not None:
            bcs.copy_bitmap.clear()
            bcs.copy_bitmap.merge_from(self.user_bitmap)
        elif self.sync == "top":
            bcs.skip_unallocated = True  # until run() has narrowed the bitmap
        self.progress_total = self.progress_current + bcs.remaining()

    def _progress_done(self, n: int) -> None:
        self.progress_current += n

    def _progress_remaining(self, n: int) -> None:
        self.progress_total = self.progress_current + n

    def blocked_nodes(self) -> list[BlockNode]:
        # QEMU's op blockers sit on the job's nodes, the filter and the
        # target; not on the source, so a second backup of it may run
        return [e.node for e in self.edges]

    # -- running ---------------------------------------------------------------------------
    def _bcs(self) -> BlockCopyState:
        """The filter's copy state (set by insert_filter(), before the job runs)."""
        assert self.bcs is not None
        return self.bcs

    async def run(self) -> None:
        bcs = self._bcs()
        self.write_behind = WriteBehind(self.target)
        if self.sync == "top":
            pos = 0
            while pos < bcs.len:
                await self.pause_point()
                pos += await bcs.reset_unallocated(pos)
            bcs.skip_unallocated = False
        if self.sync == "none":
            # all clusters may be copied, none must: copy-before-write serves
            # the guest's writes until the job is cancelled
            while True:
                await self.yield_()
        while True:
            err = await self._copy_all()
            if err is None:
                break
            # the pass stopped at an error: report, or pause (stop) / retry
            is_read = failed_reading(err)
            policy = self.on_source_error if is_read else self.on_target_error
            action = self.error_action(policy, is_read, err)
            if action == "report":
                raise err
            await self.pause_point()
        # the copy is complete only once it is on disk (metadata included)
        await self.target.flush()

    async def _copy_all(self) -> OSError | None:
        """block_copy_common over the whole disk: passes until nothing is
        dirty or in flight; the first error of a pass ends it."""
        bcs = self._bcs()
        while True:
            self._error = None
            cancelled: JobCancelled | None = None
            found = False
            async with trio.open_nursery() as nursery:
                workers = trio.Semaphore(self.max_workers)
                pos = 0
                try:
                    while self._error is None:
                        await self.pause_point()
                        await workers.acquire()
                        task = await bcs.next_task(pos, bcs.len, self.max_chunk)
                        if task is None:
                            workers.release()
                            break
                        found = True
                        pos = task.end
                        nursery.start_soon(self._worker, workers, task, nursery)
                        await self.rate_limit(task.nbytes)
                except JobCancelled as e:
                    # tasks in flight finish (their clusters stay consistent)
                    cancelled = e
            if cancelled is not None:
                raise cancelled
            if self._error is not None:
                return self._error
            if found:
                continue
            # nothing dirty: wait for copy-before-write tasks still copying
            other = bcs.find_conflict(0, bcs.len)
            if other is None:
                return None
            await other.done.wait()

    async def _worker(self, workers: trio.Semaphore, task: Task,
                      nursery: trio.Nursery) -> None:
        try:
            await self._bcs().run_task(task)
            if not task.zeroes:
                assert self.write_behind is not None  # run() made it
                self.write_behind.wrote(task.nbytes, nursery)
        except OSError as e:
            if self._error is None:
                self._error = e
        finally:
            workers.release()

    # -- completion ------------------------------------------------------------------------
    def commit(self) -> None:
        bm, succ = self.user_bitmap, self.successor
        if bm is not None and succ is not None and self.bitmap_mode in ("on-success", "always"):
            bm.bits[:] = succ.bits

    def abort(self) -> None:
        bm, succ = self.user_bitmap, self.successor
        if bm is not None and succ is not None and self.bitmap_mode == "always":
            # keep what was written since, and what is still to be copied
            bm.bits[:] = succ.bits
            if self.bcs is not None:
                bm.merge_from(self.bcs.copy_bitmap)

    def clean(self) -> None:
        """backup_clean: the job's edges go, then the filter (bdrv_cbw_drop)."""
        cbw, self.cbw = self.cbw, None
        if self.successor is not None:
            self.source.bitmaps.pop(self._succ_key, None)
        if self.user_bitmap is not None:
            self.user_bitmap.busy = False
        for edge in [e for e in self.edges if e.node is cbw]:
            edge.detach()
            self.edges.remove(edge)
        if cbw is not None:
            cbw.stop_copying()
            cbw.graph.drop_filter(cbw)
            self.daemon.job_nursery.start_soon(_close_filter, cbw)
        super().clean()


async def _close_filter(cbw: BlockNode) -> None:
    # shielded: requests still inside the filter finish, then it lets go
    with trio.CancelScope(shield=True):
        await cbw.close()
