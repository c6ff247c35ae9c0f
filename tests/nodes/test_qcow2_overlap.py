"""qcow2 overlap-check: writes that would land on metadata are refused.

Crafted images whose L2 entries point at metadata (the active L1 table, an
L2 table, a refcount block) are opened in process; a guest write into such a
cluster must mark the image corrupt with QEMU's message and event, fail with
EIO, and leave the metadata untouched.  ``overlap-check`` decides which
structures are checked.  The same scenario against qemu-storage-daemon is in
tests/differential/test_qcow2_overlap.py.
"""

from __future__ import annotations

import errno
import json
import struct

import pytest

from qsd_trio import events
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.qcow2 import overlap
from tests.helpers import qemu_img, qemu_io

COPIED = 1 << 63


def craft(path, target: str) -> dict:
    """A 1 MiB image (64 KiB clusters) with guest clusters 0 and 1 written,
    then guest cluster 0's L2 entry pointed at ``target`` ("l1", "l2",
    "refblock", "reftable"); returns the layout."""
    qemu_img("create", "-f", "qcow2", str(path), "1M")
    qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", str(path))
    with open(path, "r+b") as f:
        h = f.read(104)
        l1_off, rt_off = struct.unpack_from(">QQ", h, 40)
        f.seek(rt_off)
        rb_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & ~COPIED
    layout = {"l1": l1_off, "l2": l2_off, "refblock": rb_off, "reftable": rt_off}
    _point(path, 0, layout[target])
    return layout


def _point(path, gc: int, host: int) -> None:
    """Point guest cluster ``gc`` (in the first L2 table) at ``host``."""
    with open(path, "r+b") as f:
        l1_off = struct.unpack_from(">Q", f.read(104), 40)[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & ~COPIED
        f.seek(l2_off + 8 * gc)
        f.write(struct.pack(">Q", host | COPIED))


@pytest.fixture
def corrupted_events():
    seen = []
    unsubscribe = events.subscribe(
        lambda ev: seen.append(ev.data) if ev.name == "BLOCK_IMAGE_CORRUPTED" else None)
    yield seen
    unsubscribe()


async def _open(path, **opts):
    graph = BlockGraph()
    node = await graph.add({"driver": "qcow2", "node-name": "q", **opts,
                            "file": {"driver": "file", "filename": str(path)}})
    return graph, node


def _info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", str(path)).stdout)


@pytest.mark.parametrize(("target", "name"), [
    ("l1", "active L1 table"), ("l2", "active L2 table"), ("refblock", "refcount block"),
    ("reftable", "refcount table")])
async def test_write_onto_metadata_marks_corrupt(tmp_path, corrupted_events, target, name):
    img = tmp_path / "c.qcow2"
    layout = craft(img, target)
    before = img.read_bytes()
    graph, node = await _open(img)
    with pytest.raises(OSError) as e:
        await node.write(4096, b"\x33" * 4096)
    assert e.value.errno == errno.EIO
    msg = f"Preventing invalid write on metadata (overlaps with {name})"
    assert corrupted_events == [{"device": "", "node-name": "q", "msg": msg,
                                 "offset": layout[target] + 4096, "size": 4096,
                                 "fatal": True}]
    # the node is unusable from now on, as QEMU's (its driver is gone)
    with pytest.raises(OSError) as e:
        await node.read(0, 512)
    assert e.value.errno == errno.ENOMEDIUM
    await graph.close_all()
    after = img.read_bytes()
    # only the corrupt bit changed (incompatible features, byte 79)
    assert after[:72] + after[80:] == before[:72] + before[80:]
    assert _info(img)["format-specific"]["data"]["corrupt"] is True


@pytest.mark.parametrize("opt", [
    "none", {"template": "none"}, {"active-l1": False},
    {"template": "all", "active-l1": False}])
async def test_overlap_check_off_lets_the_write_through(tmp_path, corrupted_events, opt):
    img = tmp_path / "c.qcow2"
    layout = craft(img, "l1")
    graph, node = await _open(img, **{"overlap-check": opt})
    await node.write(4096, b"\x33" * 4096)  # as QEMU: unchecked, it lands on the L1 table
    await graph.close_all()
    assert corrupted_events == []
    at = layout["l1"] + 4096
    assert img.read_bytes()[at:at + 4096] == b"\x33" * 4096


@pytest.mark.parametrize("opt", ["constant", {"template": "none", "active-l1": True}])
async def test_overlap_check_on_for_one_structure(tmp_path, corrupted_events, opt):
    img = tmp_path / "c.qcow2"
    craft(img, "l1")
    graph, node = await _open(img, **{"overlap-check": opt})
    with pytest.raises(OSError):
        await node.write(0, b"\x33" * 512)
    await graph.close_all()
    assert [e["msg"] for e in corrupted_events] == [
        "Preventing invalid write on metadata (overlaps with active L1 table)"]


async def test_l2_checks_follow_new_tables(tmp_path, corrupted_events):
    """An L2 entry pointing at a free cluster is harmless until that cluster
    becomes an L2 table: the index follows the layout ("constant" does not
    look at L2 tables at all)."""
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1G")
    qemu_io("-c", "write -P 0x11 0 64k", str(img))
    free = -(-img.stat().st_size // 65536) * 65536  # the next cluster to be allocated
    _point(img, 1, free)
    graph, node = await _open(img)
    await node.write(65536, b"\x44" * 512)  # nothing there yet
    await node.write(512 << 20, b"\x55" * 512)  # a new L2 table takes the cluster
    assert node.l1[1] & ~COPIED == free
    with pytest.raises(OSError):
        await node.write(65536, b"\x66" * 512)
    await graph.close_all()
    assert [e["msg"] for e in corrupted_events] == [
        "Preventing invalid write on metadata (overlaps with active L2 table)"]


def test_templates_and_index():
    assert overlap.parse_option(None) == overlap.CACHED
    assert overlap.parse_option("all") == overlap.CACHED | overlap.INACTIVE_L2
    assert overlap.parse_option({"template": "constant", "active-l2": True}) == \
        overlap.CONSTANT | overlap.ACTIVE_L2
    assert not overlap.CONSTANT & (overlap.ACTIVE_L2 | overlap.REFCOUNT_BLOCK)
    ix = overlap.OverlapIndex(16)
    ix.add_range(overlap.ACTIVE_L1, 0x30000, 8)
    ix.add_range(overlap.SNAPSHOT_TABLE, 0x80000, 0x18000)
    ix.add_cluster(overlap.ACTIVE_L2, 0x40000)
    ix.add_cluster(overlap.INACTIVE_L2, 0x40000)
    ix.add_cluster(overlap.REFCOUNT_BLOCK, 0x20000)
    m = overlap.ALL
    assert ix.check(m, 0x100, 1) == overlap.MAIN_HEADER
    assert ix.check(m, 0x3FFF0, 8) == overlap.ACTIVE_L1  # the cluster counts, not the bytes
    assert ix.check(m, 0x50000, 0x10000) == 0
    assert ix.check(m, 0x2FFFF, 2) == overlap.ACTIVE_L1  # L1 comes before the refblock
    assert ix.check(m, 0x40000, 1) == overlap.ACTIVE_L2
    assert ix.check(m & ~overlap.ACTIVE_L2, 0x40000, 1) == overlap.INACTIVE_L2
    assert ix.check(m, 0x97000, 1) == overlap.SNAPSHOT_TABLE
    assert ix.check(m, 0x10000, 0x100000) == overlap.ACTIVE_L1
    assert ix.check(0, 0, 1 << 30) == 0


def _snapshot_layout(path) -> dict:
    """An image whose snapshot keeps its own L1 and (after a later write) its
    own L2 table; returns where the snapshot structures are."""
    qemu_img("create", "-f", "qcow2", str(path), "1M")
    qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 64k", str(path))
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io("-c", "write -P 0x33 0 64k", str(path))  # copies the shared L2 table
    with open(path, "rb") as f:
        h = f.read(72)
        snap_off = struct.unpack_from(">Q", h, 64)[0]
        f.seek(snap_off)
        snap_l1, snap_l1_size = struct.unpack(">QI", f.read(12))
        f.seek(snap_l1)
        snap_l2 = struct.unpack(">Q", f.read(8))[0] & ~COPIED
    return {"snapshot table": snap_off, "inactive L1 table": snap_l1,
            "inactive L2 table": snap_l2}


@pytest.mark.parametrize(("name", "opt", "caught"), [
    ("snapshot table", None, True), ("inactive L1 table", None, True),
    ("inactive L2 table", None, False), ("inactive L2 table", "all", True),
    ("inactive L1 table", "constant", False)])
async def test_snapshot_structures(tmp_path, corrupted_events, name, opt, caught):
    img = tmp_path / "s.qcow2"
    layout = _snapshot_layout(img)
    _point(img, 1, layout[name])  # guest cluster 1 (the active table's own entry)
    extra = {} if opt is None else {"overlap-check": opt}
    graph, node = await _open(img, **extra)
    if caught:
        with pytest.raises(OSError):
            await node.write(65536, b"\x44" * 512)
        assert [e["msg"] for e in corrupted_events] == [
            f"Preventing invalid write on metadata (overlaps with {name})"]
    else:
        await node.write(65536, b"\x44" * 512)
        assert corrupted_events == []
    await graph.close_all()
