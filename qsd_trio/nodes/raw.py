"""The ``raw`` format: the child's bytes, optionally a window (offset, size)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..qapi import qemuopts
from ..qapi.errors import GenericError
from . import perms
from .graph import register_driver
from .node import (
    BdrvChild,
    BlockNode,
    BlockStatus,
    Buffer,
    Perm,
    ReadDone,
    WriteDone,
    json_filename,
)

# the request hooks a pass-through raw node's requests skip (BlockNode._through)
_IO_HOOKS = ("_co_preadv", "_co_preadv_into", "_co_pwritev", "_co_pwritev_vec",
             "_preadv_now", "_preadv_into_now", "_pwritev_now", "_preadv_submit",
             "_preadv_into_submit", "_pwritev_submit", "_pwritev_submit_vec")


@register_driver
class RawNode(BlockNode):
    driver = "raw"
    # whether the request hooks are raw's own: a subclass that overrides one
    # wants its requests to reach it, so it passes nothing through
    _own_hooks: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._own_hooks = all(getattr(cls, h) is getattr(RawNode, h) for h in _IO_HOOKS)

    # raw_reopen_prepare: the window may change (raw_read_options)
    reopenable: ClassVar[frozenset[str]] = frozenset({"offset", "size"})

    async def open(self, options: dict[str, Any]) -> None:
        self.offset: int = options.get("offset", 0)
        self.fixed_size: int | None = options.get("size")
        # the window's options as given (a strong runtime option: the node's
        # file name spells them out, even offset=0)
        self._given: dict[str, int] = {k: options[k] for k in ("offset", "size")
                                       if k in options}
        # raw_open: the file child's role is decided once, by the window at
        # open (DATA with one, FILTERED without); a reopen keeps it
        self._data_role = self._window()
        self.file = await self.open_child(options, "file")
        qemuopts.absorb_sizes(self.driver, options)
        self._check_window(self.offset, self.fixed_size)

    def _check_window(self, offset: int, size: int | None) -> None:
        """raw_apply_options' checks against the file child's length."""
        real = self.file.node.length
        if offset > real:
            raise GenericError(f"Offset ({offset}) cannot be greater than size of the "
                               f"containing file ({real})")
        if size is not None:
            if offset + size > real:
                raise GenericError(
                    f"The sum of offset ({offset}) and size ({size}) has to be "
                    f"smaller or equal to the  actual size of the containing file ({real})")
            if size % 512:
                raise GenericError("Specified size is not multiple of 512")

    def reopen_check(self, options: dict[str, Any]) -> None:
        # raw_reopen_prepare: an option left out is back to its default (the
        # whole file), as QEMU reads the window afresh from the new options
        qemuopts.absorb_sizes(self.driver, options)
        self._check_window(options.get("offset", 0), options.get("size"))

    async def reopen_prepare(self, options: dict[str, Any]) -> Callable[[], None] | None:
        offset, size = options.get("offset", 0), options.get("size")
        self._check_window(offset, size)  # the file may have changed size since the check

        def commit() -> None:
            # raw_reopen_commit; inside the drained section, so no request
            # sees half a window
            self.offset, self.fixed_size = offset, size
            self._given = {k: options[k] for k in ("offset", "size") if k in options}
            self._set_through()
        return commit

    @property
    def has_info(self) -> bool:
        # raw_get_info asks the child: over null-co there is no dirty-flag
        return self.file.node.has_info

    @property
    def filename(self) -> str:
        if not self._given:
            return super().filename
        # offset and size are strong runtime options (raw_strong_runtime_opts):
        # QEMU spells the node out once either is given
        return json_filename({"driver": self.driver, **self._given,
                              "file": self.file.node.full_open_options()})

    def _window(self) -> bool:
        return bool(self.offset) or self.fixed_size is not None

    def child_attached(self, edge: BdrvChild) -> None:
        # Set when the child is opened (offset and size are known by then)
        # and when a graph change moves the edge to another node.
        if edge.name == "file":
            self._set_through()

    def _set_through(self) -> None:
        """Without a window every request reaches the file child as it is:
        reads and writes go straight to its driver (BlockNode._through),
        unless blkdebug-style events are wanted on the child, which raw's
        own hooks (below) raise.  Again whenever the window or the child
        changes (a reopen that adds or drops a window)."""
        edge = self.children.get("file")
        if edge is None:
            self._through = None
            return
        child = edge.node
        self._through = (child if self._own_hooks and not (self._window()
                                                            or child._debug_events)
                         else None)

    def child_detached(self, edge: BdrvChild) -> None:
        if edge.name == "file":
            self._through = None

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # raw_child_perm: a window at open makes the child DATA storage,
        # otherwise it is FILTERED; only take write/resize when a parent
        # needs them
        if self._data_role:
            np, ns = perms.storage_perms(perm, shared, writable=not self.read_only,
                                         metadata=False)
        else:
            np, ns = perms.filter_perms(perm, shared)
        np = (np & ~(Perm.WRITE | Perm.RESIZE)) | (perm & (Perm.WRITE | Perm.RESIZE))
        return Perm(np), Perm(ns)

    def _length(self) -> int:
        if self.fixed_size is not None:
            return self.fixed_size
        # whole sectors, as the block layer counts them (bdrv_getlength is
        # total_sectors * 512): an offset that is not a multiple of 512
        # leaves a tail past the file's end, which reads as zeroes
        return -(-max(self.file.node._length() - self.offset, 0) // 512) * 512

    # the fast path (BlockNode.read_now) of a window, or over a child that
    # wants blkdebug-style events (those decline): the child's, at the
    # window's offset
    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        child = self.file.node
        return None if child._debug_events else child.read_now(self.offset + offset, length)

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        child = self.file.node
        return not child._debug_events and child.read_into_now(self.offset + offset, views)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        return self.file.node.write_now(self.offset + offset, mv)

    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        child = self.file.node
        return not child._debug_events and child.read_submit(self.offset + offset, length, done)

    def _preadv_into_submit(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        child = self.file.node
        return not child._debug_events and child.readv_submit(self.offset + offset, length,
                                                              views, done)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        return self.file.node.write_submit(self.offset + offset, mv, done)

    def _pwritev_submit_vec(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return self.file.node.writev_submit(self.offset + offset, views, done)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        self.file.node.debug_event("read_aio")
        return await self.file.node.read(self.offset + offset, length)

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        self.file.node.debug_event("read_aio")
        await self.file.node.read_into(self.offset + offset, views)

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        self.file.node.debug_event("write_aio")
        await self.file.node.writev(self.offset + offset, views, fua=fua)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        self.file.node.debug_event("write_aio")
        await self.file.node.write(self.offset + offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self.file.node.write_zeroes(self.offset + offset, length, may_unmap=may_unmap,
                                          fua=fua, no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self.file.node.discard(self.offset + offset, length)

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        st = await self.file.node.block_status(self.offset + offset, length)
        return BlockStatus(st.flags, min(st.length, length), st.depth, st.offset)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if self.fixed_size is not None:
            raise GenericError("Cannot resize fixed-size raw disks")
        if self.offset:
            raise GenericError("Cannot resize raw disks with an offset")
        await self.file.node.truncate(size, exact=exact, prealloc=prealloc)
