"""qcow2 cache options: l2-cache-size, l2-cache-entry-size (L2 slices),
refcount-cache-size and cache-size, in process.

The caches must really be that big: after a workload the L2 cache holds no
more slices, and the refcount cache no more blocks, than configured (dirty
ones aside, which stay until the next flush), and reads of L2 tables are
slice-sized.  Data goes through the conformance suite and a random
workload with the smallest caches, checked with ``qemu-img check`` and
against a model.  The option errors are compared with qemu-storage-daemon
in tests/differential/test_qcow2_cache.py.
"""

from __future__ import annotations

import contextlib

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.qcow2.cluster import l2_table
from qsd_trio.nodes.qcow2.l2 import TableView, read_cache_sizes
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node
from .qcow2_helpers import check_clean, create, qemu_img
from .test_qcow2_node import dump

TINY = {"l2-cache-entry-size": 512, "l2-cache-size": 1024, "refcount-cache-size": 1}


async def _open(path, **opts):
    graph = BlockGraph()
    node = await graph.add({"driver": "qcow2", "node-name": "q", "discard": "unmap", **opts,
                            "file": {"driver": "file", "filename": str(path)}})
    return graph, node


@pytest.mark.parametrize("opts", [("cluster_size=4096",), ("extended_l2=on",)],
                         ids=["c4k", "extl2"])
async def test_conformance_with_tiny_caches(tmp_path, opts):
    paths = []

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        if not read_only or not paths:
            path = tmp_path / f"img{len(paths)}.qcow2"
            create(path, size, *opts)
            paths.append(path)
        graph, node = await _open(paths[-1], **{"read-only": read_only}, **TINY)
        assert node.l2cache.sliced and node.l2cache.capacity == 2
        assert node.refs.capacity == 4
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        check_clean(paths[-1])
        assert dump(paths[-1], tmp_path) == model

    await check_block_node(factory, after_close=after_close)


async def test_slices_are_read_and_kept_within_bounds(tmp_path):
    """512-byte slices of 4 KiB tables: a spread of reads loads slice by
    slice, and the cache never keeps more than its 4 slices."""
    path = tmp_path / "s.qcow2"
    size = 16 << 20
    create(path, size, "cluster_size=4096")
    # one cluster in every 64th: many L2 tables, every slice of them used
    cmds = [f"write -P {i % 250 + 1} {i * 64 * 4096} 4096" for i in range(size // (64 * 4096))]
    from .qcow2_helpers import qemu_io
    qemu_io(path, *cmds)
    graph, node = await _open(path, **{"l2-cache-entry-size": 512, "l2-cache-size": 2048})
    reads = []
    file = node.file
    real_read = file.read

    async def counting_read(offset, length):
        reads.append((offset, length))
        return await real_read(offset, length)

    file.read = counting_read
    try:
        for i in range(size // (64 * 4096)):
            data = await node.read(i * 64 * 4096, 4096)
            assert bytes(data) == bytes([i % 250 + 1]) * 4096
            assert len(node.l2cache.tables) <= 4
        l2_reads = [r for r in reads if r[1] != 4096]
        assert l2_reads and all(length == 512 for _, length in l2_reads)
        # 8 clusters per 512-byte slice, 64 clusters apart: each read needs a new slice
        assert len(l2_reads) == size // (64 * 4096)
        # a whole table's view: iterating and slicing see every slice
        table = await l2_table(node, 0)
        assert isinstance(table, TableView) and len(table) == 512
        assert list(table)[::64] == table[0:512:64] != [0] * 8
    finally:
        file.read = real_read
        await graph.close_all()


async def test_sliced_writes_land_and_refcount_cache_is_bounded(tmp_path):
    """Allocating writes over many refcount blocks (512-byte clusters, 256
    refcounts a block) with the smallest caches; after a flush at most 4
    refcount blocks and 2 L2 slices stay cached."""
    path = tmp_path / "w.qcow2"
    size = 2 << 20
    create(path, size, "cluster_size=512")
    graph, node = await _open(path, **TINY)
    model = bytearray(size)
    step = 37 * 512 + 100
    for i, off in enumerate(range(0, size - 2048, step)):
        data = bytes([i % 251 + 1]) * 1500
        await node.write(off, data)
        model[off:off + len(data)] = data
        if i % 25 == 0:
            await node.flush()
            assert len(node.refs.blocks) <= 4
            assert len(node.l2cache.tables) <= 2
    for off in range(0, size, 1 << 16):
        assert bytes(await node.read(off, 1 << 16)) == model[off:off + (1 << 16)]
    await graph.close_all()
    check_clean(path)
    assert dump(path, tmp_path) == model


def test_read_cache_sizes_as_qemu():
    cs, size = 65536, 64 << 30  # 64 GiB: 8 MiB of L2 tables
    full = 8 << 20
    assert read_cache_sizes({}, cs, size, 8) == (full // cs, cs, 4)
    # a cache that cannot cover the disk works in 4 KiB slices
    assert read_cache_sizes({"l2-cache-size": 1 << 20}, cs, size, 8) == (256, 4096, 4)
    assert read_cache_sizes({"l2-cache-size": 1 << 20, "l2-cache-entry-size": cs},
                            cs, size, 8) == (16, cs, 4)
    # cache-size alone: L2 first, the rest (at least 4 clusters) for refcounts
    assert read_cache_sizes({"cache-size": 16 << 20}, cs, size, 8) == (128, cs, 128)
    assert read_cache_sizes({"cache-size": 1 << 20}, cs, size, 8) == (192, 4096, 4)
    assert read_cache_sizes({"cache-size": 4 << 20, "refcount-cache-size": 1 << 20},
                            cs, size, 8) == (768, 4096, 16)
    assert read_cache_sizes({"l2-cache-size": 0}, cs, size, 8) == (2, 4096, 4)
    with pytest.raises(GenericError, match="may not be set at the same time"):
        read_cache_sizes({"cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1},
                         cs, size, 8)
    with pytest.raises(GenericError, match="^L2 cache entry size must be a power of two "
                                           r"between 512 and the cluster size \(65536\)$"):
        read_cache_sizes({"l2-cache-entry-size": 768}, cs, size, 8)


async def test_open_errors(tmp_path):
    path = tmp_path / "e.qcow2"
    create(path, 1 << 20)
    for opts, msg in [
        ({"l2-cache-entry-size": 256}, "L2 cache entry size must be a power of two "
                                       "between 512 and the cluster size (65536)"),
        ({"refcount-cache-size": 1 << 50}, "Refcount cache size too big"),
        ({"cache-clean-interval": 1 << 33}, "Cache clean interval too big"),
        ({"l2-cache-size": 3 << 20, "cache-size": 2 << 20},
         "l2-cache-size may not exceed cache-size"),
    ]:
        with pytest.raises(GenericError) as e:
            await _open(path, **opts)
        assert e.value.desc == msg
    qemu_img("check", str(path))


def test_tables_in_use_are_not_evicted():
    """A request holding a table across an await may still change it: the
    cache keeps it (beyond its size) until nobody holds it."""
    from array import array

    from qsd_trio.nodes.qcow2.l2 import L2Cache

    c = L2Cache(2, table_bytes=4096)
    held = c.put(0, array("Q", bytes(4096)))
    c.put(4096, array("Q", bytes(4096)))
    c.put(8192, array("Q", bytes(4096)))
    assert list(c.tables) == [0, 8192]  # 4096, unreferenced, went
    held[0] = 5
    c.mark_dirty(0)
    assert c.tables[0] is held and c.dirty == {0}
    del held
    c.put(12288, array("Q", bytes(4096)))
    assert 0 in c.tables  # dirty: stays until written back
    c.dirty.clear()
    c.put(16384, array("Q", bytes(4096)))
    assert 0 not in c.tables and len(c.tables) == 2
    # sliced: a view pins its slices, and writes through it mark them dirty
    s = L2Cache(2, table_bytes=4096, slice_bytes=512)
    view = s.put(0, array("Q", bytes(4096)))
    assert len(s.tables) == 8  # all held by the view
    view[70] = 9
    del view
    s.put(4096, array("Q", bytes(4096)))
    assert 512 in s.dirty and 512 in s.tables


async def test_l2_cache_covering_the_image_is_not_written_back_mid_copy(tmp_path):
    """Two L2 tables (1 GiB with 64 KiB clusters is 2 tables; here 2 tables
    of 4 KiB clusters): both dirty fill the default cache, which covers the
    image, and no metadata is written until the flush."""
    path = tmp_path / "c.qcow2"
    size = 2 * 512 * 4096  # two L2 tables of 512 entries
    create(path, size, "cluster_size=4096")
    graph, node = await _open(path)
    assert node.l2cache.capacity == 2
    flushes = []
    real_flush = node.file.flush

    async def counting_flush():
        flushes.append(1)
        await real_flush()

    node.file.flush = counting_flush
    try:
        model = bytearray(size)
        for off in range(0, size, 64 * 1024):
            data = bytes([off // 65536 % 250 + 1]) * (64 * 1024)
            await node.write(off, data)
            model[off:off + len(data)] = data
        assert len(node.l2cache.dirty) == 2 and not flushes
        await node.flush()
        assert flushes
    finally:
        node.file.flush = real_flush
        await graph.close_all()
    check_clean(path)
    assert dump(path, tmp_path) == model
