"""What every engine shares: requests parked on their task, completions
reaped from an eventfd in batches.

A request is submitted from the task that wants it, which then parks with
``trio.lowlevel.wait_task_rescheduled``.  One reaper task per engine waits
on the engine's eventfd (``trio.lowlevel.wait_readable``); each wakeup takes
every completion that has arrived and reschedules its task with the result.
So a thousand completions cost one wakeup of the event loop, not one each.

A parked request cannot be cancelled: the kernel (or a worker thread) owns
its buffer until the completion arrives, and a write must not be half done.
A cancelled caller gets its ``Cancelled`` at its next checkpoint, after the
request has finished; that is what makes it safe for a client to go away,
or an export to be deleted, with requests in flight (the buffers are held
by the engine's table of requests in flight until then, see buffers.py).

The reaper is a trio system task, started with the engine: engines belong
to the block graph, which is a set of plain objects any task may call (see
the design notes on nodes), and a system task outlives whichever task
opened the first file.  ``aclose()`` waits for the requests in flight and
then stops the reaper.
"""

from __future__ import annotations

import os

import outcome
import trio

_Abort = trio.lowlevel.Abort
_reschedule = trio.lowlevel.reschedule
_wait = trio.lowlevel.wait_task_rescheduled
_current_task = trio.lowlevel.current_task


def _no_abort(raise_cancel) -> _Abort:
    return _Abort.FAILED


def os_error(res: int) -> OSError:
    """The OSError for a negative errno result."""
    return OSError(-res, os.strerror(-res))


class Engine:
    """Base class: an eventfd, a reaper task, parked requests."""

    name = ""

    def __init__(self) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.in_flight = 0
        self.submitted = 0   # statistics: requests
        self.wakeups = 0     # statistics: reaper wakeups
        self._idle: trio.Event | None = None
        self._reaper_scope = trio.CancelScope()
        self._closed = False
        trio.lowlevel.spawn_system_task(self._reaper, name=f"io-engine-{self.name}")

    async def _reaper(self) -> None:
        try:
            with self._reaper_scope:
                efd = self.efd
                while True:
                    await trio.lowlevel.wait_readable(efd)
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        pass
                    self.wakeups += 1
                    self._reap()
        finally:
            self._close_fds()

    def _reap(self) -> None:
        """Reschedule the tasks of every completion that has arrived."""
        raise NotImplementedError

    def _close_fds(self) -> None:
        if self.efd >= 0:
            trio.lowlevel.notify_closing(self.efd)
            os.close(self.efd)
            self.efd = -1

    async def _park(self):
        """Wait for this task's request; returns its result."""
        return await _wait(_no_abort)

    def _finished(self, task, result) -> None:
        _reschedule(task, outcome.Value(result))
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    async def aclose(self) -> None:
        """Wait for everything in flight, then stop reaping."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            while self.in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
        self._reaper_scope.cancel()

    # -- what drivers call --------------------------------------------------
    async def read(self, fd: int, buf: memoryview, offset: int) -> int:
        """Read into ``buf`` at ``offset``; the bytes read (fewer at EOF)."""
        raise NotImplementedError

    async def write(self, fd: int, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at ``offset``."""
        raise NotImplementedError

    async def fdatasync(self, fd: int) -> None:
        raise NotImplementedError
