"""Clients for the socket chardev's differential tests: plain, telnet,
WebSocket and TLS connections to a monitor, read until what a step waits
for has arrived (never for a fixed time), with QEMU's stalls nudged.

qemu-storage-daemon 7.2 stalls in two places a client can see, which these
clients work around for both daemons alike (qsd-trio answers without them):

- WebSocket: the frames are decoded in the main loop and the monitor reads
  the result in its own thread's loop, which nothing wakes; a QMP command
  on another monitor (served by that thread) wakes it (``poke``).
- TLS: a record gnutls has read ahead stays unread until the socket is
  readable again; another record (a blank, which QMP ignores) makes it so.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Callable

from qsd_trio.chardev.websocket import encode_frame

DEADLINE = 30.0   # seconds a step may take before the test fails

GREETING = re.compile(rb'\{"QMP": \{"version": \{[^}]*\}, "package": "[^"]*"\}, '
                      rb'"capabilities": \["oob"\]\}\}\r\n')
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def normalise(data: bytes) -> bytes:
    """The QMP greeting names the version and package, which differ; the
    Date header is the time."""
    return DATE.sub(b"\r\nDate: <date>\r\n", GREETING.sub(b"<greeting>\r\n", data))


def no_ports(name: str) -> str:
    """A chardev's name with its port numbers (the system's choice) as P."""
    return re.sub(r":\d+(?=,| |$)", ":P", name)


def listen_port(q, label: str = "c") -> int:
    """The port a listening inet chardev got (its query-chardev filename)."""
    name = next(c["filename"] for c in q.cmd("query-chardev") if c["label"] == label)
    m = re.search(r":(\d+),server=on", name)
    assert m, name
    return int(m.group(1))


def chardev_filename(q, label: str = "c") -> str:
    return next(c["filename"] for c in q.cmd("query-chardev") if c["label"] == label)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll a daemon's state (query-chardev, a file) until ``predicate``."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_disconnected(q, label: str = "c") -> None:
    """Until the chardev has seen its client go (and listens again)."""
    wait_for(lambda: chardev_filename(q, label).startswith("disconnected:"),
             f"{label} to be disconnected")


class Conn:
    """A connection to a chardev, read into a buffer.

    ``recv``/``send`` are the transport's (a socket, an ssl.SSLSocket);
    ``nudge`` is called whenever nothing came for a moment (see the module
    docstring)."""

    def __init__(self, sock: socket.socket, nudge: Callable[[], None] | None = None):
        self.sock = sock
        self.nudge = nudge
        self.buf = b""
        self.eof = False
        sock.settimeout(0.2)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:  # socket.timeout, for plain and TLS sockets
            if self.nudge is not None:
                self.nudge()
            return
        except OSError:
            chunk = b""  # reset, or TLS ended without close_notify: the end too
        if not chunk:
            self.eof = True
        self.buf += chunk

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker``."""
        deadline = time.monotonic() + DEADLINE
        while marker not in self.buf:
            assert not self.eof, f"connection closed before {marker!r}: {self.buf!r}"
            assert time.monotonic() < deadline, f"no {marker!r} in {self.buf!r}"
            self._more()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_to_eof(self) -> bytes:
        deadline = time.monotonic() + DEADLINE
        while not self.eof:
            assert time.monotonic() < deadline, f"not closed: {self.buf!r}"
            self._more()
        out, self.buf = self.buf, b""
        return out

    def close(self) -> None:
        self.sock.close()


# -- WebSocket --------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(key: str = KEY, proto: str = "binary", extra: str = "") -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {proto}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def client_frame(payload: bytes, op: int = 2, fin: bool = True, mask: bytes = b"abcd",
                 masked: bool = True) -> bytes:
    """A frame as a client sends it (``masked=False``: as it must not)."""
    return encode_frame(op, payload, fin=fin, mask=mask if masked else None)


# requests whose fate was measured against qemu-storage-daemon 7.2
REFUSED_REQUESTS = [
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\n\r\n",
    b"GET /foo HTTP/1.1\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1 \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad\r\n\r\n",
    upgrade_request(proto="text"),
    upgrade_request(key="abc"),
    upgrade_request().replace(b"Version: 13", b"Version: 8"),
    upgrade_request().replace(b"Connection: Upgrade", b"Connection: keep-alive"),
    upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"),
    upgrade_request().replace(b"Host: x\r\n", b""),
    upgrade_request().replace(b"Host: x", b"Hostx"),
    upgrade_request(extra="X-Junk: 1\r\n" * 27),     # 33 headers
]
ACCEPTED_REQUESTS = [
    upgrade_request().replace(b"Connection: Upgrade", b"Connection: keep-alive, upgrade"),
    upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: WebSocket"),
    upgrade_request().replace(b"Host: x", b"HOST:    x"),
    upgrade_request(proto="chat, binary"),
    upgrade_request(proto="binaryx"),
    upgrade_request(extra="X-Junk: 1\r\n" * 26),     # 32 headers
]


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole server frames in ``data`` as (first byte, payload), and the rest."""
    frames = []
    while len(data) >= 2:
        n, at = data[1] & 0x7F, 2
        if n == 126:
            if len(data) < 4:
                break
            n, at = struct.unpack(">H", data[2:4])[0], 4
        elif n == 127:
            if len(data) < 10:
                break
            n, at = struct.unpack(">Q", data[2:10])[0], 10
        if len(data) < at + n:
            break
        frames.append((data[0], data[at:at + n]))
        data = data[at + n:]
    return frames, data


class WsConn(Conn):
    """A WebSocket client: frames from the server gathered as (first byte,
    normalised payload)."""

    def upgrade(self) -> list:
        """The upgrade: the server's reply and the frames up to the greeting."""
        self.send(upgrade_request())
        return [normalise(self.read_until(b"\r\n\r\n")), self.frames_until(b"<greeting>")]

    def frames_until(self, marker: bytes | int | None) -> list[tuple[int, bytes]]:
        """Frames up to the one whose payload holds ``marker`` (an int: whose
        first byte is that; None: up to the end of the connection)."""
        deadline = time.monotonic() + DEADLINE
        got: list[tuple[int, bytes]] = []
        while True:
            frames, self.buf = split_frames(self.buf)
            got += [(b0, normalise(p)) for b0, p in frames]
            if isinstance(marker, int) and any(b0 == marker for b0, _ in got):
                return got
            if isinstance(marker, bytes) and any(marker in p for _, p in got):
                return got
            if self.eof:
                assert marker is None, f"closed before {marker!r}: {got!r}"
                return got + ([(-1, self.buf)] if self.buf else [])
            assert time.monotonic() < deadline, f"waiting for {marker!r}: {got!r}"
            self._more()
