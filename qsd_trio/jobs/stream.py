"""block-stream: copy into the top what it reads from the chain above ``base``,
then make ``base`` its backing file.

Each chunk is copied inside a drained section of the top node, so no guest
write to the same range can fall between our read and our write (QEMU gets
the same from copy-on-read serialising requests).  Only ranges the top does
not allocate itself are copied, and that is checked again under the drain.

The graph, as QEMU 7.2's stream_start builds it: a ``copy-on-read`` filter
(``filter-node-name``, else an automatic name; ``bottom`` is the layer above
``base``) goes above ``top`` and its users move to it, so guest reads copy
up too; the job holds the filter ("main node"), ``top`` ("active node") and
the layers it removes ("intermediate node"), and reads through a
BlockBackend on the filter.  The filter is dropped, inside a drained
section, when the work ends on every path.
"""

from __future__ import annotations

from typing import Any

import trio

from ..nodes.node import BlockNode, Perm, Status
from . import chain
from .blockjob import BlockJob
from .write_behind import WriteBehind

# QEMU streams 512 KiB at a time; a bigger step halves our per-request overhead
# (the drained section, block status, two thread hops) without changing results
CHUNK = 4 << 20


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, daemon: Any, job_id: str, top: BlockNode, base: BlockNode | None,
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

    async def attach_nodes(self) -> None:
        """stream_start's graph changes; on failure nothing is left behind."""
        top = self.top
        c = chain.chain(top)
        below = c[1:c.index(self.base)] if self.base is not None else c[1:]
        opts: dict = {"driver": "copy-on-read", "file": top.node_name}
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
            with trio.CancelScope(shield=True):
                # the job lets go of the filter first (drop_filter's contract)
                for edge in [e for e in self.edges + self.backends if e.node is filt]:
                    edge.detach()
                    if edge in self.edges:
                        self.edges.remove(edge)
                    else:
                        self.backends.remove(edge)
                async with self.top.drained():
                    self.graph.drop_filter(filt)
                await filt.close()

    async def _allocated_between(self, offset: int, n: int) -> tuple[bool, int]:
        """(copy?, length): data in an intermediate layer (not top, not base or below)."""
        st = await self.top.block_status(offset, n)
        length = max(min(st.length, n), 1)
        base_depth = chain.depth_of(self.top, self.base)
        need = st.depth > 1 and st.depth < base_depth and bool(
            st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED))
        return need, length

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._drop_filter()

    async def _run(self) -> None:
        top = self.top
        length = top.length
        self.progress_total = length
        # the header change below flushes top first: start its writeback early
        write_behind = WriteBehind(top)
        pos = 0
        async with trio.open_nursery() as nursery:
            while pos < length:
                await self.pause_point()
                n = min(CHUNK, length - pos)
                try:
                    async with top.drained():
                        need, n = await self._allocated_between(pos, n)
                        if need:
                            data = await top.read(pos, n)
                            await top.write(pos, data)
                            write_behind.wrote(n, nursery)
                except OSError as e:
                    action = self.error_action(self.on_error, True, e)
                    if action == "report":
                        raise
                    continue  # ignore/stop: try the range again (after a resume)
                pos += n
                self.progress_current += n
                await self.rate_limit(n if need else 0)
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
