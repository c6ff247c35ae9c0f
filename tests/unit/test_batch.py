"""BatchExecutor: every call runs exactly once, in order per batch, errors go
to their own caller, leadership never leaks, and queued calls share hops."""

import random
import threading
import time

import pytest
import trio

from qsd_trio.nodes.batch import BatchExecutor


async def test_many_concurrent_calls_run_once_and_share_hops():
    ex = BatchExecutor(max_leaders=2)
    seen: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        time.sleep(random.random() / 2000)
        with lock:
            seen.append(i)
        return i * 2

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        await trio.sleep(random.random() / 1000)
        results[i] = await ex.run(work, i)

    async with trio.open_nursery() as n:
        for i in range(500):
            n.start_soon(one, i)
    assert sorted(seen) == list(range(500))
    assert results == {i: i * 2 for i in range(500)}
    assert ex.leaders == 0 and not ex.queue  # no leadership left behind
    assert ex.hops < ex.calls  # batching happened


async def test_errors_reach_their_own_caller():
    ex = BatchExecutor(max_leaders=1)

    def work(i: int) -> int:
        if i % 3 == 0:
            raise OSError(5, "Input/output error")
        return i

    outcomes: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await ex.run(work, i)
        except OSError as e:
            outcomes[i] = e.errno

    async with trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(one, i)
    assert outcomes == {i: (5 if i % 3 == 0 else i) for i in range(30)}


async def test_cancelled_caller_still_completes_its_call():
    ex = BatchExecutor(max_leaders=1)
    done = []

    def slow() -> None:
        time.sleep(0.05)
        done.append(1)

    with trio.move_on_after(0.01) as scope:
        await ex.run(slow)
    assert scope.cancelled_caught  # the caller sees the cancellation ...
    assert done == [1]  # ... after the call completed
    with pytest.raises(ZeroDivisionError):
        await ex.run(lambda: 1 / 0)
