"""The FUSE export stops asking BlockNode.read_now after a run of READs it
could not serve (an image opened with O_DIRECT never can) and starts them
with read_submit directly, then asks again (exports/read_now.py), as the
NBD reader does; the same for WRITEs and write_now/write_submit: in-process, over the memory node of the NBD test whose
synchronous path can be switched off and on and which counts how often it
is asked.  The client reads the mount with O_DIRECT from a worker thread,
so every read reaches the export, and every read is checked against the
node's data, however it was served.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import trio

from qsd_trio.daemon import Daemon
from qsd_trio.exports import read_now
from qsd_trio.exports.fuse import FuseExport
from tests.integration.fuse_helpers import (  # noqa: F401 - fuse_tmp is a fixture
    fuse_tmp,
    make_mountpoint,
)
from tests.integration.test_engine_nbd_read_now import SwitchNode
from tests.integration.test_fuse_inprocess import export_args

SIZE = 8 << 20
BS = 4096


def each_block(mp: str, flags: int, first: int, n: int,
               io: Callable[[int, mmap.mmap, int, int], None]) -> None:
    """``io(fd, buf, i, offset)`` for ``n`` blocks from block ``first`` on,
    on the mount opened O_DIRECT with ``flags``, ``buf`` one aligned block."""
    fd = os.open(mp, flags | os.O_DIRECT)
    buf = mmap.mmap(-1, BS)
    try:
        for i in range(first, first + n):
            io(fd, buf, i, (i * BS) % SIZE)
    finally:
        os.close(fd)


def read_blocks(mp: str, node: SwitchNode, first: int, n: int) -> None:
    """``n`` O_DIRECT reads of one block each, each checked against the node."""
    def read(fd: int, buf: mmap.mmap, _i: int, off: int) -> None:
        assert os.preadv(fd, [buf], off) == BS
        assert buf[:] == node.data[off:off + BS], f"block at {off}"

    each_block(mp, os.O_RDONLY, first, n, read)


N = read_now.READ_NOW_MISSES + read_now.READ_NOW_SKIP


async def exercise(where, check, *, writable: bool) -> SwitchNode:
    """Export a fresh SwitchNode (its data a pattern) at a mountpoint under
    ``where`` while ``await check(node, mp)`` runs; returns the node."""
    daemon = Daemon()
    node = SwitchNode(daemon.graph, "n")
    await node.open({"size": SIZE})
    node.data[:] = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
    daemon.graph.nodes["n"] = node
    mp = make_mountpoint(where)
    exp = FuseExport(daemon, export_args(mp, writable=writable), node)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            try:
                await check(node, mp)
            finally:
                await exp.stop()
    return node


async def skipped_then_asked(node: SwitchNode, run: Callable[[int, int], None],
                             counts: Callable[[], tuple[int, int, int]]) -> None:
    """The guess of one kind of request: ``run(first, n)`` sends ``n``
    requests from a worker thread; ``counts()`` is the node's (asked,
    submitted, served without the engine) for that kind.  Asked until the
    run of misses, then not for the next READ_NOW_SKIP; once the node
    serves synchronously again the export asks after the skip, and from
    then on every request is served so."""
    await trio.to_thread.run_sync(run, 0, N)
    asked, submitted, _now = counts()
    assert asked == read_now.READ_NOW_MISSES
    assert submitted == N
    node.fast = True
    await trio.to_thread.run_sync(run, N, N)
    asked, submitted, now = counts()
    assert now > 0
    assert asked == read_now.READ_NOW_MISSES + now
    assert now + (submitted - N) == N


async def test_read_now_skipped_after_misses_then_asked_again(fuse_tmp):  # noqa: F811
    async def check(node: SwitchNode, mp: str) -> None:
        await skipped_then_asked(
            node, lambda first, n: read_blocks(mp, node, first, n),
            lambda: (node.asked, node.submitted, node.served_now))
        await trio.to_thread.run_sync(read_blocks, mp, node, 2 * N, 64)
        assert node.served_now == node.asked - read_now.READ_NOW_MISSES
        assert node.submitted + node.served_now == 2 * N + 64

    await exercise(fuse_tmp, check, writable=False)


def write_blocks(mp: str, model: bytearray, first: int, n: int) -> None:
    """``n`` O_DIRECT writes of one block each, each also made to ``model``."""
    def write(fd: int, buf: mmap.mmap, i: int, off: int) -> None:
        buf[:] = bytes([i % 251]) * BS
        model[off:off + BS] = buf
        assert os.pwritev(fd, [buf], off) == BS

    each_block(mp, os.O_RDWR, first, n, write)


async def test_write_now_skipped_after_misses_then_asked_again(fuse_tmp):  # noqa: F811
    model = bytearray(bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251))

    async def check(node: SwitchNode, mp: str) -> None:
        await skipped_then_asked(
            node, lambda first, n: write_blocks(mp, model, first, n),
            lambda: (node.w_asked, node.w_submitted, node.w_now))

    node = await exercise(fuse_tmp, check, writable=True)
    assert node.data == model
