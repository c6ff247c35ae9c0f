"""The data plane of a virtio-blk export: a task per started virtqueue.

Shared by vhost-user-blk and VDUSE, which differ only in their control
plane: where a ring's addresses, kick eventfd and start come from
(vhost-user messages, VDUSE's messages and ioctls), how the driver is told
that buffers were used (a call eventfd, VDUSE_VQ_INJECT_IRQ) and what a
broken ring does (libvhost-user's vu_panic drops the front-end; VDUSE
reports it).

:class:`QueueWorker` serves one ring.  Its task waits on the kick eventfd
and takes every available chain; each request goes the cheapest way the
node allows (BlkHandler.start): done on the spot (a cached read, a write
into the page cache), handed to the node's I/O engine with a callback (a
large write: no task of its own), or else run in a task of its own.  A
completed request is pushed to the used ring at once; the driver is
notified once per batch: once per pass over the ring, once per engine
wakeup of completions (after_completions), once per scheduler pass of
request tasks.

:class:`Device` is one driver attached to the export (a vhost-user
front-end, a VDUSE device): its workers, and stopping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import attrs
import trio

from ...nodes.engine.base import after_completions
from .blk import STARTED, BlkHandler, Prepared
from .virtqueue import Chain, SplitQueue, VirtqueueError


@attrs.define(eq=False)
class QueueWorker:
    """One started virtqueue and the task that serves it (:meth:`run`).

    ``kick_fd`` is the eventfd the driver writes when it makes buffers
    available; it stays the caller's (closed by the transport once the
    worker has stopped).  ``signal()`` notifies the driver; ``report(text)``
    is called when the driver broke the ring (or the kick descriptor is
    unusable), after which the worker takes nothing more from it.
    """

    index: int
    queue: SplitQueue
    handler: BlkHandler
    kick_fd: int
    signal: Callable[[], None]
    report: Callable[[str], None]
    # requests started through the node without a task, not yet done
    submitted: int = 0
    # once the task has ended: nothing more is pushed to the ring
    closed: bool = False
    finished: trio.Event = attrs.field(factory=trio.Event)
    _pop_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _settled: trio.Event | None = None
    # a notification is due once the current batch has been pushed
    _notify_pending: bool = False
    _requests: trio.Nursery | None = None

    @property
    def in_flight(self) -> int:
        """Requests taken from the ring and not yet returned to it."""
        return self.queue.inuse

    def panic(self, text: str) -> None:
        self.report(f"queue {self.index}: {text}")

    def stop_popping(self) -> None:
        """Take no more requests; those in flight finish (:attr:`finished`)."""
        self._pop_scope.cancel()

    async def stop(self) -> None:
        """Stop taking requests and wait until those in flight are done."""
        self.stop_popping()
        await self.finished.wait()

    async def run(self, resubmit: Iterable[Chain] = (), *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the ring until stopped: ``resubmit`` first (chains a
        previous back-end took and never answered), then what the driver
        makes available.  Returns once every request taken is answered;
        cancelled, it leaves those still in the engine unanswered."""
        try:
            async with trio.open_nursery() as requests:
                self._requests = requests
                with self._pop_scope:
                    task_status.started()
                    for chain in resubmit:
                        requests.start_soon(self._request, chain)
                    try:
                        await self._pop_loop()
                    except VirtqueueError as e:
                        self.panic(str(e))
                    except OSError as e:
                        # a kick descriptor that cannot be polled or read
                        self.panic(f"kick descriptor: {e}")
                # popping stopped; the nursery lets request tasks finish
            while self.submitted:
                self._settled = trio.Event()
                await self._settled.wait()
        finally:
            self.closed = True
            self.finished.set()

    async def _pop_loop(self) -> None:
        queue = self.queue
        start = self.handler.start
        finished = self._finished
        requests = self._requests
        assert requests is not None
        kick = self.kick_fd
        wait_readable = trio.lowlevel.wait_readable
        while True:
            # up to a ring's worth of requests done here, then the other
            # tasks get a turn
            served = 0
            while (chain := queue.pop()) is not None:
                self.submitted += 1
                used = start(chain, finished)
                if used == STARTED:
                    continue
                self.submitted -= 1
                if not isinstance(used, int):
                    # (a Prepared request: parsed, not to be parsed again)
                    requests.start_soon(self._request, chain, used)
                    continue
                queue.push(chain.head, used)
                served += 1
                if served >= queue.size:
                    break
            if served:
                if not self._notify_pending:
                    self._notify()
                if served >= queue.size:
                    await trio.lowlevel.checkpoint()
                    continue
            await wait_readable(kick)
            try:  # (not contextlib.suppress: three calls more, once a wakeup)
                os.read(kick, 8)
            except (BlockingIOError, InterruptedError):
                pass

    def _finished(self, head: int, used: int) -> None:
        """A request started without a task is done (from the engine's
        completions, or at once): push it, notify after the batch."""
        self.submitted -= 1
        if not self.closed:
            self._push(head, used)
            if not self._notify_pending:
                self._notify_pending = True
                if not after_completions(self._notify):
                    self._notify()
        if not self.submitted and self._settled is not None:
            self._settled.set()

    async def _request(self, chain: Chain, prepared: Prepared | None = None) -> None:
        used = await self.handler.process(chain, prepared)
        if self.closed or not self._push(chain.head, used) or self._notify_pending:
            return  # the request that set it notifies for the batch
        # one notification for the requests that complete in this
        # scheduler pass (one wakes the driver's thread, costing far more
        # than a push)
        self._notify_pending = True
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._notify()

    def _push(self, head: int, used: int) -> bool:
        try:
            self.queue.push(head, used)
        except VirtqueueError as e:
            self.panic(str(e))
            return False
        return True

    def _notify(self) -> None:
        """Notify the driver, if it wants it now, of what was pushed."""
        self._notify_pending = False
        if self.closed:
            return
        try:
            if self.queue.notify_needed():
                self.signal()
        except VirtqueueError as e:
            self.panic(str(e))


class Device:
    """One driver attached to a virtio-blk export: a vhost-user front-end
    or a VDUSE device.  Its queue workers run in :attr:`nursery`, which
    the transport opens in its ``serve``."""

    def __init__(self, handler: BlkHandler, num_queues: int):
        self.handler = handler
        self.workers: list[QueueWorker | None] = [None] * num_queues
        self.nursery: trio.Nursery | None = None

    async def serve(self) -> None:
        """The transport's message loop: opens :attr:`nursery`, returns
        when the driver is gone, with every ring stopped."""
        raise NotImplementedError

    def panic(self, text: str) -> None:
        """A ring is broken (the transport reports it; vhost-user drops the
        front-end)."""
        raise NotImplementedError

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers if w is not None)

    async def start_queue(self, index: int, queue: SplitQueue, kick_fd: int, *,
                          signal: Callable[[], None], resubmit: Iterable[Chain] = ()) -> None:
        """Serve ``queue`` as ring ``index`` until :meth:`stop_queue`."""
        worker = QueueWorker(index, queue, self.handler, kick_fd, signal, self.panic)
        self.workers[index] = worker
        assert self.nursery is not None
        await self.nursery.start(worker.run, resubmit, name=f"virtqueue {index}")

    async def stop_queue(self, index: int) -> int | None:
        """Stop ring ``index`` after its requests in flight; the available
        index it stopped at, None if it was not running."""
        worker = self.workers[index]
        if worker is None:
            return None
        await worker.stop()
        self.workers[index] = None
        return worker.queue.last_avail_idx

    async def quiesce(self) -> None:
        """Stop taking requests from every ring and wait for those in flight."""
        workers = [w for w in self.workers if w is not None]
        for w in workers:
            w.stop_popping()
        for w in workers:
            await w.finished.wait()
