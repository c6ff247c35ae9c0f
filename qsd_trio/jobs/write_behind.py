"""Write-behind for block jobs: the disk writes while the job still copies.

A job that copies a whole disk into the page cache leaves all of it dirty,
and the flush that ends it (backup's, stream's before the backing file
changes) then waits for the disk to take everything, the copy already
done: 1.6 s of a 5 s backup of 1 GiB on the benchmark machine.  The kernel
would start that writeback by itself only past its dirty_background
threshold (10% of memory, more than many disks), and on a virtual disk
even written-back data waits in the host's cache until a flush.

So every ``STEP`` bytes a job has written, the files under its target
write back what is dirty (``FileNode.write_back``: sync_file_range, then
fdatasync) on a worker thread, one round at a time, while the job goes on
copying.  The final flush then finds little left.  This promises nothing
to anyone and orders nothing: what must be on disk when is still decided
by flushes (writing data earlier never breaks qcow2's ordering, which
only needs data before the metadata that points at it).  QEMU gets much
the same by accident: qcow2's l2_allocate flushes the image file each
time it adds an L2 table, every 512 MiB of 64 KiB clusters.

Resources: the rounds run in the nursery the caller passes to
:meth:`WriteBehind.wrote` and end with it.  Errors are not raised here:
the file node keeps one and its next flush raises it.
"""

from __future__ import annotations

import trio

from ..nodes.node import BlockNode

STEP = 64 << 20


def _files_below(node: BlockNode) -> list[BlockNode]:
    """The nodes that writes to ``node`` reach (itself included: its
    children but not its backing chain, which writes never change); those
    that keep no page-cache data write back nothing."""
    return node.subtree(backing=False)


class WriteBehind:
    """Counts what a job wrote to ``node``; every ``step`` bytes, a round of
    write-back of the files below it."""

    def __init__(self, node: BlockNode, step: int | None = None) -> None:
        self.node = node
        self.step = STEP if step is None else step
        self.pending = 0
        self.busy = False
        self.rounds = 0  # statistics: rounds started

    def wrote(self, nbytes: int, nursery: trio.Nursery) -> None:
        """Account ``nbytes`` written; maybe start a round in ``nursery``."""
        self.pending += nbytes
        if self.pending >= self.step and not self.busy:
            self.pending = 0
            self.busy = True
            self.rounds += 1
            nursery.start_soon(self._round)

    async def _round(self) -> None:
        try:
            # the graph may have changed since the last round: look again
            for f in _files_below(self.node):
                await f.write_back()  # read-only files return at once
        finally:
            self.busy = False
