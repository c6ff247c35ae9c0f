"""What block jobs share: graph edges, op blockers, copy helpers, pivots.

A block job uses nodes through edges (``BdrvChild``) with permissions, like
any parent, so conflicting users are refused with the graph's messages.  On
top of that, QEMU's op blockers refuse a second job on a node a job already
holds: "Node 'x' is busy: block device is in use by block job: mirror".
Every edge is detached in :meth:`BlockJob.clean`, which the job core runs
once on every path (success, failure, cancel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..nodes.node import BdrvChild, BlockNode, BlockParent, Perm, bulk_requests
from ..qapi.errors import GenericError
from .job import Job

if TYPE_CHECKING:
    from ..nodes.graph import BlockGraph


def check_not_busy(daemon: Any, node: BlockNode) -> None:
    """bdrv_op_is_blocked for job starts."""
    for job in daemon.jobs.values():
        if isinstance(job, BlockJob) and node in job.blocked_nodes():
            raise GenericError(f"Node '{node.node_name}' is busy: block device is in use "
                               f"by block job: {job.job_type}")


class BlockJob(Job, BlockParent):
    """A job on block nodes."""

    # a filter inserted above a node the job uses leaves the job's edge where
    # it is (QEMU's child_job.stay_at_node)
    stay_at_node = True

    def __init__(self, daemon: Any, job_id: str, **kw: Any) -> None:
        super().__init__(daemon, job_id, **kw)
        self.edges: list[BdrvChild] = []
        self.backends: list[BdrvChild] = []  # "root" edges of the job's BlockBackends
        self._used: list[BlockNode] = []  # every node the job held, for clean()
        self._drain_release: trio.Event | None = None

    @property
    def perm_desc(self) -> str:
        return f"{self.job_type} job '{self.id}'"

    @property
    def block_job_type(self) -> str | None:
        return self.job_type

    async def _main(self) -> None:
        # the job's copies are bulk requests, in this task and in the tasks
        # it starts (contextvars are copied at the spawn): the file driver
        # reads their large runs of page-cache data on its workers
        bulk_requests.set(True)
        await super()._main()

    def blocked_nodes(self) -> list[BlockNode]:
        """Nodes whose operations this job blocks (QEMU's op blockers)."""
        return [e.node for e in self.edges]

    def use(self, node: BlockNode, role: str, perm: Perm, shared: Perm = Perm.ALL) -> BdrvChild:
        """block_job_add_bdrv: the job holds ``node`` (x-debug-query-block-graph
        shows the edge under the job; op blockers refuse other jobs there)."""
        edge = node.attach(role, self, perm, shared)
        self.edges.append(edge)
        self._used.append(node)
        return edge

    def backend(self, node: BlockNode, perm: Perm, shared: Perm) -> BdrvChild:
        """A BlockBackend of the job's own on ``node`` (blk_new + blk_insert_bs),
        through which it does its I/O: a "root" edge of an anonymous user."""
        edge = node.attach("root", JobBackend(self), perm, shared)
        self.backends.append(edge)
        self._used.append(node)
        return edge

    def detach_backends(self) -> None:
        for edge in self.backends:
            edge.detach()
        self.backends.clear()

    def detach_all(self) -> None:
        """block_job_remove_all_bdrv, and the BlockBackends with it."""
        self.detach_backends()
        for edge in self.edges:
            edge.detach()
        self.edges.clear()

    async def remove_filter(self, filt: BlockNode, drained: BlockNode) -> None:
        """Take the job's filter node out of the graph and close it: the
        job's own edges to it go first (drop_filter's contract), the rest
        under a drain of ``drained``; shielded, as it runs on the way out
        of a cancelled job."""
        with trio.CancelScope(shield=True):
            for edge in [e for e in self.edges + self.backends if e.node is filt]:
                edge.detach()
                (self.edges if edge in self.edges else self.backends).remove(edge)
            async with drained.drained():
                filt.graph.drop_filter(filt)
            await filt.close()

    def clean(self) -> None:
        self.release_drain()
        self.detach_all()
        nodes, self._used = list(dict.fromkeys(self._used)), []
        # implicit nodes (drive-backup/drive-mirror targets) close with their last user
        for node in nodes:
            graph = node.graph
            if not node.monitor_owned and not node.parents and \
                    graph.nodes.get(node.node_name) is node:
                self.daemon.job_nursery.start_soon(_close_implicit, graph, node)

    # -- holding a node drained across await points ------------------------------------
    async def hold_drain(self, node: BlockNode) -> None:
        """Drain ``node`` (and its parents) until :meth:`release_drain`.

        The section lives in a task of its own so that it can outlast
        ``run`` (QEMU's mirror keeps the source drained until the pivot in
        prepare); the job's own requests made *after* this call wait too, so
        call it only when no more I/O on ``node`` is needed.
        """
        release = self._drain_release = trio.Event()

        async def holder(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
            with trio.CancelScope(shield=False):
                async with node.drained():
                    task_status.started()
                    await release.wait()

        await self.daemon.job_nursery.start(holder)

    def release_drain(self) -> None:
        if self._drain_release is not None:
            self._drain_release.set()
            self._drain_release = None


class JobBackend(BlockParent):
    """The anonymous BlockBackend a job writes through (shown by
    x-debug-query-block-graph as an unnamed block-backend)."""

    def __init__(self, job: BlockJob) -> None:
        self.job = job


async def _close_implicit(graph: BlockGraph, node: BlockNode) -> None:
    # shielded: a close cut short by shutdown would leave metadata half-written
    with trio.CancelScope(shield=True):
        await graph.unref(node)

