"""Listening sockets from a QAPI SocketAddress.

``unix``, ``inet`` and ``fd`` addresses as qemu-storage-daemon takes them
(``--nbd-server addr.type=...`` or nbd-server-start), with QEMU's error
messages; nbdkit's sockets.c has the same role.  The NBD server and the
``--metrics`` endpoint listen through it.
"""

from __future__ import annotations

import os
import socket as _stdsocket
from typing import Any

import trio

from . import activation
from .qapi.errors import GenericError


def no_notsent_limit(sock: _stdsocket.socket | trio.socket.SocketType) -> None:
    """Undo what trio's SocketStream sets on a TCP socket: TCP_NOTSENT_LOWAT
    at 16 KiB, so that a send returns as soon as that much waits unsent and a
    1 MiB NBD payload leaves in pieces, each a wait for the socket.  0 is the
    system's default (no limit), as QEMU's NBD server and client have.  A
    unix socket, or a passed descriptor that is not TCP, is left alone."""
    if sock.family == _stdsocket.AF_UNIX or not hasattr(_stdsocket, "TCP_NOTSENT_LOWAT"):
        return
    try:
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NOTSENT_LOWAT, 0)
    except OSError:
        pass  # not TCP after all: nothing to undo


def addr_dict(addr: Any) -> dict[str, Any]:
    """SocketAddress or SocketAddressLegacy (attrs instance or dict) -> flat dict."""
    if not isinstance(addr, dict):
        # schema.to_qmp keeps union tags, which are class variables of the
        # variant classes and so invisible to attrs.asdict
        from .qapi import schema

        addr = schema.to_qmp(addr)
    assert isinstance(addr, dict)
    flat: dict[str, Any] = {k.replace("_", "-"): v for k, v in addr.items() if v is not None}
    data = flat.get("data")
    if isinstance(data, dict):  # legacy form: {"type": ..., "data": {...}}
        legacy = {k.replace("_", "-"): v for k, v in data.items() if v is not None}
        legacy["type"] = flat["type"]
        return legacy
    return flat


async def open_listeners(addr: dict[str, Any]) -> list[trio.SocketListener]:
    """Listening sockets for a flat address (see :func:`addr_dict`).

    Raises:
        GenericError: with QEMU's message, when it cannot bind or resolve.
    """
    kind = addr["type"]
    if kind == "unix":
        path = addr["path"]
        sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            # QEMU replaces a stale socket file
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            await sock.bind(path)
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise GenericError(f"Failed to bind socket to {path}: {e.strerror}") from None
        return [trio.SocketListener(sock)]
    if kind == "inet":
        host = addr.get("host") or None
        port = str(addr["port"])
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM,
                                                  flags=_stdsocket.AI_PASSIVE)
        except _stdsocket.gaierror as e:
            raise GenericError(f"address resolution failed for {host or ''}:{port}: "
                               f"{e.strerror}") from None
        port_n = int(infos[0][4][1])
        try:
            return await trio.open_tcp_listeners(port_n, host=host)
        except OSError as e:
            raise GenericError(f"Failed to bind socket: {e.strerror}") from None
    if kind == "fd":
        fd_str = addr["str"]
        # a number, or the name of a socket-activated descriptor; there is
        # no fd passing over QMP in qemu-storage-daemon, hence QEMU's error
        fd = activation.socket_fd(fd_str, "only QEMU supports file descriptor passing")
        try:
            sock = trio.socket.from_stdlib_socket(_stdsocket.socket(fileno=fd))
        except OSError as e:
            raise GenericError(f"Failed to use socket fd {fd_str}: {e.strerror}") from None
        return [trio.SocketListener(sock)]
    raise GenericError(f"Unsupported socket address type '{kind}'")
