"""block-commit of an intermediate layer: copy what ``top`` and the layers down
to ``base`` allocate into ``base``, then drop them from the chain.

(An active commit -- ``top`` is the device itself -- is a mirror job of type
"commit", see mirror.py.)  Nothing above ``top`` changes what these layers
read, and they are read-only to everyone else, so the copy needs no
serialisation with guest writes.

The graph, as QEMU 7.2's commit_start builds it: a ``commit_top`` filter
(``filter-node-name``, else an automatic name) goes above ``top``, so the
overlay reads through it; the job holds the device ("main node"), the
layers from ``top`` down to ``base`` ("intermediate node") and ``base``,
and has BlockBackends on ``base`` (which it writes) and on ``top``.  When
the work is done (or the job fails or is cancelled) the filter is dropped
inside a drained section, before the chain is rewired.
"""

from __future__ import annotations

from typing import Any

import trio

from ..nodes import job_filters  # noqa: F401 - registers commit_top
from ..nodes.node import BlockNode, Perm, Status
from . import chain
from .blockjob import BlockJob

CHUNK = 4 << 20  # QEMU: 512 KiB (COMMIT_BUFFER_SIZE); bigger costs less here


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, daemon: Any, job_id: str, device: BlockNode, top: BlockNode,
                 base: BlockNode, backing_file: str | None, *, on_error: str = "report",
                 filter_node_name: str | None = None, **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.device = device
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        self.graph = top.graph
        self.filter_node_name = filter_node_name
        self.filter: BlockNode | None = None
        self.overlay = chain.overlay_of(device, top)

    async def attach_nodes(self) -> None:
        """commit_start's graph changes; on failure nothing is left behind."""
        top, base = self.top, self.base
        self.use(self.device, "main node", Perm(0), Perm.ALL)
        try:
            # opened read-only, as QEMU opens it (its parent only reads)
            opts: dict = {"driver": "commit_top", "backing": top.node_name, "read-only": True}
            if self.filter_node_name is not None:
                opts["node-name"] = self.filter_node_name
            self.filter = await self.graph.insert_filter(top, opts)
            c = chain.chain(top)
            for node in c[:c.index(base)]:
                self.use(node, "intermediate node", Perm(0), Perm.WRITE_UNCHANGED | Perm.WRITE)
            self.use(base, "base", Perm(0), Perm.ALL)
            perm = Perm.CONSISTENT_READ | Perm.WRITE
            if base.length < top.length:
                perm |= Perm.RESIZE
            self.backend(base, perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
            self.backend(top, Perm(0), Perm.ALL)
        except BaseException:
            self.detach_all()
            await self._drop_filter()
            raise

    async def _drop_filter(self) -> None:
        filt, self.filter = self.filter, None
        if filt is not None:
            with trio.CancelScope(shield=True):
                async with self.top.drained():
                    self.graph.drop_filter(filt)
                await filt.close()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._drop_filter()

    async def _run(self) -> None:
        top, base = self.top, self.base
        length = top.length
        if base.length < length:
            await base.truncate(length)
        self.progress_total = length
        base_depth = chain.depth_of(top, base)
        pos = 0
        while pos < length:
            await self.pause_point()
            n = min(CHUNK, length - pos)
            copied = 0
            try:
                st = await top.block_status(pos, n)
                n = max(min(st.length, n), 1)
                if 0 < st.depth < base_depth and st.flags & (Status.DATA | Status.ZERO):
                    if st.flags & Status.ZERO:
                        await base.write_zeroes(pos, n)
                    else:
                        data = await top.read(pos, n)
                        await base.write(pos, data)
                    copied = n
            except OSError as e:
                action = self.error_action(self.on_error, True, e)
                if action == "report":
                    raise
                continue
            pos += n
            self.progress_current += n
            await self.rate_limit(copied)
        await self.pause_point()
        # QEMU's commit_prepare: the overlay of top now uses base
        await self._drop_filter()
        name = self.backing_file if self.backing_file is not None else base.filename
        async with self.device.drained():
            await chain.set_backing(self.graph, self.overlay, base, name)
