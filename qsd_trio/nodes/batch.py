"""Batched thread hops for small blocking I/O.

A hop to a worker thread (``trio.to_thread.run_sync``) costs tens of
microseconds, more than a 4 KiB ``pwrite`` into the page cache.  At queue
depth 32 an NBD client has many such requests waiting at once, so instead of
one hop each, the first caller becomes a *leader*: it takes everything queued
so far into one hop and runs it there in order; callers that arrive meanwhile
queue up, and when the leader's hop returns it promotes the first of them to
lead the next batch.  Up to ``max_leaders`` batches run at a time, so one
slow request (a page-cache miss) does not hold up the rest for long.

Each call still completes even if its caller is cancelled while waiting, as
``trio.to_thread.run_sync`` does: a write that was queued is never half
done, and the caller sees the cancellation afterwards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio


class _Call:
    __slots__ = ("fn", "args", "result", "error", "finished", "promoted", "wake")

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        # leads handed to this caller: each is one batch it must run (two
        # leaders finishing at once may both hand theirs to the same waiter)
        self.promoted = 0
        self.wake = trio.Event()


def _run_batch(batch: list[_Call]) -> None:
    for call in batch:
        try:
            call.result = call.fn(*call.args)
        except BaseException as e:  # noqa: BLE001 - delivered to its own caller
            call.error = e


class BatchExecutor:
    """Runs blocking calls on worker threads, many per hop."""

    def __init__(self, max_leaders: int = 4, max_batch: int = 64):
        self.max_leaders = max_leaders
        self.max_batch = max_batch
        self.leaders = 0
        self.queue: deque[_Call] = deque()
        self.hops = 0   # statistics: thread hops taken
        self.calls = 0  # statistics: calls run

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        call = _Call(fn, args)
        self.queue.append(call)
        self.calls += 1
        with trio.CancelScope(shield=True):
            if self.leaders < self.max_leaders:
                self.leaders += 1
                await self._lead()
            while not call.finished:
                await call.wake.wait()
                call.wake = trio.Event()
                while call.promoted:
                    call.promoted -= 1
                    await self._lead()
        await trio.lowlevel.checkpoint_if_cancelled()
        if call.error is not None:
            raise call.error
        return call.result

    async def _lead(self) -> None:
        """Run one batch from the head of the queue, then pass the lead on."""
        try:
            if self.queue:
                n = min(len(self.queue), self.max_batch)
                batch = [self.queue.popleft() for _ in range(n)]
                self.hops += 1
                await trio.to_thread.run_sync(_run_batch, batch)
                for c in batch:
                    c.finished = True
                    c.wake.set()
        finally:
            if self.queue:
                nxt = self.queue[0]
                nxt.promoted += 1
                nxt.wake.set()
            else:
                self.leaders -= 1
