"""block-commit of an intermediate layer: copy what ``top`` and the layers down
to ``base`` allocate into ``base``, then drop them from the chain.

(An active commit -- ``top`` is the device itself -- is a mirror job of type
"commit", see mirror.py.)  Nothing above ``top`` changes what these layers
read, and they are read-only to everyone else, so the copy needs no
serialisation with guest writes.
"""

from __future__ import annotations

from typing import Any

from ..nodes.node import BlockNode, Perm, Status
from . import chain
from .blockjob import BlockJob

CHUNK = 4 << 20  # QEMU: 512 KiB (COMMIT_BUFFER_SIZE); bigger costs less here


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, daemon: Any, job_id: str, device: BlockNode, top: BlockNode,
                 base: BlockNode, backing_file: str | None, *, on_error: str = "report",
                 **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.device = device
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        self.graph = top.graph

    def attach_nodes(self) -> None:
        self.use(self.base, "commit-base", Perm.WRITE | Perm.RESIZE, Perm.ALL)

    async def run(self) -> None:
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
        overlay = chain.overlay_of(self.device, top)
        name = self.backing_file if self.backing_file is not None else base.filename
        async with self.device.drained():
            await chain.set_backing(self.graph, overlay, base, name)
