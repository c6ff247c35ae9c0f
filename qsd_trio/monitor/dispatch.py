"""Command dispatch: name -> handler, arguments through the schema.

The schema (qapi/schema.py) turns the QMP ``arguments`` into the command's
typed arguments and the handler's result back into QMP JSON, so handlers
never see or build raw dicts for what the schema declares.
"""

from __future__ import annotations

import contextvars
import sys
import traceback
from typing import TYPE_CHECKING, Any

from ..qapi import schema
from ..qapi.errors import CommandNotFound, GenericError, QapiError
from .registry import Command, load_all

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .session import QmpSession

# the session whose command is running (qmp_capabilities needs it)
current_session: contextvars.ContextVar[QmpSession | None] = contextvars.ContextVar(
    "current_session", default=None)


def commands() -> dict[str, Command]:
    return load_all()


def lookup(name: str) -> Command:
    cmd = commands().get(name)
    if cmd is None:
        raise CommandNotFound(f"The command {name} has not been found")
    return cmd


async def call(daemon: Daemon, cmd: Command, arguments: dict[str, Any] | None, *,
               session: QmpSession | None = None) -> Any:
    args = schema.parse_command(cmd.name, arguments)
    token = current_session.set(session)
    try:
        result = await cmd.handler(daemon, args)
    except QapiError:
        raise
    except OSError as e:
        # an I/O error that no layer below turned into a QEMU message
        raise GenericError(e.strerror or str(e)) from None
    except Exception as e:
        # a bug of ours: the client gets an error and the session goes on;
        # the traceback goes to stderr for a bug report
        traceback.print_exc(file=sys.stderr)
        raise GenericError(f"internal error in {cmd.name}: {e}") from None
    finally:
        current_session.reset(token)
    if result is None:
        return {}
    return schema.declared_order(schema.to_qmp(result), schema.SCHEMA[cmd.name].get("ret"))
