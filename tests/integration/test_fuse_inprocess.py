"""FuseExport in-process (pytest-trio): lifecycle corners a subprocess hides.

The export runs in the test's trio loop over a null-co node; file I/O on the
mount runs in worker threads, as any other process would do it.  Never touch
the mount from the loop's own thread: the call would wait for a reply that
only this thread can send (and sit in D state until the connection is
aborted).
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import trio

import qsd_trio.nodes.null  # noqa: F401 - registers null-co
from qsd_trio.daemon import Daemon
from qsd_trio.exports import fuse
from qsd_trio.exports.fuse import FuseExport
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.qapi import schema
from qsd_trio.qapi.errors import GenericError
from tests.integration.fuse_helpers import (  # noqa: F401 - fuse_tmp is a fixture
    fuse_tmp,
    is_mounted,
    make_mountpoint,
)

SIZE = 4 << 20


def export_args(mp: str, export_id: str = "e", **kw):
    """block-export-add's arguments for a FUSE export, built by the schema
    (``node_name=`` is ``node-name``)."""
    args = {"type": "fuse", "id": export_id, "node-name": "n", "writable": True,
            "mountpoint": mp}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    return schema.parse_json("BlockExportOptions", args)


@pytest.fixture
def daemon() -> Daemon:
    """The daemon the exports belong to; their nodes are in its graph."""
    return Daemon()


async def null_node(graph: BlockGraph, name: str = "n", **opts):
    return await graph.add({"driver": "null-co", "node-name": name, "size": SIZE,
                            "read-zeroes": True, **opts})


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_once(mp: str, outcome: dict) -> None:
    """One O_DIRECT read of the mount from a worker thread; ``outcome["r"]``
    is "ok" or the errno it failed with."""
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECT)
    try:
        os.pread(fd, 4096, 0)
        outcome["r"] = "ok"
    except OSError as e:
        outcome["r"] = e.errno
    finally:
        try:
            os.close(fd)  # the flush on close fails too once the connection is gone
        except OSError:
            pass


async def test_mount_through_fusermount3_helper(fuse_tmp, daemon):  # noqa: F811
    """The non-root path: fusermount3 mounts and passes the fd back (_FUSE_COMMFD)."""
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph)
    exp = FuseExport(daemon, export_args(mp), node)
    exp.use_helper = True
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            assert is_mounted(mp)
            data = await trio.to_thread.run_sync(read_all, mp)
            assert data == bytes(SIZE)
            await exp.stop()
    assert not is_mounted(mp)
    assert node.parents == []  # the export's edge is gone


async def test_external_unmount_returns_normally(fuse_tmp, daemon):  # noqa: F811
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph)
    exp = FuseExport(daemon, export_args(mp), node)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            await trio.to_thread.run_sync(
                lambda: subprocess.run(["fusermount3", "-u", mp], check=True))
            await exp.finished.wait()  # run() ended by itself
    assert not exp.cancel_scope.cancel_called
    assert not is_mounted(mp)


async def test_stacked_export_through_a_symlink_does_not_deadlock(fuse_tmp, daemon):  # noqa: F811
    """Exporting on a path that is itself our mount (via another string) stats it in a thread."""
    mp = make_mountpoint(fuse_tmp)
    link = str(fuse_tmp / "link")
    os.symlink(mp, link)
    graph = daemon.graph
    a = FuseExport(daemon, export_args(mp, "a"), await null_node(graph, "n"))
    b = FuseExport(daemon, export_args(link, "b", writable=False),
                   await null_node(graph, "m", size=SIZE // 2))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            # b covers a (file calls in threads: this loop serves them)
            assert await trio.to_thread.run_sync(os.path.getsize, mp) == SIZE // 2
            await b.stop()
            assert await trio.to_thread.run_sync(os.path.getsize, mp) == SIZE
            await a.stop()
    assert not is_mounted(mp)


async def test_same_mountpoint_string_twice_is_refused(fuse_tmp, daemon):  # noqa: F811
    mp = make_mountpoint(fuse_tmp)
    graph = daemon.graph
    node = await null_node(graph)
    a = FuseExport(daemon, export_args(mp, "a"), node)
    b = FuseExport(daemon, export_args(mp, "b"), node)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            with pytest.raises(GenericError, match=f"There already is a FUSE export on '{mp}'"):
                await nursery.start(b.run)
            await a.stop()
    assert node.parents == []


async def test_stop_while_a_client_waits_on_a_slow_node(fuse_tmp, daemon):  # noqa: F811
    """Deletion does not wait for the node: the blocked client gets an error, no hang."""
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph, **{"latency-ns": 60 * 10**9})
    exp = FuseExport(daemon, export_args(mp), node)
    outcome = {}

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            nursery.start_soon(trio.to_thread.run_sync, read_once, mp, outcome)
            await trio.sleep(0.5)  # let the read reach the node's latency sleep
            await exp.stop()
    assert outcome["r"] in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    assert not is_mounted(mp)


async def test_mountpoint_checks(fuse_tmp, daemon):  # noqa: F811
    (fuse_tmp / "dir").mkdir()
    node = await null_node(daemon.graph)
    for mp, text in [(str(fuse_tmp / "missing"),
                      f"Failed to stat '{fuse_tmp / 'missing'}': No such file or directory"),
                     (str(fuse_tmp / "dir"), f"'{fuse_tmp / 'dir'}' is not a regular file")]:
        exp = FuseExport(daemon, export_args(mp), node)
        async with trio.open_nursery() as nursery:
            with pytest.raises(GenericError) as info:
                await nursery.start(exp.run)
        assert info.value.desc == text
        assert exp.finished.is_set()
    assert node.parents == []


async def test_a_driver_bug_fails_the_request_not_the_export(fuse_tmp, daemon):  # noqa: F811
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph)
    calls = []

    async def broken_preadv(offset, length):
        calls.append(offset)
        raise RuntimeError("driver bug")

    node._co_preadv = broken_preadv
    exp = FuseExport(daemon, export_args(mp), node)

    def client():
        fd = os.open(mp, os.O_RDWR | os.O_DIRECT)
        try:
            try:
                os.pread(fd, 4096, 0)
            except OSError as e:
                read_errno = e.errno
            else:
                read_errno = 0
            return read_errno, os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            read_errno, written = await trio.to_thread.run_sync(client)
            assert (read_errno, written) == (errno.EIO, 4096)  # still serving
            await exp.stop()
    assert calls


async def test_stop_when_a_completion_never_comes(fuse_tmp, daemon, monkeypatch):  # noqa: F811
    """A READ started on the engine whose completion a driver loses (a
    bug) holds the export's deletion for ANSWER_GRACE, not for ever: the
    mount goes, its client gets an error, and the reply that comes after
    all is dropped (the descriptor is closed)."""
    monkeypatch.setattr(fuse, "ANSWER_GRACE", 0.5)
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph)
    lost: list = []
    started = trio.Event()

    def lose(offset, length, done):
        lost.append((length, done))
        started.set()
        return True

    node._preadv_now = lambda offset, length: None  # every READ goes to _preadv_submit
    node._preadv_submit = lose
    exp = FuseExport(daemon, export_args(mp), node)
    outcome = {}

    stopped = trio.Event()

    async def late_completion():
        # delivered once the export has stopped, or after a long while: a
        # deletion that waits for it returns only then (what failed before)
        with trio.move_on_after(30):
            await stopped.wait()
        length, done = lost[0]
        outcome["delivered"] = True
        done(bytes(length), None)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            nursery.start_soon(trio.to_thread.run_sync, read_once, mp, outcome)
            await started.wait()
            nursery.start_soon(late_completion)
            await exp.stop()
            assert len(lost) == 1 and not outcome.get("delivered")
            stopped.set()
    assert outcome["r"] in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    assert not is_mounted(mp)


async def test_a_read_failed_on_the_engine_gets_its_errno(fuse_tmp, daemon):  # noqa: F811
    """A READ started with read_submit whose completion carries an error is
    answered with that errno (_read_done's error reply), and the export
    serves the next READ from its completion as usual."""
    mp = make_mountpoint(fuse_tmp)
    node = await null_node(daemon.graph)
    send, receive = trio.open_memory_channel(100)

    def submit(offset, length, done):
        send.send_nowait((offset, length, done))
        return True

    node._preadv_now = lambda offset, length: None  # every READ goes to _preadv_submit
    node._preadv_submit = submit
    exp = FuseExport(daemon, export_args(mp), node)

    async def complete():
        # from a task, as an engine's reaper does: the first read fails,
        # the next ones return their offset's low byte
        first = True
        async for offset, length, done in receive:
            if first:
                done(None, OSError(errno.EIO, "injected"))
                first = False
            else:
                done(bytes([offset & 0xFF or 1]) * length, None)

    def client():
        fd = os.open(mp, os.O_RDONLY | os.O_DIRECT)
        try:
            try:
                os.pread(fd, 4096, 8192)
            except OSError as e:
                got = e.errno
            else:
                got = 0
            return got, os.pread(fd, 4096, 4096 * 3)
        finally:
            os.close(fd)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            nursery.start_soon(complete)
            read_errno, data = await trio.to_thread.run_sync(client)
            await exp.stop()
            nursery.cancel_scope.cancel()
    assert read_errno == errno.EIO
    assert data == bytes([1]) * 4096  # offset 12288: low byte 0
