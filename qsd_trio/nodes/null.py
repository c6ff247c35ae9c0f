"""null-co / null-aio: a node of a given size that discards writes."""

from __future__ import annotations

import errno
from typing import Any

import trio

from ..qapi import qemuopts
from ..qapi.errors import GenericError
from .graph import register_driver
from .node import BlockNode, BlockStatus, Buffer, Status, json_filename


class NullNode(BlockNode):
    driver = "null-co"
    has_info = False  # no bdrv_get_info: QEMU shows no dirty-flag

    async def open(self, options: dict[str, Any]) -> None:
        qemuopts.absorb_sizes(self.driver, options)
        self.size: int = options.get("size", 1 << 30)
        self.read_zeroes = options.get("read-zeroes", False)
        self.latency_ns = options.get("latency-ns", 0)
        if self.latency_ns >= 2**63:
            raise GenericError("latency-ns is invalid")

    def _length(self) -> int:
        return self.size

    @property
    def filename(self) -> str:
        extra = {k: v for k, v in self.options.items()
                 if k not in ("driver", "node-name", "read-only", "auto-read-only",
                              "discard", "detect-zeroes", "cache", "force-share")}
        if not extra:
            return f"{self.driver}://"
        return json_filename({"driver": self.driver, **extra})

    def actual_size(self) -> int | None:
        return 0

    async def _delay(self) -> None:
        if self.latency_ns:
            await trio.sleep(self.latency_ns / 1e9)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        await self._delay()
        # without read-zeroes QEMU leaves the buffer untouched; we return zeroes
        return bytes(length)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._delay()

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        if no_fallback:
            # QEMU's null driver has no zero-write of its own (supported_zero_flags
            # is 0), so BDRV_REQ_NO_FALLBACK is refused before it is called
            raise OSError(errno.ENOTSUP, "Operation not supported")
        await self._delay()

    async def _co_flush(self) -> None:
        await self._delay()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        if self.read_zeroes:
            return BlockStatus(Status.ZERO | Status.OFFSET_VALID, length, offset=offset)
        return BlockStatus(Status.OFFSET_VALID, length, offset=offset)


@register_driver
class NullCo(NullNode):
    driver = "null-co"


@register_driver
class NullAio(NullNode):
    driver = "null-aio"
