"""In-process job tests: a daemon whose nurseries are the test's, and an event log."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from qsd_trio import events
from qsd_trio.daemon import Daemon
from qsd_trio.monitor import block as qmp_block  # noqa: F401 - bitmap commands
from qsd_trio.monitor import jobs as qmp_jobs  # noqa: F401 - registers the commands
from qsd_trio.monitor.registry import COMMANDS
from qsd_trio.nodes import null  # noqa: F401 - registers null-co
from qsd_trio.nodes.graph import register_driver
from qsd_trio.nodes.node import BlockStatus, Status, bulk_requests
from qsd_trio.nodes.raw import RawNode
from qsd_trio.qapi import schema


@register_driver
class DataNull(null.NullNode):
    """null-co whose blocks report as data, so that jobs copy (and rate-limit) them."""

    driver = "x-test-data-null"

    async def _co_block_status(self, offset, length):
        return BlockStatus(Status.DATA | Status.ALLOCATED, length)


@register_driver
class FailingNull(DataNull):
    """Writes fail with EIO once ``fail-after`` bytes have been written."""

    driver = "x-test-failing-null"

    async def open(self, options):
        await super().open(options)
        self.budget = options.get("fail-after", 0)

    async def _co_pwritev(self, offset, data, fua):
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(5, "Input/output error")


@register_driver
class CountingRaw(RawNode):
    """raw over its file, counting what reaches it: requests in flight at
    once (reads, writes and zero writes together), the bytes of data writes
    in flight at once, the largest request, block status calls.  Each
    request takes a little time (``delay``, seconds), so that requests a
    job issues together are seen together; the synchronous fast path is
    declined, so every request is counted.

    ``fail-reads`` / ``fail-writes``: that many requests covering the byte
    ``fail-at`` fail with EIO (ENOSPC for writes with ``enospc``)."""

    driver = "x-test-counting"

    async def open(self, options):
        await super().open(options)
        self.grows = self.file.node.grows  # qcow2 above writes past the end
        self.delay = options.get("delay", 0.001)
        self.fail_at = options.get("fail-at", -1)
        self.fail_reads = options.get("fail-reads", 0)
        self.fail_writes = options.get("fail-writes", 0)
        self.enospc = options.get("enospc", False)
        self.now = self.most = 0
        self.write_bytes_now = self.most_write_bytes = 0
        self.biggest = 0
        self.status_calls = 0
        self.data_written = 0
        self.zeroes_written = 0
        self.failed = 0
        self.bulk_reads = self.plain_reads = 0  # reads with node.bulk_requests set, without

    def _preadv_now(self, offset, length):
        return None

    def _pwritev_now(self, offset, mv):
        return False

    def _hits(self, offset, length):
        return offset <= self.fail_at < offset + length

    async def _counted(self, length, fn, *args):
        self.now += 1
        self.most = max(self.most, self.now)
        self.biggest = max(self.biggest, length)
        try:
            await trio.sleep(self.delay)
            return await fn(*args)
        finally:
            self.now -= 1

    async def _co_preadv(self, offset, length):
        if self.fail_reads and self._hits(offset, length):
            self.fail_reads -= 1
            self.failed += 1
            raise OSError(5, "Input/output error")
        if bulk_requests.get():
            self.bulk_reads += 1
        else:
            self.plain_reads += 1
        return await self._counted(length, super()._co_preadv, offset, length)

    async def _co_pwritev(self, offset, data, fua):
        n = len(data)
        if self.fail_writes and self._hits(offset, n):
            self.fail_writes -= 1
            self.failed += 1
            raise OSError(28 if self.enospc else 5, "injected")
        self.write_bytes_now += n
        self.most_write_bytes = max(self.most_write_bytes, self.write_bytes_now)
        try:
            await self._counted(n, super()._co_pwritev, offset, data, fua)
        finally:
            self.write_bytes_now -= n
        self.data_written += n

    async def _co_pwrite_zeroes(self, offset, length, may_unmap, fua, no_fallback=False):
        await self._counted(0, super()._co_pwrite_zeroes, offset, length, may_unmap, fua,
                            no_fallback)
        self.zeroes_written += length

    async def _co_block_status(self, offset, length):
        self.status_calls += 1
        return await super()._co_block_status(offset, length)


def qmp_args(**kw: Any) -> dict[str, Any]:
    """QMP arguments from keywords: ``job_id=`` is ``job-id``, None is absent.
    Nested objects are written as QMP has them."""
    return {k.replace("_", "-"): v for k, v in kw.items() if v is not None}


class Env:
    """A real :class:`Daemon` (the handlers' first argument) running its jobs
    in the test's nursery, and the events it emitted."""

    def __init__(self, nursery: trio.Nursery):
        self.daemon = Daemon()
        self.daemon.job_nursery = self.daemon.root_nursery = nursery
        self.graph = self.daemon.graph
        self.jobs = self.daemon.jobs
        self.job_nursery = nursery
        self.log: list[tuple[str, dict | None]] = []
        self._changed = trio.Event()

    def on_event(self, ev) -> None:
        self.log.append((ev.name, ev.data))
        self._changed.set()
        self._changed = trio.Event()

    async def qmp(self, name: str, **kw: Any) -> Any:
        """Run command ``name``'s handler on arguments the schema built, as
        QMP dispatch does; errors and the result come back unchanged."""
        args = schema.parse_command(name, qmp_args(**kw))
        return await COMMANDS[name].handler(self.daemon, args)

    async def wait_event(self, name: str, **match) -> dict | None:
        """Wait until an event ``name`` whose data contains ``match`` has been logged."""
        with trio.fail_after(10):
            while True:
                for n, d in self.log:
                    if n == name and all((d or {}).get(k) == v for k, v in match.items()):
                        return d
                await self._changed.wait()

    def statuses(self, job_id: str) -> list[str]:
        return [d["status"] for n, d in self.log if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    def names(self) -> list[str]:
        return [n if n != "JOB_STATUS_CHANGE" else f"{n}:{d['status']}" for n, d in self.log]


@pytest.fixture
async def env():
    async with trio.open_nursery() as nursery:
        e = Env(nursery)
        unsubscribe = events.subscribe(e.on_event)
        try:
            yield e
        finally:
            unsubscribe()
            nursery.cancel_scope.cancel()
