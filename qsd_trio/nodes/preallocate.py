"""The ``preallocate`` filter (BlockdevOptionsPreallocate, QEMU 7.2's
block/preallocate.c): a write past the end of its ``file`` child first
extends the file by ``prealloc-size`` bytes (default 128 MiB), the new end
aligned up to ``prealloc-align`` (default 1 MiB), with one zero write that
must not fall back to writing data (fallocate on a file node).

The node's length is the real end of the data (QEMU's ``data_end``): the
largest of the file's length when the filter got write and resize
permissions and the ends of every write after that.  A format above (qcow2)
therefore allocates from the real end, not from the preallocated one.  At
close the file is truncated back to that end.

The three states ``data_end``, ``zero_start`` and ``file_end`` are valid
(not None) only while the filter's parents hold both write and resize; it
then takes both on its child and shares neither, so nobody else can move
the file's end under it (preallocate_child_perm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..qapi.errors import GenericError, QapiError
from ..qapi.ghash import qdict_order
from ..qapi.qemuopts import parse_size
from .filter import FileFilter
from .graph import register_driver
from .node import BdrvChild, Perm, json_filename
from .perms import filter_perms

MiB = 1 << 20
SECTOR = 512


def _can_write_resize(perm: Perm) -> bool:
    return bool(perm & Perm.WRITE) and bool(perm & Perm.RESIZE)


def _absorb_opts(options: dict[str, Any], file_align: int) -> tuple[int, int]:
    """preallocate_absorb_opts: (prealloc-align, prealloc-size) with QEMU's
    checks; the options are QemuOpts sizes, so a negative one fails as in
    parse_option_size."""
    for key in qdict_order(options):
        if key in ("prealloc-align", "prealloc-size"):
            parse_size(key, str(options[key]))
    align = options.get("prealloc-align", 1 * MiB)
    size = options.get("prealloc-size", 128 * MiB)
    if align % SECTOR:
        raise GenericError("prealloc-align parameter of preallocate filter is not aligned "
                           f"to {SECTOR}")
    if align % file_align:
        raise GenericError("prealloc-align parameter of preallocate filter is not aligned "
                           f"to underlying node request alignment ({file_align})")
    return align, size


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


@register_driver
class PreallocateNode(FileFilter):
    driver = "preallocate"
    # a format above writes past the end (QEMU checks no end on writes)
    grows = True
    reopenable = frozenset({"prealloc-align", "prealloc-size"})

    async def open(self, options: dict[str, Any]) -> None:
        # invalid until the permissions are known (preallocate_open)
        self.data_end: int | None = None
        self.zero_start: int | None = None
        self.file_end: int | None = None
        # (data end, file end) when the permissions went before close did
        self._pending_cut: tuple[int, int] | None = None
        self.file = await self.open_child(options, "file")
        self.prealloc_align, self.prealloc_size = _absorb_opts(
            options, self.file.node.request_alignment)
        self.request_alignment = self.file.node.request_alignment

    # -- permissions (preallocate_child_perm, _set_perm) -------------------------
    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        perm, shared = filter_perms(perm, shared)
        if _can_write_resize(perm):
            perm |= Perm.WRITE | Perm.RESIZE
            # shares neither, to keep data_end, zero_start and file_end valid
            shared &= ~(Perm.WRITE | Perm.RESIZE)
        return Perm(perm), Perm(shared)

    def _set_perm(self, perm: Perm, shared: Perm) -> None:
        if not hasattr(self, "file"):
            return  # still opening: open() starts with the states invalid
        if _can_write_resize(perm):
            if self.data_end is None:
                n = self.file.node.length
                self.data_end = self.file_end = self.zero_start = n
                cut, self._pending_cut = self._pending_cut, None
                if cut is not None and cut[1] == n:
                    # back before the cut was made: the preallocation is still ours
                    self.data_end = self.zero_start = cut[0]
        else:
            # QEMU truncates the preallocation away here (check_perm), but a
            # permission change does no I/O here: what to cut is kept for
            # close, which cuts it if the file still ends where we left it
            if self.data_end is not None and self.file_end is not None \
                    and self.data_end < self.file_end:
                self._pending_cut = (self.data_end, self.file_end)
            self.data_end = self.file_end = self.zero_start = None

    def _has_prealloc_perms(self) -> bool:
        return _can_write_resize(self.file.perm)

    # -- information ------------------------------------------------------------
    @property
    def filename(self) -> str:
        # a filter: QEMU spells it out (bdrv_refresh_filename)
        return json_filename(self._open_options_from_children())

    def _length(self) -> int:
        if self.data_end is not None:
            return self.data_end
        n = self.file.node.length
        if self._has_prealloc_perms():
            self.file_end = self.zero_start = self.data_end = n
        return n

    def reopen_check(self, options: dict[str, Any]) -> None:
        _absorb_opts(options, self.file.node.request_alignment)

    async def reopen_prepare(self, options: dict[str, Any]) -> Callable[[], None] | None:
        align, size = _absorb_opts(options, self.file.node.request_alignment)

        def commit() -> None:
            self.prealloc_align, self.prealloc_size = align, size
        return commit

    # -- I/O ----------------------------------------------------------------------
    async def _handle_write(self, offset: int, length: int, want_merge_zero: bool) -> bool:
        """handle_write: before a write past the data's end, extend the file
        by a preallocation; True if the range reads as zeroes already (a
        zero write merged with the preallocation)."""
        child = self.file.node
        file_align = max(1, child.request_alignment)
        prealloc_align = max(self.prealloc_align, file_align)
        end = offset + length
        if not self._has_prealloc_perms():
            return False
        if self.data_end is None:
            self.data_end = child.length
            if self.file_end is None:
                self.file_end = self.data_end
        if end <= self.data_end:
            return False
        self.data_end = end
        if self.zero_start is None or not want_merge_zero:
            self.zero_start = end
        if self.file_end is None:
            self.file_end = child.length
        if end <= self.file_end:
            return want_merge_zero and offset >= self.zero_start
        start = _align_up(min(offset, self.file_end) if want_merge_zero else self.file_end,
                          file_align)
        stop = _align_up(max(start, end) + self.prealloc_size, prealloc_align)
        want_merge_zero = want_merge_zero and start <= offset
        try:
            await child.write_zeroes(start, stop - start, no_fallback=True)
        except OSError:
            self.file_end = None
            return False
        self.file_end = stop
        return want_merge_zero

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._handle_write(offset, len(data), False)
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        # only a plain zero write (no FUA, no unmap) merges with preallocation
        if await self._handle_write(offset, length, not (may_unmap or fua)):
            return
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        child = self.file.node
        if self.data_end is not None and size > self.data_end:
            if self.file_end is None:
                self.file_end = child.length
            if prealloc == "falloc":
                if size <= self.file_end:
                    # what the filter preallocated becomes the user's
                    self.data_end = size
                    return
            elif self.file_end > self.data_end:
                try:
                    await child.truncate(self.data_end, exact=True, prealloc="off")
                except QapiError as e:
                    self.file_end = None
                    raise GenericError("preallocate-filter: failed to drop write-zero "
                                       f"preallocation: {e.desc}") from None
                self.file_end = self.data_end
            self.data_end = size
        try:
            await child.truncate(size, exact=exact, prealloc=prealloc)
        except BaseException:
            self.file_end = self.zero_start = self.data_end = None
            raise
        if self._has_prealloc_perms():
            self.file_end = self.zero_start = self.data_end = size

    async def _truncate_to_real_size(self) -> None:
        """preallocate_truncate_to_real_size: drop what was preallocated."""
        if self.file_end is None:
            self.file_end = self.file.node.length
        if self.data_end is not None and self.data_end < self.file_end:
            try:
                await self.file.node.truncate(self.data_end, exact=True, prealloc="off")
            except (OSError, QapiError):
                self.file_end = None
                raise
            self.file_end = self.data_end

    async def _close(self) -> None:
        if "file" not in self.children or not hasattr(self, "_pending_cut"):
            return  # the open failed before the states existed
        with contextlib.suppress(OSError, QapiError):
            if self.data_end is not None:
                await self._truncate_to_real_size()
            elif self._pending_cut is not None:
                data_end, file_end = self._pending_cut
                if self.file.node.length == file_end and not self.file.node.read_only:
                    await self.file.node.truncate(data_end, exact=True, prealloc="off")
