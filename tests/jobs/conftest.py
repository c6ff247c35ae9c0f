"""In-process job tests: a minimal daemon (graph, jobs, job nursery) and an event log."""

from __future__ import annotations

import types

import pytest
import trio

from qsd_trio import events
from qsd_trio.monitor import block as qmp_block  # noqa: F401 - bitmap commands
from qsd_trio.monitor import jobs as qmp_jobs  # noqa: F401 - registers the commands
from qsd_trio.monitor.registry import COMMANDS
from qsd_trio.nodes import null  # noqa: F401 - registers null-co
from qsd_trio.nodes.graph import BlockGraph, register_driver
from qsd_trio.nodes.node import BlockStatus, Status


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


class Env:
    def __init__(self, nursery: trio.Nursery):
        self.graph = BlockGraph()
        self.jobs: dict = {}
        self.job_nursery = nursery
        self.log: list[tuple[str, dict | None]] = []
        self._changed = trio.Event()

    def on_event(self, ev) -> None:
        self.log.append((ev.name, ev.data))
        self._changed.set()
        self._changed = trio.Event()

    async def qmp(self, name: str, **kw):
        """Run a QMP handler with the typed-args stand-in (attribute access)."""
        args = types.SimpleNamespace(**{k: v for k, v in kw.items()})
        return await COMMANDS[name].handler(self, args)

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
