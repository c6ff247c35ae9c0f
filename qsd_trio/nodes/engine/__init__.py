"""The I/O engine under the file drivers: how reads, writes and syncs reach
the kernel, chosen by the ``aio`` option as in QEMU.

* ``threads`` (QEMU 7.2's default): a pool of long-lived worker threads
  (threads.py);
* ``io_uring``: one io_uring per graph (uring.py);
* ``native``: one Linux AIO context per graph (linux_aio.py), O_DIRECT only.

Every engine hands completions to trio through one descriptor that a reaper
task waits on (an eventfd, or the io_uring's own), many completions per
wakeup, and batches submissions made in one scheduler pass (base.py).
Buffers come from buffers.py; the measurements behind these choices are in
docs/io-engine.md.

The graph owns its engines (``BlockGraph.io``): they are created on first
use by a node that asks for them, and closed after the last node.
"""

from __future__ import annotations

from collections.abc import Callable

from ...qapi.errors import GenericError
from .base import Engine
from .inline_wait import make_waiter
from .linux_aio import LinuxAio
from .threads import ThreadPool
from .uring import Uring


class Engines:
    """A graph's engines, each made on first use."""

    def __init__(self) -> None:
        self._threads: ThreadPool | None = None
        self._uring: Engine | None = None
        self._aio: Engine | None = None
        self._started: list[Engine] = []  # started(), kept up to date
        self._attached: list[Engine] = []  # engines of a node's own (attach)

    @property
    def threads(self) -> ThreadPool:
        """The worker pool; also runs what no engine submits (fallocate, ...)."""
        if self._threads is None:
            self._threads = ThreadPool()
            self._update()
        return self._threads

    def get(self, aio: str) -> Engine:
        """The engine for ``aio``; QEMU's refusal when it cannot be set up."""
        if aio == "io_uring":
            if self._uring is None:
                try:
                    self._uring = Uring()
                except OSError as e:
                    # QEMU 7.2 prints a stale errno here (liburing leaves
                    # errno alone); ours is the one the kernel returned
                    raise GenericError("Unable to use io_uring: failed to init linux io_uring "
                                       f"ring: {e.strerror}") from None
                self._update()
            return self._uring
        if aio == "native":
            if self._aio is None:
                try:
                    self._aio = LinuxAio(self.threads)
                except OSError as e:
                    raise GenericError("Unable to use native AIO: failed to create linux AIO "
                                       f"context: {e.strerror}") from None
                self._update()
            return self._aio
        return self.threads

    def attach(self, engine: Engine) -> None:
        """List a node's own engine (driver=rbd's completions) with the
        graph's, so that inline waiters reap its completions too; ``detach``
        before it closes."""
        self._attached.append(engine)
        self._update()

    def detach(self, engine: Engine) -> None:
        if engine in self._attached:
            self._attached.remove(engine)
            self._update()

    def _update(self) -> None:
        # in place: inline waiters hold the list (inline_waiter)
        self._started[:] = [e for e in (self._uring, self._aio, self._threads) if e is not None]
        self._started += self._attached

    def started(self) -> list[Engine]:
        """The engines made so far (a list kept up to date: not to be changed)."""
        return self._started

    def inline_waiter(self) -> Callable[[int], bool] | None:
        """A connection's way to wait for its socket without the scheduler
        while nothing else can run (inline_wait.py); None where trio's
        loop does not allow it."""
        return make_waiter(self.started)

    async def aclose(self) -> None:
        """Wait for what is in flight on every engine, then close them."""
        for name in ("_uring", "_aio", "_threads"):
            eng = getattr(self, name)
            if eng is not None:
                setattr(self, name, None)
                self._update()
                await eng.aclose()


__all__ = ["Engine", "Engines", "ThreadPool"]
