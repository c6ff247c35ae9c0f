"""The ``mux`` chardev (QEMU's char-mux.c): up to four frontends on one
base chardev; in a storage daemon the frontends are QMP monitors
(``--chardev socket,...,mux=on --monitor ID --monitor ID``).

Every frontend writes to the base; input goes to the frontend with the
focus (the last one attached, at first).  Ctrl-A is the escape character:
``C-a c`` moves the focus to the next frontend, ``C-a h`` (or ``?``) prints
the help, ``C-a t`` toggles time stamps at line starts, ``C-a x`` prints
"QEMU: Terminated" and quits the daemon, ``C-a C-a`` sends a Ctrl-A, and
``C-a b`` (a break) and ``C-a s`` (commit -snapshot disks) do nothing here:
monitors ignore a break, and a storage daemon has no -snapshot (QEMU 7.2's
qemu-storage-daemon fails an assertion on ``C-a s``).

When a client connects to the base, each frontend gets a stream of its own
(QEMU sends CHR_EVENT_OPENED to all of them: each monitor greets); they all
end when the base's client leaves.

Resources: the pump (one task in the daemon's monitor nursery, started by
the first frontend that asks for connections) reads the base's streams; it
ends with that nursery.  :meth:`aclose` lets go of the base.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import trio

from ..qapi.errors import GenericError
from .chardev import Chardev

MAX_MUX = 4
TERM_ESCAPE = 0x01  # Ctrl-A

MUX_HELP = [
    "% h    print this help\n\r",
    "% x    exit emulator\n\r",
    "% s    save disk data back to file (if -snapshot)\n\r",
    "% t    toggle console timestamps\n\r",
    "% b    send break (magic sysrq)\n\r",
    "% c    switch between console and monitor\n\r",
    "% %  sends %\n\r",
]


def mux_help_text() -> bytes:
    """mux_print_help's output for the default escape character."""
    ebuf = "C-" + chr(TERM_ESCAPE - 1 + ord("a"))
    return ("\n\r" + "".join(line.replace("%", ebuf) for line in MUX_HELP)).encode()


class MuxView(trio.abc.Stream):
    """One frontend's side of a base connection."""

    def __init__(self, mux: MuxChardev, base: trio.abc.Stream):
        self.mux = mux
        self.base = base
        self.input, self._input_recv = trio.open_memory_channel[bytes](math.inf)
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        await self.mux.write_to(self.base, bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            return await self._input_recv.receive()
        except trio.EndOfChannel:
            return b""

    async def aclose(self) -> None:
        # the base connection is the pump's
        self._closed = True
        await trio.lowlevel.checkpoint()


class MuxChardev(Chardev):
    backend = "mux"

    def __init__(self, id: str, base_id: str):
        super().__init__(id)
        self.base_id = base_id
        self.base: Chardev | None = None
        self.frontends: list[object] = []
        self.focus = -1
        self.timestamps = False
        self.timestamps_start = -1
        self.linestart = False
        self._got_escape = False
        self._daemon: Any = None
        self._wanted = trio.Event()
        self._pump_started = False
        self._send_lock = trio.StrictFIFOLock()
        self._channels: list[tuple[trio.MemorySendChannel[MuxView],
                                   trio.MemoryReceiveChannel[MuxView]]] = []

    def bind(self, daemon: Any) -> None:
        self._daemon = daemon

    async def open(self) -> None:
        # qemu_chr_open_mux
        chardevs = self._daemon.chardevs if self._daemon is not None else {}
        base = chardevs.get(self.base_id)
        if base is None:
            raise GenericError(f"mux: base chardev {self.base_id} not found")
        base.attach(self)
        self.base = base

    def busy(self) -> bool:
        # QEMU 7.2's qemu_chr_is_busy tests mux_cnt >= 0: always busy, so a
        # mux is never removed
        return True

    def attach(self, frontend: object) -> None:
        # qemu_chr_fe_init on a mux, then set_handlers takes the focus
        if len(self.frontends) >= MAX_MUX:
            raise GenericError(f"Device '{self.id}' is in use")
        self.frontends.append(frontend)
        self._channels.append(trio.open_memory_channel[MuxView](math.inf))
        self.frontend = frontend
        self.focus = len(self.frontends) - 1

    async def connections_for(self, frontend: object) -> AsyncGenerator[trio.abc.Stream, None]:
        tag = self.frontends.index(frontend)
        if not self._pump_started and self._daemon is not None:
            self._pump_started = True
            self._daemon.monitor_nursery.start_soon(self._pump)
        async for view in self._channels[tag][1]:
            yield view

    # -- output (mux_chr_write) ---------------------------------------------------
    async def write_to(self, base: trio.abc.Stream, data: bytes) -> None:
        if self.timestamps:
            out = bytearray()
            for b in data:
                if self.linestart:
                    ti = int(time.monotonic() * 1000)
                    if self.timestamps_start == -1:
                        self.timestamps_start = ti
                    ti -= self.timestamps_start
                    secs = ti // 1000
                    out += (f"[{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
                            f"{ti % 1000:03d}] ").encode()
                    self.linestart = False
                out.append(b)
                if b == 0x0A:
                    self.linestart = True
            data = bytes(out)
        self.log(data)
        async with self._send_lock:
            await base.send_all(data)

    # -- input (mux_chr_read, mux_proc_byte) --------------------------------------
    async def _pump(self) -> None:
        assert self.base is not None
        async with trio.open_nursery() as nursery:
            conns = self.base.connections_for(self)
            try:
                async for stream in conns:
                    await self._serve(stream, nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await conns.aclose()

    async def _serve(self, base: trio.abc.Stream, nursery: trio.Nursery) -> None:
        views = [MuxView(self, base) for _ in self.frontends]
        for (send, _), view in zip(self._channels, views, strict=True):
            send.send_nowait(view)  # CHR_EVENT_OPENED to every frontend
        try:
            while True:
                try:
                    data = await base.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                await self._input(bytes(data), views, nursery)
        finally:
            for view in views:
                view.input.close()  # CHR_EVENT_CLOSED
            with trio.CancelScope(shield=True):
                await base.aclose()

    async def _input(self, data: bytes, views: list[MuxView], nursery: trio.Nursery) -> None:
        run = bytearray()
        for ch in data:
            if self._got_escape:
                self._got_escape = False
                if ch == TERM_ESCAPE:
                    run.append(ch)
                    continue
                self._deliver(run, views)
                run = bytearray()
                await self._escape(ch, views[0].base, nursery)
            elif ch == TERM_ESCAPE:
                self._got_escape = True
            else:
                run.append(ch)
        self._deliver(run, views)

    def _deliver(self, run: bytearray, views: list[MuxView]) -> None:
        if run and 0 <= self.focus < len(views):
            try:
                views[self.focus].input.send_nowait(bytes(run))
            except trio.ClosedResourceError:
                pass

    async def _escape(self, ch: int, base: trio.abc.Stream, nursery: trio.Nursery) -> None:
        c = chr(ch)
        if c in "?h":
            await self._write_quietly(base, mux_help_text())
        elif c == "x":
            await self._write_quietly(base, b"QEMU: Terminated\n\r")
            nursery.start_soon(self._quit)
        elif c == "c":
            self.focus = (self.focus + 1) % len(self.frontends)
        elif c == "t":
            self.timestamps = not self.timestamps
            self.timestamps_start = -1
            self.linestart = False
        # 'b' (a break: monitors ignore it), 's' (no -snapshot here) and any
        # other character: nothing

    async def _write_quietly(self, base: trio.abc.Stream, data: bytes) -> None:
        try:
            await self.write_to(base, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _quit(self) -> None:
        # as the quit command (qmp_quit)
        daemon = self._daemon
        await daemon.shutdown_blockers()
        daemon.root_nursery.start_soon(daemon.shutdown)

    async def aclose(self) -> None:
        if self.base is not None:
            self.base.detach(self)
            self.base = None
        await super().aclose()
