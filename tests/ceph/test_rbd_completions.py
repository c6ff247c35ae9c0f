"""driver=rbd's completions (rbd_lib's Reaper): many requests in flight at
once, and requests whose callers are cancelled.

An rbd node in a graph of the test's own, on the session's cluster: 300
writes of distinct data at once, from bytes, bytearrays and pool buffers,
with the event loop held for a second meanwhile (so that one wakeup finds
more completions than one rbd_poll_io_events call collects);
300 reads at once; then ``rbd export`` (librbd's own reader) must hold what
a model holds.  Writes whose tasks are cancelled mid-flight still complete
(librbd uses their buffers until then), so their data is there too.
Requests started without a task complete inside the reaper's batch, where
a callback may defer a call until the whole batch is handled.
"""

from __future__ import annotations

import itertools
import random
import time

import trio

from qsd_trio.nodes.engine import buffers
from qsd_trio.nodes.engine.base import after_completions, hold_submissions, submit_held
from qsd_trio.nodes.graph import BlockGraph

BLOCK = 4096
COUNT = 300


def data_for(i: int) -> bytes:
    return random.Random(i).randbytes(BLOCK)


async def open_node(cluster, image):
    graph = BlockGraph()
    node = await graph.add({"driver": "rbd", "node-name": "r", "pool": "rbd", "image": image,
                            "conf": str(cluster.conf)})
    return graph, node


def as_kind(i: int, data: bytes):
    """The write's buffer: bytes, a bytearray or a pool buffer, by turns."""
    if i % 3 == 0:
        return data
    if i % 3 == 1:
        return bytearray(data)
    buf = buffers.alloc(len(data))
    buf[:] = data
    return buf


async def start_writes(node, nursery: trio.Nursery) -> None:
    """Start the COUNT writes in ``nursery``; return once librbd has them
    all (node.write runs without a checkpoint up to the submission)."""
    started: set[int] = set()

    async def write(i: int) -> None:
        started.add(i)
        await node.write(i * BLOCK, as_kind(i, data_for(i)))

    for i in range(COUNT):
        nursery.start_soon(write, i)
    while len(started) < COUNT:
        await trio.lowlevel.checkpoint()


async def many_at_once(cluster, image) -> None:
    _graph, node = await open_node(cluster, image)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                await start_writes(node, n)
                # hold the event loop, so that completions pile up and one
                # wakeup of the reaper finds more than one poll collects
                time.sleep(1)  # noqa: ASYNC251 - blocking the loop is the point
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                got[i] = bytes(await node.read(i * BLOCK, BLOCK))
            async with trio.open_nursery() as n:
                for i in range(COUNT):
                    n.start_soon(read, i)
        assert all(got[i] == data_for(i) for i in range(COUNT))
    finally:
        await node.close()


def test_many_requests_at_once(ceph_cluster, rbd_image, tmp_path):
    trio.run(many_at_once, ceph_cluster, rbd_image)
    out = tmp_path / "x.raw"
    ceph_cluster.rbd("export", f"rbd/{rbd_image}", str(out))
    image = out.read_bytes()
    assert image[:COUNT * BLOCK] == b"".join(data_for(i) for i in range(COUNT))
    assert image[COUNT * BLOCK:] == bytes(len(image) - COUNT * BLOCK)


async def cancelled_writes(cluster, image) -> None:
    _graph, node = await open_node(cluster, image)
    try:
        with trio.fail_after(120):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as n:
                    await start_writes(node, n)
                    scope.cancel()  # every write is submitted; most are in flight
            # the nursery waited for every write: each completed despite the cancel
            await node.flush()
            for i in range(COUNT):
                assert bytes(await node.read(i * BLOCK, BLOCK)) == data_for(i), i
    finally:
        await node.close()


def test_cancelled_requests_still_complete(ceph_cluster, rbd_image):
    trio.run(cancelled_writes, ceph_cluster, rbd_image)


async def batched_replies(cluster, image) -> None:
    """Requests started without a task (read_submit/write_submit, as the NBD
    export starts them) complete inside the reaper's batch: a callback may
    defer a call (after_completions) until every completion of that wakeup
    has been handled, which is how an exporter answers a whole batch with
    one sendmsg.  The event loop is held while they complete, so one wakeup
    finds them all."""
    _graph, node = await open_node(cluster, image)
    events: list[tuple[str, int]] = []
    deferred: list[bool] = []
    left = COUNT
    all_done = trio.Event()

    def done_for(i: int):
        def done(buf, err) -> None:
            nonlocal left
            assert err is None, err
            if buf is not None:
                assert bytes(buf) == data_for(i), i
            events.append(("done", i))
            deferred.append(after_completions(lambda: events.append(("flush", i))))
            left -= 1
            if not left:
                all_done.set()
        return done

    try:
        with trio.fail_after(120):
            for i in range(COUNT):
                buf = buffers.alloc(BLOCK)
                buf[:] = data_for(i)
                assert node.write_submit(i * BLOCK, buf, done_for(i))
            time.sleep(1)  # noqa: ASYNC251 - completions pile up for one wakeup
            await all_done.wait()
            await node.flush()
            assert deferred == [True] * COUNT
            # each deferred call ran after its whole batch: none of them
            # between two completions of one wakeup
            assert events[0][0] == "done" and events[-1][0] == "flush"
            batches = [len(list(g)) for k, g in itertools.groupby(e[0] for e in events)
                       if k == "done"]
            assert len(batches) < COUNT and max(batches) > 1
            events.clear()
            deferred.clear()
            left = COUNT
            all_done = trio.Event()
            for i in range(COUNT):
                assert node.read_submit(i * BLOCK, BLOCK, done_for(i))
            time.sleep(1)  # noqa: ASYNC251
            await all_done.wait()
            assert deferred == [True] * COUNT
    finally:
        await node.close()


def test_callbacks_complete_in_batches(ceph_cluster, rbd_image):
    trio.run(batched_replies, ceph_cluster, rbd_image)


async def reaped_at_submission(cluster, image) -> None:
    """Completions that have arrived are handled when the next request is
    submitted, without waiting for the reaper task: with the event loop
    held (no checkpoint, so the reaper cannot run), the callbacks of
    finished writes run inside the next write_submit."""
    _graph, node = await open_node(cluster, image)
    finished: list[int] = []
    all_done = trio.Event()

    def done_for(i: int):
        def done(_buf, err) -> None:
            assert err is None, err
            finished.append(i)
            if len(finished) == 9:
                all_done.set()
        return done

    try:
        with trio.fail_after(120):
            for i in range(8):
                buf = buffers.alloc(BLOCK)
                buf[:] = data_for(i)
                assert node.write_submit(i * BLOCK, buf, done_for(i))
            deadline = time.monotonic() + 30
            last = buffers.alloc(BLOCK)
            last[:] = data_for(8)
            # no checkpoint from here to the assertion: only a submission
            # can have handled the completions
            while len(finished) < 8 and time.monotonic() < deadline:
                time.sleep(0.2)  # noqa: ASYNC251 - the loop must not run
                assert node.read_submit(0, BLOCK, lambda _b, _e: None)
            assert sorted(finished) == list(range(8))
            assert node.write_submit(8 * BLOCK, last, done_for(8))
            await all_done.wait()
            for i in range(9):
                assert bytes(await node.read(i * BLOCK, BLOCK)) == data_for(i), i
    finally:
        await node.close()


def test_completions_reaped_at_submission(ceph_cluster, rbd_image):
    trio.run(reaped_at_submission, ceph_cluster, rbd_image)


async def reaped_by_an_inline_wait(cluster, image) -> None:
    """The image's completions are reaped by a connection's inline wait
    (engine/inline_wait.py, as an NBD export's reader waits), not only by
    the reaper task: with the event loop held, a write's callback runs
    inside the graph's inline waiter."""
    graph, node = await open_node(cluster, image)
    try:
        wait = graph.io.inline_waiter()
        assert wait is not None
        # a first write starts the image's reaper task (parked from then on)
        await node.write(BLOCK, data_for(41))
        done: list[OSError | None] = []
        buf = buffers.alloc(BLOCK)
        buf[:] = data_for(42)
        assert node.write_submit(0, buf, lambda _b, err: done.append(err))
        deadline = time.monotonic() + 30
        # no checkpoint until the assertion: the reaper task cannot run
        while not done and time.monotonic() < deadline:
            wait(-1)  # until a batch of completions was reaped, or 5 ms
        assert done == [None]
        assert bytes(await node.read(0, BLOCK)) == data_for(42)
        assert bytes(await node.read(BLOCK, BLOCK)) == data_for(41)
    finally:
        await node.close()


def test_completions_reaped_by_an_inline_wait(ceph_cluster, rbd_image):
    trio.run(reaped_by_an_inline_wait, ceph_cluster, rbd_image)


async def submitted_views(cluster, image) -> None:
    """write_submit hands librbd a pool buffer by its address (Image.
    submit_write's own path); any other view is written as _pointer makes
    it: a read-only view and a non-contiguous one as a copy, a view of
    another format cast to bytes.  Each lands where it was written."""
    _graph, node = await open_node(cluster, image)
    pool = buffers.alloc(BLOCK)
    pool[:] = data_for(50)
    wide = bytearray(2 * BLOCK)
    wide[::2] = data_for(52)
    views = [pool, memoryview(data_for(51)), memoryview(wide)[::2],
             memoryview(bytearray(data_for(53))).cast("I")]
    done: list[OSError | None] = []
    all_done = trio.Event()

    def finished(_buf, err) -> None:
        done.append(err)
        if len(done) == len(views):
            all_done.set()

    try:
        with trio.fail_after(120):
            for i, view in enumerate(views):
                assert node.write_submit(i * BLOCK, view, finished)
            await all_done.wait()
            assert done == [None] * len(views)
            for i in range(len(views)):
                assert bytes(await node.read(i * BLOCK, BLOCK)) == data_for(50 + i), i
    finally:
        await node.close()


def test_write_submit_takes_any_view(ceph_cluster, rbd_image):
    trio.run(submitted_views, ceph_cluster, rbd_image)


async def held_writes(cluster, image) -> None:
    """Writes started without a task while a caller holds submissions (an
    NBD reader with a batch of requests: engine/base.py's hold_submissions)
    stay with the image until that caller's submit_held, then go to librbd
    one after another, in order: two writes to the same block leave the
    second's data."""
    _graph, node = await open_node(cluster, image)
    done: list[OSError | None] = []
    all_done = trio.Event()
    count = 8

    def finished(_buf, err) -> None:
        done.append(err)
        if len(done) == count + 1:
            all_done.set()

    try:
        with trio.fail_after(120):
            await node.write(0, data_for(60))  # the image's reaper exists from here
            hold_submissions()
            try:
                for i in range(count):
                    buf = buffers.alloc(BLOCK)
                    buf[:] = data_for(60 + i)
                    assert node.write_submit(i * BLOCK, buf, finished)
                last = buffers.alloc(BLOCK)
                last[:] = data_for(70)
                assert node.write_submit(0, last, finished)  # after the first, over it
                # nothing has reached librbd yet
                assert node.image.reaper is not None and node.image.reaper.in_flight == 0
            finally:
                submit_held()
            assert node.image.reaper.in_flight == count + 1
            await all_done.wait()
            assert done == [None] * (count + 1)
            assert bytes(await node.read(0, BLOCK)) == data_for(70)
            for i in range(1, count):
                assert bytes(await node.read(i * BLOCK, BLOCK)) == data_for(60 + i), i
    finally:
        await node.close()


def test_writes_held_until_the_holder_submits(ceph_cluster, rbd_image):
    trio.run(held_writes, ceph_cluster, rbd_image)
