"""QMP monitors and sessions.

A :class:`Monitor` is the frontend of one chardev; it serves the chardev's
clients one at a time, each as a :class:`QmpSession`.  A session has a
reader (this task: parse, dispatch, one command at a time, as QEMU runs a
monitor's in-band commands in order) and a writer task that sends replies
and events from one queue, so an event emitted while a command runs is
written before that command's reply.

Resources: the session's stream is closed when the client leaves or the
monitor nursery is cancelled; its event subscription ends with it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import traceback
from typing import TYPE_CHECKING, Any

import trio

from .. import PACKAGE, QEMU_VERSION, events, tasks, trace
from ..qapi.errors import CommandNotFound, GenericError, QapiError
from . import dispatch
from .qmp_json import JsonError, JsonStreamer, encode_message

if TYPE_CHECKING:
    from ..chardev.chardev import Chardev
    from ..daemon import Daemon


def version_info() -> dict[str, Any]:
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}


class Monitor:
    """``--monitor chardev=ID``: QMP on a chardev."""

    def __init__(self, daemon: Daemon, chardev: Chardev, pretty: bool):
        self.daemon = daemon
        self.chardev = chardev
        self.pretty = pretty
        self.session: QmpSession | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.daemon.accepting.wait()
        # closed here, not by the garbage collector, when the monitor is
        # cancelled at shutdown (which would warn under -W default)
        async with contextlib.aclosing(self.chardev.connections_for(self)) as connections:
            async for stream in connections:
                self.session = QmpSession(self.daemon, stream, self.pretty)
                try:
                    with tasks.serving("monitor-session", f"QMP on {self.chardev.id}",
                                       client=tasks.peer_name(stream)):
                        await self.session.run()
                except Exception:  # noqa: BLE001 - one broken session must not end the monitor
                    traceback.print_exc(file=sys.stderr)
                finally:
                    self.session = None

    async def drain(self) -> None:
        if self.session is not None:
            await self.session.drain()


class QmpSession:
    def __init__(self, daemon: Daemon, stream: trio.abc.Stream, pretty: bool):
        self.daemon = daemon
        self.stream = stream
        self.pretty = pretty
        self.negotiated = False
        self.oob = False
        self._send, self._recv = trio.open_memory_channel[bytes](math.inf)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- output ----------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            self._send.send_nowait(encode_message(msg, self.pretty))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._pending -= 1

    def _on_event(self, ev: events.Event) -> None:
        if self.negotiated:
            self.send(ev.to_qmp())

    async def _writer(self) -> None:
        async for data in self._recv:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left; the reader sees EOF and ends the session
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    async def drain(self) -> None:
        """Wait (bounded) until everything queued has been written."""
        with trio.move_on_after(5):
            await self._idle.wait()

    # -- input -----------------------------------------------------------------
    async def run(self) -> None:
        unsubscribe = events.subscribe(self._on_event)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                self.send({"QMP": {"version": version_info(), "capabilities": ["oob"]}})
                await self._reader()
                await self.drain()
                nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _reader(self) -> None:
        streamer = JsonStreamer()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for msg in streamer.feed(bytes(data)):
                await self.handle(msg)

    async def handle(self, msg: Any) -> None:
        if isinstance(msg, JsonError):
            self.send({"error": {"class": "GenericError", "desc": msg.desc}})
            return
        reply: dict[str, Any] = {}
        if isinstance(msg, dict) and "id" in msg:
            reply["id"] = msg["id"]
        if isinstance(msg, dict) and trace.enabled("monitor_qmp_cmd_in_band"):
            trace.event("monitor_qmp_cmd_in_band", id=msg.get("id"),
                        cmd=msg.get("execute", msg.get("exec-oob")))
        try:
            reply["return"] = await self._execute(msg)
        except QapiError as e:
            reply["error"] = e.to_qmp()
        # QEMU puts "return"/"error" before "id"
        out: dict[str, Any] = {k: reply[k] for k in ("return", "error") if k in reply}
        if "id" in reply:
            out["id"] = reply["id"]
        trace.event("monitor_qmp_respond", error="error" in out)
        self.send(out)

    async def _execute(self, msg: Any) -> Any:
        if not isinstance(msg, dict):
            raise GenericError("QMP input must be a JSON object")
        name = None
        oob = False
        for key, value in msg.items():
            if key in ("execute", "exec-oob"):
                if key == "exec-oob" and not self.oob:
                    raise GenericError("QMP input member 'exec-oob' is unexpected")
                if not isinstance(value, str):
                    raise GenericError(f"QMP input member '{key}' must be a string")
                if name is not None:
                    raise GenericError("QMP input must not contain both 'execute' and 'exec-oob'")
                name, oob = value, key == "exec-oob"
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise GenericError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise GenericError(f"QMP input member '{key}' is unexpected")
        if name is None:
            raise GenericError("QMP input lacks member 'execute'")
        if not self.negotiated and name != "qmp_capabilities":
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        if self.negotiated and name == "qmp_capabilities":
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        cmd = dispatch.lookup(name)
        if oob and not cmd.allow_oob:
            raise GenericError(f"The command {name} does not support OOB")
        return await dispatch.call(self.daemon, cmd, msg.get("arguments"), session=self)
