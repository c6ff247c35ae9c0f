"""Write-behind of a job's target (jobs/write_behind.py, FileNode.write_back):
a round every ``step`` bytes, one at a time, over the writable files below
the node; a failed write-back is kept and raised by the next flush, since
the kernel reports a writeback error to a descriptor only once."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from qsd_trio.jobs import write_behind
from qsd_trio.jobs.write_behind import WriteBehind
from qsd_trio.nodes.graph import BlockGraph

from .qcow2_helpers import create

MiB = 1 << 20


async def _qcow2(path, **opts):
    graph = BlockGraph()
    node = await graph.add({"driver": "qcow2", "node-name": "q", **opts,
                            "file": {"driver": "file", "filename": str(path)}})
    return graph, node


async def test_rounds_every_step_one_at_a_time(tmp_path, monkeypatch):
    create(tmp_path / "t.qcow2", 8 * MiB)
    graph, node = await _qcow2(tmp_path / "t.qcow2")
    file = node.file
    calls = []
    release = trio.Event()

    async def write_back():
        calls.append(file)
        await release.wait()

    monkeypatch.setattr(file, "write_back", write_back)
    wb = WriteBehind(node, step=MiB)
    try:
        async with trio.open_nursery() as nursery:
            wb.wrote(MiB - 1, nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == []
            wb.wrote(1, nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [file]  # the qcow2 node itself has no write_back
            wb.wrote(3 * MiB, nursery)  # a round is running: none starts
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [file] and wb.busy
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not wb.busy
            wb.wrote(MiB, nursery)
        assert len(calls) == 2 and wb.rounds == 2
    finally:
        await graph.close_all()


async def test_write_back_keeps_data_and_skips_read_only(tmp_path):
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(MiB))
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    ro = await graph.add({"driver": "file", "node-name": "r", "filename": str(path),
                          "read-only": True})
    try:
        await f.write(4096, b"\x5a" * 8192)
        assert write_behind._files_below(f) == [f]
        await f.write_back()
        await ro.write_back()  # nothing to do, no error
        assert f.stats["flush_operations"] == 0  # not a flush request
        assert path.read_bytes()[4096:4096 + 8192] == b"\x5a" * 8192
    finally:
        await graph.close_all()


async def test_failed_write_back_is_raised_by_the_next_flush(tmp_path, monkeypatch):
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(MiB))
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        await f.write(0, b"\x01" * 4096)
        real = os.fdatasync

        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing)
        await f.write_back()  # kept, not raised
        monkeypatch.setattr(os, "fdatasync", real)
        with pytest.raises(OSError) as ei:
            await f.flush()
        assert ei.value.errno == errno.EIO
        await f.flush()  # reported once, as the kernel does
    finally:
        await graph.close_all()
