"""The write paths leave the same side effects (issue 13, item 3), and the
read paths count what read() counts.

An exporter writes through ``write()`` (a task per request), ``write_now()``
(served synchronously, from the page cache), ``write_submit()`` (handed
to the I/O engine, answered from its completion) or ``writev()`` (a
virtio-blk request's segments of guest memory, not gathered).  Whichever it takes,
what the graph records must be what ``write()`` records: the statistics of
the node and of its file child, the highest offset written, the dirty
bitmaps (enabled ones only), the BLOCK_WRITE_THRESHOLD event, and the bytes.

Each case runs the same writes once per path, as an exporter drives them
(a declined fast path falls back to ``write()``), and compares every
result with an independent model, so a path that skips a piece of the
bookkeeping, or does it twice, fails here.
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import trio

from qsd_trio import events
from qsd_trio.nodes import inline_io
from qsd_trio.nodes.engine import buffers
from qsd_trio.nodes.graph import BlockGraph

from ..helpers import mounted
from .qcow2_helpers import check_clean, create, qemu_io

MiB = 1 << 20
SIZE = 4 * MiB
GRAN = 65536
THRESHOLD = 3 * MiB + 100
# page-aligned writes that every path can take: inside the first 2 MiB (the
# qcow2 clusters the test allocates first), then one that crosses the threshold
WRITES = [(0, 4096, 0x11), (65536 + 8192, 8192, 0x22), (MiB, 65536, 0x33),
          (MiB + 4096, 4096, 0x44), (3 * MiB, 8192, 0x55)]


@pytest.fixture(autouse=True)
def far_from_dirty_throttling(monkeypatch):
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)


def _payload(n: int, byte: int) -> memoryview:
    # a pooled buffer, as the NBD export receives a payload into
    mv = buffers.alloc(n)
    mv[:] = bytes([byte]) * n
    return mv


async def _write(node, path: str, offset: int, mv: memoryview) -> tuple[str, int]:
    """Write as an exporter does: the path that took the request, and the
    errno it failed with (0: it did not)."""
    if path == "write_now" and node.write_now(offset, mv):
        return path, 0
    if path == "writev":
        # a virtio-blk request's segments: pages, or halves of a page
        step = 4096 if len(mv) > 4096 else len(mv) // 2
        views = [mv[i:i + step] for i in range(0, len(mv), step)]
        try:
            await node.writev(offset, views)
        except OSError as e:
            return path, e.errno
        return path, 0
    if path == "write_submit":
        done = trio.Event()
        result = []

        def finished(res, err) -> None:  # called by the engine's reaper task
            result.append(err)
            done.set()

        if node.write_submit(offset, mv, finished):
            await done.wait()
            return path, result[0].errno if result[0] else 0
    try:
        await node.write(offset, mv)
    except OSError as e:
        return "write", e.errno
    return "write", 0


CASES = {
    "file-cached": ("raw", {"aio": "threads"}),
    "file-io_uring-direct": ("raw", {"aio": "io_uring", "cache": {"direct": True}}),
    "qcow2-cached": ("qcow2", {"aio": "threads"}),
    "qcow2-io_uring-direct": ("qcow2", {"aio": "io_uring", "cache": {"direct": True}}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_write_path_leaves_what_write_leaves(tmp_path, case):
    fmt, file_opts = CASES[case]
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    results = {}
    try:
        for path in ("write", "write_now", "write_submit", "writev"):
            results[path] = await _run(tmp_path / path, fmt, file_opts, path, seen)
    finally:
        unsubscribe()

    model = _model(fmt)
    for path, got in results.items():
        taken = [p for p, err in got.pop("taken")]
        if path != "write":
            # the path under test served the writes it can: on O_DIRECT the
            # fast path declines them all (nothing is cached), and write_submit
            # takes every aligned one
            expect = {"write_now": 0 if "direct" in case else len(WRITES),
                      "write_submit": len(WRITES), "writev": len(WRITES)}[path]
            assert taken.count(path) == expect, (path, taken)
        assert got == model, (path, got, model)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
async def test_failed_writes_leave_the_same_on_every_path(tmp_path):
    """ENOSPC from a full tmpfs: a write that fails still counts as failed,
    marks the bitmaps and moves the highest offset (QEMU's
    bdrv_co_write_req_finish does so whatever the result), on every path."""
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    results = {}
    try:
        for path in ("write", "write_now", "write_submit", "writev"):
            with mounted(tmp_path / path, "-t", "tmpfs", "-o", "size=64k", "tmpfs") as mnt:
                results[path] = await _run(mnt / "img", "raw", {"aio": "threads"}, path, seen)
    finally:
        unsubscribe()
    errors = [err for _, err in results["write"]["taken"]]
    # 64 KiB hold the first two writes and part of the third; the fourth
    # lands in pages the third allocated; the fifth finds no space
    assert errors == [0, 0, errno.ENOSPC, 0, errno.ENOSPC]
    assert results["write"]["stats"]["node.failed_wr_operations"] == 2
    for path, got in results.items():
        assert [err for _, err in got["taken"]] == errors, path
        if path in ("write_submit", "writev"):
            assert all(p == path for p, _ in got["taken"]), got["taken"]
        got.pop("taken")
    assert results["write_now"] == results["write"]
    assert results["write_submit"] == results["write"]
    assert results["writev"] == results["write"]


async def _run(img, fmt: str, file_opts: dict, path: str, seen: list) -> dict:
    if fmt == "qcow2":
        create(img, SIZE)
        # allocate the clusters written below, so that the writes are in
        # place: the case write_now and write_submit take for qcow2
        qemu_io(img, "write -P 0 0 2M", "write -P 0 3M 1M")
    else:
        await trio.Path(img).write_bytes(b"")
        os.truncate(img, SIZE)
    file_node = {"driver": "file", "filename": str(img), **file_opts}
    opts = ({"driver": "qcow2", "node-name": "n", "file": file_node} if fmt == "qcow2"
            else {**file_node, "node-name": "n"})
    graph = BlockGraph()
    node = await graph.add(opts)
    try:
        child = node.data if fmt == "qcow2" else None
        if child is not None:
            # the first access loads the L2 table and the overlap index, the
            # same for every path; its statistics are left out below
            await node.read(0, 4096)
            await node.write(2 * MiB, _payload(4096, 0))
        node.add_bitmap("on", GRAN)
        node.add_bitmap("off", GRAN, enabled=False)
        node.write_threshold = THRESHOLD
        base = _counters(node, child)
        seen.clear()
        taken = [await _write(node, path, off, _payload(n, byte)) for off, n, byte in WRITES]
        after = _counters(node, child)
        result = {
            "taken": taken,
            "stats": {k: after[k] - base[k] for k in after},
            "highest": node.wr_highest_offset,
            "bitmaps": {name: [(o, n) for o, n, d in bm.dirty_extents() if d]
                        for name, bm in sorted(node.bitmaps.items())},
            "threshold": node.write_threshold,
            "events": [(e.name, e.data) for e in seen if e.name == "BLOCK_WRITE_THRESHOLD"],
        }
        result["data"] = hashlib.sha256(await node.read(0, SIZE)).hexdigest()
    finally:
        await graph.close_all()
    if fmt == "qcow2":
        check_clean(img)
    return result


def _counters(node, child) -> dict:
    keys = ("rd_operations", "rd_bytes", "wr_operations", "wr_bytes",
            "failed_wr_operations", "failed_rd_operations")
    got = {f"node.{k}": node.stats[k] for k in keys}
    if child is not None:
        got.update({f"child.{k}": child.stats[k] for k in keys})
    return got


def _model(fmt: str) -> dict:
    """What the writes must leave, computed from WRITES alone."""
    nbytes = sum(n for _, n, _ in WRITES)
    stats = {}
    # qcow2 writes in place: one write of the same size on its file child
    for who in ("node", "child") if fmt == "qcow2" else ("node",):
        stats.update({f"{who}.rd_operations": 0, f"{who}.rd_bytes": 0,
                      f"{who}.wr_operations": len(WRITES), f"{who}.wr_bytes": nbytes,
                      f"{who}.failed_wr_operations": 0, f"{who}.failed_rd_operations": 0})
    dirty: list[tuple[int, int]] = []
    for off, n, _ in sorted(WRITES):
        start, end = off // GRAN * GRAN, -(-(off + n) // GRAN) * GRAN
        if dirty and dirty[-1][0] + dirty[-1][1] >= start:
            s, ln = dirty[-1]
            dirty[-1] = (s, max(s + ln, end) - s)
        else:
            dirty.append((start, end - start))
    last_off, last_n, _ = WRITES[-1]
    content = bytearray(SIZE)
    for off, n, byte in WRITES:
        content[off:off + n] = bytes([byte]) * n
    return {
        "stats": stats,
        "highest": max(off + n for off, n, _ in WRITES),
        "bitmaps": {"on": dirty, "off": []},
        "threshold": 0,
        "events": [("BLOCK_WRITE_THRESHOLD", {"node-name": "n",
                                              "amount-exceeded": last_off + last_n - THRESHOLD,
                                              "write-threshold": THRESHOLD})],
        "data": hashlib.sha256(content).hexdigest(),
    }


READS = [(0, 4096), (65536 + 8192, 8192), (MiB, 65536), (3 * MiB, 16384)]


async def _read(node, path: str, offset: int, n: int) -> tuple[str, bytes]:
    """Read as an exporter does; the path that took it, and the bytes."""
    if path == "read_now":
        data = node.read_now(offset, n)
        if data is not None:
            return path, bytes(data)
    if path in ("read_into", "read_into_now"):
        # segments of a page, or halves of one, in one buffer the caller owns
        buf = buffers.alloc(n)
        step = 4096 if n > 4096 else n // 2
        views = [buf[i:i + step] for i in range(0, n, step)]
        if path == "read_into_now" and node.read_into_now(offset, views):
            return path, bytes(buf)
        await node.read_into(offset, views)
        return "read_into", bytes(buf)
    if path == "read_submit":
        done = trio.Event()
        result = []

        def finished(res, err) -> None:
            result.append((res, err))
            done.set()

        if node.read_submit(offset, n, finished):
            await done.wait()
            assert result[0][1] is None
            return path, bytes(result[0][0])
    return "read", bytes(await node.read(offset, n))


@pytest.mark.parametrize("case", list(CASES))
async def test_every_read_path_counts_what_read_counts(tmp_path, case):
    fmt, file_opts = CASES[case]
    results = {}
    for path in ("read", "read_now", "read_submit", "read_into", "read_into_now"):
        img = tmp_path / path
        if fmt == "qcow2":
            create(img, SIZE)
            qemu_io(img, "write -P 0x5a 0 2M", "write -P 0xa5 3M 1M")
        else:
            img.write_bytes(bytes([0x5a]) * (2 * MiB) + bytes(MiB) + bytes([0xa5]) * MiB)
        file_node = {"driver": "file", "filename": str(img), **file_opts}
        opts = ({"driver": "qcow2", "node-name": "n", "file": file_node} if fmt == "qcow2"
                else {"driver": "raw", "node-name": "n", "file": file_node})
        graph = BlockGraph()
        node = await graph.add(opts)
        try:
            child = node.data if fmt == "qcow2" else node.file.node
            await node.read(0, 4096)  # qcow2 loads its L2 table; the same for every path
            base = _counters(node, child)
            got = [await _read(node, path, off, n) for off, n in READS]
            after = _counters(node, child)
            assert node._in_flight == 0 and child._in_flight == 0
        finally:
            await graph.close_all()
        results[path] = {"stats": {k: after[k] - base[k] for k in after},
                         "data": [data for _, data in got]}
        taken = [p for p, _ in got]
        if path == "read_into":
            assert taken == ["read_into"] * len(READS)
        if path == "read_into_now" and case == "file-cached":
            # qcow2 has no read_into_now of its own (BlockNode's declines)
            assert taken == ["read_into_now"] * len(READS)
    expect = [bytes([0x5a]) * n if off < 2 * MiB else bytes([0xa5]) * n for off, n in READS]
    nbytes = sum(n for _, n in READS)
    for path, got in results.items():
        assert got["data"] == expect, path
        assert got["stats"]["node.rd_operations"] == len(READS), (path, got)
        assert got["stats"]["node.rd_bytes"] == nbytes, (path, got)
        assert got["stats"]["node.failed_rd_operations"] == 0, (path, got)
        assert got["stats"] == results["read"]["stats"], (path, got, results["read"])
