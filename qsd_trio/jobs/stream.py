"""block-stream: copy into the top what it reads from the chain above ``base``,
then make ``base`` its backing file.

Each chunk is copied inside a drained section of the top node, so no guest
write to the same range can fall between our read and our write (QEMU gets
the same from copy-on-read serialising requests).  Only ranges the top does
not allocate itself are copied, and that is checked again under the drain.
"""

from __future__ import annotations

from typing import Any

from ..nodes.node import BlockNode, Perm, Status
from . import chain
from .blockjob import BlockJob

# QEMU streams 512 KiB at a time; a bigger step halves our per-request overhead
# (the drained section, block status, two thread hops) without changing results
CHUNK = 4 << 20


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, daemon: Any, job_id: str, top: BlockNode, base: BlockNode | None,
                 backing_file: str | None, *, on_error: str = "report", **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        self.graph = top.graph

    def attach_nodes(self) -> None:
        self.use(self.top, "stream-top", Perm(0), Perm.ALL)

    async def _allocated_between(self, offset: int, n: int) -> tuple[bool, int]:
        """(copy?, length): data in an intermediate layer (not top, not base or below)."""
        st = await self.top.block_status(offset, n)
        length = max(min(st.length, n), 1)
        base_depth = chain.depth_of(self.top, self.base)
        need = st.depth > 1 and st.depth < base_depth and bool(
            st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED))
        return need, length

    async def run(self) -> None:
        top = self.top
        length = top.length
        self.progress_total = length
        pos = 0
        while pos < length:
            await self.pause_point()
            n = min(CHUNK, length - pos)
            try:
                async with top.drained():
                    need, n = await self._allocated_between(pos, n)
                    if need:
                        data = await top.read(pos, n)
                        await top.write(pos, data)
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
        async with self.top.drained():
            await chain.set_backing(self.graph, self.top, base, name)
