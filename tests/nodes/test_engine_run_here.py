"""The threads engine runs a write on trio's thread when its caller would
only wait for it (base.caller_waits: a FUSE export's write with nothing
else in flight), and only when that cannot block: whole pages, not
O_DIRECT, nothing else in the pool.

Checked: such a write has completed (its callback has run, its bytes are
in the file) when submit_write returns; without caller_waits, with an
unaligned range, on an O_DIRECT descriptor, with another request in the
pool and with much of memory dirty it goes to a worker (the callback runs later, from the reaper),
and every write lands.  A vectored write (a guest's scatter-gather list)
runs here without caller_waits and with the pool busy, under the same
limits.
"""

from __future__ import annotations

import os

import pytest

from qsd_trio.nodes import inline_io
from qsd_trio.nodes.engine import Engines, base, buffers
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.qapi.errors import GenericError
from tests.engines import settled

PAGE = 4096


def _buffer(data: bytes) -> memoryview:
    buf = buffers.alloc(len(data))
    buf[:] = data
    return buf


@pytest.fixture(autouse=True)
def little_dirty_memory(monkeypatch):
    """The machine's dirty memory is an input here (as in test_file_inline)."""
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)


def _image(tmp_path):
    """A zeroed 64-page image opened for writing, and a threads engine."""
    path = tmp_path / "img"
    path.write_bytes(bytes(64 * PAGE))
    engines = Engines()
    return path, engines, engines.threads, os.open(path, os.O_RDWR)


async def test_write_runs_here_when_the_caller_waits(tmp_path, monkeypatch):
    path, engines, eng, fd = _image(tmp_path)
    results: list[tuple[str, int]] = []
    model = bytearray(64 * PAGE)

    def submit(name: str, offset: int, data: bytes) -> bool:
        """submit_write under caller_waits; whether it completed in the call."""
        model[offset:offset + len(data)] = data
        base.caller_waits(True)
        try:
            eng.submit_write(fd, _buffer(data), offset,
                             lambda res: results.append((name, res)))
        finally:
            base.caller_waits(False)
        return bool(results) and results[-1][0] == name

    try:
        assert submit("here", 4 * PAGE, os.urandom(16 * PAGE))
        assert results == [("here", 16 * PAGE)]
        assert eng.run_here.done == 1

        # a range that is not whole pages: to a worker
        assert not submit("unaligned", 100, os.urandom(PAGE))
        await settled(eng)

        # with something else in the pool: to a worker as well
        eng.submit_write(fd, _buffer(b"x" * PAGE), 40 * PAGE,
                         lambda res: results.append(("other", res)))
        model[40 * PAGE:41 * PAGE] = b"x" * PAGE
        assert not submit("busy", 20 * PAGE, os.urandom(PAGE))
        await settled(eng)

        # with much of memory dirty (the kernel may throttle the write): a worker
        monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: False)
        assert not submit("dirty", 24 * PAGE, os.urandom(PAGE))
        await settled(eng)
        monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)

        # without caller_waits: the worker, as always
        model[30 * PAGE:31 * PAGE] = data = os.urandom(PAGE)
        eng.submit_write(fd, _buffer(data), 30 * PAGE,
                         lambda res: results.append(("plain", res)))
        assert results[-1][0] != "plain"
        await settled(eng)
    finally:
        os.close(fd)
        await engines.aclose()
    assert eng.run_here.done == 1
    assert sorted(results) == sorted([("here", 16 * PAGE), ("unaligned", PAGE),
                                      ("other", PAGE), ("busy", PAGE), ("dirty", PAGE),
                                      ("plain", PAGE)])
    assert path.read_bytes() == model


async def test_o_direct_write_goes_to_a_worker(tmp_path):
    """The file driver tells the engine which descriptors are O_DIRECT
    (RunHere.direct_fd), on open, on reopen and on close."""
    path = tmp_path / "img"
    path.write_bytes(bytes(16 * PAGE))
    graph = BlockGraph()
    try:
        node = await graph.add({"driver": "file", "node-name": "f", "filename": str(path),
                                "read-only": True, "cache": {"direct": True}})
    except GenericError:
        pytest.fail("the test directory's file system has no O_DIRECT")
    eng = graph.io.threads
    results: list[int] = []
    data = os.urandom(4 * PAGE)
    try:
        await node.reopen_rw()  # a new descriptor, O_DIRECT as well
        base.caller_waits(True)
        try:
            eng.submit_write(node.fd, _buffer(data), 8 * PAGE, results.append)
        finally:
            base.caller_waits(False)
        assert results == []  # an O_DIRECT write waits for the device: not here
        await settled(eng)
    finally:
        fd = node.fd
        await graph.close_all()
    assert results == [4 * PAGE]
    assert eng.run_here.done == 0
    assert path.read_bytes()[8 * PAGE:12 * PAGE] == data
    assert fd not in eng.run_here._direct  # closed: a later file may get its number


async def test_vectored_write_runs_here_even_with_the_pool_busy(tmp_path, monkeypatch):
    """A guest's scatter-gather write (submit_writev) runs on trio's thread
    whenever it cannot block, whatever else is in flight: done when the
    call returns; not whole pages, much memory dirty or within the cool-down
    after a stall: a worker."""
    path, engines, eng, fd = _image(tmp_path)
    results: list[tuple[str, int]] = []
    model = bytearray(64 * PAGE)

    def submit(name: str, offset: int, pieces: list[bytes]) -> bool:
        """submit_writev of ``pieces``; whether it completed in the call."""
        data = b"".join(pieces)
        model[offset:offset + len(data)] = data
        eng.submit_writev(fd, [_buffer(p) for p in pieces], offset,
                          lambda res: results.append((name, res)))
        return bool(results) and results[-1][0] == name

    try:
        # something else in the pool does not keep it off trio's thread
        eng.submit_write(fd, _buffer(b"x" * PAGE), 40 * PAGE,
                         lambda res: results.append(("other", res)))
        model[40 * PAGE:41 * PAGE] = b"x" * PAGE
        assert submit("here", 4 * PAGE, [os.urandom(PAGE), os.urandom(2 * PAGE), os.urandom(PAGE)])
        assert eng.run_here.done == 1
        await settled(eng)

        assert not submit("unaligned", 8 * PAGE, [os.urandom(100), os.urandom(PAGE)])
        await settled(eng)

        monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: False)
        assert not submit("dirty", 12 * PAGE, [os.urandom(PAGE)] * 2)
        await settled(eng)
        monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)

        eng.run_here.resume_at = float("inf")  # as after a write that stalled
        assert not submit("cooling", 16 * PAGE, [os.urandom(PAGE)] * 2)
        await settled(eng)
    finally:
        os.close(fd)
        await engines.aclose()
    assert eng.run_here.done == 1
    assert sorted(results) == sorted([("other", PAGE), ("here", 4 * PAGE),
                                      ("unaligned", 100 + PAGE), ("dirty", 2 * PAGE),
                                      ("cooling", 2 * PAGE)])
    assert path.read_bytes() == model
