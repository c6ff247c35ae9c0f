"""The synchronous fast path (BlockNode.read_now/write_now).

It may decline anything (the caller then takes the async path); what it
must never do is serve a request the async path would treat differently:
a drained node, a node with write hooks, zero detection, a read-only node,
a cluster that is not plainly allocated.  When it serves one, the bytes,
statistics and dirty bitmaps are what read()/write() would leave.
"""

from __future__ import annotations

import collections
import contextlib
import sys

import pytest
import trio

from qsd_trio.nodes import inline_io
from qsd_trio.nodes.graph import BlockGraph

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_img, qemu_io

PAGE = inline_io.PAGE


@pytest.fixture(autouse=True)
def far_from_dirty_throttling(monkeypatch):
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)


@pytest.fixture
async def file_node(tmp_path):
    path = tmp_path / "f.raw"
    path.write_bytes(b"\x11" * (1 << 20))
    graph = BlockGraph()
    n = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    yield n
    await graph.close_all()


async def test_file_serves_cached_reads_and_page_writes(file_node):
    n = file_node
    assert n.read_now(PAGE, 100) == b"\x11" * 100
    assert n.write_now(2 * PAGE, memoryview(b"\x22" * PAGE)) is True
    assert n.write_now(10, memoryview(b"\x33" * 10)) is False  # part of a page
    assert n.read_now((1 << 20) - 10, 20) is None  # short: past EOF
    assert bytes(await n.read(2 * PAGE, PAGE)) == b"\x22" * PAGE
    st = n.stats
    assert (st["rd_operations"], st["wr_operations"], st["wr_bytes"]) == (2, 1, PAGE)
    assert n.wr_highest_offset == 3 * PAGE


async def test_file_declines_when_the_async_path_has_work(file_node):
    n = file_node
    mv = memoryview(bytearray(b"\x44" * PAGE))  # writable: write_submit takes no bytes
    await _declines_while_held(n, n, mv)
    assert n.write_now(0, mv) is True
    assert n.stats["wr_operations"] == 1


async def _declines_while_held(n, who, mv):
    """``n``'s paths without a task decline while ``who`` (``n``, or the
    node it passes its requests through to) is drained, has a before-write
    hook, detects zeroes or is read-only; nothing is counted."""
    async def hook(node, offset, length):
        pass

    async with who.drained():
        assert n.read_now(0, PAGE) is None and n.write_now(0, mv) is False
        assert (await _submitted(lambda d: n.read_submit(0, PAGE, d)))[0] is False
        assert (await _submitted(lambda d: n.write_submit(0, mv, d)))[0] is False
    who.before_write.append(hook)
    assert n.write_now(0, mv) is False
    assert (await _submitted(lambda d: n.write_submit(0, mv, d)))[0] is False
    who.before_write.clear()
    who.detect_zeroes = "on"
    assert n.write_now(0, memoryview(bytes(PAGE))) is False
    who.detect_zeroes = "off"
    who.read_only = True
    assert n.write_now(0, mv) is False
    assert (await _submitted(lambda d: n.writev_submit(0, [mv], d)))[0] is False
    who.read_only = False
    assert n.stats["wr_operations"] == n.stats["rd_operations"] == 0


async def test_file_write_marks_dirty_bitmaps(file_node):
    from qsd_trio.nodes.bitmaps import DirtyBitmap

    n = file_node
    bm = DirtyBitmap("b", n.length, 65536)
    n.bitmaps["b"] = bm
    assert n.write_now(3 * 65536, memoryview(b"\x55" * PAGE)) is True
    assert bm.count() == 65536


async def test_qcow2_only_plain_allocated_clusters(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 4 << 20)
    qemu_io(img, "write -P 0x5a 0 1M", "write -c -P 0x6b 2M 64k")  # plain, compressed
    async with open_qcow2(img) as q:
        await q.read(0, 4096)  # loads the L2 table into the cache
        assert q.write_now(4096, memoryview(b"\x01" * 4096)) is False  # no overlap index yet
        await q.write(4096, b"\x5a" * 4096)  # ... which the async path builds
        assert q.read_now(4096, 4096) == b"\x5a" * 4096
        # two clusters one after the other on the host: one read of the file
        assert q.read_now(64 * 1024 - 512, 1024) == b"\x5a" * 1024
        assert q.read_now(2 << 20, 4096) is None            # compressed
        assert q.read_now(3 << 20, 4096) is None            # unallocated
        assert q.write_now(8192, memoryview(b"\x01" * 4096)) is True
        assert q.write_now(2 << 20, memoryview(b"\x02" * 4096)) is False
        assert q.write_now(3 << 20, memoryview(b"\x03" * 4096)) is False
        # what was declined goes the async way
        await q.write(3 << 20, b"\x03" * 4096)
        assert (q.stats["wr_operations"], q.stats["rd_operations"]) == (3, 3)
        assert q.data.stats["wr_operations"] >= 3
    check_clean(img)
    qemu_io(img, "read -P 0x5a 0 8k", "read -P 1 8k 4k", "read -P 0x5a 12k 1012k",
            "read -P 0x6b 2M 64k", "read -P 3 3M 4k")


async def test_qcow2_serves_runs_of_contiguous_clusters_only(tmp_path):
    """A request over several clusters is one file request when they
    follow each other on the host (a 1 MiB sequential read); a gap, a
    cluster out of order, another kind of cluster or a second L2 table
    sends it the general way; a write also needs every cluster COPIED."""
    img = tmp_path / "r.qcow2"
    K = 64 * 1024
    create(img, 1 << 30)
    # clusters 0-15 in order; 17 before 16 on the host; 18 compressed;
    # the last cluster of the first L2 table (512 MiB) and the first of the next
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 1088k 64k", "write -P 0x33 1M 64k",
            "write -c -P 0x44 1152k 64k", "write -P 0x55 524224k 128k")
    async with open_qcow2(img) as q:
        await q.read(0, 4096)
        await q.read(512 << 20, 4096)  # both L2 tables cached
        assert q.read_now(0, 1 << 20) == b"\x11" * (1 << 20)
        assert q.read_now(K // 2, 3 * K) == b"\x11" * (3 * K)
        assert q.read_now(15 * K, 2 * K) is None        # 16 is not after 15
        assert q.read_now(16 * K, 2 * K) is None        # 17 lies before 16
        assert q.read_now(17 * K, 2 * K) is None        # 18 is compressed
        assert q.read_now((512 << 20) - K, 2 * K) is None   # two L2 tables
        assert q.read_now((512 << 20) - K, K) == b"\x55" * K
        await q.write(0, b"\x11" * 4096)  # builds the overlap index the fast writes need
        assert q.write_now(K, memoryview(b"\x66" * (4 * K))) is True
        assert q.write_now(15 * K, memoryview(b"\x77" * (2 * K))) is False
    check_clean(img)
    qemu_io(img, "read -P 0x11 0 64k", "read -P 0x66 64k 256k", "read -P 0x11 320k 704k",
            "read -P 0x33 1M 64k", "read -P 0x22 1088k 64k", "read -P 0x44 1152k 64k")
    # after a snapshot every cluster is shared: runs are read, never written in place
    qemu_img("snapshot", "-c", "s", str(img))
    async with open_qcow2(img) as q:
        await q.read(0, 4096)
        assert q.read_now(0, 4 * K) == b"\x11" * K + b"\x66" * (3 * K)
        await q.write(16 * K, b"\x33" * 4096)  # copies cluster 16 (and builds the index)
        assert q.write_now(0, memoryview(b"\x77" * (2 * K))) is False
    check_clean(img)


async def test_qcow2_declines_a_corrupt_image(tmp_path):
    img = tmp_path / "c.qcow2"
    create(img, 1 << 20)
    qemu_io(img, "write -P 0x5a 0 64k")
    async with open_qcow2(img) as q:
        await q.read(0, 4096)
        q._corrupt = True
        assert q.read_now(0, 4096) is None
        assert q.write_now(0, memoryview(bytes(4096))) is False


@pytest.fixture
async def raw_over_file(tmp_path):
    path = tmp_path / "f.raw"
    path.write_bytes(b"\x11" * (1 << 20))
    graph = BlockGraph()
    n = await graph.add({"driver": "raw", "node-name": "r", "file": {
        "driver": "file", "node-name": "f", "filename": str(path)}})
    yield n
    await graph.close_all()


async def _submitted(submit):
    """A request started without a task: whether it was taken, and its
    result and error once done."""
    got = []
    finished = trio.Event()

    def done(res, err):
        got.append((res, err))
        finished.set()

    if not submit(done):
        return False, None, None
    await finished.wait()
    return True, *got[0]


async def test_raw_over_file_declines_what_either_node_holds_back(raw_over_file):
    """A raw node without a window hands the paths without a task straight
    to its file's driver; what holds a request back on either node still
    sends it to the general path, and a request they take counts on both."""
    r = raw_over_file
    f = r.file.node
    mv = memoryview(bytearray(b"\x44" * PAGE))  # writable: write_submit takes no bytes

    for who in (r, f):
        await _declines_while_held(r, who, mv)
    # past the end of the raw node (the file below would grow)
    assert r.read_now((1 << 20) - 10, 20) is None
    assert r.write_now(1 << 20, mv) is False
    assert (await _submitted(lambda d: r.write_submit(1 << 20, mv, d)))[0] is False
    assert f.stats["wr_operations"] == r.stats["wr_operations"] == 0
    # taken: counted once on each node, nothing left in flight
    assert r.write_now(0, mv) is True
    assert bytes(r.read_now(0, PAGE)) == b"\x44" * PAGE
    assert (await _submitted(lambda d: r.write_submit(PAGE, mv, d)))[:2] == (True, None)
    taken, data, err = await _submitted(lambda d: r.read_submit(PAGE, PAGE, d))
    assert taken and err is None and bytes(data) == b"\x44" * PAGE
    for n in (r, f):
        assert (n.stats["rd_operations"], n.stats["wr_operations"]) == (2, 2)
        assert n._in_flight == 0
        assert n.wr_highest_offset == 2 * PAGE


async def test_raw_with_a_window_reads_and_writes_at_its_offset(tmp_path):
    """raw with an offset is no pass-through: its requests land at the
    offset in the file on every path."""
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(range(256)) * (1 << 12))
    graph = BlockGraph()
    r = await graph.add({"driver": "raw", "node-name": "r", "offset": 2 * PAGE,
                         "size": 4 * PAGE, "file": {"driver": "file", "filename": str(path)}})
    try:
        whole = path.read_bytes()
        assert bytes(r.read_now(0, PAGE)) == whole[2 * PAGE:3 * PAGE]
        taken, data, err = await _submitted(lambda d: r.read_submit(PAGE, PAGE, d))
        assert taken and bytes(data) == whole[3 * PAGE:4 * PAGE]
        assert r.write_now(0, memoryview(b"\x66" * PAGE)) is True
        assert r.read_now(4 * PAGE, PAGE) is None  # past the window
        await r.flush()
        assert path.read_bytes()[2 * PAGE:3 * PAGE] == b"\x66" * PAGE
    finally:
        await graph.close_all()


@contextlib.contextmanager
def _functions_entered():
    """How often each Python function, by (file name, function name), was
    entered meanwhile in this thread; a coroutine resumed is "called" again,
    so each frame counts once."""
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    frames = set()

    def profile(frame, event, arg):
        if event == "call" and frame not in frames:
            frames.add(frame)
            calls[frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)


async def test_raw_without_a_window_hands_requests_to_the_file_driver(raw_over_file):
    """A request on a raw node without a window passes its checks once and
    reaches the file node's driver without raw's hooks or the file node's
    public methods (the same checks again): which functions run is the
    whole point of the pass-through, so they are counted."""
    r = raw_over_file
    mv = memoryview(bytearray(b"\x77" * PAGE))
    done = []
    both_done = trio.Event()

    def finished(*result):
        done.append(result)
        if len(done) == 2:
            both_done.set()

    for request in (lambda: r.read_now(0, PAGE), lambda: r.write_now(0, mv),
                    lambda: r.read_submit(0, PAGE, finished),
                    lambda: r.write_submit(PAGE, mv, finished)):
        with _functions_entered() as calls:
            assert request()
        assert not [c for c in calls if c[0] == "raw.py"], calls
        public = [c for c in calls if c[0] == "node.py" and not c[1].startswith("_")]
        assert len(public) == 1 and calls[public[0]] == 1, calls
        assert calls["node.py", "_plain_read"] + calls["node.py", "_plain_write"] == 1, calls
    await both_done.wait()
    assert [err for _, err in done] == [None, None]
    # read() and write(): one coroutine of the node layer, none of raw's
    for request in (lambda: r.read(0, PAGE), lambda: r.write(0, mv, fua=True)):
        with _functions_entered() as calls:
            await request()
        assert not [c for c in calls if c[0] == "raw.py"], calls
        assert calls["node.py", "read"] + calls["node.py", "write"] == 1, calls


@pytest.mark.parametrize("path", ["write", "writev", "write_now", "write_submit", "fua"])
async def test_raw_over_file_keeps_the_file_nodes_books(raw_over_file, path):
    """A write through a raw node without a window leaves on the file node
    what the file node's own write() leaves: its before-write hook (once,
    after raw's), its write threshold event, its dirty bitmap, its
    statistics; zero detection on the file still turns zeroes into a zero
    write there."""
    from qsd_trio import events

    r = raw_over_file
    f = r.file.node
    order = []

    def hook_of(name):
        async def hook(node, offset, length):
            order.append((name, node.node_name, offset, length))
        return hook

    r.before_write.append(hook_of("raw"))
    f.before_write.append(hook_of("file"))
    bm = f.add_bitmap("b", 65536)
    f.write_threshold = 5 * PAGE
    seen = []
    unsubscribe = events.subscribe(seen.append)
    mv = memoryview(bytearray(b"\x99" * 2 * PAGE))
    try:
        if path == "write_now":
            assert not r.write_now(4 * PAGE, mv)  # hooks: the general path
            await r.write(4 * PAGE, mv)
        elif path == "write_submit":
            assert (await _submitted(lambda d: r.write_submit(4 * PAGE, mv, d)))[0] is False
            await r.write(4 * PAGE, mv)
        elif path == "writev":
            await r.writev(4 * PAGE, [mv[:PAGE], mv[PAGE:]])
        else:
            await r.write(4 * PAGE, mv, fua=path == "fua")
        f.detect_zeroes = "on"
        await r.write(8 * PAGE, memoryview(bytes(PAGE)))
    finally:
        unsubscribe()
    assert order == [("raw", "r", 4 * PAGE, 2 * PAGE), ("file", "f", 4 * PAGE, 2 * PAGE),
                     ("raw", "r", 8 * PAGE, PAGE), ("file", "f", 8 * PAGE, PAGE)]
    assert [(e.name, e.data) for e in seen if e.name == "BLOCK_WRITE_THRESHOLD"] == [
        ("BLOCK_WRITE_THRESHOLD", {"node-name": "f", "amount-exceeded": PAGE,
                                   "write-threshold": 5 * PAGE})]
    assert [(o, n) for o, n, d in bm.dirty_extents() if d] == [(0, 65536)]
    for n in (r, f):
        assert (n.stats["wr_operations"], n.stats["wr_bytes"]) == (2, 3 * PAGE), n.node_name
        assert n._in_flight == 0 and n.wr_highest_offset == 9 * PAGE
    assert bytes(await r.read(4 * PAGE, 5 * PAGE)) == (b"\x99" * 2 * PAGE + b"\x11" * 2 * PAGE
                                                      + bytes(PAGE))


async def test_raw_over_file_write_refused_by_raws_hook_never_reaches_the_file(raw_over_file):
    """A before-write hook on the raw node that fails the write fails it
    before the file node has it: the failure is raw's alone, and the file
    node's books stay as they were (as when raw's write() called the
    file's)."""
    r = raw_over_file
    f = r.file.node

    async def refuse(node, offset, length):
        raise OSError(28, "No space left on device")

    r.before_write.append(refuse)
    with pytest.raises(OSError):
        await r.write(0, memoryview(bytearray(PAGE)))
    assert r.stats["failed_wr_operations"] == 1
    assert (f.stats["failed_wr_operations"], f.stats["wr_operations"]) == (0, 0)
    assert f.wr_highest_offset == 0 and f._in_flight == r._in_flight == 0
