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


def read_blocks(mp: str, node: SwitchNode, first: int, n: int) -> None:
    """``n`` O_DIRECT reads of one block each, from block ``first`` on."""
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BS)
    try:
        for i in range(first, first + n):
            off = (i * BS) % SIZE
            assert os.preadv(fd, [buf], off) == BS
            assert buf[:] == node.data[off:off + BS], f"block at {off}"
    finally:
        os.close(fd)


async def test_read_now_skipped_after_misses_then_asked_again(fuse_tmp):  # noqa: F811
    daemon = Daemon()
    node = SwitchNode(daemon.graph, "n")
    await node.open({"size": SIZE})
    node.data[:] = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
    daemon.graph.nodes["n"] = node
    mp = make_mountpoint(fuse_tmp)
    exp = FuseExport(daemon, export_args(mp, writable=False), node)
    n = read_now.READ_NOW_MISSES + read_now.READ_NOW_SKIP
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            try:
                await trio.to_thread.run_sync(read_blocks, mp, node, 0, n)
                # asked until the run of misses, then not for the next READ_NOW_SKIP
                assert node.asked == read_now.READ_NOW_MISSES
                assert node.submitted == n
                # the node serves synchronously again: after the skip the
                # export asks, and from then on every READ is served so
                node.fast = True
                await trio.to_thread.run_sync(read_blocks, mp, node, n, n)
                assert node.served_now > 0
                assert node.asked == read_now.READ_NOW_MISSES + node.served_now
                assert node.served_now + (node.submitted - n) == n
                await trio.to_thread.run_sync(read_blocks, mp, node, 2 * n, 64)
                assert node.served_now == node.asked - read_now.READ_NOW_MISSES
                assert node.submitted + node.served_now == 2 * n + 64
            finally:
                await exp.stop()


def write_blocks(mp: str, model: bytearray, first: int, n: int) -> None:
    """``n`` O_DIRECT writes of one block each, from block ``first`` on."""
    fd = os.open(mp, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BS)
    try:
        for i in range(first, first + n):
            off = (i * BS) % SIZE
            buf[:] = bytes([i % 251]) * BS
            model[off:off + BS] = buf
            assert os.pwritev(fd, [buf], off) == BS
    finally:
        os.close(fd)


async def test_write_now_skipped_after_misses_then_asked_again(fuse_tmp):  # noqa: F811
    daemon = Daemon()
    node = SwitchNode(daemon.graph, "n")
    await node.open({"size": SIZE})
    daemon.graph.nodes["n"] = node
    model = bytearray(SIZE)
    mp = make_mountpoint(fuse_tmp)
    exp = FuseExport(daemon, export_args(mp), node)
    n = read_now.READ_NOW_MISSES + read_now.READ_NOW_SKIP
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            try:
                await trio.to_thread.run_sync(write_blocks, mp, model, 0, n)
                assert node.w_asked == read_now.READ_NOW_MISSES
                assert node.w_submitted == n
                node.fast = True
                await trio.to_thread.run_sync(write_blocks, mp, model, n, n)
                assert node.w_now > 0
                assert node.w_asked == read_now.READ_NOW_MISSES + node.w_now
                assert node.w_now + (node.w_submitted - n) == n
            finally:
                await exp.stop()
    assert node.data == model
