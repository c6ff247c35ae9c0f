"""Persistent dirty bitmaps: qemu-img made them, we load, mark, store; qemu reads them back."""

from __future__ import annotations

import json

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_img, qemu_io
from .qemu_dirty import qemu_dirty_extents

SIZE = 4 << 20


def qemu_bitmap_extents(path, name: str, tmp_path) -> list[tuple[int, int]]:
    return qemu_dirty_extents(path, "qcow2", name, tmp_path)


def our_extents(bm) -> list[tuple[int, int]]:
    return [(off, n) for off, n, dirty in bm.dirty_extents() if dirty]


async def test_bitmaps_roundtrip(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_img("bitmap", "--add", "-g", "4096", "--disable", str(img), "b1")
    qemu_io(img, "write -P 1 0 64k", "write -P 2 1M 4k")
    async with open_qcow2(img) as node:
        b0, b1 = node.bitmaps["b0"], node.bitmaps["b1"]
        assert b0.persistent and b0.enabled and not b1.enabled
        assert our_extents(b0) == [(0, 65536), (1 << 20, 65536)]
        assert our_extents(b1) == []
        await node.write(3 << 20, b"x" * 100)
        node.add_bitmap("b2", 65536, persistent=True).set_dirty(2 << 20, 1)
    check_clean(img)
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    bms = {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}
    assert set(bms) == {"b0", "b1", "b2"}
    assert "in-use" not in bms["b0"]["flags"] and "auto" in bms["b0"]["flags"]
    assert bms["b1"]["granularity"] == 4096
    assert qemu_bitmap_extents(img, "b0", tmp_path) == [(0, 65536), (1 << 20, 65536),
                                                         (3 << 20, 65536)]
    assert qemu_bitmap_extents(img, "b2", tmp_path) == [(2 << 20, 65536)]
    # removing one (at close) frees its clusters: no leaks
    async with open_qcow2(img) as node:
        del node.bitmaps["b2"]
    info = check_clean(img)
    assert info.get("leaks", 0) == 0
    qemu_img("bitmap", "--remove", str(img), "b1")
    check_clean(img)


async def test_bitmaps_read_only(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write -P 1 64k 64k")
    before = img.read_bytes()
    async with open_qcow2(img, read_only=True) as node:
        assert our_extents(node.bitmaps["b0"]) == [(65536, 65536)]
        assert node.bitmaps["b0"].readonly
    assert img.read_bytes() == before
