"""The ``throttle`` filter (BlockdevOptionsThrottle): I/O to its ``file``
child waits for the limits of the named throttle group.

Reads count as reads; writes, zero writes and discards count as writes, all
with their length in bytes (QEMU's throttle driver does the same).  Flush,
block status and truncate pass straight through.  The group is looked up by
name among the daemon's ``throttle-group`` objects when the node opens and
stays referenced until the node closes, so ``object-del`` of a group in use
is refused.
"""

from __future__ import annotations

from typing import Any

import trio

from ..qapi.errors import GenericError
from .filter import FileFilter
from .graph import register_driver
from .node import Buffer, json_filename
from .throttle_group import ThrottleGroup, groups


@register_driver
class ThrottleNode(FileFilter):
    driver = "throttle"

    async def open(self, options: dict[str, Any]) -> None:
        name = options.get("throttle-group")
        if name is None:
            raise GenericError("Please specify a throttle group")
        group = groups(self.graph).get(name)
        if group is None:
            raise GenericError(f"Throttle group '{name}' does not exist")
        self.file = await self.open_child(options, "file")
        self.group: ThrottleGroup = group
        group.members.append(self)
        # drained sections in progress: requests are not throttled while > 0
        self.io_limits_disabled = 0
        self.throttled: set[trio.CancelScope] = set()  # requests waiting in the group
        self.request_alignment = self.file.node.request_alignment

    def drain_begin(self) -> None:
        # throttle_co_drain_begin: queued requests go now, new ones pass
        self.io_limits_disabled += 1
        if self.io_limits_disabled == 1:
            ThrottleGroup.restart(self)

    def drain_end(self) -> None:
        self.io_limits_disabled -= 1

    async def _close(self) -> None:
        # leave the group it joined, if its open got that far
        for group in self.graph.throttle_groups.values():
            if self in group.members:
                group.members.remove(self)

    @property
    def filename(self) -> str:
        # a strong runtime option (the group) makes QEMU spell the node out
        return json_filename({"driver": "throttle", "throttle-group": self.group.name,
                              "file": self.file.node.full_open_options()})

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        await self.group.intercept(False, length, self)
        return await self.file.node.read(offset, length)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self.group.intercept(True, len(data), self)
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self.group.intercept(True, length, self)
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self.group.intercept(True, length, self)
        await self.file.node.discard(offset, length)

