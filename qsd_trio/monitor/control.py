"""QMP commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..qapi import schema
from .dispatch import commands, current_session
from .registry import command
from .session import version_info

if TYPE_CHECKING:
    from ..daemon import Daemon


@command("qmp_capabilities")
async def qmp_capabilities(daemon: Daemon, args: Any) -> None:
    session = current_session.get()
    assert session is not None  # only a QMP session runs it
    # the schema already refused anything but QMPCapability values
    enable = (args.enable or []) if args else []
    session.oob = "oob" in enable
    session.negotiated = True


@command("query-version")
async def query_version(daemon: Daemon, args: None) -> dict[str, Any]:
    return version_info()


def implemented() -> list[str]:
    # in the schema's order, as QEMU lists them (newest registration first)
    have = commands()
    return [n for n in schema.command_names() if n in have]


@command("query-commands")
async def query_commands(daemon: Daemon, args: None) -> list[dict[str, str]]:
    return [{"name": n} for n in reversed(implemented())]


@command("query-qmp-schema")
async def query_qmp_schema(daemon: Daemon, args: None) -> list[dict[str, Any]]:
    return schema.introspect(implemented())


@command("quit")
async def quit(daemon: Daemon, args: None) -> None:
    # exports, jobs and nodes go first, so their events precede the reply;
    # monitors and the pidfile follow once the reply is on its way
    await daemon.shutdown_blockers()
    daemon.root_nursery.start_soon(daemon.shutdown)
