"""One conformance suite for every block driver and filter.

Usage from a driver's test module::

    from tests.nodes.conformance import check_block_node

    async def test_conformance(tmp_path):
        @contextlib.asynccontextmanager
        async def factory(size, *, read_only=False):
            graph = BlockGraph()
            node = await graph.add({...,"read-only": read_only, "discard": "unmap"})
            try:
                yield node
            finally:
                await graph.close_all()
        await check_block_node(factory)

``factory(size, read_only=False)`` is an async context manager that yields a
fresh node of exactly ``size`` bytes reading as zeroes, opened with
``discard=unmap``.  The suite compares every read against a bytearray model.
``verify(node, model)`` (optional) runs after each writing check, before the
node is closed; ``after_close(model)`` after it is closed (e.g. qemu-img check).
"""

from __future__ import annotations

import errno
import random

import trio

from qsd_trio.nodes.node import BlockNode, Status

SIZE = 4 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def read_all(node: BlockNode, offset: int, length: int) -> bytes:
    return bytes(await node.read(offset, length))


async def check_equal(node: BlockNode, model: bytearray, chunk: int = 1 << 20) -> None:
    for off in range(0, len(model), chunk):
        n = min(chunk, len(model) - off)
        got = await read_all(node, off, n)
        if got != model[off:off + n]:
            bad = next(i for i in range(n) if got[i] != model[off + i])
            raise AssertionError(f"mismatch at {off + bad}: {got[bad]} != {model[off + bad]}")


async def _writes(node, model, rnd):
    offsets = [0, 1, 511, 4095, 65535, 65536 * 3 - 7, len(model) - 4096, len(model) - 1]
    for i, off in enumerate(offsets):
        n = min(rnd.choice([1, 512, 4096, 70000, 131072 + 3]), len(model) - off)
        data = pattern(i, n)
        await node.write(off, data)
        model[off:off + n] = data
    # every buffer type the API promises to take
    await node.write(8192, bytearray(b"B" * 100))
    model[8192:8292] = b"B" * 100
    await node.write(9000, memoryview(b"xyz" * 50)[10:110])
    model[9000:9100] = (b"xyz" * 50)[10:110]
    await check_equal(node, model)


async def _zeroes(node, model, rnd):
    await node.write(0, b"\xaa" * (1 << 20))
    model[0:1 << 20] = b"\xaa" * (1 << 20)
    for off, n, unmap in [(100, 1000, False), (65536, 65536, True), (200000, 300001, True),
                          (700000, 4096, False)]:
        await node.write_zeroes(off, n, may_unmap=unmap)
        model[off:off + n] = bytes(n)
    await check_equal(node, model)


async def _discard(node, model, rnd):
    data = pattern(7, 1 << 20)
    await node.write(0, data)
    model[0:1 << 20] = data
    off, n = 131072, 262144
    await node.discard(off, n)
    got = await read_all(node, 0, 1 << 20)
    assert got[:off] == model[:off] and got[off + n:] == model[off + n:1 << 20]
    for i in range(off, off + n, 4096):
        # discarded bytes read either as before or as zeroes
        assert got[i:i + 4096] in (model[i:i + 4096], bytes(4096)), i
    model[:1 << 20] = got


async def _status(node, model, rnd):
    await node.write(65536, b"\x01" * 65536)
    model[65536:131072] = b"\x01" * 65536
    pos, size = 0, node.length
    while pos < size:
        st = await node.block_status(pos, size - pos)
        assert 0 < st.length <= size - pos, st
        if st.flags & Status.ZERO:
            assert await read_all(node, pos, min(st.length, 1 << 20)) == bytes(
                min(st.length, 1 << 20))
        pos += st.length
    st = await node.block_status(65536, 65536)
    assert not st.flags & Status.ZERO


async def _concurrent(node, model, rnd):
    async def one(i):
        off = i * 20000
        data = pattern(100 + i, 20000)
        await node.write(off, data)
        model[off:off + 20000] = data

    async with trio.open_nursery() as n:
        for i in range(32):
            n.start_soon(one, i)
    await node.flush()
    await check_equal(node, model)


async def _drain(node, model, rnd):
    async def writer(i):
        await node.write(i * 4096, b"d" * 4096)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(writer, i)
        await trio.lowlevel.checkpoint()
        async with node.drained():
            assert node._in_flight == 0
            # the drainer itself may still do I/O
            await node.write(1 << 20, b"own")
    model[0:8 * 4096] = b"d" * 8 * 4096
    model[1 << 20:(1 << 20) + 3] = b"own"
    await check_equal(node, model)


async def _bitmap(node, model, rnd):
    bm = node.add_bitmap("b0", 65536)
    await node.write(65536 + 10, b"z" * 10)
    await node.write_zeroes(3 * 65536, 65536 + 1)
    model[65546:65556] = b"z" * 10
    model[3 * 65536:4 * 65536 + 1] = bytes(65537)
    assert bm.get(65536) and bm.get(3 * 65536) and bm.get(4 * 65536)
    assert not bm.get(0) and not bm.get(2 * 65536)
    assert bm.count() == 3 * 65536
    await check_equal(node, model)


WRITE_CHECKS = [_writes, _zeroes, _discard, _status, _concurrent, _drain, _bitmap]


async def check_block_node(factory, *, size: int = SIZE, can_resize: bool = True,
                           verify=None, after_close=None, seed: int = 0,
                           can_read_only: bool = True) -> None:
    """Run every check against fresh nodes from ``factory``."""
    for check in WRITE_CHECKS:
        model = bytearray(size)
        async with factory(size) as node:
            assert node.length == size
            await check(node, model, random.Random(seed))
            await node.flush()
            if verify:
                await verify(node, model)
        if after_close:
            await after_close(model)

    # bounds
    async with factory(size) as node:
        for bad in [(-1, 1), (size, 1) if not node.grows else (-5, 1)]:
            try:
                await node.read(*bad)
            except OSError as e:
                assert e.errno == errno.EIO
            else:
                raise AssertionError(f"read {bad} past the end succeeded")
        if not node.grows:
            for op in (lambda: node.write(size - 1, b"ab"),
                       lambda: node.write_zeroes(size, 1),
                       lambda: node.discard(size - 1, 2)):
                try:
                    await op()
                except OSError as e:
                    assert e.errno == errno.EIO
                else:
                    raise AssertionError("request past the end succeeded")

    # resize
    if can_resize:
        model = bytearray(size)
        async with factory(size) as node:
            await node.write(size - 3, b"end")
            await node.truncate(size * 2)
            assert node.length == size * 2
            model[size - 3:size] = b"end"
            model += bytes(size)
            await check_equal(node, model)
            await node.truncate(size)
            assert node.length == size
            del model[size:]
            await check_equal(node, model)
            if verify:
                await verify(node, model)
        if after_close:
            await after_close(model)

    if not can_read_only:
        return
    # read-only
    async with factory(size, read_only=True) as node:
        assert node.read_only
        await read_all(node, 0, 4096)
        for op in (lambda: node.write(0, b"x"), lambda: node.write_zeroes(0, 512),
                   lambda: node.discard(0, 512)):
            try:
                await op()
            except OSError as e:
                assert e.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
            else:
                raise AssertionError("write to a read-only node succeeded")
