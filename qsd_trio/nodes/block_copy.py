"""block-copy: copy each cluster of a source to a target at most once
(QEMU's block/block-copy.c).

The copy-before-write filter copies the clusters a guest write is about to
change; the backup job copies whatever is left, with many tasks at once.
Both go through one :class:`BlockCopyState`, so a cluster is copied by
whoever comes first and the other waits for it.

``copy_bitmap`` has a bit per cluster still to copy.  A task *claims* a run
of dirty clusters by clearing their bits (nobody else claims them), copies
it, and sets the bits again if the copy fails.  Tasks in flight are listed:
a caller whose range overlaps one waits for it instead of copying twice.
The bitmap is an anonymous, disabled bitmap of the source, so
query-named-block-nodes shows it there as QEMU does.

Each task asks the source's block status first: zeroes are written as a
zero write (no data read), and in ``skip_unallocated`` mode (backup
sync=top, until the job has narrowed the bitmap) what the top layer does
not allocate is not copied at all.

Errors: :meth:`BlockCopyState.run_task` and :meth:`BlockCopyState.copy`
raise ``OSError`` with ``is_read`` set (source read or target write).
Released by :meth:`BlockCopyState.release` (drops the bitmap).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

import trio

from .bitmaps import DirtyBitmap
from .node import BlockNode, BlockStatus, Buffer, Status

CLUSTER_SIZE_DEFAULT = 1 << 16   # BLOCK_COPY_CLUSTER_SIZE_DEFAULT
MAX_BUFFER = 1 << 20             # BLOCK_COPY_MAX_BUFFER: one read + write
                                 # (larger: see jobs/mirror.py, MAX_CHUNK)
MAX_WORKERS = 64                 # BLOCK_COPY_MAX_WORKERS (backup's x-perf default)

_keys = itertools.count()


def cluster_size_for(target: BlockNode) -> int:
    """block_copy_calculate_cluster_size: the target's cluster size, at
    least 64 KiB, so that a copied cluster never half-fills a target cluster
    (which would then read its other half from a backing file or as zeroes)."""
    cs = target.info_extra().get("cluster-size") if target.has_info else None
    if not cs and "backing" not in target.children:
        # QEMU's warn_report, word for word (stderr)
        print("warning: The target block device doesn't provide information about the "
              "block size and it doesn't have a backing file. The default block size of "
              f"{CLUSTER_SIZE_DEFAULT} bytes is used. If the actual block size of the target "
              "exceeds this default, the backup may be unusable", file=sys.stderr, flush=True)
    return max(CLUSTER_SIZE_DEFAULT, cs or 0)


class CopyError(OSError):
    """An I/O error of a copy, with the side that failed (QEMU's
    error_in_source), which picks a job's on-source-error or
    on-target-error.  Same errno and text as the error it stands for."""

    def __init__(self, cause: OSError, *, is_read: bool) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.is_read = is_read


class CountedBitmap(DirtyBitmap):
    """A dirty bitmap that keeps its count as its bits change, as QEMU's
    hbitmap does.  The jobs ask for the count once per request or extent;
    counting a whole bitmap each time costs as much as its size
    (milliseconds for a TiB at 64 KiB granularity).  Used by the mirror
    job's bitmap and by the copy bitmap here."""

    _bits_set: int | None = None  # None: count them again

    def _set_bits(self, first: int, last: int, value: bool) -> None:
        known = self._bits_set
        if known is None:
            super()._set_bits(first, last, value)
            return
        b0, b1 = first >> 3, (last >> 3) + 1
        before = int.from_bytes(self.bits[b0:b1], "little").bit_count()
        super()._set_bits(first, last, value)
        self._bits_set = known + int.from_bytes(self.bits[b0:b1], "little").bit_count() - before

    def count(self) -> int:
        if self._bits_set is None:
            self._bits_set = int.from_bytes(self.bits, "little").bit_count()
        return min(self._bits_set << self.shift, self.size)

    # every other change of the bits: count again next time
    def resize(self, size: int) -> None:
        self._bits_set = None
        super().resize(size)

    def clear(self) -> None:
        self._bits_set = None
        super().clear()

    def merge_from(self, other: DirtyBitmap) -> None:
        self._bits_set = None
        super().merge_from(other)

    def load_bytes(self, data: bytes) -> None:
        self._bits_set = None
        super().load_bytes(data)


class Task:
    """One claimed run of clusters being copied."""

    __slots__ = ("offset", "nbytes", "zeroes", "done")

    def __init__(self, offset: int, nbytes: int) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.zeroes = False
        self.done = trio.Event()

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


class BlockCopyState:
    """What is left to copy from ``source`` to ``target``, and who copies what."""

    def __init__(self, source: BlockNode, target: BlockNode, *,
                 bitmap: DirtyBitmap | None = None) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size_for(target)
        self.len = source.length
        self.copy_bitmap = CountedBitmap(None, self.len, self.cluster_size, enabled=False)
        if bitmap is None:
            self.copy_bitmap.set_dirty(0, self.len)
        else:
            self.copy_bitmap.merge_from(bitmap)
        self._key = f"\x00block-copy:{next(_keys)}"
        source.bitmaps[self._key] = self.copy_bitmap
        self.tasks: list[Task] = []
        self.in_flight_bytes = 0
        self.skip_unallocated = False
        self.compress = False
        self.chunk = max(MAX_BUFFER, self.cluster_size)
        self._extent: tuple[int, int, Status, int] | None = None  # last block status
        # progress meter (the backup job's): work done, and what remains
        self.on_done: Callable[[int], None] | None = None
        self.on_remaining: Callable[[int], None] | None = None

    def release(self) -> None:
        """Drop the copy bitmap from the source (block_copy_state_free)."""
        if self.source.bitmaps.get(self._key) is self.copy_bitmap:
            del self.source.bitmaps[self._key]

    # -- bookkeeping ---------------------------------------------------------------------
    def remaining(self) -> int:
        return self.copy_bitmap.count() + self.in_flight_bytes

    def _report_remaining(self) -> None:
        if self.on_remaining is not None:
            self.on_remaining(self.remaining())

    def reset(self, offset: int, nbytes: int) -> None:
        """block_copy_reset: these clusters need no copy any more."""
        self.copy_bitmap.reset_dirty(offset, nbytes)
        self._report_remaining()

    def find_conflict(self, offset: int, nbytes: int) -> Task | None:
        end = offset + nbytes
        for t in self.tasks:
            if t.offset < end and offset < t.end:
                return t
        return None

    def _claim(self, offset: int, end: int, max_chunk: int) -> Task | None:
        """block_copy_task_create: the first dirty run in [offset, end)."""
        area = self.copy_bitmap.next_dirty_area(offset, end - offset, max_chunk)
        if area is None:
            return None
        start, n = area
        c = self.cluster_size
        n = -(-n // c) * c
        self.copy_bitmap.reset_dirty(start, n)
        self.in_flight_bytes += n
        task = Task(start, n)
        self.tasks.append(task)
        return task

    def _shrink(self, task: Task, nbytes: int) -> None:
        if nbytes < task.nbytes:
            self.in_flight_bytes -= task.nbytes - nbytes
            self.copy_bitmap.set_dirty(task.offset + nbytes, task.nbytes - nbytes)
            task.nbytes = nbytes

    def _end(self, task: Task, ok: bool, *, skipped: bool = False) -> None:
        """block_copy_task_end: done, or dirty again to be copied later.

        Copied or put back, the job's total stays what it was (bytes move
        from in flight to done or to dirty); only a skipped task shrinks
        it, so only then is the bitmap counted again.
        """
        self.in_flight_bytes -= task.nbytes
        if not ok:
            self.copy_bitmap.set_dirty(task.offset, task.nbytes)
        self.tasks.remove(task)
        if skipped:
            self._report_remaining()
        task.done.set()

    # -- block status ----------------------------------------------------------------------
    async def _status(self, offset: int, nbytes: int) -> tuple[int, Status, int]:
        """block_copy_block_status: (bytes, flags, depth), whole clusters.

        One query answers for the whole extent it returns: a cluster still
        dirty here has not been written since the state was created (a write
        through the filter copies it first), so its status cannot have
        changed, and the next tasks in the extent reuse the answer.
        """
        c = self.cluster_size
        ext = self._extent
        if ext is not None and ext[0] <= offset < ext[1]:
            st = BlockStatus(ext[2], ext[1] - offset, ext[3])
        else:
            try:
                st = await self.source.block_status(offset, self.len - offset)
            except OSError:
                return c, Status.DATA | Status.ALLOCATED, 1
            self._extent = (offset, offset + st.length, st.flags, st.depth)
        n = min(st.length, nbytes)
        if n < c:
            return c, Status.DATA | Status.ALLOCATED, 1
        if offset + n >= self.len:
            n = -(-n // c) * c
        else:
            n = n // c * c
        return n, st.flags, st.depth

    async def allocated_run(self, offset: int) -> tuple[int, bool]:
        """block_copy_is_cluster_allocated: (bytes, allocated in the top
        layer) for the clusters from ``offset`` that agree."""
        c = self.cluster_size
        st = await self.source.block_status(offset, self.len - offset)
        allocated = st.depth == 1
        if allocated:
            # a partly allocated cluster counts as allocated
            n = max(st.length, 1)
            return -(-n // c) * c, True
        n = st.length // c * c
        if n == 0:
            return c, True  # the cluster is allocated further on
        return n, False

    async def reset_unallocated(self, offset: int) -> int:
        """block_copy_reset_unallocated: bytes looked at from ``offset``."""
        n, allocated = await self.allocated_run(offset)
        if not allocated:
            self.copy_bitmap.reset_dirty(offset, n)
            self._report_remaining()
        return n

    # -- copying ---------------------------------------------------------------------------
    async def next_task(self, offset: int, end: int, max_chunk: int = 0) -> Task | None:
        """Claim the next run to copy in [offset, end), sized by block
        status; None when nothing there is dirty.  The caller runs it."""
        chunk = min(self.chunk, max_chunk) if max_chunk else self.chunk
        chunk = max(chunk, self.cluster_size)
        while True:
            task = self._claim(offset, end, chunk)
            if task is None:
                return None
            n, flags, depth = await self._status(task.offset, task.nbytes)
            self._shrink(task, n)
            if self.skip_unallocated and depth != 1:
                self._end(task, True, skipped=True)
                offset = task.end
                continue
            task.zeroes = bool(flags & Status.ZERO)
            return task

    async def run_task(self, task: Task) -> None:
        """block_copy_task_entry: copy ``task``; raise CopyError."""
        ok = False
        try:
            await self._do_copy(task.offset, min(task.end, self.len) - task.offset,
                                task.zeroes)
            ok = True
        finally:
            if ok and self.on_done is not None:
                self.on_done(min(task.end, self.len) - task.offset)
            self._end(task, ok)

    async def _do_copy(self, offset: int, nbytes: int, zeroes: bool) -> None:
        target = self.target
        if zeroes:
            try:
                await target.write_zeroes(offset, nbytes)
            except OSError as e:
                raise CopyError(e, is_read=False) from e
            return
        try:
            data = await self.source.read(offset, nbytes)
        except OSError as e:
            raise CopyError(e, is_read=True) from e
        try:
            if self.compress:
                await self._write_compressed(offset, data)
            else:
                await target.write(offset, data)
        except OSError as e:
            raise CopyError(e, is_read=False) from e

    async def _write_compressed(self, offset: int, data: Buffer) -> None:
        c = self.cluster_size
        mv = memoryview(data)
        for i in range(0, len(mv), c):
            piece = mv[i:i + c]
            if len(piece) == c:
                await self.target.write_compressed(offset + i, piece)
            else:
                await self.target.write(offset + i, piece)

    async def copy(self, offset: int, nbytes: int) -> None:
        """block_copy: return once nothing in the range is left to copy,
        copying what is dirty and waiting for what others copy."""
        end = min(offset + nbytes, self.len)
        while True:
            task = await self.next_task(offset, end)
            if task is not None:
                await self.run_task(task)
                continue
            other = self.find_conflict(offset, end - offset)
            if other is None:
                return
            await other.done.wait()
