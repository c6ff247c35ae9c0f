"""Character devices: stdio, ringbuf/memory, null, file here; socket (unix,
inet, inherited fd; server or client) in :mod:`.socket`, pipe, serial,
parallel and pty in :mod:`.fd`, udp in :mod:`.udp`, mux in :mod:`.mux`.

A chardev is created by ``chardev-add`` (and ``--chardev``, which goes
through the same code).  A frontend (a QMP monitor) takes it with
:meth:`Chardev.attach` and reads connections from :meth:`Chardev.connections`
(an async generator: its user closes it with ``contextlib.aclosing``):
one client at a time, as QEMU's socket chardev serves one connection and lets
the next wait in the listen backlog until that one leaves.

Resources: a backend's descriptors (a socket chardev's listening socket)
are released by :meth:`Chardev.aclose` (``chardev-remove`` and shutdown).
Every backend may have a ``logfile`` (QEMU's
ChardevCommon): what the chardev writes is copied there; it is opened
before the backend (its error first) and closed by :meth:`Chardev.aclose`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Any

import trio

from ..qapi.errors import GenericError

BACKENDS = ("serial", "mux", "pipe", "parallel", "null", "ringbuf", "stdio", "socket",
            "file", "memory", "udp", "pty")


class Chardev:
    backend = ""

    def __init__(self, id: str):
        self.id = id
        self.frontend: object | None = None
        self.logfile: str | None = None   # ChardevCommon
        self.logappend = False
        self.logfd = -1

    @property
    def filename(self) -> str:
        return self.backend

    def frontend_open(self) -> bool:
        # QEMU's be->fe_open: a mux opens its base only once a frontend of
        # its own (a monitor) has set its handlers
        fe = self.frontend
        if isinstance(fe, Chardev):
            return fe.frontend_open()
        return fe is not None

    def busy(self) -> bool:
        """qemu_chr_is_busy: chardev-remove refuses a chardev in use."""
        return self.frontend is not None

    def info(self) -> dict[str, Any]:
        return {"frontend-open": self.frontend_open(), "filename": self.filename,
                "label": self.id}

    def common(self, data: dict[str, Any]) -> Chardev:
        """Take ChardevCommon's members (logfile, logappend) from ``data``."""
        self.logfile = data.get("logfile")
        self.logappend = bool(data.get("logappend", False))
        return self

    def bind(self, daemon: Any) -> None:
        """Learn about the daemon (a mux finds its base chardev there)."""

    async def setup(self) -> None:
        """The log file, then the backend's resources; raises QapiError
        (qemu_char_open's order)."""
        if self.logfile is not None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.logappend else os.O_TRUNC)
            try:
                self.logfd = os.open(self.logfile, flags, 0o666)
            except OSError as e:
                raise GenericError(f"Could not create '{self.logfile}': {e.strerror}") from None
        try:
            await self.open()
        except BaseException:
            self._close_log()
            raise

    async def open(self) -> None:
        """Create the backend's resources (bind, open); raises QapiError."""

    def attach(self, frontend: object) -> None:
        if self.frontend is not None:
            raise GenericError(f"Device '{self.id}' is in use")
        self.frontend = frontend

    def detach(self, frontend: object) -> None:
        if self.frontend is frontend:
            self.frontend = None

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        """Yield a stream per client, one at a time, until the chardev closes."""
        return
        yield  # pragma: no cover

    async def connections_for(self, frontend: object) -> AsyncGenerator[trio.abc.Stream, None]:
        """:meth:`connections` as ``frontend`` sees them (with the log file
        copying what is written, when there is one)."""
        async with contextlib.aclosing(self.connections()) as conns:
            async for stream in conns:
                yield stream if self.logfd < 0 else LoggedStream(stream, self)

    def log(self, data: bytes) -> None:
        if self.logfd >= 0 and data:
            try:
                os.write(self.logfd, data)
            except OSError:
                pass  # QEMU ignores a failing log write too

    async def write(self, data: bytes) -> None:
        """Write to the backend with no client (file, null, ringbuf)."""
        self.log(data)

    def _close_log(self) -> None:
        if self.logfd >= 0:
            os.close(self.logfd)
            self.logfd = -1

    async def aclose(self) -> None:
        self._close_log()


class LoggedStream(trio.abc.Stream):
    """A chardev's stream whose writes are also copied to its log file."""

    def __init__(self, stream: trio.abc.Stream, chardev: Chardev):
        self.stream = stream
        self.chardev = chardev

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # logged as it is sent (QEMU: right after the write returns), so the
        # log has a reply by the time the client has read it
        self.chardev.log(bytes(data))
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class NullChardev(Chardev):
    backend = "null"

    @property
    def filename(self) -> str:
        return "null"


class RingbufChardev(Chardev):
    """ringbuf/memory: a byte ring of a power-of-two size; old bytes are
    overwritten when it is full."""

    backend = "ringbuf"

    def __init__(self, id: str, size: int = 65536):
        super().__init__(id)
        if size <= 0 or size & (size - 1):
            raise GenericError("size of ringbuf chardev must be power of two")
        self.size = size
        self.buf = bytearray()

    @property
    def filename(self) -> str:
        return "ringbuf"

    async def write(self, data: bytes) -> None:
        self.log(data)
        self.buf += data
        if len(self.buf) > self.size:
            del self.buf[: len(self.buf) - self.size]

    def read(self, size: int, fmt: str) -> str:
        data = bytes(self.buf[:size])
        del self.buf[:size]
        if fmt == "base64":
            return base64.b64encode(data).decode()
        # QEMU hands out the bytes as a C string: invalid UTF-8 becomes U+FFFD
        return data.decode(errors="replace")


class FileChardev(Chardev):
    backend = "file"
    # query-chardev says just "file", as QEMU does

    def __init__(self, id: str, out: str, append: bool, in_path: str | None):
        super().__init__(id)
        self.out = out
        self.append = append
        self.in_path = in_path
        self.fd = -1

    @property
    def filename(self) -> str:
        return "file"

    async def open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.append else os.O_TRUNC)
        try:
            self.fd = os.open(self.out, flags, 0o666)
        except OSError as e:
            raise GenericError(f"Could not open '{self.out}': {e.strerror}") from None

    async def write(self, data: bytes) -> None:
        self.log(data)
        os.write(self.fd, data)

    async def aclose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        await super().aclose()


class StdioChardev(Chardev):
    backend = "stdio"

    @property
    def filename(self) -> str:
        return "stdio"

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        stream = trio.StapledStream(
            trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())),
            trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())),
        )
        yield stream


Factory = Callable[[str, dict[str, Any]], Chardev]


def _factories() -> dict[str, Factory]:
    """Each implemented backend's constructor from its ChardevBackend data."""
    from . import fd, mux, socket, udp  # they import this module (Chardev)

    return {
        "null": lambda id, d: NullChardev(id),
        "ringbuf": lambda id, d: RingbufChardev(id, d.get("size", 65536)),
        "memory": lambda id, d: RingbufChardev(id, d.get("size", 65536)),
        "file": lambda id, d: FileChardev(id, d["out"], d.get("append", False), d.get("in")),
        "stdio": lambda id, d: StdioChardev(id),
        "socket": socket.socket_chardev,
        "pipe": lambda id, d: fd.PipeChardev(id, d["device"]),
        "serial": lambda id, d: fd.SerialChardev(id, d["device"]),
        "parallel": lambda id, d: fd.ParallelChardev(id, d["device"]),
        "pty": lambda id, d: fd.PtyChardev(id),
        "udp": lambda id, d: udp.UdpChardev(id, d["remote"], d.get("local")),
        "mux": lambda id, d: mux.MuxChardev(id, d["chardev"]),
    }


def implemented_backends() -> list[str]:
    """The backends of :data:`BACKENDS` that :func:`make_chardev` builds
    (the README's feature table reads them here)."""
    made = _factories()
    return [b for b in BACKENDS if b in made]


def make_chardev(id: str, backend: dict[str, Any]) -> Chardev:
    """A chardev from a ChardevBackend in QMP form ({'type':..., 'data':{...}})."""
    t = backend["type"]
    d: dict[str, Any] = backend.get("data") or {}
    factory = _factories().get(t)
    if factory is None:
        raise GenericError(f"'{t}' is not a valid char driver name")
    return factory(id, d).common(d)
