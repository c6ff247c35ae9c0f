"""The filter over one child: what a filter does not say, passes through.

QEMU's filters (copy-on-read, throttle, blkdebug, compress, preallocate,
copy-before-write, snapshot-access) sit above one child, ``file`` (blkdebug
calls it ``image``), and hand it every request they do not change.  A
filter here subclasses :class:`FileFilter`, opens its child into
``self.file`` and overrides only the requests it changes; the length,
reads, writes, zero writes, discards, flushes, block status and truncation
it does not change reach the child as they came.
"""

from __future__ import annotations

from .node import BdrvChild, BlockNode, BlockStatus, Buffer


class FileFilter(BlockNode):
    """A filter of ``self.file`` (set by the subclass's ``open``)."""

    is_filter = True
    shows_filtered_child = True
    file: BdrvChild

    def _length(self) -> int:
        return self.file.node.length

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        return await self.file.node.read(offset, length)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self.file.node.discard(offset, length)

    async def _co_flush(self) -> None:
        await self.file.node.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.file.node.block_status(offset, length)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        await self.file.node.truncate(size, exact=exact, prealloc=prealloc)
