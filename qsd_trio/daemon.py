"""The daemon: one root nursery, ordered startup, one shutdown sequence.

::

    root nursery
    ├── signals      SIGINT/SIGTERM/SIGHUP -> shutdown()
    ├── graph timers one task calling each node's periodic() (qcow2 cache cleaning)
    ├── monitors     one task per monitor (its chardev's clients, one at a time)
    ├── exports      NBD server, one nursery per export with its client tasks
    └── jobs         one task per block job, each in its own cancel scope

Startup carries out the command line in order through the QMP handlers
(``blockdev-add``, ``chardev-add``, ...), writes the pidfile, and only then
opens the gate (:attr:`Daemon.accepting`) that lets monitors and the NBD
server accept connections.  At that moment a service manager that set
``NOTIFY_SOCKET`` is told ``READY=1`` (:mod:`.notify`), then ``STATUS=``
lines as exports and jobs come and go, and ``STOPPING=1`` when shutdown
begins.

Shutdown (:meth:`Daemon.shutdown`) runs once, shielded, in this order:
exports (no new requests), jobs (they write to nodes), nodes (drained,
flushed, closed), monitors, pidfile; docs/design.md says why.  ``quit`` runs the first
three steps before it replies, so its client sees BLOCK_EXPORT_DELETED and
friends before the reply, as with qemu-storage-daemon.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import events, tasks
from .jobs import manager
from .memory import freeze_startup_objects
from .nodes.graph import BlockGraph
from .notify import Notifier
from .qapi.errors import QapiError, report_location
from .qapi.ghash import HashSet

if TYPE_CHECKING:
    # the export, job and NBD server modules load on demand (startup cost)
    from .exports.base import BlockExport
    from .exports.nbd.server import NbdServer
    from .jobs.job import Job
    from .objects.qom import UserObject

Action = Callable[["Daemon"], Awaitable[None]]
_V = TypeVar("_V")


class StartupError(Exception):
    """A command-line option failed: ``qsd-trio: --opt value: message``."""

    def __init__(self, option: str | None, value: str | None, message: str,
                 hint: str | None = None):
        super().__init__(message)
        self.option = option
        self.value = value
        self.message = message + (f"\n{hint}" if hint else "")

    def __str__(self) -> str:
        if self.option is None:
            return self.message
        if self.value is None:
            return f"{self.option}: {self.message}"
        return f"{self.option} {self.value}: {self.message}"


class PidFile:
    """A locked pidfile, removed at exit only if it still is ours."""

    def __init__(self, path: str):
        # absolute, so removal works after --daemonize changes directory
        self.path = os.path.abspath(path)
        self.fd = -1

    def write(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise OSError(e.errno, f"Could not create '{self.path}': {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"Cannot lock pid file: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        # an exit that skips the shutdown (QEMU's exit(1) of blkverify)
        # still removes it, as qemu-storage-daemon's atexit handler does
        atexit.register(self.remove)

    def remove(self) -> None:
        if self.fd < 0:
            return
        try:
            # only unlink the path if it still names the file we locked
            st, ours = os.stat(self.path), os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


class _Watched(dict[str, _V]):
    """A dict that calls ``changed()`` when a key is added or removed (the
    daemon's exports and jobs, for the service manager's STATUS line)."""

    def __init__(self, changed: Callable[[], None]):
        super().__init__()
        self._changed = changed

    def __setitem__(self, key: str, value: _V) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._changed()
        return value


class Daemon:
    """All state of one qsd-trio process.  ``run`` owns every task."""

    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.objects: dict[str, UserObject] = self.graph.objects
        self.chardevs: dict[str, Any] = {}
        # the ids as QEMU's /chardevs container holds them: a GHashTable,
        # whose slot order (with its history of removals) is query-chardev's
        self.chardev_slots = HashSet()
        self.notifier = Notifier()
        self._status_changed = trio.Event()
        self.exports: dict[str, BlockExport] = _Watched(self._mark_changed)
        self.nbd_server: NbdServer | None = None
        self.jobs: dict[str, Job] = _Watched(self._mark_changed)
        self.monitors: list[Any] = []
        self.objects_root = False  # QEMU creates /objects with the first object
        self.pidfile: PidFile | None = None
        # set once startup is complete: monitors and servers may accept
        self.accepting = trio.Event()
        self.root_nursery: trio.Nursery
        self.monitor_nursery: trio.Nursery
        self.export_nursery: trio.Nursery
        self.job_nursery: trio.Nursery
        self._shutdown_started = False
        self._blockers_done = trio.Event()
        self.finished = trio.Event()

    def object_users(self, id: str) -> list[str]:
        """Who refers to object ``id`` (object-del refuses while any does)."""
        users = []
        server = self.nbd_server
        if server is not None and id in (server.tls_creds, server.tls_authz):
            users.append("nbd-server")
        obj = self.objects.get(id)
        if obj is not None:  # e.g. throttle nodes of a throttle-group
            users += obj.qom_users()
        return users

    # -- the tree ------------------------------------------------------------------
    async def _hold(self, attr: str, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            setattr(self, attr, nursery)
            task_status.started()
            await trio.sleep_forever()

    async def run(self, actions: list[tuple[str, str | None, Action]],
                  pidfile: str | None = None,
                  on_started: Callable[[], None] | None = None) -> None:
        """Start, serve until shutdown, return when everything is closed.

        Raises StartupError when an option fails (after undoing what was
        started, so no socket or pidfile is left behind).
        """
        async with trio.open_nursery() as root:
            self.root_nursery = root
            await root.start(self._signals)
            await root.start(self._hold, "monitor_nursery")
            await root.start(self._hold, "export_nursery")
            await root.start(self._hold, "job_nursery")
            # the block graph's timers (cache cleaning); nodes are not tasks
            await root.start(self.graph.run_timers)
            try:
                for option, value, action in actions:
                    try:
                        with report_location(f"{option} {value}" if value else str(option)):
                            await action(self)
                    except QapiError as e:
                        raise StartupError(option, value, e.desc, e.hint) from None
                if pidfile is not None:
                    pf = PidFile(pidfile)
                    try:
                        pf.write()
                    except OSError as e:
                        # QEMU words this without the option prefix
                        raise StartupError(None, None,
                                           f"cannot create PID file: {e.strerror}") from None
                    self.pidfile = pf
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._teardown()
                self.notifier.close()
                root.cancel_scope.cancel()
                raise
            self.accepting.set()
            await root.start(tasks.print_on_sigusr1)
            self.notifier.ready()
            if self.notifier.active:
                root.start_soon(self.notifier.run_watchdog)
                root.start_soon(self._report_status)
            freeze_startup_objects()
            if on_started is not None:
                on_started()
            try:
                await self.finished.wait()
            finally:
                # normally shutdown() did this; after a crash, still don't
                # leave a pidfile naming a dead process
                if self.pidfile is not None:
                    self.pidfile.remove()
                self.notifier.close()
            root.cancel_scope.cancel()

    async def _signals(self, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
            task_status.started()
            async for _ in sigs:
                # a second signal during shutdown changes nothing: the steps
                # that protect data are shielded and run to the end
                self.root_nursery.start_soon(self.shutdown)

    def status_text(self) -> str:
        """The service manager's STATUS line: exports and running jobs."""
        running = [id for id, job in self.jobs.items()
                   if job.status in ("running", "ready")]

        def part(ids: list[str], one: str, many: str) -> str:
            word = one if len(ids) == 1 else many
            return f"{len(ids)} {word}" + (f" ({', '.join(ids)})" if ids else "")
        return (f"Serving {part(list(self.exports), 'export', 'exports')}, "
                f"{part(running, 'job running', 'jobs running')}")

    def _mark_changed(self) -> None:
        self._status_changed.set()

    async def _report_status(self) -> None:
        """Send STATUS= whenever exports or jobs change (an export added or
        deleted, a job created, dismissed, or changing state)."""
        unsubscribe = events.subscribe(lambda event: self._mark_changed())
        try:
            while not self._shutdown_started:
                self.notifier.status(self.status_text())
                await self._status_changed.wait()
                self._status_changed = trio.Event()
        finally:
            unsubscribe()

    # -- shutdown --------------------------------------------------------------------
    async def shutdown_blockers(self) -> None:
        """Steps 1-3: exports, jobs, nodes.  Idempotent; shielded."""
        if self._shutdown_started:
            await self._blockers_done.wait()
            return
        self._shutdown_started = True
        if self.accepting.is_set():  # a failed startup was never READY
            self.notifier.stopping()
        with trio.CancelScope(shield=True):
            self.graph.drain_all_begin()
            await self._stop_exports()
            await self._stop_jobs()
            await self.graph.close_all()
        self._blockers_done.set()

    async def shutdown(self) -> None:
        """The whole sequence; the process exits when it returns."""
        await self.shutdown_blockers()
        with trio.CancelScope(shield=True):
            await self._teardown()
        self.finished.set()

    async def _stop_exports(self) -> None:
        for export_id in list(self.exports):
            # an export whose task ended meanwhile (a FUSE mount unmounted
            # from outside while an earlier export stopped) took itself out
            export = self.exports.pop(export_id, None)
            if export is None:
                continue
            with trio.move_on_after(30):
                await export.stop()
            events.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
        if self.nbd_server is not None:
            server, self.nbd_server = self.nbd_server, None
            await server.stop()
        self.export_nursery.cancel_scope.cancel()

    async def _stop_jobs(self) -> None:
        if self.jobs:
            with trio.move_on_after(60):
                await manager.cancel_all(self)
        self.job_nursery.cancel_scope.cancel()

    async def _teardown(self) -> None:
        """Steps 4-5 (and the cleanup of a failed startup)."""
        await self.shutdown_blockers()  # a no-op after quit/signal shutdown
        for mon in list(self.monitors):
            await mon.drain()
        self.monitor_nursery.cancel_scope.cancel()
        for chardev in list(self.chardevs.values()):
            await chardev.aclose()
        self.chardevs.clear()
        if self.pidfile is not None:
            self.pidfile.remove()
            self.pidfile = None
