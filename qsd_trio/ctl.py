"""qsd-trio-ctl: a control tool for people, over QMP.

``qsd-trio-ctl SOCKET COMMAND ...`` (or ``python -m qsd_trio.ctl``) connects
to a daemon's QMP monitor socket with qemu.qmp's synchronous client and
speaks QMP only, so it works against qemu-storage-daemon too wherever the
commands exist:

- ``jobs [--watch]``: the jobs (query-jobs); with ``--watch`` a progress bar,
  rate and ETA per job until every job has ended or is ready (a mirror or
  an active commit waiting for job-complete), exiting 1 if one failed or
  was cancelled;
- ``tree``: the task tree (``x-query-tasks``, a qsd-trio addition);
- ``exports``: the block exports (query-block-exports) with their clients
  when the daemon reports them (the client connections of the task tree);
- ``stats``: per-node counters (x-query-node-stats, a qsd-trio addition;
  against qemu-storage-daemon query-blockstats, whose node counters are
  zeros) and median latencies while the daemon times requests (--metrics);
- ``mirror``, ``backup``, ``stream``, ``commit``: start a job with readable
  flags and follow it to the end (``--pivot`` completes a mirror or an active
  commit once it is ready; without it the tool leaves the job ready).

Jobs the tool starts are created with ``auto-dismiss: false`` so that their
error can be read once they conclude; the tool dismisses them itself.

Exit status: 0 on success, 1 when a job failed or was cancelled or a command
returned an error, 2 when the socket cannot be reached. Terminal output goes
through rich, imported here only (the daemon never imports this module);
rich honours ``NO_COLOR`` and ``COLUMNS``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from . import tasks

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

# how often a watch asks query-jobs for progress, in seconds
POLL = 0.2

# job statuses after which a job does nothing more
_ENDED = ("concluded", "null")


class CtlError(Exception):
    """A failure the tool reports in one line and exits 1 for."""


def _console() -> Console:
    from rich.console import Console
    return Console(highlight=False)


def _connect(path: str) -> QEMUMonitorProtocol:
    client = QEMUMonitorProtocol(path)
    client.connect(negotiate=True)
    client.settimeout(60)
    return client


def _execute(qmp: QEMUMonitorProtocol, cmd: str, **args: object) -> Any:
    """Run one command; an error reply raises CtlError with QEMU's text."""
    try:
        return qmp.cmd(cmd, **args)
    except ExecuteError as e:
        if e.error_class == "CommandNotFound":
            raise CtlError(f"the daemon does not support {cmd} ({e.error.error.desc})") from e
        raise CtlError(f"{cmd}: {e.error.error.desc}") from e


# -- jobs ------------------------------------------------------------------

class JobWatch:
    """Follows jobs with a rich progress display until each one ends.

    Progress comes from query-jobs every POLL seconds; how a job ended comes
    from its last query-jobs entry (``error`` once concluded) or, when the job
    was dismissed before the tool saw it conclude, from BLOCK_JOB_COMPLETED
    (its ``error``) and BLOCK_JOB_CANCELLED.
    """

    def __init__(self, qmp: QEMUMonitorProtocol, console: Console,
                 only: set[str] | None = None) -> None:
        self.qmp = qmp
        self.console = console
        self.only = only
        self.tasks: dict[str, TaskID] = {}
        self.status: dict[str, str] = {}
        self.types: dict[str, str] = {}
        # job id -> "completed" / "failed: ..." / "cancelled"
        self.result: dict[str, str] = {}
        self.progress: Progress | None = None

    def _progress(self) -> Progress:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                        DownloadColumn(binary_units=True), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=self.console)

    def _describe(self, job_id: str) -> str:
        return f"{job_id} ({self.types.get(job_id, 'job')}) {self.status.get(job_id, '')}"

    def _track(self, job: dict[str, Any]) -> None:
        assert self.progress is not None
        job_id = job["id"]
        if self.only is not None and job_id not in self.only:
            return
        self.types[job_id] = job["type"]
        self.status[job_id] = job["status"]
        total = max(int(job["total-progress"]), 1)
        current = int(job["current-progress"])
        if job_id not in self.tasks:
            self.tasks[job_id] = self.progress.add_task(self._describe(job_id), total=total,
                                                       completed=current)
        else:
            self.progress.update(self.tasks[job_id], total=total, completed=current,
                                 description=self._describe(job_id))
        if job["status"] == "concluded" and job_id not in self.result:
            if "error" in job:
                self._end(job_id, f"failed: {job['error']}")
            else:
                self._end(job_id, "completed")

    def _end(self, job_id: str, result: str) -> None:
        assert self.progress is not None
        if job_id in self.result or job_id not in self.tasks:
            return
        self.result[job_id] = result
        task = self.tasks[job_id]
        if result == "completed":
            # a job dismissed at once is seen only through its event
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total)
        self.status[job_id] = result.split(":")[0]
        self.progress.update(task, description=self._describe(job_id))
        self.progress.stop_task(task)
        self.progress.console.print(f"{job_id}: {result}", markup=False)

    def _events(self) -> None:
        for event in self.qmp.get_events():
            name = event["event"]
            data = event.get("data", {})
            job_id = data.get("device") or data.get("id")
            if name == "JOB_STATUS_CHANGE" and job_id in self.status:
                self.status[job_id] = data["status"]
            elif name == "BLOCK_JOB_COMPLETED" and job_id in self.tasks:
                self._end(job_id, f"failed: {data['error']}" if "error" in data else "completed")
            elif name == "BLOCK_JOB_CANCELLED" and job_id in self.tasks:
                self._end(job_id, "cancelled")

    def poll(self) -> list[dict[str, Any]]:
        """One round: query-jobs, then the events that came before its reply."""
        jobs: list[dict[str, Any]] = _execute(self.qmp, "query-jobs")
        self._events()
        for job in jobs:
            self._track(job)
        present = {job["id"] for job in jobs}
        for job_id in self.tasks:
            if job_id not in present and job_id not in self.result:
                # gone without an event: a job that is not a block job
                self._end(job_id, "completed")
        return jobs

    def running(self) -> list[str]:
        return [j for j in self.tasks if j not in self.result]

    def run(self, *, at_ready: str = "wait") -> None:
        """Watch until every tracked job has ended; a job that starts
        meanwhile is tracked too. A job that becomes ready (mirror, active
        commit) is waited for (``at_ready="wait"``), completed once
        (``"complete"``: job-complete), or counts as ended (``"stop"``)."""
        completing: set[str] = set()
        with self._progress() as self.progress:
            while True:
                self.poll()
                running = self.running()
                ready = [j for j in running if self.status.get(j) == "ready"]
                if at_ready == "stop":
                    running = [j for j in running if j not in ready]
                elif at_ready == "complete":
                    for job_id in ready:
                        if job_id not in completing:
                            completing.add(job_id)
                            _execute(self.qmp, "job-complete", id=job_id)
                            self.progress.console.print(f"{job_id}: ready, completing (pivot)",
                                                        markup=False)
                if not running:
                    return
                time.sleep(POLL)

    def failed(self) -> list[str]:
        return [j for j, r in self.result.items() if r != "completed"]


def cmd_jobs(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    if not args.watch:
        from rich.table import Table
        table = Table("id", "type", "status", "progress", "error")
        for job in _execute(qmp, "query-jobs"):
            total = job["total-progress"]
            pct = 100 * job["current-progress"] / total if total else 0
            table.add_row(job["id"], job["type"], job["status"],
                          f"{job['current-progress']}/{total} ({pct:.0f}%)",
                          job.get("error", ""))
        console.print(table)
        return 0
    watch = JobWatch(qmp, console)
    # a ready job waits for job-complete or job-cancel, which this
    # command will not send: it counts as ended
    watch.run(at_ready="stop")
    if not watch.tasks:
        console.print("no jobs")
    for job_id in watch.running():
        console.print(f"{job_id}: ready (job-complete or job-cancel ends it)", markup=False)
    return 1 if watch.failed() else 0


def follow(qmp: QEMUMonitorProtocol, console: Console, job_id: str, pivot: bool) -> int:
    """Follow a job the tool started to its end; complete it once ready when
    ``pivot`` is set, else leave it ready. Dismisses the concluded job."""
    watch = JobWatch(qmp, console, only={job_id})
    watch.run(at_ready="complete" if pivot else "stop")
    if job_id not in watch.result:
        console.print(f"{job_id}: ready; not completed (job-complete pivots to the target, "
                      f"job-cancel ends the job and keeps the source)", markup=False)
        return 0
    result = watch.result[job_id]
    try:
        _execute(qmp, "job-dismiss", id=job_id)
    except CtlError:
        pass  # already gone (dismissed by someone else)
    return 0 if result == "completed" else 1


def _start(qmp: QEMUMonitorProtocol, console: Console, cmd: str, job_id: str,
           pivot: bool, **args: object) -> int:
    args = {k: v for k, v in args.items() if v is not None}
    _execute(qmp, cmd, **{"job-id": job_id, "auto-dismiss": False, **args})
    console.print(f"{job_id}: {cmd} started")
    return follow(qmp, console, job_id, pivot)


def cmd_mirror(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    return _start(qmp, console, "blockdev-mirror", args.job_id or "mirror0", args.pivot,
                  device=args.source, target=args.target, sync=args.sync, speed=args.speed)


def cmd_backup(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    return _start(qmp, console, "blockdev-backup", args.job_id or "backup0", False,
                  device=args.source, target=args.target, sync=args.sync, speed=args.speed)


def cmd_stream(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    return _start(qmp, console, "block-stream", args.job_id or "stream0", False,
                  device=args.node, **{"base-node": args.base}, speed=args.speed)


def cmd_commit(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    return _start(qmp, console, "block-commit", args.job_id or "commit0", args.pivot,
                  device=args.node, **{"top-node": args.top, "base-node": args.base},
                  speed=args.speed)


# -- tree, exports, stats -----------------------------------------------------

def _label(node: dict[str, Any], now: float) -> str:
    from rich.markup import escape
    return " ".join([f"{node['kind']} [bold]{escape(node['name'])}[/bold]",
                     *(escape(p) for p in tasks.describe(node, now))])


def cmd_tree(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    from rich.tree import Tree
    root = _execute(qmp, "x-query-tasks")
    now = time.time()

    def add(parent: Tree, node: dict[str, Any]) -> None:
        branch = parent.add(_label(node, now))
        for child in node["children"]:
            add(branch, child)

    tree = Tree(_label(root, now))
    for child in root["children"]:
        add(tree, child)
    console.print(tree)
    return 0


def _clients(qmp: QEMUMonitorProtocol) -> dict[str, list[str]] | None:
    """Export id -> client addresses, from the task tree; None when the
    daemon has no task tree (qemu-storage-daemon)."""
    try:
        root: dict[str, Any] = _execute(qmp, "x-query-tasks")
    except CtlError:
        return None
    out: dict[str, list[str]] = {}

    def walk(node: dict[str, Any]) -> None:
        if node["kind"] == "client-connection" and "export-id" in node:
            out.setdefault(node["export-id"], []).append(node.get("client", "?"))
        for child in node["children"]:
            walk(child)

    walk(root)
    return out


def cmd_exports(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    from rich.table import Table
    exports = _execute(qmp, "query-block-exports")
    clients = _clients(qmp)
    table = Table("id", "type", "node", "state", "clients")
    for e in exports:
        who = ("(not reported)" if clients is None
               else ", ".join(clients.get(e["id"], [])) or "none")
        table.add_row(e["id"], e["type"], e["node-name"],
                      "shutting down" if e["shutting-down"] else "running", who)
    console.print(table)
    return 0


def _node_stats(qmp: QEMUMonitorProtocol) -> tuple[list[dict[str, Any]], bool]:
    """The nodes' BlockStats and whether they hold counters: qsd-trio's
    x-query-node-stats does; qemu-storage-daemon counts requests only in
    BlockBackends, so its query-blockstats node entries are zeros."""
    try:
        return _execute(qmp, "x-query-node-stats"), True
    except CtlError:
        return _execute(qmp, "query-blockstats", **{"query-nodes": True}), False


def _latency(stats: dict[str, Any], key: str) -> str:
    """The median latency from a histogram, as "<= bound"."""
    hist = stats.get(key)
    if not hist or not sum(hist["bins"]):
        return ""
    half, seen = sum(hist["bins"]) / 2, 0
    for bound, count in zip([*hist["boundaries"], None], hist["bins"], strict=True):
        seen += count
        if seen >= half:
            return "slower" if bound is None else f"<={bound / 1000:g}µs"
    return ""


def cmd_stats(qmp: QEMUMonitorProtocol, console: Console, args: argparse.Namespace) -> int:
    from rich.table import Table
    nodes = {n["node-name"]: n for n in _execute(qmp, "query-named-block-nodes", flat=True)}
    entries, counted = _node_stats(qmp)
    table = Table("node", "driver", "size", "rd ops", "rd bytes", "wr ops", "wr bytes",
                  "flush ops", "discard ops", "failed", "rd p50", "wr p50")
    for entry in entries:
        name = entry.get("node-name")
        if name is None:
            continue
        s = entry["stats"]
        info = nodes.get(name, {})
        failed = (s.get("failed_rd_operations", 0) + s.get("failed_wr_operations", 0)
                  + s.get("failed_flush_operations", 0) + s.get("failed_unmap_operations", 0))
        table.add_row(name, info.get("drv", ""), str(info.get("image", {}).get("virtual-size", "")),
                      str(s["rd_operations"]), str(s["rd_bytes"]), str(s["wr_operations"]),
                      str(s["wr_bytes"]), str(s["flush_operations"]),
                      str(s.get("unmap_operations", 0)), str(failed),
                      _latency(s, "rd_latency_histogram"), _latency(s, "wr_latency_histogram"))
    console.print(table)
    if not counted:
        console.print("(this daemon keeps no per-node counters: query-blockstats reports "
                      "zeros for nodes)", markup=False)
    return 0


# -- command line -------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsd-trio-ctl",
                                description="Watch and drive a qsd-trio or "
                                            "qemu-storage-daemon over its QMP socket.")
    p.add_argument("socket", help="the QMP monitor's unix socket")
    sub = p.add_subparsers(dest="command", required=True)
    jobs = sub.add_parser("jobs", help="list the jobs; --watch follows them to the end")
    jobs.add_argument("--watch", action="store_true",
                      help="progress, rate and ETA until every job ends; exit 1 if one fails")
    jobs.set_defaults(func=cmd_jobs)
    sub.add_parser("tree", help="the daemon's task tree (x-query-tasks)").set_defaults(
        func=cmd_tree)
    sub.add_parser("exports", help="block exports and their clients").set_defaults(
        func=cmd_exports)
    sub.add_parser("stats", help="per-node I/O counters").set_defaults(func=cmd_stats)

    def job(name: str, help: str) -> argparse.ArgumentParser:
        j = sub.add_parser(name, help=help)
        j.add_argument("--job-id", help=f"the job's id (default {name}0)")
        j.add_argument("--speed", type=int, help="rate limit in bytes per second")
        return j

    for name, help in (("mirror", "mirror a node to another and follow it"),
                       ("backup", "back a node up to another and follow it")):
        j = job(name, help)
        j.add_argument("--from", dest="source", required=True, help="source node")
        j.add_argument("--to", dest="target", required=True, help="target node")
        j.add_argument("--sync", default="full", choices=["full", "top", "none"])
        if name == "mirror":
            j.add_argument("--pivot", action="store_true",
                           help="once ready, complete: the target replaces the source")
        j.set_defaults(func=cmd_mirror if name == "mirror" else cmd_backup)
    j = job("stream", "copy the backing chain into a node and follow it")
    j.add_argument("--node", required=True, help="the node to stream into")
    j.add_argument("--base", help="keep this backing node and what is below it")
    j.set_defaults(func=cmd_stream)
    j = job("commit", "commit a node's data into its backing chain and follow it")
    j.add_argument("--node", required=True, help="the active node of the chain")
    j.add_argument("--top", help="the top node to commit (default: the active node)")
    j.add_argument("--base", help="the node to commit into (default: the bottom)")
    j.add_argument("--pivot", action="store_true",
                   help="for an active commit: once ready, complete it")
    j.set_defaults(func=cmd_commit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = _console()
    try:
        qmp = _connect(args.socket)
    except Exception as e:  # noqa: BLE001 - ConnectError, OSError: one line and out
        console.print(f"qsd-trio-ctl: cannot connect to {args.socket}: {e}", markup=False)
        return 2
    try:
        code: int = args.func(qmp, console, args)
        return code
    except CtlError as e:
        console.print(f"qsd-trio-ctl: {e}", markup=False)
        return 1
    finally:
        qmp.close()


if __name__ == "__main__":
    sys.exit(main())
