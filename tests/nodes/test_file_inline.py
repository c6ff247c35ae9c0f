"""File writes: whole-page buffered writes run inline, the rest on threads;
an inline write that stalls sends the node's writes to threads for a while.
Either way the bytes on disk are what was written."""

import time

import pytest
import trio

from qsd_trio.nodes import inline_io
from qsd_trio.nodes.graph import BlockGraph
from tests.helpers import other_task_turns

PAGE = inline_io.PAGE


@pytest.fixture
async def node(tmp_path):
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(1 << 20))
    graph = BlockGraph()
    n = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    yield n
    await graph.close_all()


def on_disk(node) -> bytes:
    with open(node.path, "rb") as f:
        return f.read()


async def test_page_aligned_writes_inline_others_on_threads(node, monkeypatch):
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    model = bytearray(1 << 20)
    writes = [(0, b"\x01" * PAGE), (PAGE * 3, b"\x02" * (2 * PAGE)),  # whole pages
              (100, b"\x03" * 50), (PAGE - 10, b"\x04" * 20),          # partial pages
              (8 * PAGE, b"\x05" * (inline_io.INLINE_MAX + PAGE))]     # too large
    for off, data in writes:
        await node.write(off, data)
        model[off:off + len(data)] = data
    assert node._inline.inline == 2
    await node.flush()
    assert on_disk(node) == bytes(model)


async def test_stalled_inline_write_falls_back_to_threads(node, monkeypatch):
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    monkeypatch.setattr(inline_io, "STALL_NS", -1)  # every inline write is slow ...
    slept = iter(range(1000))
    monkeypatch.setattr(inline_io, "voluntary_switches", lambda: next(slept))  # ... and slept
    for i in range(5):
        await node.write(i * PAGE, bytes([i + 1]) * PAGE)
    assert (node._inline.inline, node._inline.stalls) == (1, 1)
    await node.flush()
    data = on_disk(node)
    assert all(data[i * PAGE:(i + 1) * PAGE] == bytes([i + 1]) * PAGE for i in range(5))


async def test_no_inline_writes_near_dirty_throttling(node, monkeypatch):
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: False)
    await node.write(0, b"\x07" * PAGE)
    assert node._inline.inline == 0
    assert on_disk(node)[:PAGE] == b"\x07" * PAGE


async def test_slow_but_preempted_inline_write_is_no_stall(node, monkeypatch):
    # slow because the CPU was busy elsewhere (no sleep in the kernel):
    # a thread would not have helped, so writes stay inline
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    monkeypatch.setattr(inline_io, "STALL_NS", -1)
    monkeypatch.setattr(inline_io, "voluntary_switches", lambda: 7)
    for i in range(5):
        await node.write(i * PAGE, bytes([i + 1]) * PAGE)
    assert (node._inline.inline, node._inline.stalls) == (5, 0)
    await node.flush()
    data = on_disk(node)
    assert all(data[i * PAGE:(i + 1) * PAGE] == bytes([i + 1]) * PAGE for i in range(5))


def test_voluntary_switches_counts_sleeps():
    before = inline_io.voluntary_switches()
    time.sleep(0.01)
    assert inline_io.voluntary_switches() > before


async def test_a_loop_of_inline_writes_lets_other_tasks_run(node, monkeypatch):
    # inline writes skip most checkpoints, but never more than YIELD_EVERY in a row
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    async with other_task_turns() as turns:
        before = turns.n
        for i in range(4 * inline_io.YIELD_EVERY):
            await node.write((i % 64) * PAGE, bytes([i % 251 + 1]) * PAGE)
        assert turns.n - before >= 3
        assert node._inline.inline == 4 * inline_io.YIELD_EVERY


async def test_a_loop_of_cached_reads_lets_other_tasks_run(node):
    await node.write(0, b"\x09" * PAGE)
    async with other_task_turns() as turns:
        before = turns.n
        for _ in range(4 * inline_io.YIELD_EVERY):
            assert await node.read(0, PAGE) == b"\x09" * PAGE
        assert turns.n - before >= 3


async def test_stall_on_an_unwatched_write_is_caught_on_the_next(node, monkeypatch):
    # only every WATCH_EVERY-th write pays for getrusage; a slow one in
    # between makes the next one watched
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    await node.write(0, b"\x01" * PAGE)  # watched, fast
    monkeypatch.setattr(inline_io, "STALL_NS", -1)  # from now on every write is slow ...
    slept = iter(range(1000))
    monkeypatch.setattr(inline_io, "voluntary_switches", lambda: next(slept))  # ... and slept
    for i in range(1, 5):
        await node.write(i * PAGE, bytes([i + 1]) * PAGE)
    # write 2 was slow but not watched, write 3 was watched and stalled: to threads
    assert (node._inline.inline, node._inline.stalls) == (3, 1)
    await node.flush()
    data = on_disk(node)
    assert all(data[i * PAGE:(i + 1) * PAGE] == bytes([i + 1]) * PAGE for i in range(5))


async def _read_in_task(node, offset, length, *, bulk):
    """node.read() in a task of its own, as a block job's (``bulk``) or an
    exporter's request; the data, and whether another task ran meanwhile."""
    from qsd_trio.nodes.node import bulk_requests
    got = []

    async def reader(turns):
        bulk_requests.set(bulk)  # this task's context only
        before = turns.n
        data = bytes(await node.read(offset, length))
        got.append((data, turns.n != before))

    async with other_task_turns() as turns, trio.open_nursery() as nursery:
        nursery.start_soon(reader, turns)
    return got[0]


async def test_a_jobs_large_cached_read_goes_to_the_engine(tmp_path):
    """Page-cache data is read on the event loop for an exporter; for a
    block job (node.bulk_requests) a read larger than INLINE_MAX goes to
    the engine's workers, and the loop goes on meanwhile.  Small reads
    stay inline either way.  The bytes are the file's."""
    import os
    data = os.urandom(2 << 20)
    path = tmp_path / "f.raw"
    path.write_bytes(data)
    graph = BlockGraph()
    node = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        big = inline_io.INLINE_MAX * 4
        for bulk, length, waited in ((False, big, False), (True, big, True),
                                     (True, PAGE, False), (False, PAGE, False)):
            node._inline._since_yield = 0  # no checkpoint every YIELD_EVERY-th read
            got, ran = await _read_in_task(node, PAGE, length, bulk=bulk)
            assert got == data[PAGE:PAGE + length]
            assert ran == waited, (bulk, length)
    finally:
        await graph.close_all()
