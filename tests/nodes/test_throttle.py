"""The throttle filter and throttle groups, in process.

Timing runs on trio's ``autojump_clock``: virtual time jumps ahead whenever
every task sleeps, so the elapsed virtual time is exactly what the leaky
buckets imposed, and the checks below are exact bounds derived from the
limits, not measurements of the machine's speed.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.throttle_group import ThrottleConfig, ThrottleGroup, groups
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node
from .test_drivers import qemu_img_compare


def _group(graph: BlockGraph, name: str, **limits) -> ThrottleGroup:
    cfg = ThrottleConfig()
    cfg.apply_limits(limits)
    g = groups(graph)[name] = ThrottleGroup(name, cfg)
    return g


async def _throttled(tmp_path, size=1 << 20, name="tg0", **limits):
    img = tmp_path / "t.raw"
    img.write_bytes(b"")
    os.truncate(img, size)
    graph = BlockGraph()
    group = _group(graph, name, **limits)
    node = await graph.add({"driver": "throttle", "node-name": "t0", "throttle-group": name,
                            "discard": "unmap",
                            "file": {"driver": "file", "filename": str(img)}})
    return graph, group, node


async def test_conformance(tmp_path):
    img = tmp_path / "img.raw"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.write_bytes(b"")
        os.truncate(img, size)
        graph = BlockGraph()
        # generous limits: the suite checks data, not time
        _group(graph, "tg", **{"bps-total": 1 << 40, "iops-total": 1 << 30})
        node = await graph.add({"driver": "throttle", "node-name": "top",
                                "throttle-group": "tg", "read-only": read_only,
                                "discard": "unmap",
                                "file": {"driver": "file", "filename": str(img),
                                         "read-only": read_only, "discard": "unmap"}})
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        qemu_img_compare(img, model, tmp_path)

    await check_block_node(factory, after_close=after_close)


@pytest.mark.parametrize("direction", ["read", "write"])
async def test_bps_lower_bound(tmp_path, autojump_clock, direction):
    bps, req, count = 64 * 1024, 16 * 1024, 16
    graph, _group_, node = await _throttled(tmp_path, **{"bps-total": bps})
    start = trio.current_time()
    for i in range(count):
        if direction == "read":
            await node.read(i * req, req)
        else:
            await node.write(i * req, bytes([i + 1]) * req)
    elapsed = trio.current_time() - start
    # the bucket admits avg/10 before throttling and the last request is
    # admitted as soon as the level falls to that allowance
    floor = (count * req - bps / 10 - req) / bps
    assert elapsed >= floor
    assert elapsed <= count * req / bps + 1e-6
    await graph.close_all()
    if direction == "write":
        data = (tmp_path / "t.raw").read_bytes()
        for i in range(count):
            assert data[i * req:(i + 1) * req] == bytes([i + 1]) * req


async def test_iops_and_directions(tmp_path, autojump_clock):
    graph, _g, node = await _throttled(tmp_path, **{"iops-write": 10})
    start = trio.current_time()
    for _ in range(20):
        await node.read(0, 512)  # reads are not limited
    assert trio.current_time() == start
    for i in range(21):
        await node.write(i * 512, b"x" * 512)
    # one write passes free (bucket allowance of avg/10 = 1 op), then 10/s
    assert trio.current_time() - start >= 1.9
    await graph.close_all()


async def test_iops_size_counts_large_requests(tmp_path, autojump_clock):
    graph, _g, node = await _throttled(tmp_path, **{"iops-total": 10, "iops-size": 4096})
    start = trio.current_time()
    for i in range(6):
        await node.write(i * 65536, bytes(65536))  # 16 units each
    # 96 units at 10/s, minus the allowance (1 unit) and the last request (16)
    assert trio.current_time() - start >= (96 - 1 - 16) / 10
    await graph.close_all()


async def test_burst(tmp_path, autojump_clock):
    # 10 KiB/s long-term, bursts of 100 KiB/s for 2 s: a 150 KiB workload in
    # 15 KiB requests may go at burst rate for the bucket's 200 KiB, so it
    # is limited by the burst rate only
    k = 1024
    graph, _g, node = await _throttled(tmp_path, **{
        "bps-write": 10 * k, "bps-write-max": 100 * k, "bps-write-max-length": 2})
    start = trio.current_time()
    for i in range(10):
        await node.write(i * 15 * k, bytes(15 * k))
    elapsed = trio.current_time() - start
    assert (150 * k - 10 * k - 15 * k) / (100 * k) <= elapsed < 2
    await graph.close_all()


async def test_group_shared_by_two_nodes(tmp_path, autojump_clock):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (a, b):
        p.write_bytes(bytes(1 << 20))
    graph = BlockGraph()
    _group(graph, "shared", **{"bps-total": 100 * 1024})
    na = await graph.add({"driver": "throttle", "node-name": "ta", "throttle-group": "shared",
                          "file": {"driver": "file", "filename": str(a)}})
    nb = await graph.add({"driver": "throttle", "node-name": "tb", "throttle-group": "shared",
                          "file": {"driver": "file", "filename": str(b)}})
    start = trio.current_time()

    async def load(node):
        for i in range(10):
            await node.write(i * 20480, bytes(20480))

    async with trio.open_nursery() as n:
        n.start_soon(load, na)
        n.start_soon(load, nb)
    # 400 KiB through one 100 KiB/s group, not 200 KiB through each
    assert trio.current_time() - start >= (400 - 10 - 20) / 100
    await graph.close_all()


async def test_reconfigure_wakes_waiters(tmp_path, autojump_clock):
    graph, group, node = await _throttled(tmp_path, **{"bps-total": 1024})
    await node.write(0, bytes(65536))  # the bucket now needs ~64 s to drain
    done = trio.Event()

    async def writer():
        await node.write(0, bytes(512))
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(1)
        assert not done.is_set()
        cfg = group.config.copy()
        cfg.apply_limits({"bps-total": 0})  # unlimited from now on
        group.configure(cfg)
        await done.wait()
    assert trio.current_time() < 2
    await graph.close_all()


async def test_open_errors(tmp_path):
    graph = BlockGraph()
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(4096))
    with pytest.raises(GenericError, match="^Throttle group 'nope' does not exist$"):
        await graph.add({"driver": "throttle", "node-name": "t", "throttle-group": "nope",
                         "file": {"driver": "file", "filename": str(img)}})
    assert not graph.nodes  # nothing half-made left behind


@pytest.mark.parametrize(("limits", "msg"), [
    ({"bps-total": 1, "bps-write": 1}, "bps/iops/max total values and read/write values "
                                       "cannot be used at the same time"),
    ({"iops-total-max": 5, "iops-total": 1, "iops-read-max": 5},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 512}, "iops size requires an iops value to be set"),
    ({"bps-read": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-read-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-read-max-length": 3}, "burst length set without burst rate"),
    ({"bps-read": 1, "bps-read-max": 10 ** 15, "bps-read-max-length": 2},
     "burst length too high for this burst rate"),
    ({"iops-write-max": 3}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-write-max": 3, "iops-write": 4}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-write-max-length": 1 << 32},
     "iops-write-max-length value must be in the range [0, 4294967295]"),
])
def test_validation(limits, msg):
    with pytest.raises(GenericError) as e:
        ThrottleConfig().apply_limits(limits)
    assert e.value.desc == msg


def test_limits_roundtrip():
    cfg = ThrottleConfig()
    cfg.apply_limits({"bps-read": 7, "iops-total": 3, "iops-total-max": 9,
                      "iops-total-max-length": 4, "iops-size": 512})
    lim = cfg.to_limits()
    assert len(lim) == 19
    assert (lim["bps-read"], lim["iops-total-max"], lim["iops-total-max-length"],
            lim["iops-size"], lim["bps-write-max-length"]) == (7, 9, 4, 512, 1)


async def _queue_writes(nursery, node, count, size):
    """Start ``count`` writes of ``size`` bytes (pattern i+1 at i*size)."""
    for i in range(count):
        nursery.start_soon(node.write, i * size, bytes([i + 1]) * size)
    await trio.sleep(1)  # virtual: the first goes, the others queue in the group


async def test_drained_section_lets_queued_requests_through(tmp_path, autojump_clock):
    """bdrv_drained_begin on a throttle node (throttle_co_drain_begin): what
    it holds back goes at once and new requests pass while drained; after
    the section, the limits apply again (the released requests counted)."""
    k = 64 * 1024
    graph, _g, node = await _throttled(tmp_path, **{"bps-total": 4096})
    async with trio.open_nursery() as n:
        await _queue_writes(n, node, 8, k)  # 512 KiB at 4 KiB/s: two minutes
        assert node.throttled
        start = trio.current_time()
        async with node.drained():
            assert not node.throttled and node.io_limits_disabled == 1
            await node.write(8 * k, b"\x09" * k)  # the drainer's own request passes
        assert trio.current_time() - start < 1
    assert node.io_limits_disabled == 0
    below = node.file.node  # reads through the filter would count too
    for i in range(9):
        assert bytes(await below.read(i * k, k)) == bytes([i + 1]) * k
    start = trio.current_time()
    await node.write(0, b"\x01")
    assert trio.current_time() - start >= (9 * k) / 4096 - 10
    await graph.close_all()


async def test_deleting_parent_releases_throttled_requests(tmp_path, autojump_clock):
    """blockdev-del of a node above a throttle filter: its close drains the
    filter, so the parent's requests queued there finish at once and land."""
    k = 64 * 1024
    graph, _g, node = await _throttled(tmp_path, **{"bps-total": 4096})
    top = await graph.add({"driver": "raw", "node-name": "top", "file": "t0"})
    async with trio.open_nursery() as n:
        await _queue_writes(n, top, 6, k)
        assert node.throttled
        start = trio.current_time()
        await graph.delete("top")
        assert trio.current_time() - start < 1
    assert node.io_limits_disabled == 0 and "top" not in graph.nodes
    for i in range(6):
        assert bytes(await node.file.node.read(i * k, k)) == bytes([i + 1]) * k
    await graph.close_all()


async def test_close_all_releases_throttled_requests(tmp_path, autojump_clock):
    """Shutdown (drain_all_begin, then close_all): queued requests land."""
    k = 64 * 1024
    graph, _g, node = await _throttled(tmp_path, **{"bps-total": 4096})
    img = node.file.node.filename
    async with trio.open_nursery() as n:
        await _queue_writes(n, node, 6, k)
        start = trio.current_time()
        graph.drain_all_begin()
        await graph.close_all()
        assert trio.current_time() - start < 1
    data = (await trio.Path(img).read_bytes())[:6 * k]
    assert data == b"".join(bytes([i + 1]) * k for i in range(6))
