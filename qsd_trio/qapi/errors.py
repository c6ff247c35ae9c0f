"""The one error tree for everything a QMP client or the command line sees.

A :class:`QapiError` carries QEMU's error class and text.  It is raised where
the fact is known (a driver that finds a missing file, the schema layer that
finds a missing parameter) and turned into a QMP error reply, or into
``qsd-trio: --option value: message`` on the command line, at one boundary
each.  Code never formats QMP error dicts itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any


class QapiError(Exception):
    """An error a QMP client sees: ``{"class": ..., "desc": ...}``."""

    error_class = "GenericError"

    def __init__(self, desc: str, *, error_class: str | None = None, hint: str | None = None):
        super().__init__(desc)
        self.desc = desc
        # QEMU's error_append_hint: printed on the command line, never sent over QMP
        self.hint = hint
        if error_class is not None:
            self.error_class = error_class

    def to_qmp(self) -> dict[str, Any]:
        return {"class": self.error_class, "desc": self.desc}

    def prefixed(self, prefix: str) -> QapiError:
        """The same error with ``prefix`` in front of its text (QEMU's error_prepend)."""
        return type(self)(prefix + self.desc, error_class=self.error_class, hint=self.hint)


class GenericError(QapiError):
    error_class = "GenericError"


class CommandNotFound(QapiError):
    error_class = "CommandNotFound"


class DeviceNotFound(QapiError):
    error_class = "DeviceNotFound"


class DeviceNotActive(QapiError):
    error_class = "DeviceNotActive"


# -- warnings --------------------------------------------------------------------
_collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "qapi_warnings", default=None)


def warn_report(msg: str) -> None:
    """QEMU's warn_report: ``warning: msg`` on stderr.  While a command-line
    option is parsed the warning is kept for it (:func:`collect_warnings`),
    to be printed with the option's location when the option takes effect,
    as QEMU parses and applies each option in turn."""
    sink = _collected.get()
    if sink is not None:
        sink.append(msg)
    else:
        print(f"qsd-trio: {_where()}warning: {msg}", file=sys.stderr, flush=True)


# QEMU's location stack while a command-line option takes effect; a plain
# global as in QEMU, not a context variable, so that the tasks an option
# starts (a monitor, an export) do not keep it once the option is applied
_location: list[str] = []


def _where() -> str:
    return f"{_location[-1]}: " if _location else ""


def error_report(msg: str, *, located: bool = True) -> None:
    """QEMU's error_report: ``msg`` on stderr, after the command-line option
    being applied (:func:`report_location`), if any; ``located=False`` for
    what QEMU reports from its main loop, where no option is being applied."""
    where = _where() if located else ""
    print(f"qsd-trio: {where}{msg}", file=sys.stderr, flush=True)


def info_report(msg: str) -> None:
    """QEMU's info_report: ``info: msg`` on stderr, after the command-line
    option being applied, if any."""
    error_report(f"info: {msg}")


@contextlib.contextmanager
def report_location(where: str) -> Iterator[None]:
    """While a command-line option takes effect, error_report and
    warn_report name it (``--blockdev VALUE: ...``), as QEMU's location
    stack does; QMP commands run without one."""
    _location.append(where)
    try:
        yield
    finally:
        _location.pop()


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    warned: list[str] = []
    token = _collected.set(warned)
    try:
        yield warned
    finally:
        _collected.reset(token)
