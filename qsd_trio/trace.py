"""-T/--trace: QEMU-style trace events, enabled by glob patterns.

``trace.event("nbd_request", handle=..., ...)`` writes one line
``<pid>@<time> nbd_request handle=...`` to stderr or ``file=`` when a pattern
enables it.  Patterns come from ``-T [enable=]PATTERN`` and ``events=FILE``
(one pattern per line, ``-`` prefix disables); ``-T help`` lists the events
(:class:`HelpRequested`, which the command line turns into its output).
"""

from __future__ import annotations

import atexit
import fnmatch
import os
import sys
import time
from typing import Any, TextIO

from .qapi.errors import GenericError

# the events our code emits; keep in step with the trace.event() calls
EVENTS = (
    "monitor_qmp_cmd_in_band",  # session.py: a command is about to run
    "monitor_qmp_respond",      # session.py: a reply is queued
    "qmp_event",                # events.py: an event is emitted
    "bdrv_open",                # nodes/graph.py: blockdev-add opened a node
)


class HelpRequested(Exception):
    """``-T help``: the caller prints :func:`help_text` and exits."""


def help_text() -> str:
    return "".join(f"{e}\n" for e in EVENTS)


_patterns: list[tuple[bool, str]] = []
_out: TextIO | None = None
_enabled: set[str] = set()


def configure(optarg: str) -> None:
    """Apply one ``-T`` option.

    Raises:
        HelpRequested: the option asked for the list of events.
        GenericError: a malformed option or a file that cannot be opened,
            with QEMU's text.
    """
    global _out
    items = [i for i in optarg.split(",") if i]
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n != 0:
                raise GenericError(f"Invalid parameter '{key}'")
            key, value = "enable", item
        if key == "enable":
            if value == "help":
                raise HelpRequested
            _add(value)
        elif key == "events":
            try:
                with open(value) as f:
                    for line in f:
                        line = line.strip()
                        if line and not line.startswith("#"):
                            _add(line)
            except OSError as e:
                raise GenericError(f"Could not open '{value}': {e.strerror}") from None
        elif key == "file":
            try:
                out = open(value, "a", buffering=1)
            except OSError as e:
                raise GenericError(f"Could not open '{value}': {e.strerror}") from None
            close()  # a later file= replaces an earlier one
            _out = out
            atexit.register(close)
        else:
            raise GenericError(f"Invalid parameter '{key}'")
    _recompute()


def close() -> None:
    """Close the trace file (at exit, as QEMU's trace backend does)."""
    global _out
    if _out is not None:
        _out.close()
        _out = None
    atexit.unregister(close)


def _add(pattern: str) -> None:
    if pattern.startswith("-"):
        _patterns.append((False, pattern[1:]))
    else:
        _patterns.append((True, pattern))


def _recompute() -> None:
    _enabled.clear()
    for ev in EVENTS:
        on = False
        for enable, pat in _patterns:
            if fnmatch.fnmatchcase(ev, pat):
                on = enable
        if on:
            _enabled.add(ev)


def enabled(name: str) -> bool:
    return name in _enabled


def event(name: str, /, **fields: Any) -> None:
    if name not in _enabled:
        return
    now = time.time()
    args = " ".join(f"{k}={v}" for k, v in fields.items())
    line = f"{os.getpid()}@{now:.6f}:{name} {args}\n"
    (_out or sys.stderr).write(line)
