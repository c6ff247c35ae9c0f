"""The live task tree: ``x-query-tasks`` and ``SIGUSR1``.

The shape comes from trio itself: starting at
``trio.lowlevel.current_root_task()``, every task lists its child nurseries
and every nursery its child tasks.  What a task is for comes from a small
registry: a service enters :func:`serving` in the task that runs it (an
export, an NBD client connection, a QMP session, a job) and leaves it when
the task ends.  A task that did not register is shown as kind ``task`` with
trio's name for it, so nothing running is hidden.

Each node is a plain dict in the ``XTaskInfo`` shape of the schema
(tools/qapi-qsd/qsd-trio.json): ``kind``, ``name``, the ids it serves,
``started`` (wall clock, seconds), ``state`` (running, draining,
cancelling), and for services that count them ``in-flight`` and ``bytes``.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import attrs
import trio


@attrs.define(eq=False)
class Service:
    """What one task serves; counters are read when the tree is built."""

    kind: str
    name: str
    ids: dict[str, Any]
    started: float
    # the service's own scope: cancelled -> "cancelling"
    cancel_scope: trio.CancelScope | None = None
    draining: Callable[[], bool] | None = None
    in_flight: Callable[[], int] | None = None
    moved: Callable[[], int] | None = None

    def state(self) -> str:
        if self.cancel_scope is not None and self.cancel_scope.cancel_called:
            return "cancelling"
        if self.draining is not None and self.draining():
            return "draining"
        return "running"


# task -> service, filled by serving(); a task ends only after leaving it
_SERVICES: dict[trio.lowlevel.Task, Service] = {}


@contextmanager
def serving(kind: str, name: str, *,
            cancel_scope: trio.CancelScope | None = None,
            draining: Callable[[], bool] | None = None,
            in_flight: Callable[[], int] | None = None,
            moved: Callable[[], int] | None = None,
            **ids: Any) -> Iterator[Service]:
    """Register the current task as ``kind`` serving ``ids`` (``export_id``,
    ``client``, ``job_id``, ``node_names``) until the block ends.

    An id given as a callable is read when the tree is built (an export's
    node changes when a job inserts a filter above it)."""
    task = trio.lowlevel.current_task()
    svc = Service(kind, name, {k.replace("_", "-"): v for k, v in ids.items()
                               if v is not None},
                  time.time(), cancel_scope, draining, in_flight, moved)
    outer = _SERVICES.get(task)
    _SERVICES[task] = svc
    try:
        yield svc
    finally:
        if outer is None:
            del _SERVICES[task]
        else:
            _SERVICES[task] = outer


def peer_name(stream: trio.abc.Stream) -> str | None:
    """A connected socket stream's peer as ``host:port`` or a unix path."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer or "unix")


class _Walk:
    """One walk of trio's tree; keeps first-seen times of what is still there."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.seen: dict[object, float] = {}

    def started(self, key: object) -> float:
        t = self.seen[key] = _FIRST_SEEN.get(key, self.now)
        return t

    def task(self, task: trio.lowlevel.Task) -> dict[str, Any]:
        svc = _SERVICES.get(task)
        if svc is None:
            node: dict[str, Any] = {"kind": "task", "name": task.name,
                                    "started": self.started(task), "state": "running"}
        else:
            ids = {k: v() if callable(v) else v for k, v in svc.ids.items()}
            node = {"kind": svc.kind, "name": svc.name, **ids,
                    "started": svc.started, "state": svc.state()}
            if svc.in_flight is not None:
                node["in-flight"] = svc.in_flight()
            if svc.moved is not None:
                node["bytes"] = svc.moved()
        node["children"] = [self.nursery(n) for n in task.child_nurseries]
        return node

    def nursery(self, nursery: trio.Nursery) -> dict[str, Any]:
        scope = nursery.cancel_scope
        return {"kind": "nursery", "name": f"nursery of {nursery.parent_task.name}",
                "started": self.started(nursery),
                "state": "cancelling" if scope.cancel_called else "running",
                "children": [self.task(t) for t in nursery.child_tasks]}


# when the tree first saw an unregistered task or a nursery (trio does not
# record it); only what the last walk found is kept
_FIRST_SEEN: dict[object, float] = {}


def tree() -> dict[str, Any]:
    """The whole task tree, from trio's root task down."""
    global _FIRST_SEEN
    walk = _Walk(time.time())
    root_task = trio.lowlevel.current_root_task()
    assert root_task is not None  # called from inside trio.run
    root = walk.task(root_task)
    _FIRST_SEEN = walk.seen
    return root


_IDS = ("export-id", "client", "job-id", "node-names")


def describe(n: dict[str, Any], now: float) -> list[str]:
    """What one node of the tree says after its kind and name: the ids it
    serves, its state, requests in flight, bytes and age (SIGUSR1's lines,
    qsd-trio-ctl's tree)."""
    parts = []
    for key in _IDS:
        if key in n:
            val = n[key]
            parts.append(f"{key}={','.join(val) if isinstance(val, list) else val}")
    parts.append(n["state"])
    for key in ("in-flight", "bytes"):
        if key in n:
            parts.append(f"{key}={n[key]}")
    parts.append(f"up {now - n['started']:.1f}s")
    return parts


def format_tree(node: dict[str, Any], now: float | None = None) -> str:
    """The tree as indented text, one line per node."""
    now = time.time() if now is None else now
    lines: list[str] = []

    def line(n: dict[str, Any], depth: int) -> None:
        lines.append(" ".join([f"{'  ' * depth}{n['kind']} {n['name']!r}", *describe(n, now)]))
        for child in n["children"]:
            line(child, depth + 1)

    line(node, 0)
    return "\n".join(lines) + "\n"


async def print_on_sigusr1(out: TextIO | None = None, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                           ) -> None:
    """Print the tree to stderr at each SIGUSR1, for the daemon's lifetime."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        task_status.started()
        async for _ in signals:
            stream = sys.stderr if out is None else out
            stream.write(format_tree(tree()))
            stream.flush()
