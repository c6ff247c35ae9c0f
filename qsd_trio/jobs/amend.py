"""x-blockdev-amend (a job of type "amend", dismissed by the client).

In QEMU 7.2 the only amendable options are LUKS key slots: ``encrypt``
of a qcow2 node and the options of a luks node (add a passphrase to a free
or given slot, erase slots by index or by passphrase).  A qcow2 amend
without ``encrypt`` changes nothing and succeeds, as QEMU's does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..nodes.qcow2.crypt import amend_encryption
from .job import Job

if TYPE_CHECKING:
    from ..daemon import Daemon


class AmendJob(Job):
    job_type = "amend"
    is_block_job = False

    def __init__(self, daemon: Daemon, job_id: str, node: Any, options: Any,
                 force: bool = False) -> None:
        super().__init__(daemon, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options
        self.force = force

    async def run(self) -> None:
        self.progress_total = 1
        try:
            if self.node.driver == "luks":
                await self.node.amend(self.options, self.force)
            elif self.options.encrypt is not None:
                await amend_encryption(self.node, self.options.encrypt, self.force)
        finally:
            self.progress_current = 1
