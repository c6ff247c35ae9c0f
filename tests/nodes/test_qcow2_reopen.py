"""blockdev-reopen of a qcow2 node with new cache options, in process: the
L2 and refcount caches really take the new sizes (and the slice size), the
dirty entries are written before the old caches go, and an image written
through both cache settings reads back as a model and checks clean.  The
replies are compared with qemu-storage-daemon in
tests/differential/test_qcow2_reopen.py."""

from __future__ import annotations

import pytest

from qsd_trio.monitor.block import _reopen_one
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.qcow2 import overlap
from qsd_trio.qapi.errors import GenericError

from .qcow2_helpers import check_clean, create, qemu_img
from .test_qcow2_node import dump

BASE = {"driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "filename": ""}}


async def _write_spread(node, model: bytearray, pattern: int, step: int) -> None:
    for off in range(0, len(model), step):
        data = bytes([pattern]) * 4096
        await node.write(off, data)
        model[off:off + 4096] = data


async def test_reopen_resizes_caches(tmp_path):
    path = tmp_path / "r.qcow2"
    size = 16 << 20
    create(path, size, "cluster_size=4096")
    opts = {**BASE, "file": {"driver": "file", "filename": str(path)}}
    graph = BlockGraph()
    node = await graph.add(opts)
    model = bytearray(size)
    try:
        assert not node.l2cache.sliced and node.overlap_mask == overlap.CACHED
        await _write_spread(node, model, 0x5A, 256 << 10)
        assert node.l2cache.dirty and node.refs.dirty  # nothing flushed yet

        tiny = {"l2-cache-entry-size": 512, "l2-cache-size": 1024,
                "refcount-cache-size": 1, "overlap-check": "all",
                "cache-clean-interval": 0}
        await _reopen_one(node, {**opts, **tiny})
        assert node.l2cache.sliced and node.l2cache.capacity == 2
        assert node.l2cache.slice_bytes == 512 and not node.l2cache.tables
        assert node.refs.capacity == 4 and len(node.refs.blocks) <= 4 and not node.refs.dirty
        assert node.overlap_mask == overlap.ALL and node.cache_clean_interval == 0
        # what was dirty is on disk: a second opener (sharing the lock) sees the writes
        out = tmp_path / "shared.raw"
        qemu_img("convert", "-U", "-O", "raw", str(path), str(out))
        assert out.read_bytes() == bytes(model)

        await _write_spread(node, model, 0xA5, 96 << 10)
        await node.flush()
        assert await node.read(0, size) == model
        for off in range(0, size, 1 << 20):  # one slice at a time: evicts the rest
            assert await node.read(off, 4096) == model[off:off + 4096]
        assert len(node.l2cache.tables) <= 2 and len(node.refs.blocks) <= 4

        # bad values: refused with QEMU's text, the caches stay as they were
        with pytest.raises(GenericError, match="L2 cache entry size must be a power of two"):
            await _reopen_one(node, {**opts, "l2-cache-entry-size": 1000})
        assert node.l2cache.slice_bytes == 512 and node.overlap_mask == overlap.ALL

        # back to the defaults: whole tables, the cache covering the image
        await _reopen_one(node, opts)
        assert not node.l2cache.sliced and node.l2cache.capacity == size // (512 * 4096)  # one per table
        assert node.overlap_mask == overlap.CACHED and node.cache_clean_interval == 600
        assert await node.read(0, size) == model
    finally:
        await graph.close_all()
    check_clean(path)
    assert dump(path, tmp_path) == bytes(model)
