"""Allocating writes of whole runs of clusters (cluster.py's write_allocating):
a 1 MiB write into 16 new clusters links and counts them as a run; the
result must be what the same data written one cluster at a time gives."""

from __future__ import annotations

import json
import random

import pytest
import trio

from tests.nodes.qcow2_helpers import check_clean, create, open_qcow2, qemu_img

CS = 65536
RUN = 16 * CS


def metadata(node) -> tuple[list[int], dict[int, bytes], dict[int, bytes]]:
    """L1, L2 tables (by host offset) and refcount blocks, as the node holds them."""
    tables = {off: bytes(memoryview(t).cast("B")) if not hasattr(t, "parts")
              else b"".join(bytes(memoryview(p).cast("B")) for p in t.parts if p is not None)
              for off, t in node.l2cache.tables.items()}
    return list(node.l1), tables, {b: bytes(blk) for b, blk in node.refs.blocks.items()}


@pytest.mark.parametrize("opts,extra", [
    ((), {}),
    (("extended_l2=on",), {}),
    ((), {"l2-cache-entry-size": 4096}),
])
async def test_run_is_linked_as_cluster_by_cluster(tmp_path, opts, extra):
    """The same writes as whole 1 MiB runs (image A) and as 64 KiB
    clusters (image B) give identical L1, L2 tables and refcount blocks,
    in memory and on disk; some runs land on zero clusters and allocated
    clusters, whose old entries go the cluster-by-cluster way."""
    size = 8 << 20
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a, size, *opts)
    create(b, size, *opts)
    rnd = random.Random(11)
    data = rnd.randbytes(size)
    # runs 0..7 in a shuffled order: fresh ones, one over zero clusters
    # (old entries: the zero flag), one around a cluster written before,
    # one written twice (in place the second time)
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    states = []
    for path, step in ((a, RUN), (b, CS)):
        async with open_qcow2(path, **extra) as node:
            await node.write_zeroes(2 * RUN, RUN, may_unmap=False)
            # one cluster in the middle of run 5 allocated first: that run
            # is 8 new clusters, one written in place, 7 new
            mid = 5 * RUN + 8 * CS
            await node.write(mid, data[mid:mid + CS])
            for run in order + [6]:
                for off in range(run * RUN, (run + 1) * RUN, step):
                    await node.write(off, data[off:off + step])
            await node.flush()
            assert node._allocating == {}
            states.append(metadata(node))
            assert bytes(await node.read(0, size)) == data
    assert states[0] == states[1]
    for path in (a, b):
        check_clean(path)
        out = tmp_path / "out.raw"
        qemu_img("convert", "-O", "raw", str(path), str(out))
        assert out.read_bytes() == data
    maps = [json.loads(qemu_img("map", "--output=json", str(p)).stdout) for p in (a, b)]
    assert maps[0] == maps[1]
    assert a.read_bytes() == b.read_bytes()


async def test_parallel_runs_leave_nothing_in_flight(tmp_path):
    """Parallel 1 MiB allocating writes into a fresh image (a mirror's
    target): every run linked, its clusters no longer held in flight,
    every cluster counted once."""
    size = 32 << 20
    img = tmp_path / "t.qcow2"
    create(img, size)
    data = random.Random(5).randbytes(size)
    async with open_qcow2(img) as node:
        async def worker(k: int) -> None:
            for off in range(k * RUN, size, 8 * RUN):
                await node.write(off, data[off:off + RUN])
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(worker, k)
        assert node._allocating == {}
        assert bytes(await node.read(0, size)) == data
    info = check_clean(img)
    assert info.get("leaks", 0) == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == data
