"""Internal snapshots and corruption handling, checked with qemu-img."""

from __future__ import annotations

import json
import struct

import pytest

from qsd_trio import events
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.qcow2 import snapshots
from qsd_trio.qapi.errors import GenericError

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_img, qemu_io

SIZE = 4 << 20


async def test_read_qemu_snapshots_and_write_after(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 2 64k 64k")
    qemu_img("snapshot", "-c", "s2", str(img))
    async with open_qcow2(img) as node:
        assert [s.name for s in node.snapshots] == ["s1", "s2"]
        assert [s.id for s in node.snapshots] == ["1", "2"]
        assert node.info_extra()["snapshots"][0]["name"] == "s1"
        # shared clusters: our writes must copy, not change the snapshots
        await node.write(0, b"\x03" * 100_000)
        await node.write_zeroes(512 * 1024, 65536, may_unmap=True)
        await node.discard(768 * 1024, 65536)
    check_clean(img)
    qemu_io(img, "read -P 3 0 100000", "read -P 2 100000 31072", "read -P 0 512k 64k",
            "read -P 0 768k 64k")
    qemu_img("snapshot", "-a", "s1", str(img))
    qemu_io(img, "read -P 1 0 1M")
    check_clean(img)


async def test_create_and_delete_snapshots(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_io(img, "write -P 7 0 2M", "write -c -P 8 2M 128k")
    async with open_qcow2(img) as node:
        snap = await snapshots.create(node, "mine")
        assert snap.id == "1"
        await node.write(4096, b"\x09" * 70000)
        await node.write(2 << 20, b"\x0a" * 512)
        await snapshots.create(node, "second")
    check_clean(img)
    listing = qemu_img("snapshot", "-l", str(img)).stdout
    assert "mine" in listing and "second" in listing
    qemu_io(img, "read -P 9 4096 70000", "read -P 7 0 4096")
    async with open_qcow2(img) as node:
        s = snapshots.find(node, None, "mine")
        await snapshots.delete(node, s)
        assert [x.name for x in node.snapshots] == ["second"]
        await node.write(0, b"\x0b" * 4096)
    check_clean(img)
    qemu_img("snapshot", "-a", "second", str(img))
    qemu_io(img, "read -P 9 4096 70000", "read -P 7 0 4096", "read -P 10 2M 512",
            "read -P 8 2097664 130560")
    async with open_qcow2(img) as node:
        await snapshots.delete(node, snapshots.find(node, "2", None))
    info = check_clean(img)
    assert info.get("leaks", 0) == 0


@pytest.fixture
def corrupt_events():
    seen = []
    unsub = events.subscribe(lambda ev: seen.append(ev) if ev.name ==
                             "BLOCK_IMAGE_CORRUPTED" else None)
    yield seen
    unsub()


async def test_corrupt_l2_offset_is_signalled(tmp_path, corrupt_events):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_io(img, "write -P 1 0 64k")
    raw = bytearray(img.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1_off)[0] & ~(1 << 63)
    struct.pack_into(">Q", raw, l1_off, (l2 + 512) | (1 << 63))  # unaligned L2 table
    img.write_bytes(bytes(raw))
    async with open_qcow2(img) as node:
        with pytest.raises(OSError):
            await node.read(0, 512)
        with pytest.raises(OSError):
            await node.write(0, b"x")
    assert len(corrupt_events) == 1
    data = corrupt_events[0].data
    assert data == {"device": "", "node-name": "q",
                    "msg": f"L2 table offset {l2 + 512:#x} unaligned (L1 index: 0x0)",
                    "offset": l2 + 512, "size": 65536, "fatal": True}
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    # QEMU refuses to open a corrupt image read/write, and so do we
    graph = BlockGraph()
    with pytest.raises(GenericError) as ei:
        await graph.add({"driver": "qcow2", "node-name": "q",
                         "file": {"driver": "file", "filename": str(img)}})
    assert ei.value.desc == "qcow2: Image is corrupt; cannot be opened read/write"
    assert not graph.nodes
    async with open_qcow2(img, read_only=True) as node:
        assert node.read_only


@pytest.mark.parametrize("blob,msg", [
    (b"NOPE" + bytes(100), "Image is not in qcow2 format"),
    (b"QFI\xfb\x00\x00\x00\x04" + bytes(100), "Unsupported qcow2 version 4"),
])
async def test_open_errors(tmp_path, blob, msg):
    img = tmp_path / "bad.qcow2"
    img.write_bytes(blob)
    graph = BlockGraph()
    with pytest.raises(GenericError) as ei:
        await graph.add({"driver": "qcow2", "node-name": "q",
                         "file": {"driver": "file", "filename": str(img)}})
    assert ei.value.desc == msg
    assert not graph.nodes
