"""The event bus: publishers anywhere, subscribers are QMP sessions.

Anything may import this module (like ``qapi``).  ``emit`` never blocks and
never fails: each subscriber has its own unbounded queue, read by its session.
Events carry QEMU's names and data; the timestamp is taken at emission, as
QEMU does, so that events keep their order and time when a session is slow.

A few events are rate-limited as QEMU's monitor limits them
(monitor_qapi_event_conf): the ones a failing disk can raise with every
request, QUORUM_FAILURE and QUORUM_REPORT_BAD (per ``node-name``), go out at
most once a second.  The first goes at once; those that come within the
second are held back and only the last of them is sent when the second is
up (with its own timestamp), which starts another second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

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
    """Publish event ``name`` (e.g. ``BLOCK_JOB_READY``) to every subscriber
    now, or for a rate-limited event once its key's second is up."""
    trace.event("qmp_event", name=name)
    if data:
        # members in declaration order, as QEMU's event marshaller puts them
        data = schema.declared_order(data, schema.SCHEMA.get(name, {}).get("arg"))
    ns = time.time_ns()
    ev = Event(name, data, ns // 1_000_000_000, (ns // 1000) % 1_000_000)
    if name in RATE_LIMITED:
        _throttled(ev)
    else:
        _publish(ev)


def _publish(ev: Event) -> None:
    for cb in list(_subscribers):
        cb(ev)


# event -> seconds between two of it with the same key (QEMU: 1000 ms)
RATE_LIMITED = {"QUORUM_FAILURE": 1.0, "QUORUM_REPORT_BAD": 1.0}


def _key(ev: Event) -> tuple[str, str | None]:
    """qapi_event_throttle_equal: QUORUM_REPORT_BAD per node, the rest per name."""
    if ev.name == "QUORUM_REPORT_BAD" and ev.data:
        return ev.name, ev.data.get("node-name")
    return ev.name, None


@attrs.define
class _Window:
    """A key's second in progress, and the event held back for its end."""

    pending: Event | None = None


# per trio run: a daemon (or a test) that ends leaves no window open
_windows: trio.lowlevel.RunVar[dict[tuple[str, str | None], _Window]] = \
    trio.lowlevel.RunVar("event_windows")


def _throttled(ev: Event) -> None:
    try:
        windows = _windows.get()
    except LookupError:
        windows = {}
        _windows.set(windows)
    except RuntimeError:  # outside trio: no timer to hold it back with
        _publish(ev)
        return
    key = _key(ev)
    window = windows.get(key)
    if window is not None:
        window.pending = ev  # replaces one held back before
        return
    _publish(ev)
    windows[key] = window = _Window()
    # a system task: the window outlives the request that opened it, and
    # ends with the run (QEMU's timer)
    trio.lowlevel.spawn_system_task(_close_window, windows, key, window,
                                    RATE_LIMITED[ev.name], name=f"event-rate {key}")


async def _close_window(windows: dict[tuple[str, str | None], _Window],
                        key: tuple[str, str | None], window: _Window, rate: float) -> None:
    """monitor_qapi_event_handler: each second, send what was held back
    (and keep the window for another second), or close the window."""
    while True:
        await trio.sleep(rate)
        ev, window.pending = window.pending, None
        if ev is None:
            del windows[key]
            return
        _publish(ev)
