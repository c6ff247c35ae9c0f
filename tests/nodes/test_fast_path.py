"""The synchronous fast path (BlockNode.read_now/write_now).

It may decline anything (the caller then takes the async path); what it
must never do is serve a request the async path would treat differently:
a drained node, a node with write hooks, zero detection, a read-only node,
a cluster that is not plainly allocated.  When it serves one, the bytes,
statistics and dirty bitmaps are what read()/write() would leave.
"""

from __future__ import annotations

import pytest

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
    mv = memoryview(b"\x44" * PAGE)
    async with n.drained():
        assert n.read_now(0, PAGE) is None
        assert n.write_now(0, mv) is False

    async def hook(node, offset, length):
        pass

    n.before_write.append(hook)
    assert n.write_now(0, mv) is False
    n.before_write.clear()
    n.detect_zeroes = "on"
    assert n.write_now(0, memoryview(bytes(PAGE))) is False
    n.detect_zeroes = "off"
    n.read_only = True
    assert n.write_now(0, mv) is False
    n.read_only = False
    assert n.write_now(0, mv) is True
    assert n.stats["wr_operations"] == 1


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
