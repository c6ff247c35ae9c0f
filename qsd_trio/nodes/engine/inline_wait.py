"""Waiting for one connection without a trip through trio's scheduler.

When a connection's reader finds its socket empty it parks in
``trio.lowlevel.wait_readable``, and when the kernel completes the request
it submitted, the engine's reaper task is woken in turn.  At queue depth 1
that is two scheduler wakeups per request (an epoll_ctl, an epoll_wait and
a task switch each): about 15 µs of CPU apiece on CPython, more than QEMU
spends on the whole request (docs/io-engine.md has the measurements).

:func:`wait_inline` does that wait itself when the rest of the process has
nothing to do, i.e. no other task is runnable.  One ``select()`` covers the
client's socket, the descriptors of the engines with requests in flight,
and trio's own epoll descriptor, which polls readable as soon as anything
else trio waits for is ready (another client, the monitor, a signal's
wakeup socket).  Completions are reaped right there (their replies are
sent by the reaper's deferred flush, as from the reaper task); a readable
socket returns to the reader, which receives without having parked;
anything else, or the time limit, returns to trio.  So no other client
waits on this one: the only thing that can be late is a timer, by at most
``MAX_WAIT`` (bounded further by trio's next deadline).

Called with no descriptor (``fd`` < 0), it waits for completions alone:
an NBD reader whose request slots are all taken waits for the replies
that give them back (a CQ ring that already holds completions is reaped
without a system call).

This reads two attributes of trio's run loop that trio does not export:
the run queue and the I/O manager's epoll object.  If a trio release
moves them, :func:`supported` turns false and every connection waits the
ordinary way (tests/nodes/test_inline_wait.py fails loudly first).
"""

from __future__ import annotations

import select
from collections.abc import Callable
from time import perf_counter as _perf_counter
from typing import Any

from .base import Engine

# the longest one wait may hold the event loop: far below anything a
# person notices, and cut to trio's next deadline, so no timer is late.
# One wait covers a device's latency and then the client's next request
# (a FUSE or NBD client at queue depth 1 sends it after the reply): at
# 0.5 ms a slow disk or a busy machine ran past it for 5-15 % of requests,
# which then went through trio's epoll (a failed read and a task wakeup,
# ~50 µs of CPU each)
MAX_WAIT = 0.005

_select = select.select


def _runner() -> Any:
    from trio._core import _run  # the run loop's internals, see the docstring
    return _run.GLOBAL_RUN_CONTEXT.runner


def supported() -> bool:
    """Whether this trio's run loop has what :func:`wait_inline` reads
    (called inside ``trio.run``)."""
    try:
        runner = _runner()
        return (hasattr(runner, "runq") and hasattr(runner, "deadlines")
                and hasattr(runner.io_manager, "_epoll"))
    except (ImportError, AttributeError, RuntimeError):
        return False


def make_waiter(engines: Callable[[], list[Engine]]) -> Callable[[int], bool] | None:
    """A ``wait_inline(fd)`` bound to this run loop, or None where the loop
    lacks what it reads.  ``engines()`` lists the engines whose completions
    it may reap: a list kept up to date in place (Engines.started), taken
    once here."""
    if not supported():
        return None
    runner = _runner()
    runq = runner.runq
    next_deadline = runner.deadlines.next_deadline
    epoll_fd = runner.io_manager._epoll.fileno()
    clock = runner.clock
    listed = engines()
    # trio's system clock is perf_counter() plus a fixed offset: read
    # perf_counter directly (this runs once or twice per request) and turn
    # the next deadline into its terms; any other clock is asked
    now_fn: Callable[[], float] = clock.current_time
    offset = getattr(clock, "offset", None)
    if isinstance(offset, float) and abs(now_fn() - _perf_counter() - offset) < 0.01:
        now_fn = _perf_counter
    else:
        offset = 0.0

    def wait_inline(fd: int) -> bool:
        """Wait until ``fd`` is readable, reaping completions meanwhile;
        True if it is, False to wait through trio instead.  With ``fd``
        negative: until a batch of completions has been reaped (True)."""
        if runq:
            return False
        limit = 0.0
        while True:
            fds = []
            busy = []
            for e in listed:
                if e.in_flight:
                    if fd < 0 and e.completions_ready():
                        # completions already in a ring need no system call
                        e.reap_now()
                        return True
                    busy.append(e)
                    fds.append(e.wake_fd)
            if fd < 0 and not busy:
                return False
            now = now_fn()
            if not limit:
                limit = now + MAX_WAIT
                deadline = next_deadline() - offset
                if deadline < limit:
                    limit = deadline
            if now >= limit:
                return False
            fds.append(epoll_fd)
            if fd >= 0:
                fds.append(fd)
            ready = _select(fds, (), (), limit - now)[0]
            if not ready:
                return False
            reaped = False
            for e in busy:
                if e.wake_fd in ready:
                    e.reap_now()
                    reaped = True
            if not reaped or runq:
                # something else trio waits for is ready, or a completion
                # woke a task: trio runs it
                return fd >= 0 and fd in ready
            if fd < 0 or fd in ready:
                return True

    return wait_inline


__all__ = ["MAX_WAIT", "make_waiter", "supported"]
