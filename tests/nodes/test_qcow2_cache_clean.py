"""cache-clean-interval: L2 tables unused for an interval are dropped by the
graph's timer task; data read afterwards is still right."""

import trio

from tests.nodes.qcow2_helpers import create, open_qcow2, qemu_io


async def test_unused_l2_tables_are_dropped(tmp_path, autojump_clock):
    img = tmp_path / "c.qcow2"
    # 64 KiB clusters: one L2 table maps 512 MiB; 3 GiB needs several tables
    create(img, "3G")
    for n in range(3):
        qemu_io(img, f"write -P {n + 1} {n}G 64k")
    async with open_qcow2(img, **{"cache-clean-interval": 30}) as node:
        cache = node.l2cache
        for n in range(3):
            assert bytes(await node.read(n << 30, 65536)) == bytes([n + 1]) * 65536
        assert len(cache.tables) == 3
        table_of_0 = list(cache.tables)[0]  # least recently used first
        async with trio.open_nursery() as nursery:
            await nursery.start(node.graph.run_timers)
            await trio.sleep(35)  # first tick arms the timer; nothing dropped yet
            assert len(cache.tables) == 3
            await node.read(0, 4096)  # table 0 stays in use
            await trio.sleep(35)
            assert list(cache.tables) == [table_of_0]
            nursery.cancel_scope.cancel()
        # dropped tables are read again on demand
        assert bytes(await node.read(2 << 30, 65536)) == b"\x03" * 65536


async def test_zero_interval_keeps_tables(tmp_path, autojump_clock):
    img = tmp_path / "z.qcow2"
    create(img, "1G")
    qemu_io(img, "write -P 7 0 64k")
    async with open_qcow2(img, **{"cache-clean-interval": 0}) as node:
        await node.read(0, 65536)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.graph.run_timers)
            await trio.sleep(3600)
            nursery.cancel_scope.cancel()
        assert len(node.l2cache.tables) == 1


async def test_unused_refcount_blocks_are_dropped(tmp_path, autojump_clock):
    """QEMU's timer cleans the refcount block cache too."""
    img = tmp_path / "r.qcow2"
    create(img, "64M", "cluster_size=512")  # 256 refcounts a block: 128 KiB each
    async with open_qcow2(img, **{"cache-clean-interval": 30,
                                  "refcount-cache-size": 64 * 512}) as node:
        for n in range(8):  # allocations across several refcount blocks
            await node.write(n << 20, bytes([n + 1]) * 200_000)
        await node.flush()
        refs = node.refs
        assert len(refs.blocks) > 1 and not refs.dirty
        async with trio.open_nursery() as nursery:
            await nursery.start(node.graph.run_timers)
            await trio.sleep(35)
            await trio.sleep(35)
            assert len(refs.blocks) == 0
            nursery.cancel_scope.cancel()
        await node.write(60 << 20, b"\x09" * 4096)  # blocks are read again on demand
        assert bytes(await node.read(0, 4096)) == b"\x01" * 4096
