"""QMP command x-query-tasks: the daemon's task tree (qsd_trio.tasks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import tasks
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon


@command("x-query-tasks")
async def x_query_tasks(daemon: Daemon, args: None) -> dict[str, Any]:
    return tasks.tree()
