"""jobs/chunked.py on its own: fake I/O in virtual time (autojump clock)."""

from __future__ import annotations

import pytest
import trio

from qsd_trio.jobs.chunked import ChunkCopier
from qsd_trio.jobs.job import RateLimit

MiB = 1 << 20


class FakeJob:
    def __init__(self, speed: int = 0) -> None:
        self.limit = RateLimit()
        self.limit.set_speed(speed)
        self.progress_current = 0
        self.pause = False
        self.is_cancelled = False

    def _should_pause(self) -> bool:
        return self.pause


class Disk:
    """plan: data everywhere but holes; copy: takes 10 ms, may fail once at ``bad``."""

    def __init__(self, holes=(), bad: int = -1, bad_status: int = -1) -> None:
        self.holes = holes
        self.bad = bad
        self.bad_status = bad_status
        self.copied: list[tuple[int, int]] = []
        self.issued: list[int] = []

    async def plan(self, offset, n):
        if offset <= self.bad_status < offset + n:
            n = self.bad_status - offset
            if n == 0:
                self.bad_status = -1
                raise OSError(5, "Input/output error")
        for a, b in self.holes:
            if a <= offset < b:
                return b - offset, None
            if offset < a:
                n = min(n, a - offset)
        return n, "data"

    async def copy(self, offset, n, what):
        assert what == "data"
        self.issued.append(offset)
        await trio.sleep(0.01)
        if offset <= self.bad < offset + n:
            self.bad = -1
            raise OSError(5, "Input/output error")
        self.copied.append((offset, n))


async def _run(copier, job, errors=None):
    while not copier.done:
        await trio.sleep(job.limit.delay())
        err = await copier.window()
        if err is not None and errors is not None:
            errors.append(err)


@pytest.mark.parametrize("chunk, most", [(4 * MiB, 4), (MiB, 16), (256 << 10, 16)])
async def test_in_flight_bounded_by_tasks_and_bytes(autojump_clock, chunk, most):
    job, disk = FakeJob(), Disk()
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=chunk)
    await _run(copier, job)
    assert copier.max_in_flight == most
    assert sum(n for _, n in disk.copied) == job.progress_current == 64 * MiB


async def test_holes_count_as_progress_and_are_not_copied(autojump_clock):
    job, disk = FakeJob(), Disk(holes=[(8 * MiB, 24 * MiB), (60 * MiB, 64 * MiB)])
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=4 * MiB)
    await _run(copier, job)
    assert job.progress_current == 64 * MiB
    assert sum(n for _, n in disk.copied) == 44 * MiB
    assert all(not (8 * MiB <= o < 24 * MiB) for o, _ in disk.copied)


async def test_a_failed_chunk_is_returned_once_and_copied_again(autojump_clock):
    job, disk = FakeJob(), Disk(bad=9 * MiB)
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=MiB)
    errors: list = []
    await _run(copier, job, errors)
    assert [e.errno for e in errors] == [5]
    # every byte copied exactly once, the failed MiB included
    spans = sorted(disk.copied)
    assert spans == [(o, MiB) for o in range(0, 64 * MiB, MiB)]
    assert job.progress_current == 64 * MiB


async def test_speed(autojump_clock):
    job, disk = FakeJob(speed=4 * MiB), Disk()
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=512 << 10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run, copier, job)
        await trio.sleep(1)
        # the first 100 ms slice, then the quota: about 4 MiB in a second
        assert 3 * MiB <= job.progress_current <= 5 * MiB
        nursery.cancel_scope.cancel()


async def test_pause_stops_issuing(autojump_clock):
    job, disk = FakeJob(), Disk()
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=MiB)

    async def pause_soon():
        await trio.sleep(0.025)
        job.pause = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pause_soon)
        await copier.window()
    # the window ended with nothing in flight, short of the end
    assert copier.in_flight == 0 and 0 < job.progress_current < 64 * MiB
    assert job.progress_current == copier.pos


async def test_a_failed_status_query_fails_its_chunk(autojump_clock):
    job, disk = FakeJob(), Disk(bad_status=9 * MiB)
    copier = ChunkCopier(job, 64 * MiB, disk.plan, disk.copy, chunk=MiB)
    errors: list = []
    await _run(copier, job, errors)
    assert [e.errno for e in errors] == [5]
    assert sorted(disk.copied) == [(o, MiB) for o in range(0, 64 * MiB, MiB)]
    assert job.progress_current == 64 * MiB
