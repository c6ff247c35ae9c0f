"""The ``blkverify`` filter (BlockdevOptionsBlkverify, QEMU 7.2's
block/blkverify.c): every read and write goes to both children, ``test``
(the image under test) and ``raw`` (a raw reference image), and the two
must agree.

Reads compare the data; a difference, or one child failing where the other
does not, is what QEMU treats as fatal: it prints
``blkverify: read offset=O bytes=N contents mismatch at offset X`` (or
``... return value mismatch A != B``) on stderr and exits the process with
status 1, running only its exit handlers (the pidfile goes).  qsd-trio does
the same: the message, the ``atexit`` handlers, ``os._exit(1)``; nothing is
flushed or closed, as in QEMU.

The node's length is the test image's; zero writes are written as zeroes to
both (blkverify has no zero write of its own); flush reaches the test image
only; discard does nothing (QEMU's default for a driver without one); block
status and truncation go to ``raw``, the filtered child.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, NoReturn

import trio

from .graph import register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, Perm, json_filename
from .perms import filter_perms, storage_perms


def _ret(e: OSError | None) -> int:
    return 0 if e is None else -(e.errno or 5)


@register_driver
class BlkverifyNode(BlockNode):
    driver = "blkverify"
    is_filter = True
    shows_filtered_child = True

    async def open(self, options: dict[str, Any]) -> None:
        # QEMU opens raw (the filtered, primary child) first, then test
        self.raw = await self.open_child(options, "raw")
        self.test = await self.open_child(options, "test")

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # bdrv_default_perms: raw is the filtered child, test a data child
        if edge.name == "test":
            return storage_perms(perm, shared, writable=not self.read_only, metadata=False)
        return filter_perms(perm, shared)

    def primary_child(self) -> BdrvChild | None:
        return self.children.get("raw")

    @property
    def filename(self) -> str:
        raw, test = self.raw.node.filename, self.test.node.filename
        if raw and test and not raw.startswith("json:") and not test.startswith("json:"):
            return f"blkverify:{raw}:{test}"
        return json_filename({"driver": "blkverify",
                              "raw": self.raw.node.full_open_options(),
                              "test": self.test.node.full_open_options()})

    def full_open_options(self) -> dict[str, Any]:
        return {"driver": "blkverify", "raw": self.raw.node.full_open_options(),
                "test": self.test.node.full_open_options()}

    def actual_size(self) -> int | None:
        return None  # QEMU reports none for blkverify

    def _length(self) -> int:
        return self.test.node.length

    def _fail(self, op: str, offset: int, length: int, what: str) -> NoReturn:
        """blkverify_err: the message, the exit handlers, exit status 1."""
        sys.stderr.write(f"blkverify: {op} offset={offset} bytes={length} {what}\n")
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(1)

    async def _both(self, op: str, offset: int, length: int,
                    test_io: Any, raw_io: Any) -> tuple[Any, Any]:
        """Run the request on both children at once (QEMU's blkverify_co_prwv);
        their results, or the test child's error when both fail alike."""
        res: dict[str, Any] = {}
        err: dict[str, OSError | None] = {"test": None, "raw": None}

        async def run(name: str, fn: Any) -> None:
            try:
                res[name] = await fn()
            except OSError as e:
                err[name] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "test", test_io)
            nursery.start_soon(run, "raw", raw_io)
        rt, rr = _ret(err["test"]), _ret(err["raw"])
        if rt != rr:
            self._fail(op, offset, length, f"return value mismatch {rt} != {rr}")
        if err["test"] is not None:
            raise err["test"]
        return res.get("test"), res.get("raw")

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        test, raw = await self._both(
            "read", offset, length,
            lambda: self.test.node.read(offset, length),
            lambda: self.raw.node.read(offset, length))
        a, b = memoryview(test).cast("B"), memoryview(raw).cast("B")
        if a != b:
            at = next(i for i in range(length) if a[i] != b[i])
            self._fail("read", offset, length, f"contents mismatch at offset {offset + at}")
        return a

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._both("write", offset, len(data),
                         lambda: self.test.node.write(offset, data, fua=fua),
                         lambda: self.raw.node.write(offset, data, fua=fua))

    async def _co_flush(self) -> None:
        # only the test image matters (blkverify_co_flush)
        await self.test.node.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        return await self.raw.node.block_status(offset, length)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        # no truncate of its own: bdrv_co_truncate passes a filter's to bs->file
        await self.raw.node.truncate(size, exact=exact, prealloc=prealloc)
