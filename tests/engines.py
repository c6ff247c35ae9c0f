"""The I/O engines of the ``file`` driver, as a user selects them (issue 11).

``aio=threads``, ``aio=io_uring`` and ``aio=native``, each with and without
``cache.direct`` (``native`` only with it: QEMU refuses it otherwise).  The
tests reach an engine through these options only, so they run against
whatever implements them.

``ENGINES`` is meant for ``pytest.mark.parametrize("engine", ENGINES)``;
``DIRECT_ENGINES`` holds the ones with O_DIRECT.
"""

from __future__ import annotations

import dataclasses
import os

import pytest


@dataclasses.dataclass(frozen=True)
class Engine:
    aio: str
    direct: bool

    def __str__(self) -> str:
        return f"{self.aio}-{'direct' if self.direct else 'cached'}"

    def options(self) -> dict:
        """Options of a ``file`` (or ``host_device``) node, for blockdev-add."""
        return {"aio": self.aio, "cache": {"direct": self.direct}}

    def keyval(self, prefix: str = "") -> str:
        """The same options in command-line syntax, each key under ``prefix``
        (e.g. ``file.`` for the file child of a format node)."""
        return (f",{prefix}aio={self.aio}"
                f",{prefix}cache.direct={'on' if self.direct else 'off'}")


ALL = [Engine("threads", False), Engine("threads", True), Engine("native", True),
       Engine("io_uring", False), Engine("io_uring", True)]
ENGINES = [pytest.param(e, id=str(e)) for e in ALL]
DIRECT_ENGINES = [pytest.param(e, id=str(e)) for e in ALL if e.direct]


def stop_clean(daemon) -> None:
    """Stop a daemon (SIGTERM: flush and close) and check it ended well:
    exit status 0 and no Python traceback on its stderr."""
    daemon.stop()
    err = daemon.stderr()
    assert "Traceback" not in err, err[-4000:]
    assert daemon.proc.returncode == 0, err[-4000:]


def drop_page_cache(path) -> None:
    """Write ``path``'s dirty pages back and drop its pages from the page
    cache, so that the next buffered reads of it (any process's) go to the
    disk: through the engine, not the page-cache fast path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def settled(eng) -> None:
    """Until an engine's requests in flight have completed (as
    Engine.aclose waits for them), for a test that started them without a
    task of its own; 60 s is a limit no passing test reaches."""
    import trio

    with trio.fail_after(60.0):
        while eng.in_flight:
            eng._idle = trio.Event()
            await eng._idle.wait()
