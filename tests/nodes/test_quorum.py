"""The quorum driver in process: the conformance suite (every child must
end up holding the model), then the vote as QEMU 7.2 takes it, with the
events it raises: a corrupted child outvoted and reported (and repaired with
rewrite-corrupted), no majority (EIO and QUORUM_FAILURE), a tie (the
version seen last wins), failing children (blkdebug), fifo failover, writes
and flushes that succeed when enough children do, block status.

Corruption is data written straight into one child's file; failures are
blkdebug rules on the child.  Events are read from the bus; where one node
is reported twice, the rate limit holds the second back for a second, which
trio's autojump clock lets pass at once.
"""

from __future__ import annotations

import contextlib
import errno

import pytest
import trio

from qsd_trio import events
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status

from .conformance import check_block_node

MiB = 1 << 20


def _files(tmp_path, n, size, fill=b"\0"):
    paths = []
    for i in range(n):
        p = tmp_path / f"c{i}.raw"
        p.write_bytes(fill * size)
        paths.append(p)
    return paths


def _poke(path, offset, data, *, size=None):
    """Write ``data`` straight into a child's file (a disk gone bad), first
    setting its size to ``size`` when given."""
    with open(path, "r+b") as f:
        if size is not None:
            f.truncate(size)
        f.seek(offset)
        f.write(data)


def _child(path, rules=None, name=None):
    """A child as the tests give it: a file, under blkdebug when ``rules``."""
    f = {"driver": "file", "filename": str(path)}
    if rules is None:
        return f
    return {"driver": "blkdebug", "node-name": name, "inject-error": rules, "image": f}


@contextlib.contextmanager
def recorded():
    seen: list[tuple[str, dict]] = []
    unsubscribe = events.subscribe(lambda ev: seen.append((ev.name, ev.data)))
    try:
        yield seen
    finally:
        unsubscribe()


async def _quorum(graph, paths, **opts):
    return await graph.add({"driver": "quorum", "node-name": opts.pop("name", "q"),
                            "vote-threshold": opts.pop("threshold", 2),
                            "children": opts.pop("children", None) or
                            [_child(p) for p in paths], **opts})


@pytest.mark.parametrize("pattern", ["quorum", "fifo"])
async def test_conformance(tmp_path, pattern):
    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        paths = _files(tmp_path, 3, size)
        graph = BlockGraph()
        node = await _quorum(graph, paths, **{"read-only": read_only, "discard": "unmap",
                                              "read-pattern": pattern})
        factory.paths = paths
        try:
            yield node
        finally:
            await graph.close_all()

    async def verify(node, model):
        # every write reached every child
        for p in factory.paths:
            assert p.read_bytes() == bytes(model), p

    # quorum cannot resize ("Image format driver does not support resize")
    await check_block_node(factory, can_resize=False, verify=verify)


async def test_resize_is_refused(tmp_path):
    graph = BlockGraph()
    try:
        q = await _quorum(graph, _files(tmp_path, 2, 4096))
        with pytest.raises(Exception, match="Image format driver does not support resize"):
            await q.truncate(8192)
    finally:
        await graph.close_all()


async def test_outvoted_child_is_reported_and_the_majority_read(tmp_path):
    paths = _files(tmp_path, 3, MiB, b"\x11")
    _poke(paths[1], 4096 + 100, b"\x22" * 10)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, children=[
            {"driver": "raw", "node-name": f"k{i}", "file": _child(p)}
            for i, p in enumerate(paths)])
        with recorded() as seen:
            assert bytes(await q.read(4000, 1000)) == b"\x11" * 1000
            # the corruption outside the range read is not noticed
            assert bytes(await q.read(0, 4096)) == b"\x11" * 4096
        assert seen == [("QUORUM_REPORT_BAD", {"type": "read", "node-name": "k1",
                                               "sector-num": 7, "sectors-count": 3})]
        # without rewrite-corrupted the child keeps its bad bytes
        assert paths[1].read_bytes()[4196:4206] == b"\x22" * 10
    finally:
        await graph.close_all()


async def test_rewrite_corrupted_repairs_the_outvoted(tmp_path):
    paths = _files(tmp_path, 3, MiB, b"\x11")
    _poke(paths[2], MiB - 512, b"\x33" * 512)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, **{"rewrite-corrupted": True})
        with recorded() as seen:
            assert bytes(await q.read(MiB - 8192, 8192)) == b"\x11" * 8192
            assert bytes(await q.read(MiB - 8192, 8192)) == b"\x11" * 8192
        # reported once: the second read found the children agreeing
        assert [name for name, _ in seen] == ["QUORUM_REPORT_BAD"]
    finally:
        await graph.close_all()
    assert paths[2].read_bytes() == b"\x11" * MiB


async def test_no_majority_fails_with_eio(tmp_path):
    paths = _files(tmp_path, 3, 65536, b"\x11")
    for i, byte in ((1, b"\x22"), (2, b"\x33")):
        _poke(paths[i], 0, byte * 512)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qx", **{"rewrite-corrupted": True})
        with recorded() as seen:
            with pytest.raises(OSError) as e:
                await q.read(0, 1024)
        assert e.value.errno == errno.EIO
        # no winner: nobody is reported bad, nothing is rewritten
        assert seen == [("QUORUM_FAILURE", {"reference": "qx", "sector-num": 0,
                                            "sectors-count": 2})]
        assert paths[1].read_bytes()[:512] == b"\x22" * 512
    finally:
        await graph.close_all()


async def test_tie_goes_to_the_version_seen_last(tmp_path):
    # threshold 1, two children that differ: QEMU's vote list is newest
    # first, so child 1's version wins and child 0 is reported
    paths = _files(tmp_path, 2, 4096, b"\x11")
    paths[1].write_bytes(b"\x22" * 4096)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, threshold=1, children=[
            {"driver": "raw", "node-name": f"t{i}", "file": _child(p)}
            for i, p in enumerate(paths)])
        with recorded() as seen:
            assert bytes(await q.read(0, 512)) == b"\x22" * 512
        assert seen == [("QUORUM_REPORT_BAD", {"type": "read", "node-name": "t0",
                                               "sector-num": 0, "sectors-count": 1})]
    finally:
        await graph.close_all()


READ_EIO = [{"event": "read_aio", "iotype": "read", "errno": errno.EIO}]
WRITE_ENOSPC = [{"event": "write_aio", "iotype": "write", "errno": errno.ENOSPC}]
WRITE_EIO = [{"event": "write_aio", "iotype": "write", "errno": errno.EIO}]
ZERO_EIO = [{"event": "write_aio", "iotype": "write-zeroes", "errno": errno.EIO}]
FLUSH_EIO = [{"event": "write_aio", "iotype": "flush", "errno": errno.EIO}]


def _raw_over_blkdebug(path, rules, name):
    return {"driver": "raw", "node-name": name, "file": _child(path, rules, name + "-d")}


async def test_failing_children(tmp_path, autojump_clock):
    paths = _files(tmp_path, 3, 65536, b"\x11")
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qf", children=[
            _raw_over_blkdebug(paths[0], READ_EIO + WRITE_ENOSPC, "a"),
            _raw_over_blkdebug(paths[1], WRITE_ENOSPC + FLUSH_EIO, "b"),
            _raw_over_blkdebug(paths[2], FLUSH_EIO, "c")])
        with recorded() as seen:
            # one child fails a read: two still agree
            assert bytes(await q.read(0, 4096)) == b"\x11" * 4096
            # two fail a write: below the threshold, with the error most returned
            with pytest.raises(OSError) as e:
                await q.write(512, b"\x22" * 512)
            assert e.value.errno == errno.ENOSPC
            # two fail a flush (their rule armed by the write): it fails,
            # with no QUORUM_FAILURE (quorum_co_flush raises none)
            with pytest.raises(OSError) as e:
                await q.flush()
            assert e.value.errno == errno.EIO
            await trio.sleep(1.5)  # a's and b's second reports were held back
        bad = sorted(((d["node-name"], d["type"], d.get("error"), d["sector-num"],
                       d["sectors-count"]) for name, d in seen if name == "QUORUM_REPORT_BAD"))
        assert bad == [("a", "read", "Input/output error", 0, 8),
                       ("a", "write", "No space left on device", 1, 1),
                       ("b", "flush", "Input/output error", 0, 0),
                       ("b", "write", "No space left on device", 1, 1),
                       ("c", "flush", "Input/output error", 0, 0)]
        assert [d for name, d in seen if name == "QUORUM_FAILURE"] == [
            {"reference": "qf", "sector-num": 1, "sectors-count": 1}]
        # the write reached the one child that took it
        assert paths[2].read_bytes()[512:1024] == b"\x22" * 512
    finally:
        await graph.close_all()


async def test_writes_succeed_when_enough_children_do(tmp_path, autojump_clock):
    paths = _files(tmp_path, 3, 65536)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qw", children=[
            _raw_over_blkdebug(paths[0], WRITE_EIO + ZERO_EIO, "w0"),
            {"driver": "raw", "file": _child(paths[1])},
            {"driver": "raw", "file": _child(paths[2])}])
        with recorded() as seen:
            await q.write(0, b"\x44" * 4096)
            await q.write_zeroes(4096, 4096)
            await trio.sleep(1.5)  # w0's second report is held back for a second
        assert [(n, d["node-name"], d["type"]) for n, d in seen] == [
            ("QUORUM_REPORT_BAD", "w0", "write"), ("QUORUM_REPORT_BAD", "w0", "write")]
        assert paths[1].read_bytes()[:4096] == paths[2].read_bytes()[:4096] == b"\x44" * 4096
        assert paths[0].read_bytes()[:4096] == bytes(4096)
    finally:
        await graph.close_all()


async def test_ties_between_errors_go_to_the_one_seen_last(tmp_path):
    paths = _files(tmp_path, 2, 65536)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qe", threshold=2, children=[
            _raw_over_blkdebug(paths[0], WRITE_EIO, "e0"),
            _raw_over_blkdebug(paths[1], WRITE_ENOSPC, "e1")])
        with recorded():
            with pytest.raises(OSError) as e:
                await q.write(0, b"x" * 512)
        assert e.value.errno == errno.ENOSPC
    finally:
        await graph.close_all()


async def test_fifo_fails_over_in_order(tmp_path):
    paths = _files(tmp_path, 3, 65536, b"\x11")
    paths[2].write_bytes(b"\x22" * 65536)  # differs: fifo takes no vote
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qo", threshold=1, **{"read-pattern": "fifo"},
                          children=[_raw_over_blkdebug(paths[0], READ_EIO, "f0"),
                                    {"driver": "raw", "node-name": "f1",
                                     "file": _child(paths[1])},
                                    {"driver": "raw", "node-name": "f2",
                                     "file": _child(paths[2])}])
        with recorded() as seen:
            assert bytes(await q.read(0, 512)) == b"\x11" * 512
        assert seen == [("QUORUM_REPORT_BAD", {"type": "read", "node-name": "f0",
                                               "sector-num": 0, "sectors-count": 1,
                                               "error": "Input/output error"})]
    finally:
        await graph.close_all()


async def test_fifo_with_every_child_failing(tmp_path):
    paths = _files(tmp_path, 2, 65536)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, name="qg", threshold=1, **{"read-pattern": "fifo"},
                          children=[_raw_over_blkdebug(p, READ_EIO, f"g{i}")
                                    for i, p in enumerate(paths)])
        with recorded() as seen:
            with pytest.raises(OSError) as e:
                await q.read(0, 512)
        assert e.value.errno == errno.EIO
        # each child reported; no QUORUM_FAILURE in fifo mode
        assert [(n, d["node-name"]) for n, d in seen] == [("QUORUM_REPORT_BAD", "g0"),
                                                          ("QUORUM_REPORT_BAD", "g1")]
    finally:
        await graph.close_all()


async def test_block_status_zero_only_where_every_child_is(tmp_path):
    paths = [tmp_path / "a.raw", tmp_path / "b.raw"]
    for p in paths:
        p.write_bytes(b"")
    _poke(paths[0], MiB, b"x" * 65536, size=4 * MiB)
    _poke(paths[1], MiB, b"x" * 131072, size=4 * MiB)
    graph = BlockGraph()
    try:
        q = await _quorum(graph, paths, threshold=1)
        st = await q.block_status(0, 4 * MiB)
        assert st.flags & Status.ZERO and st.length == MiB
        st = await q.block_status(MiB, 3 * MiB)
        # both have data, for 64 and 128 KiB: data, as far as the longer
        assert not st.flags & Status.ZERO and st.flags & Status.DATA and st.length == 131072
        st = await q.block_status(MiB + 65536, 65536)
        # a hole in one, data in the other: data
        assert st.flags & Status.DATA and st.length == 65536
        st = await q.block_status(MiB + 131072, 3 * MiB - 131072)
        assert st.flags & Status.ZERO and st.length == 3 * MiB - 131072
    finally:
        await graph.close_all()
