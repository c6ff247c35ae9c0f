"""x-blockdev-amend (a job of type "amend", dismissed by the client).

In QEMU 7.2 the only amendable qcow2 option is ``encrypt`` (LUKS key
slots); qsd-trio opens no encrypted images, so an amend either changes
nothing (and succeeds, as QEMU's does) or fails with QEMU's message.
"""

from __future__ import annotations

from typing import Any

from ..qapi.errors import GenericError
from .job import Job


class AmendJob(Job):
    job_type = "amend"
    is_block_job = False

    def __init__(self, daemon: Any, job_id: str, node: Any, options: Any) -> None:
        super().__init__(daemon, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options

    async def run(self) -> None:
        self.progress_total = 1
        try:
            if getattr(self.options, "encrypt", None) is not None:
                raise GenericError("image is not encrypted, can't amend")
        finally:
            self.progress_current = 1
