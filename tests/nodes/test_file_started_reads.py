"""Buffered reads submitted on worker threads start with RWF_NOWAIT
(FileNode._started_read): what the page cache holds is read right there,
the device read of the rest is started by that miss, and a worker of the
pool's wait lane (ThreadPool.submit_started_read) waits for it.

Checked on a file evicted from the page cache, with parts of it cached
again: reads that miss, reads cached after all, a read whose first page
is cached and the rest not, and one that crosses EOF, each equal to the
file's bytes (zeroes past EOF), with the node's statistics counted, and
the misses served by the wait lane, not the pool's workers.
"""

from __future__ import annotations

import os

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph
from tests.engines import drop_page_cache

PAGE = 4096
SIZE = (1 << 20) + 1000  # not a whole page: the last read crosses EOF
FOREVER = 60.0  # a limit no passing test reaches


def _cache(path, offset: int, length: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        f.read(length)


async def test_submitted_reads_start_with_nowait_and_wait_in_the_lane(tmp_path):
    path = tmp_path / "cold.raw"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    graph = BlockGraph()
    node = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        if not node._start_reads:
            pytest.skip("no RWF_NOWAIT, or the file system is in memory")
        pool = graph.io.threads
        drop_page_cache(path)
        _cache(path, 8 * PAGE, PAGE)        # a cached page
        _cache(path, 32 * PAGE, PAGE)       # the first page of a 16-page read
        _cache(path, SIZE - 1000, 1000)     # the tail before EOF
        reads = [(0, PAGE), (100 * PAGE, 2 * PAGE), (8 * PAGE, PAGE), (32 * PAGE, 16 * PAGE),
                 (200 * PAGE, PAGE), (1 << 20, PAGE), (64 * PAGE, 8 * PAGE)]
        got: dict[int, object] = {}
        all_done = trio.Event()
        for off, ln in reads:
            def done(buf, err, off=off):
                got[off] = err if err is not None else bytes(buf)
                if len(got) == len(reads):
                    all_done.set()
            assert node.read_submit(off, ln, done)
        with trio.fail_after(FOREVER):
            await all_done.wait()
        for off, ln in reads:
            want = data[off:off + ln]
            assert got[off] == want + bytes(ln - len(want)), off
        assert node.stats["rd_operations"] == len(reads)
        assert node.stats["rd_bytes"] == sum(ln for _, ln in reads)
        assert pool._lane_threads  # the misses waited in the lane
        assert not pool._lane_n and not pool.in_flight
    finally:
        await graph.close_all()
