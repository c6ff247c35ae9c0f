"""The ``blkdebug`` filter: inject I/O errors by rule (QEMU's blkdebug).

Rules come from ``inject-error`` (event, state, iotype, errno, sector, once,
immediately) and ``set-state`` (event, state, new_state).  When an event fires
on this node (``debug_event``, called by the generic write path and by format
drivers above, e.g. raw's "read_aio"), matching inject-error rules become
active and matching set-state rules move the state machine.  Every request
then checks the active rules: the first that matches its type and sector
fails it with the rule's errno (``once`` rules are removed when they fire).
``config`` files are not read; ``align`` sets the request alignment.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import Any

import trio

from ..qapi import qemuopts
from ..qapi.errors import GenericError
from .filter import FileFilter
from .graph import register_driver
from .node import BlockStatus, Buffer

IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")


class _Rule:
    def __init__(self, opts: dict[str, Any]):
        self.event = opts["event"]
        self.state = opts.get("state", 0)  # 0 = any state
        iot = opts.get("iotype")
        self.iotypes = set(IOTYPES) if iot is None else {iot}
        self.errno = opts.get("errno", errno_mod.EIO)
        self.sector = opts.get("sector", -1)
        self.once = opts.get("once", False)
        self.immediately = opts.get("immediately", False)


@register_driver
class BlkdebugNode(FileFilter):
    driver = "blkdebug"

    async def open(self, options: dict[str, Any]) -> None:
        qemuopts.absorb_sizes(self.driver, options)
        if options.get("config"):
            raise GenericError("blkdebug config files are not supported by qsd-trio")
        self.state = 1
        self.rules = [_Rule(r) for r in options.get("inject-error", [])]
        self.transitions = options.get("set-state", [])
        self.active: list[_Rule] = []
        self.file = await self.open_child(options, "image")
        align = options.get("align")
        if align is not None and (align <= 0 or align & (align - 1)):
            raise GenericError("Cannot meet constraints with align %d" % align)
        self.request_alignment = max(align or 1, self.file.node.request_alignment)

    @property
    def filename(self) -> str:
        return f"blkdebug::{self.file.node.filename}"

    def actual_size(self) -> int | None:
        return None  # QEMU reports none for blkdebug

    def debug_event(self, event: str) -> None:
        new_state = self.state
        armed = False
        for r in list(self.rules):
            if r.event == event and r.state in (0, self.state):
                if not armed:
                    # an event with rules replaces the active set, as QEMU's
                    # process_rule re-initialises active_rules
                    self.active.clear()
                    armed = True
                if r not in self.active:
                    self.active.insert(0, r)
        for t in self.transitions:
            if t["event"] == event and t.get("state", 0) in (0, self.state):
                new_state = t["new_state"]
        self.state = new_state

    async def _rule_check(self, offset: int, length: int, iotype: str) -> None:
        for r in self.active:
            if iotype not in r.iotypes:
                continue
            if r.sector >= 0:
                # the request must contain the rule's first byte (QEMU's
                # rule_check); a flush (no bytes) matches no sector rule
                lo = r.sector * 512
                if not (length and offset <= lo < offset + length):
                    continue
            if r.once:
                self.active.remove(r)
                self.rules.remove(r)
            if not r.immediately:
                await trio.lowlevel.checkpoint()
            raise OSError(r.errno, os.strerror(r.errno))

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        await self._rule_check(offset, length, "read")
        return await self.file.node.read(offset, length)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._rule_check(offset, len(data), "write")
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self._rule_check(offset, length, "write-zeroes")
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self._rule_check(offset, length, "discard")
        await self.file.node.discard(offset, length)

    async def _co_flush(self) -> None:
        await self._rule_check(0, 0, "flush")
        await self.file.node.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        await self._rule_check(offset, length, "block-status")
        st = await self.file.node.block_status(offset, length)
        return BlockStatus(st.flags, st.length, st.depth, st.offset)

