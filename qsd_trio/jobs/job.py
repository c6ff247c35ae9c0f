"""The job core: QEMU's job state machine, verbs, events, pauses and speed.

One :class:`Job` object per job.  Its work (``run``, written by mirror,
stream, commit, backup, create, amend) is one trio task in the daemon's job
nursery; everything else -- QMP verbs, completion, finalisation, events -- is
plain synchronous code called from the monitor or from that task, so every
transition happens at a well-defined point and never interleaves with another.

Cancellation is cooperative, as in QEMU: ``cancel`` sets a flag and wakes the
task, which stops at its next pause point (:meth:`Job.pause_point`,
:meth:`Job.sleep`).  A job is never torn out of the middle of a write, so a
cancelled job leaves every image consistent (the daemon's last-resort
``CancelScope`` only ends a job that did not stop within its shutdown
deadline).

State machine and verb table: QAPI's job.json (tools/qapi-7.2/job.json:
JobStatus, JobVerb) and QEMU's job.c.  Events, in QEMU's order:

    success   waiting, pending, [BLOCK_JOB_PENDING if not auto-finalize],
              BLOCK_JOB_COMPLETED, concluded, [null if auto-dismiss]
    failure   aborting, BLOCK_JOB_COMPLETED (with "error"), concluded, [null]
    cancel    aborting, BLOCK_JOB_CANCELLED, concluded, [null]
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from .. import events, tasks
from ..ids import id_wellformed
from ..nodes.block_copy import CopyError
from ..qapi.errors import GenericError, QapiError

if TYPE_CHECKING:
    from ..daemon import Daemon


class JobStatus(enum.StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
_ORDER = list(JobStatus)


def _row(*allowed: JobStatus) -> frozenset[JobStatus]:
    return frozenset(allowed)


# JobSTT: which transitions are legal (job.c)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: _row(S.CREATED),
    S.CREATED: _row(S.RUNNING, S.ABORTING, S.NULL),
    S.RUNNING: _row(S.PAUSED, S.READY, S.WAITING, S.ABORTING),
    S.PAUSED: _row(S.RUNNING),
    S.READY: _row(S.STANDBY, S.WAITING, S.ABORTING),
    S.STANDBY: _row(S.READY),
    S.WAITING: _row(S.PENDING, S.ABORTING),
    S.PENDING: _row(S.ABORTING, S.CONCLUDED),
    S.ABORTING: _row(S.ABORTING, S.CONCLUDED),
    S.CONCLUDED: _row(S.NULL),
    S.NULL: _row(),
}

_LIVE = (S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY)
# JobVerbTable: in which states each verb is accepted (job.c)
VERBS: dict[str, frozenset[JobStatus]] = {
    "cancel": frozenset(_LIVE + (S.WAITING, S.PENDING)),
    "pause": frozenset(_LIVE),
    "resume": frozenset(_LIVE),
    "set-speed": frozenset(_LIVE),
    "complete": frozenset((S.READY,)),
    "finalize": frozenset((S.PENDING,)),
    "dismiss": frozenset((S.CONCLUDED,)),
}


def check_job_id(job_id: str) -> None:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    if not id_wellformed(job_id):
        raise GenericError(f"Invalid job ID '{job_id}'")


class JobCancelled(Exception):
    """Raised at a pause point of a force-cancelled job; ``run`` lets it out."""


class JobTxn:
    """Jobs that succeed or fail together (transaction completion-mode=grouped)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False


class RateLimit:
    """QEMU's ratelimit.h: a quota per 100 ms slice; bursts up to one slice ahead."""

    SLICE = 0.1

    def __init__(self) -> None:
        self.speed = 0
        self.slice_end = 0.0
        self.dispatched: float = 0  # bytes; what carries over a slice is a fraction

    def set_speed(self, speed: int) -> None:
        self.speed = speed

    def processed(self, n: int) -> None:
        self.dispatched += n

    def delay(self) -> float:
        """Seconds to wait before the next request (0: go now)."""
        if not self.speed:
            return 0.0
        now = trio.current_time()  # trio's clock, so tests can run it virtually
        quota = self.speed * self.SLICE
        if self.slice_end < now:
            # a new slice; what was dispatched beyond the old quota carries on
            carry = max(self.dispatched - quota, 0) if self.slice_end else 0
            self.slice_end = now + self.SLICE
            self.dispatched = carry
        slices = self.dispatched / quota
        if slices >= 1:
            return self.slice_end - now + (slices - 1) * self.SLICE
        return 0.0


def strerror(e: BaseException) -> str:
    """The text QEMU puts in a job's error: the driver's message or strerror(errno)."""
    if isinstance(e, QapiError):
        return e.desc
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _errno(e: OSError | QapiError) -> int:
    """The errno a job that failed with ``e`` reports (EIO for QAPI errors)."""
    return (e.errno if isinstance(e, OSError) else None) or errno.EIO


def failed_reading(e: OSError) -> bool:
    """Whether a copy failed on its source side: a CopyError says which
    side; other errors count as reads."""
    return not isinstance(e, CopyError) or e.is_read


def _leaves(eg: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


class Job:
    """One job.  Subclasses set ``job_type`` and implement ``run``.

    Hooks a subclass may override (all optional): ``prepare`` (may fail the
    job), ``commit`` / ``abort`` (exactly one runs), ``clean`` (always),
    ``on_complete`` (job-complete), ``on_cancel(force) -> force``.

    Resources: a job owns only what its subclass attaches to the graph; the
    subclass releases it in ``clean``, which runs once on every path.
    """

    job_type: str = ""  # an active commit is a mirror job of type "commit"
    is_block_job: ClassVar[bool] = True

    def __init__(self, daemon: Daemon, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None) -> None:
        self.daemon = daemon
        self.id = job_id
        self.status = S.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.txn = txn if txn is not None else JobTxn()
        self.txn.jobs.append(self)

        self.progress_current = 0
        self.progress_total = 0
        self.limit = RateLimit()
        self.speed = 0

        self.pause_count = 0
        self.user_paused = False
        self.paused = False
        self.busy = False
        self._parks = 0               # times the task stopped at one of its wait points
        self.cancelled = False        # cancel requested (soft or forced)
        self.force_cancel = False
        self.started = False
        self.deferred = False         # run() returned; completion in progress
        self.ret = 0
        self.err: str | None = None
        self.io_status = "ok"
        self.ready_reached = False

        self._wake = trio.Event()
        self.changed = trio.Event()  # set (and replaced) on every transition
        self.completed_ev = trio.Event()  # reached waiting/pending/aborting or later
        self.finished = trio.Event()  # concluded (or null)
        self.cancel_scope = trio.CancelScope()
        # added by the command that starts the job: steps after run(), however
        # it ended, and after clean()
        self.after_run: list[Callable[[], Awaitable[None]]] = []
        self.after_clean: list[Callable[[], None]] = []

    # -- state ------------------------------------------------------------------
    def transition(self, new: JobStatus) -> None:
        old = self.status
        assert new in TRANSITIONS[old], f"job {self.id}: {old} -> {new}"
        self.status = new
        if self.is_completed:
            self.completed_ev.set()
        self.changed.set()
        self.changed = trio.Event()
        if new != old:
            events.emit("JOB_STATUS_CHANGE", {"status": str(new), "id": self.id})

    def apply_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise GenericError(f"Job '{self.id}' in state '{self.status}' "
                               f"cannot accept command verb '{verb}'")

    @property
    def is_ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    @property
    def is_completed(self) -> bool:
        return self.status in (S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL)

    @property
    def is_cancelled(self) -> bool:
        """Force-cancelled: the job must stop and fail with ECANCELED."""
        return self.cancelled and self.force_cancel

    def _should_pause(self) -> bool:
        return self.pause_count > 0 and not self.is_cancelled

    def kick(self) -> None:
        """Wake the task wherever it waits (job_enter)."""
        self._wake.set()
        self._wake = trio.Event()

    def idle_mark(self) -> int | None:
        """Before a verb: a mark if the task waits at one of its wait points
        (QEMU's !job->busy), None if it is busy or not running."""
        if self.started and not self.busy and not self.deferred:
            return self._parks
        return None

    async def settle(self, mark: int | None) -> None:
        """After job_start or a verb that kicked an idle job: QEMU's
        job_enter runs the job's coroutine at once, up to its next wait, so
        what the job does on the way (ready, paused, running, aborting,
        concluded, ...) is emitted before the command's reply.  Let our task
        take that step before the reply too: until it stops at a wait point
        again or finishes.  A busy job (``mark`` None) sees the verb later,
        as in QEMU, and a task that goes on working is not waited for long
        (QEMU's coroutine would have yielded for its I/O)."""
        if mark is None:
            return
        for _ in range(64):
            if self.finished.is_set() or self._parks > mark:
                return
            await trio.lowlevel.checkpoint()

    # -- what run() calls -------------------------------------------------------------
    async def pause_point(self) -> None:
        """Stop here while paused; raise JobCancelled once force-cancelled."""
        if self._should_pause():
            resume_to = S.READY if self.status == S.READY else S.RUNNING
            self.transition(S.STANDBY if self.status == S.READY else S.PAUSED)
            self.paused = True
            self.busy = False
            while self._should_pause():
                self._parks += 1
                await self._wake.wait()
            self.paused = False
            self.busy = True
            self.transition(resume_to)
        if self.is_cancelled:
            raise JobCancelled

    async def sleep(self, seconds: float) -> None:
        """job_sleep_ns: sleep unless told to pause/cancel, then a pause point."""
        if not self._should_pause() and not self.is_cancelled and seconds > 0:
            self.busy = False
            self._parks += 1
            with trio.move_on_after(seconds):
                await self._wake.wait()
            self.busy = True
        await self.pause_point()

    async def yield_(self) -> None:
        """job_yield: wait for a kick (new work, complete, cancel), then a pause point."""
        if not self._should_pause() and not self.is_cancelled:
            self.busy = False
            self._parks += 1
            await self._wake.wait()
            self.busy = True
        await self.pause_point()

    async def rate_limit(self, n: int) -> None:
        """Account ``n`` bytes just processed and wait as ``speed`` demands."""
        self.limit.processed(n)
        await self.sleep(self.limit.delay())

    def set_ready(self) -> None:
        """job_transition_to_ready: RUNNING -> READY and BLOCK_JOB_READY."""
        self.ready_reached = True
        self.transition(S.READY)
        if self.is_block_job:
            events.emit("BLOCK_JOB_READY", self.event_data())

    def error_action(self, policy: str, is_read: bool, exc: OSError) -> str:
        """block_job_error_action: decide, emit BLOCK_JOB_ERROR, stop if told to."""
        err = exc.errno or errno.EIO
        action = policy
        if policy == "enospc":
            action = "stop" if err == errno.ENOSPC else "report"
        elif policy == "auto":  # backup's default
            action = "report"
        if action == "stop":
            if not self.user_paused:
                self.pause_count += 1
                self.user_paused = True
            self.io_status = "nospace" if err == errno.ENOSPC else "failed"
        events.emit("BLOCK_JOB_ERROR", {"device": self.id,
                                        "operation": "read" if is_read else "write",
                                        "action": action})
        return action

    # -- subclass hooks --------------------------------------------------------------------
    async def run(self) -> None:
        raise NotImplementedError

    def on_cancel(self, force: bool) -> bool:
        return True  # no soft cancel: behave as if forced

    def on_complete(self) -> None:
        raise GenericError(f"The active block job '{self.id}' cannot be completed")

    def set_speed_hook(self, speed: int) -> None:
        pass

    def prepare(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def clean(self) -> None:
        pass

    # -- lifecycle ---------------------------------------------------------------------
    def create(self, speed: int | None = None) -> None:
        """job_create: CREATED and the speed check (QEMU emits null on failure)."""
        self.transition(S.CREATED)
        if speed is not None:
            try:
                self._set_speed(speed)
            except QapiError:
                self.early_fail()
                raise

    def early_fail(self) -> None:
        """job_early_fail: a job that failed before it started just goes away."""
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)
        self._do_dismiss()

    def start(self, nursery: trio.Nursery) -> None:
        """job_start: RUNNING now (before the command's reply), work in a task."""
        self.started = True
        self.busy = True
        self.transition(S.RUNNING)
        nursery.start_soon(self._main, name=f"job {self.id}")

    async def _main(self) -> None:
        with self.cancel_scope, tasks.serving(
                "job", f"{self.job_type} job {self.id}", cancel_scope=self.cancel_scope,
                moved=lambda: self.progress_current, job_id=self.id):
            try:
                await self.pause_point()
                await self._run_flat()
            except JobCancelled:
                self.ret = -errno.ECANCELED
            except trio.Cancelled:
                # the daemon's deadline: complete the bookkeeping, then go
                self.ret = -errno.ECANCELED
                self.force_cancel = self.cancelled = True
                # torn out of a pause: leave it as the pause point would have
                if self.status == S.PAUSED:
                    self.status = S.RUNNING
                elif self.status == S.STANDBY:
                    self.status = S.READY
                self._exit()
                raise
            except (OSError, QapiError) as e:
                self.ret = -_errno(e)
                self.err = strerror(e)
        if self.status not in (S.CONCLUDED, S.NULL):
            self._exit()

    async def _run_flat(self) -> None:
        """run(), with a nursery's exception group reduced to the error that matters."""
        try:
            try:
                await self.run()
            finally:
                for step in self.after_run:
                    await step()
        except BaseExceptionGroup as eg:
            leaves = list(_leaves(eg))
            for cls in (JobCancelled, OSError, QapiError):
                for e in leaves:
                    if isinstance(e, cls):
                        raise e from None
            raise

    def _exit(self) -> None:
        """job_exit: run() is over; complete in the 'main loop'."""
        self.deferred = True
        self.busy = False
        self._completed()

    def _update_rc(self) -> None:
        if not self.ret and self.is_cancelled:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.err is None:
                self.err = os.strerror(-self.ret)
            self.transition(S.ABORTING)

    def _completed(self) -> None:
        self._update_rc()
        if self.ret:
            self._txn_abort()
        else:
            self._txn_success()

    def _txn_success(self) -> None:
        self.transition(S.WAITING)
        if not all(j.is_completed for j in self.txn.jobs):
            return
        for j in list(self.txn.jobs):
            j.transition(S.PENDING)
            if not j.auto_finalize and j.is_block_job:
                events.emit("BLOCK_JOB_PENDING", {"type": j.job_type, "id": j.id})
        if not any(not j.auto_finalize for j in self.txn.jobs):
            self._do_finalize()

    def _txn_abort(self) -> None:
        txn = self.txn
        if txn.aborting:
            return  # whoever started the abort finalises everyone
        txn.aborting = True
        for other in list(txn.jobs):
            if other is not self:
                other._cancel_async(True)
                other.kick()
        # every other job must reach a completed state before anyone is
        # finalised; those still running finish it from their own task
        pending = [j for j in txn.jobs if not j.is_completed]
        if pending:
            self.daemon.job_nursery.start_soon(self._txn_abort_finish, pending)
            return
        self._txn_abort_finalize()

    async def _txn_abort_finish(self, pending: list[Job]) -> None:
        with trio.CancelScope(shield=True):
            for j in pending:
                await j.completed_ev.wait()
        self._txn_abort_finalize()

    def _txn_abort_finalize(self) -> None:
        for j in list(self.txn.jobs):
            j._finalize_single()

    def _do_finalize(self) -> None:
        """job_do_finalize: prepare everyone, then commit everyone (or abort all)."""
        for j in list(self.txn.jobs):
            if j.ret == 0:
                try:
                    j.prepare()
                except (OSError, QapiError) as e:
                    j.ret = -_errno(e)
                    j.err = strerror(e)
                j._update_rc()
                if j.ret:
                    self._txn_abort()
                    return
        for j in list(self.txn.jobs):
            j._finalize_single()

    def _finalize_single(self) -> None:
        self._update_rc()
        try:
            if not self.ret:
                self.commit()
            else:
                self.abort()
        finally:
            self._clean()
        if self.started and self.is_block_job:
            if self.is_cancelled:
                events.emit("BLOCK_JOB_CANCELLED", self.event_data())
            else:
                data = self.event_data()
                if self.ret:
                    data["error"] = self.err
                events.emit("BLOCK_JOB_COMPLETED", data)
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)
        self.transition(S.CONCLUDED)
        self.finished.set()
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _clean(self) -> None:
        try:
            self.clean()
        finally:
            for step in self.after_clean:
                step()

    def _do_dismiss(self) -> None:
        if self.daemon.jobs.get(self.id) is self:
            del self.daemon.jobs[self.id]
        self.transition(S.NULL)

    # -- verbs (QMP) ---------------------------------------------------------------
    def user_pause(self) -> None:
        self.apply_verb("pause")
        if self.user_paused:
            raise GenericError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1
        self.kick()

    def user_resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        self.apply_verb("resume")
        self.io_status = "ok"
        self.user_paused = False
        self.pause_count -= 1
        self.kick()

    def _cancel_async(self, force: bool) -> None:
        force = self.on_cancel(force)
        if self.user_paused:
            self.user_paused = False
            self.pause_count -= 1
            self.io_status = "ok"
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    def cancel(self, force: bool) -> None:
        """job_cancel_locked."""
        if self.status == S.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            self.deferred = True
            self._completed()
        elif self.deferred:
            if self.is_cancelled:
                self._txn_abort()
        else:
            self.kick()

    def user_cancel(self, force: bool) -> None:
        self.apply_verb("cancel")
        self.cancel(force)

    def complete(self) -> None:
        self.apply_verb("complete")
        if self.cancelled:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        self.on_complete()
        self.kick()

    def finalize(self) -> None:
        self.apply_verb("finalize")
        self._do_finalize()

    def dismiss(self) -> None:
        self.apply_verb("dismiss")
        self._do_dismiss()

    def _set_speed(self, speed: int) -> None:
        if speed < 0:
            raise GenericError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self.limit.set_speed(speed)
        self.set_speed_hook(speed)

    def set_speed(self, speed: int) -> None:
        self.apply_verb("set-speed")
        self._set_speed(speed)
        self.kick()

    # -- queries ---------------------------------------------------------------------
    def event_data(self) -> dict[str, Any]:
        return {"device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed, "type": self.job_type}

    def job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "current-progress": self.progress_current, "status": str(self.status),
            "total-progress": self.progress_total, "type": self.job_type, "id": self.id}
        if self.ret:
            info["error"] = self.err
        return info

    def block_job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "auto-finalize": self.auto_finalize, "io-status": self.io_status,
            "device": self.id, "auto-dismiss": self.auto_dismiss,
            "busy": self.busy, "len": self.progress_total,
            "offset": self.progress_current, "status": str(self.status),
            "paused": self.pause_count > 0, "speed": self.speed,
            "ready": self.is_ready, "type": self.job_type}
        if self.ret:
            info["error"] = self.err
        return info
