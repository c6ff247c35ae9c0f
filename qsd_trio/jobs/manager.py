"""The daemon's jobs: lookup, registration, and cancel-all at shutdown.

``daemon.jobs`` maps job id -> :class:`~.job.Job` in creation order (QEMU
lists them newest first in query-jobs).  A job leaves the dict when it is
dismissed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..qapi.errors import DeviceNotActive, GenericError
from .job import Job, JobStatus, check_job_id

if TYPE_CHECKING:
    from ..daemon import Daemon


def find_job(daemon: Daemon, job_id: str) -> Job:
    """find_job_locked (job-qmp.c)."""
    job: Job | None = daemon.jobs.get(job_id)
    if job is None:
        raise GenericError("Job not found")
    return job


def find_block_job(daemon: Daemon, job_id: str) -> Job:
    """find_block_job_locked (blockdev.c): block-job-* commands."""
    job: Job | None = daemon.jobs.get(job_id)
    if job is None or not job.is_block_job:
        raise DeviceNotActive(f"Block job '{job_id}' not found")
    return job


def check_new_id(daemon: Daemon, job_id: str | None) -> str:
    """job_create's id checks; a missing id means the device name, "" here."""
    if job_id is None:
        job_id = ""  # nodes of a storage daemon have no BlockBackend name
    check_job_id(job_id)
    if job_id in daemon.jobs:
        raise GenericError(f"Job ID '{job_id}' already in use")
    return job_id


def register(daemon: Daemon, job: Job, speed: int | None = None) -> None:
    """job_create: the id checks, then ``job`` is added (CREATED; the speed
    is checked as QEMU does at creation).  Commands call it at the point of
    their checks where QEMU creates the job, so that a client with several
    mistakes at once sees QEMU's first error."""
    check_new_id(daemon, job.id)
    daemon.jobs[job.id] = job
    try:
        job.create(speed)
    except BaseException:
        daemon.jobs.pop(job.id, None)
        raise


def start(daemon: Daemon, job: Job) -> None:
    job.start(daemon.job_nursery)


async def drain_bounce(jobs: list[Job]) -> None:
    """A drained section over these jobs' nodes, as QEMU's drains make them see it.

    bdrv_drained_begin pauses every job on a drained node (it reaches a pause
    point: paused/standby) and drained_end resumes it.  QEMU drains all nodes
    at the start of every transaction (blockdev-backup is one) and at
    shutdown; the job events show it, so we do the same.
    """
    live = [j for j in jobs if j.status in (JobStatus.RUNNING, JobStatus.READY)
            and j.pause_count == 0 and j.started]
    for job in live:
        job.pause_count += 1
        job.kick()
    for job in live:
        with trio.move_on_after(1):
            while not job.paused and not job.is_completed:
                await job.changed.wait()
    for job in live:
        job.pause_count -= 1
        job.kick()
    # drained_end resumes them before anything else happens
    for job in live:
        with trio.move_on_after(1):
            while job.paused and not job.is_completed:
                await job.changed.wait()


async def cancel_all(daemon: Daemon) -> None:
    """Shutdown: force-cancel every job and wait until each has concluded.

    Like QEMU's job_cancel_sync_all: concluded jobs are dismissed, the rest
    end with BLOCK_JOB_CANCELLED.  Before that, the whole graph is drained
    once, which a running job sees as a pause and resume (as in QEMU).
    """
    await drain_bounce(list(daemon.jobs.values()))
    for job in list(daemon.jobs.values()):
        if job.status == JobStatus.NULL:
            continue
        job.cancel(True)
    for job in list(daemon.jobs.values()):
        await job.finished.wait()
    for job in list(daemon.jobs.values()):
        if job.status == JobStatus.CONCLUDED:
            job.cancel(True)  # dismisses it
