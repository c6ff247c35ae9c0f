"""block-stream: copy into the top what it reads from the chain above ``base``,
then make ``base`` its backing file.

The copy goes in windows: each is a drained section of the top node in
which up to 16 chunks of up to 1 MiB are in flight at once (chunked.py),
until 64 MiB have been issued or 50 ms have passed, so no guest write to a
range can fall between our read and our write (QEMU gets the same from
copy-on-read serialising requests) and guest I/O waits at most one window.
Only ranges the top does not allocate itself and an intermediate layer
does are copied, and that is decided under the drain.  What an
intermediate layer reads as zeroes (a zero cluster, or data that is all
zero in a 512 KiB piece) is written as zeroes, without unmapping: QEMU's
copy-on-read does the same (buffer_is_zero), so the top maps as QEMU's
does.

The graph, as QEMU 7.2's stream_start builds it: a ``copy-on-read`` filter
(``filter-node-name``, else an automatic name; ``bottom`` is the layer above
``base``) goes above ``top`` and its users move to it, so guest reads copy
up too; the job holds the filter ("main node"), ``top`` ("active node") and
the layers it removes ("intermediate node"), and reads through a
BlockBackend on the filter.  The filter is dropped, inside a drained
section, when the work ends on every path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..nodes.node import BlockNode, Perm, Status
from . import chain, chunked
from .blockjob import BlockJob
from .write_behind import WriteBehind

if TYPE_CHECKING:
    from ..daemon import Daemon

# One copy request at most (QEMU: 512 KiB, STREAM_CHUNK).  Not more than
# the 1 MiB L2 cache of a core here: a copy through a larger buffer runs at
# half speed in the kernel on ext4 (jobs/mirror.py, MAX_CHUNK).  4 MiB before:
# a 1 GiB stream of a disk file in the page cache took 1836-1934 us of CPU
# per MiB at 469-520 MiB/s (raw; qcow2 1777-1885 at 492-538), 1 MiB takes
# 811-840 at 1071-1100 (qcow2 703-742 at 1105-1225); on tmpfs 1 MiB costs
# 12-20% more CPU per MiB (732-791 -> 889-908 raw), on a cold file 20-30%
# more (615-674 -> 801-840) for 4% more speed (2 alternated runs each, load
# 2-4).
CHUNK = 1 << 20
WINDOW = 64 << 20       # bytes issued in one drained section at most
WINDOW_SECONDS = 0.05   # ... and time spent in it
PIECE = 512 << 10       # zero detection (QEMU's copy-on-read: per STREAM_CHUNK)
_ZEROES = bytes(PIECE)


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, daemon: Daemon, job_id: str, top: BlockNode, base: BlockNode | None,
                 backing_file: str | None, *, on_error: str = "report",
                 filter_node_name: str | None = None, **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        self.graph = top.graph
        self.filter_node_name = filter_node_name
        self.filter: BlockNode | None = None
        self.copier: chunked.ChunkCopier | None = None
        self._base_depth = 0
        self._write_behind: WriteBehind | None = None
        self._wb_nursery: trio.Nursery | None = None

    async def attach_nodes(self) -> None:
        """stream_start's graph changes; on failure nothing is left behind."""
        top = self.top
        c = chain.chain(top)
        below = c[1:c.index(self.base)] if self.base is not None else c[1:]
        opts: dict[str, Any] = {"driver": "copy-on-read", "file": top.node_name}
        if below:
            opts["bottom"] = below[-1].node_name
        if self.filter_node_name is not None:
            opts["node-name"] = self.filter_node_name
        self.filter = filt = await self.graph.insert_filter(top, opts)
        try:
            self.use(filt, "main node", Perm(0), Perm.ALL)
            basic = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            self.backend(filt, Perm.CONSISTENT_READ, basic | Perm.WRITE)
            self.use(top, "active node", Perm(0), basic | Perm.WRITE)
            for node in below:
                self.use(node, "intermediate node", Perm(0), basic)
        except BaseException:
            self.detach_all()
            await self._drop_filter()
            raise

    async def _drop_filter(self) -> None:
        filt, self.filter = self.filter, None
        if filt is not None:
            await self.remove_filter(filt, self.top)

    async def _plan(self, offset: int, n: int) -> tuple[int, str | None]:
        """(length, what): "zero" or "data" where an intermediate layer (not
        top, not base or below) allocates the range, None elsewhere."""
        st = await self.top.block_status(offset, n)
        length = max(min(st.length, n), 1)
        if not (1 < st.depth < self._base_depth
                and st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED)):
            return length, None
        if st.flags & Status.ZERO and not st.flags & Status.DATA:
            return length, "zero"
        return length, "data"

    def _writes_to_top(self) -> tuple[int, ...]:
        """Writes, zero writes and discards the top has seen (or failed):
        between two windows a change means a write by someone else, which
        may have allocated what a plan meant to copy (the layers below are
        the job's, nobody else writes them)."""
        st = self.top.stats
        return (st["wr_operations"], st["failed_wr_operations"], st["unmap_operations"],
                st["failed_unmap_operations"])

    async def _copy(self, offset: int, n: int, what: str) -> None:
        top = self.top
        if what == "zero":
            await top.write_zeroes(offset, n)
            return
        data = await top.read(offset, n)
        mv = memoryview(data)
        # runs of non-zero pieces are written as data, zero pieces as zeroes
        pos = 0
        while pos < n:
            k = min(PIECE, n - pos)
            zero = _ZEROES.startswith(mv[pos:pos + k])
            end = pos + k
            while end < n:
                k = min(PIECE, n - end)
                if _ZEROES.startswith(mv[end:end + k]) != zero:
                    break
                end += k
            if zero:
                await top.write_zeroes(offset + pos, end - pos)
            else:
                await top.write(offset + pos, mv[pos:end])
                # copies run only inside _run's nursery, which set both
                assert self._write_behind is not None and self._wb_nursery is not None
                self._write_behind.wrote(end - pos, self._wb_nursery)
            pos = end

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._drop_filter()

    async def _run(self) -> None:
        top = self.top
        length = top.length
        self.progress_total = length
        self._base_depth = chain.depth_of(top, self.base)
        # the header change below flushes top first: start its writeback early
        self._write_behind = WriteBehind(top)
        copier = self.copier = chunked.ChunkCopier(
            self, length, self._plan, self._copy, chunk=CHUNK,
            window_bytes=WINDOW, window_seconds=WINDOW_SECONDS, stamp=self._writes_to_top)
        ignored: OSError | None = None
        async with trio.open_nursery() as nursery:
            self._wb_nursery = nursery
            while not copier.done:
                # pause, cancel and the speed limit take effect here, with
                # none of our requests in flight and guest I/O going on
                await self.sleep(self.limit.delay())
                async with top.drained():
                    err = await copier.window()
                # the requests that waited for the window go first: they
                # are in flight before the next window drains them
                await trio.lowlevel.checkpoint()
                if err is None:
                    continue
                action = self.error_action(self.on_error, True, err)
                if action == "report":
                    raise err
                if action == "ignore":
                    # stream_run: the chunk is left behind and the job goes
                    # on, to fail at the end with the backing file kept
                    copier.skip_failed()
                    ignored = ignored or err
                # stop: the range is tried again after the resume
        if ignored is not None:
            raise ignored
        # QEMU rewires in prepare(); the header write is I/O, so it happens
        # here, at the same point in the event sequence (before "waiting")
        await self.pause_point()
        base = self.base
        name = self.backing_file
        if name is None and base is not None:
            name = base.filename
        await self._drop_filter()
        async with self.top.drained():
            await chain.set_backing(self.graph, self.top, base, name)
