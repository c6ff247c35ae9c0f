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

import json

import trio

from ..qapi.errors import GenericError
from .graph import register_driver
from .node import BlockNode
from .throttle_group import ThrottleGroup, groups


def _qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in (qdict.c's tdb_hash modulo 512).

    A QDict iterates its buckets in order, so this is the key order of the
    JSON QEMU prints for a node's options."""
    v = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key.encode()):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_order(d: dict) -> dict:
    return {k: d[k] for k in sorted(d, key=_qdict_bucket)}


def full_open_options(node: BlockNode) -> dict:
    """The options a ``json:`` file name spells out for ``node`` (approximating
    QEMU's full_open_options for the drivers a throttle filter usually wraps:
    the driver, then each child under its role, in QDict order)."""
    name = node.filename
    if name.startswith("json:"):
        return json.loads(name[5:])
    prim = node.primary_child()
    if node.driver == "file" or prim is None:
        return qdict_order({"driver": node.driver, "filename": name})
    return qdict_order({"driver": node.driver, prim.name: full_open_options(prim.node)})


@register_driver
class ThrottleNode(BlockNode):
    driver = "throttle"
    is_filter = True
    shows_filtered_child = True

    async def open(self, options: dict) -> None:
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
        group = getattr(self, "group", None)
        if group is not None and self in group.members:
            group.members.remove(self)

    @property
    def filename(self) -> str:
        # a strong runtime option (the group) makes QEMU spell the node out
        return "json:" + json.dumps(qdict_order({
            "throttle-group": self.group.name, "driver": "throttle",
            "file": full_open_options(self.file.node)}))

    def _length(self) -> int:
        return self.file.node.length

    async def _co_preadv(self, offset, length):
        await self.group.intercept(False, length, self)
        return await self.file.node.read(offset, length)

    async def _co_pwritev(self, offset, data, fua):
        await self.group.intercept(True, len(data), self)
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset, length, may_unmap, fua, no_fallback=False):
        await self.group.intercept(True, length, self)
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_pdiscard(self, offset, length):
        await self.group.intercept(True, length, self)
        await self.file.node.discard(offset, length)

    async def _co_block_status(self, offset, length):
        return await self.file.node.block_status(offset, length)

    async def _co_truncate(self, size, exact, prealloc):
        await self.file.node.truncate(size, exact=exact, prealloc=prealloc)
