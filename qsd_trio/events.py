"""The event bus: publishers anywhere, subscribers are QMP sessions.

Anything may import this module (like ``qapi``).  ``emit`` never blocks and
never fails: each subscriber has its own unbounded queue, read by its session.
Events carry QEMU's names and data; the timestamp is taken at emission, as
QEMU does, so that events keep their order and time when a session is slow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from . import trace
from .qapi import schema


@attrs.frozen
class Event:
    name: str
    data: dict[str, Any] | None
    seconds: int
    microseconds: int

    def to_qmp(self) -> dict[str, Any]:
        # QEMU's member order: timestamp, event, data
        msg: dict[str, Any] = {
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
            "event": self.name}
        if self.data is not None:
            msg["data"] = self.data
        return msg


_subscribers: list[Callable[[Event], None]] = []


def subscribe(callback: Callable[[Event], None]) -> Callable[[], None]:
    """Call ``callback(event)`` for every event until the returned function is called."""
    _subscribers.append(callback)

    def unsubscribe() -> None:
        try:
            _subscribers.remove(callback)
        except ValueError:
            pass

    return unsubscribe


def emit(name: str, data: dict[str, Any] | None = None) -> None:
    """Publish event ``name`` (e.g. ``BLOCK_JOB_READY``) to every subscriber now."""
    trace.event("qmp_event", name=name)
    if data:
        # members in declaration order, as QEMU's event marshaller puts them
        data = schema.declared_order(data, schema.SCHEMA.get(name, {}).get("arg"))
    ns = time.time_ns()
    ev = Event(name, data, ns // 1_000_000_000, (ns // 1000) % 1_000_000)
    for cb in list(_subscribers):
        cb(ev)
