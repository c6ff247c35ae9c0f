"""The write paths leave the same side effects (issue 13, item 3), and the
read paths count what read() counts: every one of read(), read_now(),
read_submit(), read_into(), read_into_now(), write(), write_now(),
write_submit(), writev() and writev_submit().

An exporter writes through ``write()`` (a task per request), ``write_now()``
(served synchronously, from the page cache), ``write_submit()`` (handed
to the I/O engine, answered from its completion), ``writev()`` (a
virtio-blk request's segments of guest memory, not gathered) or
``writev_submit()`` (those segments handed to the engine as one
pwritev).  Whichever it takes, what the graph records must be what ``write()`` records: the statistics of
the node and of its file child, the highest offset written, the dirty
bitmaps (enabled ones only), the BLOCK_WRITE_THRESHOLD event, and the bytes.

Each case runs the same writes once per path, as an exporter drives them
(a declined fast path falls back to ``write()``), and compares every
result with an independent model, so a path that skips a piece of the
bookkeeping, or does it twice, fails here.  The real drivers (file, qcow2)
show that the paths they take agree; a stub driver that serves every hook,
and fails on demand, takes each path through requests that succeed, fail,
fall outside the node, meet a read-only node or a before-write hook, and
checks the rest of the books: latency timings, the in-flight count, the
request mark, failures and refusals.
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import trio

from qsd_trio import events
from qsd_trio.nodes import inline_io, latency
from qsd_trio.nodes.engine import buffers
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import BlockNode, _in_request

from ..helpers import mounted
from .qcow2_helpers import check_clean, create, qemu_io

MiB = 1 << 20
WRITE_PATHS = ("write", "write_now", "write_submit", "writev", "writev_submit")
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
    if path.startswith("writev"):
        # a virtio-blk request's segments: pages, or halves of a page
        step = 4096 if len(mv) > 4096 else len(mv) // 2
        views = [mv[i:i + step] for i in range(0, len(mv), step)]
        if path == "writev_submit":
            return await _submitted(path, lambda done: node.writev_submit(offset, views, done),
                                    node, offset, mv)
        try:
            await node.writev(offset, views)
        except OSError as e:
            return path, e.errno
        return path, 0
    if path == "write_submit":
        return await _submitted(path, lambda done: node.write_submit(offset, mv, done),
                                node, offset, mv)
    return await _written(node, offset, mv)


async def _submitted(path: str, submit, node, offset: int, mv: memoryview) -> tuple[str, int]:
    """A request started without a task, ``submit(done)``; write() when
    it was not taken."""
    done = trio.Event()
    result = []

    def finished(res, err) -> None:  # called by the engine's reaper task
        result.append(err)
        done.set()

    if submit(finished):
        await done.wait()
        return path, result[0].errno if result[0] else 0
    return await _written(node, offset, mv)


async def _written(node, offset: int, mv: memoryview) -> tuple[str, int]:
    try:
        await node.write(offset, mv)
    except OSError as e:
        return "write", e.errno
    return "write", 0


CASES = {
    "file-cached": ("raw", {"aio": "threads"}),
    "file-io_uring-direct": ("raw", {"aio": "io_uring", "cache": {"direct": True}}),
    # raw without a window over its file: the paths without a task go
    # straight to the file's driver and keep both nodes' books
    "raw-over-file-cached": ("raw-over-file", {"aio": "threads"}),
    "raw-over-file-io_uring-direct": ("raw-over-file", {"aio": "io_uring",
                                                        "cache": {"direct": True}}),
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
        for path in WRITE_PATHS:
            results[path] = await _run(tmp_path / path, fmt, file_opts, path, seen)
    finally:
        unsubscribe()

    model = _model(fmt)
    for path, got in results.items():
        taken = [p for p, err in got.pop("taken")]
        align = got.pop("align")
        if path != "write":
            # the path under test served the writes it can: on O_DIRECT the
            # fast path declines them all (nothing is cached), and write_submit
            # takes every aligned one
            expect = {"write_now": 0 if "direct" in case else len(WRITES),
                      "write_submit": len(WRITES), "writev": len(WRITES),
                      "writev_submit": _vec_submitted(case, align)}[path]
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
        for path in WRITE_PATHS:
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
        if path in ("write_submit", "writev", "writev_submit"):
            assert all(p == path for p, _ in got["taken"]), got["taken"]
        got.pop("taken")
    assert results["write_now"] == results["write"]
    assert results["write_submit"] == results["write"]
    assert results["writev"] == results["write"]
    assert results["writev_submit"] == results["write"]


def _vec_submitted(case: str, align: int) -> int:
    """How many of WRITES writev_submit() starts: every one on a file
    with the page cache; with O_DIRECT those whose views (pages, or halves
    of a page, see _write) are aligned to the file's ``align``; qcow2
    (writing into clusters it owns, one after the other on the host)
    hands them to its file the same way."""
    if "direct" not in case:
        return len(WRITES)
    return sum(1 for _, n, _ in WRITES if (4096 if n > 4096 else n // 2) % align == 0)


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
            else {"driver": "raw", "node-name": "n", "file": file_node}
            if fmt == "raw-over-file" else {**file_node, "node-name": "n"})
    graph = BlockGraph()
    node = await graph.add(opts)
    try:
        child = (node.data if fmt == "qcow2" else node.file.node if fmt == "raw-over-file"
                 else None)
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
        # the O_DIRECT alignment of the file (qcow2's child, if any)
        result["align"] = (node if child is None else child).align
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
    # qcow2 writes in place, raw passes the write on: one write of the
    # same size on the file child
    for who in ("node", "child") if fmt in ("qcow2", "raw-over-file") else ("node",):
        stats.update({f"{who}.rd_operations": 0, f"{who}.rd_bytes": 0,
                      f"{who}.wr_operations": len(WRITES), f"{who}.wr_bytes": nbytes,
                      f"{who}.failed_wr_operations": 0, f"{who}.failed_rd_operations": 0})
    dirty = _dirty([(off, n) for off, n, _ in WRITES])
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


def _dirty(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The extents an enabled bitmap of granularity GRAN has dirty after
    these (offset, length) writes."""
    dirty: list[tuple[int, int]] = []
    for off, n in sorted(writes):
        start, end = off // GRAN * GRAN, -(-(off + n) // GRAN) * GRAN
        if dirty and dirty[-1][0] + dirty[-1][1] >= start:
            s, ln = dirty[-1]
            dirty[-1] = (s, max(s + ln, end) - s)
        else:
            dirty.append((start, end - start))
    return dirty


READS = [(0, 4096), (65536 + 8192, 8192), (MiB, 65536), (3 * MiB, 16384)]
READ_PATHS = ("read", "read_now", "read_submit", "read_into", "read_into_now", "readv_submit")


async def _read(node, path: str, offset: int, n: int) -> tuple[str, bytes | int]:
    """Read as an exporter does; the path that took it, and the bytes (the
    errno it failed with, if it did)."""
    if path == "read_now":
        data = node.read_now(offset, n)
        if data is not None:
            return path, bytes(data)
    if path in ("read_into", "read_into_now", "readv_submit"):
        # segments of a page, or halves of one, in one buffer the caller owns
        buf = buffers.alloc(n)
        step = 4096 if n > 4096 else n // 2
        views = [buf[i:i + step] for i in range(0, n, step)]
        if path == "read_into_now" and node.read_into_now(offset, views):
            return path, bytes(buf)
        if path == "readv_submit":
            done = trio.Event()
            errors: list[OSError | None] = []

            def read(_res, err) -> None:
                errors.append(err)
                done.set()

            if node.readv_submit(offset, n, views, read):
                await done.wait()
                return path, errors[0].errno if errors[0] else bytes(buf)
        try:
            await node.read_into(offset, views)
        except OSError as e:
            return "read_into", e.errno
        return "read_into", bytes(buf)
    if path == "read_submit":
        done = trio.Event()
        result = []

        def finished(res, err) -> None:
            result.append((res, err))
            done.set()

        if node.read_submit(offset, n, finished):
            await done.wait()
            res, err = result[0]
            return path, err.errno if err else bytes(res)
    try:
        return "read", bytes(await node.read(offset, n))
    except OSError as e:
        return "read", e.errno


@pytest.mark.parametrize("case", list(CASES))
async def test_every_read_path_counts_what_read_counts(tmp_path, case):
    fmt, file_opts = CASES[case]
    results = {}
    for path in READ_PATHS:
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
        if path == "readv_submit":
            # O_DIRECT through an engine of the kernel's takes it (qcow2
            # has no readv_submit of its own), the page cache does not
            assert taken == [path if case.endswith("io_uring-direct") and fmt != "qcow2"
                             else "read_into"] * len(READS)
    expect = [bytes([0x5a]) * n if off < 2 * MiB else bytes([0xa5]) * n for off, n in READS]
    nbytes = sum(n for _, n in READS)
    for path, got in results.items():
        assert got["data"] == expect, path
        assert got["stats"]["node.rd_operations"] == len(READS), (path, got)
        assert got["stats"]["node.rd_bytes"] == nbytes, (path, got)
        assert got["stats"]["node.failed_rd_operations"] == 0, (path, got)
        assert got["stats"] == results["read"]["stats"], (path, got, results["read"])


# -- every path, on a driver that serves every hook -----------------------------
#
# The cases above go through real drivers, which decline some paths (O_DIRECT
# has no fast path) and cannot fail on demand.  _Stub serves every hook in
# memory, so each path is the one taken, and fails with EIO while ``fail`` is
# set; what it saw of the node while it had a request is kept in ``seen``.

STUB_SIZE = 1 * MiB
# the last write crosses STUB_THRESHOLD
STUB_THRESHOLD = 512 * 1024 + 100
STUB_OPS = [(0, 4096), (65536 + 8192, 8192), (512 * 1024, 4096)]


class _Stub(BlockNode):
    driver = "test-stub"

    def __init__(self, graph: BlockGraph) -> None:
        super().__init__(graph, "n")
        self.data = bytearray(STUB_SIZE)
        self.fail = False
        # per request the driver had: the node's in-flight count and whether
        # it was marked as inside a request (_in_request)
        self.seen: list[tuple[int, bool]] = []

    def _length(self) -> int:
        return len(self.data)

    def _take(self) -> None:
        self.seen.append((self._in_flight, _in_request.get()))
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")

    async def _co_preadv(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self._take()
        return bytes(self.data[offset:offset + length])

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        await trio.lowlevel.checkpoint()
        self._take()
        self._copy_out(offset, views)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._take()
        self.data[offset:offset + len(data)] = data

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        await trio.lowlevel.checkpoint()
        self._take()
        self.data[offset:offset + length] = b"".join(views)

    def _preadv_now(self, offset: int, length: int) -> bytes:
        self._take()
        return bytes(self.data[offset:offset + length])

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        self._take()
        self._copy_out(offset, views)
        return True

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        self._take()
        self.data[offset:offset + len(mv)] = mv
        return True

    # submitted requests complete later, from the event loop, as the
    # engine's reaper completes them
    def _preadv_submit(self, offset: int, length: int, done) -> bool:
        try:
            self._take()
        except OSError as e:
            trio.lowlevel.current_trio_token().run_sync_soon(done, None, e)
        else:
            data = bytes(self.data[offset:offset + length])
            trio.lowlevel.current_trio_token().run_sync_soon(done, data, None)
        return True

    def _preadv_into_submit(self, offset: int, length: int, views: list[memoryview],
                            done) -> bool:
        try:
            self._take()
        except OSError as e:
            trio.lowlevel.current_trio_token().run_sync_soon(done, None, e)
        else:
            self._copy_out(offset, views)
            trio.lowlevel.current_trio_token().run_sync_soon(done, None, None)
        return True

    def _pwritev_submit(self, offset: int, mv: memoryview, done) -> bool:
        try:
            self._take()
        except OSError as e:
            trio.lowlevel.current_trio_token().run_sync_soon(done, None, e)
        else:
            self.data[offset:offset + len(mv)] = mv
            trio.lowlevel.current_trio_token().run_sync_soon(done, None, None)
        return True

    def _pwritev_submit_vec(self, offset: int, length: int, views: list[memoryview],
                            done) -> bool:
        return self._pwritev_submit(offset, memoryview(b"".join(views)), done)

    def _copy_out(self, offset: int, views: list[memoryview]) -> None:
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)


# what each case does to the node before the requests, and where they go
STUB_CASES = {
    "served": {},
    "failing": {"fail": True},
    # each request crosses the end: refused before anything is counted
    "out-of-bounds": {"offset": STUB_SIZE - 2048},
    "read-only": {"read_only": True},
    # hooks make the fast paths decline; write() runs them, once per write
    "before-write-hook": {"hook": True},
}


@pytest.mark.parametrize("case", list(STUB_CASES))
async def test_every_path_keeps_the_same_books(case):
    """Every read path and every write path, with the same requests, leave
    what read() and write() leave, and what a model says they must: the
    statistics (failures counted once, refusals not at all), the latency
    timings, the in-flight count (back to 0; 1 while the driver has a
    request, except on the synchronous fast paths, which never count it),
    the highest offset written, the dirty bitmaps, the write threshold and
    its event, the before-write hooks (once per write, before the data
    changes), and the errors."""
    results = {path: await _stub_run(case, path) for path in READ_PATHS + WRITE_PATHS}
    for path, got in results.items():
        taken = got.pop("taken")
        if case == "served":
            assert taken == [path] * len(STUB_OPS), (path, taken)
        model = _stub_model(case, path)
        assert got == model, (path, got, model)
        if path not in ("read", "write"):
            # what differs from read()'s or write()'s is what the driver saw
            # of the request (the fast paths never count one in flight)
            family = results["read" if path.startswith("read") else "write"]
            assert {k: v for k, v in got.items() if k != "driver saw"} == \
                {k: v for k, v in family.items() if k != "driver saw"}, path


async def _stub_run(case: str, path: str) -> dict:
    opts = STUB_CASES[case]
    graph = BlockGraph()
    node = _Stub(graph)
    node.data[:] = bytes([0x5a]) * STUB_SIZE
    node.fail = opts.get("fail", False)
    node.read_only = opts.get("read_only", False)
    node.latency = {op: latency.Latency() for op in latency.OPS}
    node.add_bitmap("on", GRAN)
    node.add_bitmap("off", GRAN, enabled=False)
    node.write_threshold = STUB_THRESHOLD
    hooked: list[tuple[int, int, str]] = []
    if opts.get("hook"):
        async def hook(n: BlockNode, offset: int, length: int) -> None:
            await trio.lowlevel.checkpoint()
            # what the range holds when the hook runs: not yet the new data
            hooked.append((offset, length, hashlib.sha256(node.data[offset:offset + length])
                           .hexdigest()))
        node.before_write.append(hook)
    seen_events: list[events.Event] = []
    unsubscribe = events.subscribe(seen_events.append)
    taken, outcome = [], []
    try:
        for i, (off, n) in enumerate(STUB_OPS):
            off += opts.get("offset", 0)
            if path.startswith("read"):
                p, got = await _read(node, path, off, n)
                outcome.append(got if isinstance(got, int) else hashlib.sha256(got).hexdigest())
            else:
                p, err = await _write(node, path, off, _payload(n, 0x10 + i))
                outcome.append(err)
            taken.append(p)
            assert node._in_flight == 0, (path, p)
    finally:
        unsubscribe()
    lat = {op: sum(node.latency[op].counts) for op in ("read", "write")}
    return {
        "taken": taken,
        "outcome": outcome,
        "stats": {k: v for k, v in node.stats.items() if v},
        "latency": lat,
        "driver saw": [(in_flight, in_request) for in_flight, in_request in node.seen],
        "highest": node.wr_highest_offset,
        "bitmaps": {name: [(o, n) for o, n, d in bm.dirty_extents() if d]
                    for name, bm in sorted(node.bitmaps.items())},
        "threshold": node.write_threshold,
        "events": [(e.name, e.data) for e in seen_events if e.name == "BLOCK_WRITE_THRESHOLD"],
        "hooks": hooked,
        "data": hashlib.sha256(node.data).hexdigest(),
    }


def _stub_model(case: str, path: str) -> dict:
    """What the requests of STUB_OPS must leave on _Stub, from the case and
    the path alone."""
    opts = STUB_CASES[case]
    reading = path.startswith("read")
    shift = opts.get("offset", 0)
    ops = [(off + shift, n) for off, n in STUB_OPS]
    nbytes = sum(n for _, n in ops)
    old = bytes([0x5a]) * STUB_SIZE
    refused = shift > 0 or (opts.get("read_only", False) and not reading)
    fail = opts.get("fail", False)
    hook = opts.get("hook", False) and not reading
    # what the driver sees of one request: the in-flight count and the
    # request mark.  A task path counts it and marks it; a submitted one
    # counts it (the engine's completion ends it); the synchronous fast
    # path does neither.  A fast path declines on a hooked node, and one
    # that fails is redone by read()/write().
    task = (1, True)
    first = {"read_now": (0, False), "read_into_now": (0, False), "write_now": (0, False),
             "read_submit": (1, False), "readv_submit": (1, False), "write_submit": (1, False),
             "writev_submit": (1, False)}.get(path, task)
    if hook:
        first = task
    per_request = [first, task] if fail and first == (0, False) else [first]
    stats: dict[str, int] = {}
    written = not reading and not refused
    if not refused:
        kind = "rd" if reading else "wr"
        if fail:
            stats[f"failed_{kind}_operations"] = len(ops)
        else:
            stats.update({f"{kind}_operations": len(ops), f"{kind}_bytes": nbytes})
    timed = 0 if refused or fail else len(ops)
    dirty = _dirty(ops) if written else []
    content = bytearray(old)
    if written and not fail:
        for i, (off, n) in enumerate(ops):
            content[off:off + n] = bytes([0x10 + i]) * n
    last_off, last_n = ops[-1]
    if refused:
        outcome = [errno.EIO if shift else errno.EPERM] * len(ops)
    elif fail:
        outcome = [errno.EIO] * len(ops)
    elif reading:
        outcome = [hashlib.sha256(old[off:off + n]).hexdigest() for off, n in ops]
    else:
        outcome = [0] * len(ops)
    return {
        "outcome": outcome,
        "stats": stats,
        "latency": {"read": timed if reading else 0, "write": 0 if reading else timed},
        "driver saw": [] if refused else per_request * len(ops),
        "highest": max(off + n for off, n in ops) if written else 0,
        "bitmaps": {"off": [], "on": dirty},
        "threshold": 0 if written else STUB_THRESHOLD,
        "events": [("BLOCK_WRITE_THRESHOLD", {
            "node-name": "n", "amount-exceeded": last_off + last_n - STUB_THRESHOLD,
            "write-threshold": STUB_THRESHOLD})] if written else [],
        "hooks": [(off, n, hashlib.sha256(old[off:off + n]).hexdigest())
                  for off, n in ops] if hook and written else [],
        "data": hashlib.sha256(content).hexdigest(),
    }
