"""The ``udp`` chardev (QEMU's char-udp.c over util/qemu-sockets.c's
inet_dgram_saddr): a datagram socket bound to ``local`` and connected to
``remote``; each write is one datagram to the remote, each datagram
received from it is input.

QEMU 7.2 never marks this backend open, so a QMP monitor on it never greets
and qemu-storage-daemon dies (SIGSEGV) on the first command it receives.
Here the backend is open from the start: a monitor greets the remote at
startup and serves the commands it sends.  A datagram refused by the remote
(ICMP port unreachable, reported on the next receive) is dropped and
reading goes on, where QEMU stops reading.

Resources: the socket is the chardev's, closed by :meth:`aclose`; the
stream a frontend gets does not close it.
"""

from __future__ import annotations

import socket as pysocket
from collections.abc import AsyncGenerator
from typing import Any

import trio

from ..qapi.errors import GenericError
from .chardev import Chardev

READ_BUF_LEN = 4096  # QEMU's CHR_READ_BUF_LEN


def _ai_family(addr: dict[str, Any]) -> int:
    """inet_ai_family_from_address."""
    has4, has6 = "ipv4" in addr, "ipv6" in addr
    v4, v6 = bool(addr.get("ipv4")), bool(addr.get("ipv6"))
    if has6 and has4 and not v6 and not v4:
        raise GenericError("Cannot disable IPv4 and IPv6 at same time")
    if has6 and v6 and has4 and v4:
        return pysocket.AF_UNSPEC if addr.get("host") else pysocket.AF_INET6
    if (has6 and v6) or (has4 and not v4):
        return pysocket.AF_INET6
    if (has4 and v4) or (has6 and not v6):
        return pysocket.AF_INET
    return pysocket.AF_UNSPEC


async def _resolve(host: str | None, port: str, family: int, flags: int) -> Any:
    try:
        return (await trio.socket.getaddrinfo(host, port, family, pysocket.SOCK_DGRAM,
                                              0, flags))[0]
    except pysocket.gaierror as e:
        shown = "(null)" if host is None else host
        raise GenericError(f"address resolution failed for {shown}:{port}: "
                           f"{e.strerror}") from None


async def dgram_socket(remote: dict[str, Any], local: dict[str, Any] | None
                       ) -> trio.socket.SocketType:
    """socket_dgram(remote, local): QEMU's checks and messages, in order."""
    if remote["type"] != "inet":
        raise GenericError("socket type unsupported for datagram")
    r = remote["data"]
    family = _ai_family(r)
    host = r.get("host") or "localhost"
    port = r.get("port") or ""
    if not port:
        raise GenericError("remote port not specified")
    peer = await _resolve(host, port, family, pysocket.AI_CANONNAME | pysocket.AI_V4MAPPED
                          | pysocket.AI_ADDRCONFIG)
    laddr: str | None = None
    lport = "0"
    if local is not None:
        # QEMU reads the local address as an inet one, whatever its type
        ld = local.get("data") or {}
        laddr = ld.get("host") or None
        lport = ld.get("port") or "0"
    mine = await _resolve(laddr, lport, peer[0], pysocket.AI_PASSIVE)
    try:
        sock = trio.socket.socket(peer[0], peer[1], peer[2])
    except OSError as e:
        raise GenericError(f"Failed to create socket family {int(peer[0])}: "
                           f"{e.strerror}") from None
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        try:
            await sock.bind(mine[4])
        except OSError as e:
            raise GenericError(f"Failed to bind socket: {e.strerror}") from None
        try:
            await sock.connect(peer[4])
        except OSError as e:
            # QEMU names the local address here (its variables were reused)
            shown = "(null)" if laddr is None else laddr
            raise GenericError(f"Failed to connect to '{shown}:{lport}': "
                               f"{e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class DatagramStream(trio.abc.Stream):
    """A connected datagram socket as a byte stream: one datagram per
    send_all, up to READ_BUF_LEN bytes per receive."""

    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            await self.sock.send(data)
        except OSError:
            pass  # refused or too big: QEMU's write fails and the data is gone

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            try:
                return await self.sock.recv(min(max_bytes or READ_BUF_LEN, READ_BUF_LEN))
            except ConnectionRefusedError:
                continue  # an earlier datagram was refused; keep reading
            except OSError as e:
                raise trio.BrokenResourceError(e) from e

    async def aclose(self) -> None:
        self._closed = True  # the socket is the chardev's
        await trio.lowlevel.checkpoint()


class UdpChardev(Chardev):
    backend = "udp"

    def __init__(self, id: str, remote: dict[str, Any], local: dict[str, Any] | None):
        super().__init__(id)
        self.remote = remote
        self.local = local
        self.sock: trio.socket.SocketType | None = None

    async def open(self) -> None:
        self.sock = await dgram_socket(self.remote, self.local)

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        if self.sock is not None:
            yield DatagramStream(self.sock)

    async def aclose(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        await super().aclose()
