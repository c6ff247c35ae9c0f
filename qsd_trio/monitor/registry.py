"""The QMP command registry.

Each command group module (block.py, jobs.py, exports.py, objects.py,
chardev.py, control.py) registers its handlers with :func:`command`::

    @command("blockdev-del")
    async def blockdev_del(daemon: Daemon, args: Any) -> None:
        await daemon.graph.delete(args.node_name)

``args`` is the attrs instance the schema layer built from the QMP
arguments (QAPI member names with ``-`` turned into ``_``), or ``None`` for
a command without arguments.  The generated classes are made when first
used (qapi/qapi_types.py), so statically ``args`` is ``Any``; tests build
it through the schema too (``schema.parse_command``).  The return value is what goes into
``"return"``: None for ``{}``, JSON-able data, or attrs instances of the
schema's return type (unstructured by the schema layer).  Errors are raised
as ``QapiError``.  The argument and return types come from the schema, so
the registry holds only handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ..daemon import Daemon

Handler = Callable[["Daemon", Any], Awaitable[Any]]


@attrs.frozen
class Command:
    name: str
    handler: Handler
    allow_oob: bool = False


COMMANDS: dict[str, Command] = {}

# modules that register commands; imported by load_all()
GROUPS = ("control", "objects", "chardev", "block", "exports", "jobs", "snapshot",
          "tasks")


def command(name: str, *, allow_oob: bool = False) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, fn, allow_oob)
        return fn

    return deco


def load_all() -> dict[str, Command]:
    import importlib

    for group in GROUPS:
        importlib.import_module(f"{__package__}.{group}")
    return COMMANDS
