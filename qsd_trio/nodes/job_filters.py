"""The filters block jobs put above a node while they run (QEMU's
``mirror_top`` from block/mirror.c and ``commit_top`` from block/commit.c).

Both have one child, ``backing``, to the node they sit on, and pass
requests straight down.  They are opened with :meth:`BlockGraph.insert_filter`
(options ``{"driver": "mirror_top", "backing": NODE}``, plus ``node-name``
from the job's ``filter-node-name``, else an automatic ``#blockNNN``) and
removed with :meth:`BlockGraph.drop_filter`; they cannot be created with
blockdev-add (the schema knows no such driver).

``mirror_top`` lets the mirror job see guest writes: while ``active`` is
set, every write, zero write and discard goes through
``active(method, offset, length, data, fua, do_write)``, which performs the
write on the source itself (``do_write()``) and, in write-blocking mode,
copies it to the target before it returns.  Permissions follow QEMU's
bdrv_mirror_top_child_perm: the parents' needs pass through, an active
commit takes no consistent read and shares write, and once the job stops
(``stop``) the filter takes nothing.

Requests that waited at the filter while it was dropped (drained) go on to
the node below, which the child edge still names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .graph import register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, Perm
from .perms import filter_perms

ActiveWrite = Callable[[str, int, int, object, bool, Callable[[], Awaitable[None]]],
                       Awaitable[None]]


class _JobFilter(BlockNode):
    is_filter = True
    shows_filtered_child = True
    has_info = False  # no bdrv_get_info: QEMU shows no dirty-flag

    async def open(self, options: dict[str, Any]) -> None:
        self.backing = await self.open_child(options, "backing", inherit=False)
        self.request_alignment = self.backing.node.request_alignment

    def primary_child(self) -> BdrvChild | None:
        return self.children.get("backing")

    @property
    def below(self) -> BlockNode:
        return self.backing.node

    @property
    def filename(self) -> str:
        return self.below.filename

    def _length(self) -> int:
        return self.below.length

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        return await self.below.read(offset, length)

    async def _co_flush(self) -> None:
        await self.below.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        st = await self.below.block_status(offset, length)
        # the filter adds a layer: data found n layers below is n+1 down here
        return BlockStatus(st.flags, st.length, st.depth + 1 if st.depth else 0, st.offset)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        await self.below.truncate(size, exact=exact, prealloc=prealloc)


@register_driver
class MirrorTopNode(_JobFilter):
    driver = "mirror_top"
    stop = False  # the job is over: take nothing of the node below
    active: ActiveWrite | None = None

    async def open(self, options: dict[str, Any]) -> None:
        self.is_commit = bool(options.get("x-is-commit", False))
        await super().open(options)

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if self.stop:
            return Perm(0), Perm.ALL
        perm, shared = filter_perms(perm, shared)
        if self.is_commit:
            perm &= ~Perm.CONSISTENT_READ
            shared |= Perm.WRITE
        return Perm(perm), Perm(shared)

    async def _write(self, method: str, offset: int, length: int, data: Buffer | None, fua: bool,
                     do_write: Callable[[], Awaitable[None]]) -> None:
        active = self.active
        if active is None:
            await do_write()
        else:
            await active(method, offset, length, data, fua, do_write)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        below = self.below

        async def do_write() -> None:
            await below.write(offset, data, fua=fua)

        await self._write("copy", offset, len(data), data, fua, do_write)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        below = self.below

        async def do_write() -> None:
            await below.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                     no_fallback=no_fallback)

        await self._write("zero", offset, length, None, fua, do_write)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        below = self.below

        async def do_write() -> None:
            await below.discard(offset, length)

        await self._write("discard", offset, length, None, False, do_write)


@register_driver
class CommitTopNode(_JobFilter):
    """commit_top: reads pass through; it takes nothing of the node below
    (bdrv_commit_top_child_perm), so the commit job may write the chain."""

    driver = "commit_top"

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return Perm(0), Perm.ALL

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self.below.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self.below.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                      no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self.below.discard(offset, length)
