"""Character devices: socket (unix, inet, inherited fd; server or client),
stdio, ringbuf/memory, null, file here; pipe, serial, parallel and pty in
:mod:`.fd`, udp in :mod:`.udp`, mux in :mod:`.mux`.

A chardev is created by ``chardev-add`` (and ``--chardev``, which goes
through the same code).  A frontend (a QMP monitor) takes it with
:meth:`Chardev.attach` and reads connections from :meth:`Chardev.connections`
(an async generator: its user closes it with ``contextlib.aclosing``):
one client at a time, as QEMU's socket chardev serves one connection and lets
the next wait in the listen backlog until that one leaves.

Resources: a socket chardev owns its listening socket, released by
:meth:`Chardev.aclose` (``chardev-remove`` and shutdown); a unix socket path
it created is unlinked then.  Every backend may have a ``logfile`` (QEMU's
ChardevCommon): what the chardev writes is copied there; it is opened
before the backend (its error first) and closed by :meth:`Chardev.aclose`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket as pysocket
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Any

import trio

from .. import activation
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


class SocketChardev(Chardev):
    """A stream socket.  Server mode listens (unix path, inet host:port, or
    an inherited listening fd); client mode connects out once."""

    backend = "socket"

    def __init__(self, id: str, addr: dict[str, Any], server: bool, wait: bool, nodelay: bool):
        super().__init__(id)
        self.addr = addr          # SocketAddressLegacy in QMP form
        self.server = server
        self.wait = wait
        self.nodelay = nodelay
        self.listener: trio.socket.SocketType | None = None
        self.first: trio.SocketStream | None = None  # accepted during setup (wait=on)
        self._unlink: str | None = None
        self.current: trio.SocketStream | None = None  # the connected client

    @property
    def filename(self) -> str:
        # QEMU's wording: the address, ",server=on" for listeners, the peer
        # of a connected TCP client, and "disconnected:" while nobody is there
        t = self.addr["type"]
        d = self.addr["data"]
        suffix = ",server=on" if self.server else ""
        if t == "unix":
            base = f"unix:{d['path']}{suffix}"
        elif t == "inet":
            base = f"tcp:{d['host']}:{d['port']}{suffix}"
        else:
            base = f"fd:{d.get('str')}{suffix}"
        if self.current is None:
            return f"disconnected:{base}"
        if t == "inet":
            sock = self.current.socket
            try:
                lh, lp = sock.getsockname()[:2]
                ph, pp = sock.getpeername()[:2]
                return f"tcp:{lh}:{lp}{suffix} <-> {ph}:{pp}"
            except OSError:
                pass
        return base

    async def open(self) -> None:
        t = self.addr["type"]
        d = self.addr["data"]
        if not self.server:
            self.first = await self._connect(t, d)
            return
        if t == "fd":
            self.listener = _inherited_listener(d["str"])
        elif t == "unix":
            path = d["path"]
            sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            self.listener = await _listening(sock, path, f"Failed to bind socket to {path}",
                                             unlink_stale=True)
            self._unlink = path
        elif t == "inet":
            host, port = d.get("host") or "0.0.0.0", d["port"]
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=pysocket.SOCK_STREAM,
                                                      flags=pysocket.AI_PASSIVE)
            except pysocket.gaierror as e:
                raise GenericError(f"address resolution failed for {host}:{port}: {e.strerror}") from None
            family, type_, proto, _, sockaddr = infos[0]
            sock = trio.socket.socket(family, type_, proto)
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
            self.listener = await _listening(sock, sockaddr, "Failed to bind socket")
        else:
            raise GenericError(f"Parameter 'addr.type' does not accept value '{t}'")
        if self.wait:
            # server=on,wait=on: QEMU blocks startup until a client connects
            print(f"QEMU waiting for connection on: disconnected:{self.filename}",
                  file=sys.stderr, flush=True)
            self.first = await self._accept()

    async def _connect(self, t: str, d: dict[str, Any]) -> trio.SocketStream:
        try:
            if t == "unix":
                return await trio.open_unix_socket(d["path"])
            if t == "inet":
                return await trio.open_tcp_stream(d["host"], int(d["port"]))
            if t == "fd":
                sock = trio.socket.from_stdlib_socket(pysocket.socket(fileno=_fd_number(d["str"])))
                return trio.SocketStream(sock)
        except OSError as e:
            target = d.get("path") or f"{d.get('host')}:{d.get('port')}"
            raise GenericError(f"Failed to connect to '{target}': {e.strerror}") from None
        raise GenericError(f"Parameter 'addr.type' does not accept value '{t}'")

    async def _accept(self) -> trio.SocketStream:
        assert self.listener is not None
        sock, _ = await self.listener.accept()
        if self.nodelay and sock.family != pysocket.AF_UNIX:
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        return trio.SocketStream(sock)

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        try:
            if self.first is not None:
                self.current, self.first = self.first, None
                yield self.current
            if not self.server:
                return  # a client chardev without reconnect is done when its peer leaves
            while self.listener is not None:
                self.current = None
                self.current = await self._accept()
                yield self.current
        finally:
            self.current = None

    async def aclose(self) -> None:
        if self.first is not None:
            await self.first.aclose()
            self.first = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._unlink:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None
        await super().aclose()


async def _listening(sock: trio.socket.SocketType, address: Any, failed: str, *,
                     unlink_stale: bool = False) -> trio.socket.SocketType:
    """``sock`` bound to ``address`` (a unix socket's path: with
    ``unlink_stale``, whatever is there goes first) and listening for one
    connection at a time; on failure it is closed and the error is
    ``failed: strerror``."""
    try:
        if unlink_stale:
            _unlink_stale(address)
        await sock.bind(address)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise GenericError(f"{failed}: {e.strerror}") from None
    return sock


def _unlink_stale(path: str) -> None:
    # QEMU unlinks whatever is at the path before binding a unix socket
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise GenericError(f"Failed to unlink socket {path}: {e.strerror}") from None


def _fd_number(s: str) -> int:
    # a number, or the name of a socket-activated descriptor
    fd = activation.socket_fd(s, f"Unable to parse FD number {s}")
    try:
        os.fstat(fd)
    except OSError:
        raise GenericError(f"File descriptor '{fd}' is not open") from None  # noqa: B904
    return fd


def _inherited_listener(s: str) -> trio.socket.SocketType:
    fd = _fd_number(s)
    sock = pysocket.socket(fileno=fd)
    if sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ACCEPTCONN) == 0:
        sock.detach()
        raise GenericError(f"File descriptor '{fd}' is not a listening socket")
    sock.setblocking(False)
    return trio.socket.from_stdlib_socket(sock)


Factory = Callable[[str, dict[str, Any]], Chardev]


def _factories() -> dict[str, Factory]:
    """Each implemented backend's constructor from its ChardevBackend data."""
    from . import fd, mux, udp  # they import this module (Chardev)

    def socket(id: str, d: dict[str, Any]) -> Chardev:
        server = d.get("server", True)
        return SocketChardev(id, d["addr"], server, d.get("wait", True) if server else False,
                             d.get("nodelay", False))

    return {
        "null": lambda id, d: NullChardev(id),
        "ringbuf": lambda id, d: RingbufChardev(id, d.get("size", 65536)),
        "memory": lambda id, d: RingbufChardev(id, d.get("size", 65536)),
        "file": lambda id, d: FileChardev(id, d["out"], d.get("append", False), d.get("in")),
        "stdio": lambda id, d: StdioChardev(id),
        "socket": socket,
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
