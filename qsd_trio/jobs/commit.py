"""block-commit of an intermediate layer: copy what ``top`` and the layers down
to ``base`` allocate into ``base``, then drop them from the chain.

(An active commit -- ``top`` is the device itself -- is a mirror job of type
"commit", see mirror.py.)  Nothing above ``top`` changes what these layers
read, and they are read-only to everyone else, so the copy needs no
serialisation with guest writes: up to 16 chunks of up to 1 MiB are in
flight at once (chunked.py).  Ranges no layer from ``top`` down to above
``base`` allocates are skipped; zero clusters there are written to
``base`` as zeroes, without unmapping (QEMU 7.2 reads and writes them as
data: the contents are the same, ``qemu-img map`` shows zeroes here where
it shows data there).

The graph, as QEMU 7.2's commit_start builds it: a ``commit_top`` filter
(``filter-node-name``, else an automatic name) goes above ``top``, so the
overlay reads through it; the job holds the device ("main node"), the
layers from ``top`` down to ``base`` ("intermediate node") and ``base``,
and has BlockBackends on ``base`` (which it writes) and on ``top``.  When
the work is done (or the job fails or is cancelled) the filter is dropped
inside a drained section, before the chain is rewired.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..nodes import job_filters  # noqa: F401 - registers commit_top
from ..nodes.block_copy import CopyError
from ..nodes.node import BlockNode, Perm, Status
from . import chain, chunked
from .blockjob import BlockJob
from .job import failed_reading

if TYPE_CHECKING:
    from ..daemon import Daemon

# one copy request at most (QEMU: 512 KiB, COMMIT_BUFFER_SIZE); 1 MiB as
# stream's CHUNK, for the same reason (stream.py; measured there, this job's
# copies go through the same ChunkCopier and buffers)
CHUNK = 1 << 20


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, daemon: Daemon, job_id: str, device: BlockNode, top: BlockNode,
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
        overlay = chain.overlay_of(device, top)
        assert overlay is not None  # block-commit checked: top is below the device
        self.overlay = overlay
        self.copier: chunked.ChunkCopier | None = None
        self._base_depth = 0

    async def attach_nodes(self) -> None:
        """commit_start's graph changes; on failure nothing is left behind."""
        top, base = self.top, self.base
        self.use(self.device, "main node", Perm(0), Perm.ALL)
        try:
            # opened read-only, as QEMU opens it (its parent only reads)
            opts: dict[str, Any] = {"driver": "commit_top", "backing": top.node_name,
                                    "read-only": True}
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
            await self.remove_filter(filt, self.top)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._drop_filter()

    async def _plan(self, offset: int, n: int) -> tuple[int, str | None]:
        """(length, what): "zero" or "data" where a layer from top down to
        above base allocates the range, None elsewhere."""
        st = await self.top.block_status(offset, n)
        length = max(min(st.length, n), 1)
        if not (0 < st.depth < self._base_depth and st.flags & (Status.DATA | Status.ZERO)):
            return length, None
        return length, "zero" if st.flags & Status.ZERO else "data"

    async def _copy(self, offset: int, n: int, what: str) -> None:
        is_read = what == "data"
        try:
            if what == "zero":
                await self.base.write_zeroes(offset, n)
            else:
                data = await self.top.read(offset, n)
                is_read = False
                await self.base.write(offset, data)
        except OSError as e:
            raise CopyError(e, is_read=is_read) from e

    async def _run(self) -> None:
        top, base = self.top, self.base
        length = top.length
        if base.length < length:
            await base.truncate(length)
        self.progress_total = length
        self._base_depth = chain.depth_of(top, base)
        copier = self.copier = chunked.ChunkCopier(self, length, self._plan, self._copy,
                                                   chunk=CHUNK)
        while not copier.done:
            # pause, cancel and the speed limit take effect here, with none
            # of our requests in flight
            await self.sleep(self.limit.delay())
            err = await copier.window()
            if err is not None and self.error_action(
                    self.on_error, failed_reading(err), err) == "report":
                raise err
        await self.pause_point()
        # QEMU's commit_prepare: the overlay of top now uses base
        await self._drop_filter()
        name = self.backing_file if self.backing_file is not None else base.filename
        async with self.device.drained():
            await chain.set_backing(self.graph, self.overlay, base, name)
