"""The socket chardev (QEMU 7.2's chardev/char-socket.c): a stream socket
on a unix path, an inet host:port or an inherited descriptor, listening
(``server``) or connecting out, with ChardevSocket's options: ``wait``,
``nodelay``, ``telnet``/``tn3270``, ``websocket``, ``reconnect``,
``tls-creds``, ``tls-authz``.

A listening chardev serves one client at a time and lets the next wait in
the listen backlog (QEMU stops accepting while it has a client).  A client
chardev connects when it opens, and fails if it cannot; with
``reconnect=N`` a failure there is no error: it tries again N seconds after
each failure or disconnection, for as long as its frontend reads, and
reports the first failure since it was last connected ("Unable to connect
character device ID: ...", as QEMU; the first attempt's failure is reported
as the chardev opens, with or without a frontend).  A chardev acts for its
frontend only: without one it accepts nobody and does not reconnect
(QEMU's does both; nothing would read what such a connection carries).

Each connection gets QEMU's layers before the frontend sees it (see
:mod:`.layers`): TLS, WebSocket, telnet.  A connection whose handshake
fails is dropped without a word, as in QEMU.

Resources: the listening socket, a connection made while opening (client
mode, or ``wait=on``) and a unix path the chardev bound are released by
:meth:`SocketChardev.aclose`; a connection handed to the frontend is the
frontend's to close.  Errors are QEMU's messages (GenericError), raised by
:meth:`SocketChardev.open`.
"""

from __future__ import annotations

import os
import socket as pysocket
from collections.abc import AsyncGenerator
from typing import Any

import trio

from .. import activation
from ..objects.tls_creds import find_creds
from ..qapi.errors import GenericError, error_report, info_report
from . import layers
from .chardev import Chardev
from .telnet import IacFilter, init_bytes


class SocketChardev(Chardev):
    """``socket``: see the module's docstring.

    Attributes:
        addr: SocketAddressLegacy in QMP form.
        listener: the listening socket (server mode), until closed.
    """

    backend = "socket"

    def __init__(self, id: str, addr: dict[str, Any], *, server: bool = True,
                 wait: bool | None = None, nodelay: bool = False, telnet: bool = False,
                 tn3270: bool = False, websocket: bool = False, reconnect: int | None = None,
                 tls_creds: str | None = None, tls_authz: str | None = None):
        """The options as ChardevSocket has them (None: not given, which
        qmp_chardev_validate_socket tells apart from a value)."""
        super().__init__(id)
        self.addr = addr
        self.server = server
        self.wait = wait
        self.nodelay = nodelay
        self.telnet = telnet
        self.tn3270 = tn3270
        self.websocket = websocket
        self.reconnect = reconnect
        self.tls_creds = tls_creds
        self.tls_authz = tls_authz
        self.listener: trio.socket.SocketType | None = None
        self._objects: dict[str, Any] = {}
        self._tls: Any = None            # server: SSLContext or PSK file; client: ClientTls
        self._authz_x509 = False         # the server checks x509 client certificates
        # QEMU's do_telnetopt: one filter for the chardev's life
        self._iac = IacFilter(tn3270) if server and (telnet or tn3270) else None
        self._first: trio.socket.SocketType | None = None  # connected while opening
        self._connected: trio.socket.SocketType | None = None  # QEMU's "connected" socket
        self._listen_addr: tuple[str, int] | None = None
        self._unlink: str | None = None
        self._reported = False           # QEMU's connect_err_reported
        self._failure: GenericError | None = None  # the first attempt's, to report

    def _reconnects(self) -> bool:
        # QEMU: reconnect only when positive (0 and less connect once)
        return not self.server and self.reconnect is not None and self.reconnect > 0

    def bind(self, daemon: Any) -> None:
        self._objects = daemon.objects

    # -- query-chardev -------------------------------------------------------------
    @property
    def _protocol(self) -> str:
        # qemu_chr_socket_protocol: tn3270 alone reads "tcp"
        return "telnet" if self.telnet else "websocket" if self.websocket else "tcp"

    def _address(self) -> str:
        """qemu_chr_socket_address: how a chardev without a client reads."""
        t, d = self.addr["type"], self.addr["data"]
        listen = ",server=on" if self.server else ""
        if t == "inet":
            # a listener reads as the address it got (port 0 resolved)
            host, port = self._listen_addr or (d.get("host", ""), d.get("port", ""))
            return f"{self._protocol}:{host}:{port}{listen}"
        if t == "unix":
            return f"unix:{d['path']}{listen}"
        return f"fd:{d.get('str')}{listen}"

    @property
    def filename(self) -> str:
        sock = self._connected or self._first
        if sock is None:
            return f"disconnected:{self._address()}"
        return self._connected_name(sock)

    def _connected_name(self, sock: trio.socket.SocketType) -> str:
        """qemu_chr_compute_filename: from the connection's own addresses."""
        listen = ",server=on" if self.server else ""
        try:
            local = sock.getsockname()
            peer = sock.getpeername()
        except OSError:
            return f"disconnected:{self._address()}"
        if sock.family == pysocket.AF_UNIX:
            path = local if isinstance(local, str) else local.decode(errors="replace")
            return f"unix:{path}{listen}"
        lb, rb = ("[", "]") if sock.family == pysocket.AF_INET6 else ("", "")
        return (f"{self._protocol}:{lb}{local[0]}{rb}:{local[1]}{listen} <-> "
                f"{lb}{peer[0]}{rb}:{peer[1]}")

    # -- opening -------------------------------------------------------------------
    async def open(self) -> None:
        """qmp_chardev_open_socket: the TLS credentials, the options checked
        together, then listen (and with ``wait`` take the first client) or
        connect; raises GenericError."""
        creds = None
        if self.tls_creds is not None:
            creds = find_creds(self._objects, self.tls_creds,
                               "server" if self.server else "client")
        self._validate()
        if creds is not None:
            self._tls_setup(creds)
        if not self.server:
            if self._reconnects():
                # tried now, as QEMU's asynchronous first attempt; a
                # failure is no error, only reported (QEMU reports it
                # whether or not a frontend ever reads); the next attempt
                # comes ``reconnect`` seconds later
                try:
                    self._first = await self._connect()
                except GenericError as e:
                    self._failure = e
                    self._report(e)
            else:
                self._first = await self._connect()
            return
        await self._listen()
        if self.wait:
            # server=on,wait=on: QEMU blocks startup until a client connects
            info_report(f"QEMU waiting for connection on: {self.filename}")
            self._first = await self._accept()

    def _validate(self) -> None:
        """qmp_chardev_validate_socket, in its order."""
        t = self.addr["type"]
        if t == "fd":
            if self.reconnect is not None:
                raise GenericError("'reconnect' option is incompatible with 'fd' address type")
            if self.tls_creds is not None and not self.server:
                raise GenericError("'tls_creds' option is incompatible with 'fd' address "
                                   "type as client")
        elif t == "unix" and self.tls_creds is not None:
            raise GenericError("'tls_creds' option is incompatible with 'unix' address type")
        if self.tls_authz is not None and self.tls_creds is None:
            raise GenericError("'tls_authz' option requires 'tls_creds' option")
        if self.server:
            if self.reconnect is not None:
                raise GenericError("'reconnect' option is incompatible with socket in server "
                                   "listen mode")
        else:
            if self.websocket:
                raise GenericError("Websocket client is not implemented")
            if self.wait is not None:
                raise GenericError("'wait' option is incompatible with socket in client "
                                   "connect mode")

    def _tls_setup(self, creds: Any) -> None:
        """The TLS side of the credentials, read now and kept (QEMU holds a
        reference: object-del does not take them from the chardev)."""
        if self.server:
            from ..exports.nbd.tls import server_context  # TLS code, loaded with tls-creds

            self._tls = server_context(creds)
            self._authz_x509 = (self.tls_authz is not None and creds.qom_type == "tls-creds-x509"
                                and creds.props.get("verify-peer", True))
        else:
            from ..nodes.nbd_tls import client_tls  # TLS code, loaded with tls-creds

            # the certificate must name the host connected to (QEMU's hostname)
            self._tls = client_tls(self._objects, creds.id, self.addr["data"].get("host"))

    async def _listen(self) -> None:
        t, d = self.addr["type"], self.addr["data"]
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
            self._listen_addr = self.listener.getsockname()[:2]
        else:
            raise GenericError(f"Parameter 'addr.type' does not accept value '{t}'")

    async def _connect(self) -> trio.socket.SocketType:
        t, d = self.addr["type"], self.addr["data"]
        if t == "unix":
            targets = [(pysocket.AF_UNIX, pysocket.SOCK_STREAM, 0, d["path"])]
            name = d["path"]
        elif t == "inet":
            host, port = d["host"], d["port"]
            name = f"{host}:{port}"
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=pysocket.SOCK_STREAM)
            except pysocket.gaierror as e:
                raise GenericError(f"address resolution failed for {name}: {e.strerror}") from None
            targets = [(family, type_, proto, addr) for family, type_, proto, _, addr in infos]
        elif t == "fd":
            return self._client_socket(trio.socket.from_stdlib_socket(
                pysocket.socket(fileno=_fd_number(d["str"]))))
        else:
            raise GenericError(f"Parameter 'addr.type' does not accept value '{t}'")
        # each address in turn, as QEMU's inet_connect_saddr: the last error counts
        error = ""
        for family, type_, proto, addr in targets:
            sock = trio.socket.socket(family, type_, proto)
            try:
                await sock.connect(addr)
            except OSError as e:
                sock.close()
                # trio's message adds the address: the errno's text is QEMU's
                error = os.strerror(e.errno) if e.errno else str(e)
                continue
            except BaseException:
                sock.close()
                raise
            return self._client_socket(sock)
        raise GenericError(f"Failed to connect to '{name}': {error}")

    async def _accept(self) -> trio.socket.SocketType:
        assert self.listener is not None
        sock, _ = await self.listener.accept()
        return self._client_socket(sock)

    def _client_socket(self, sock: trio.socket.SocketType) -> trio.socket.SocketType:
        # tcp_chr_new_client: nodelay on the connection, either way round
        if self.nodelay and sock.family != pysocket.AF_UNIX:
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        return sock

    # -- connections ---------------------------------------------------------------
    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        try:
            sock, self._first = self._first, None
            while True:
                if sock is None:
                    if self.server:
                        if self.listener is None:
                            return
                        sock = await self._accept()
                    elif self._reconnects():
                        sock = await self._reconnect()
                    else:
                        return  # a client without reconnect is done when its peer leaves
                stream = await self._layers(sock)
                raw, sock = sock, None
                if stream is not None:
                    self._connected = raw
                    yield stream
                    self._connected = None
                if self._reconnects():
                    await trio.sleep(self.reconnect or 0)
        finally:
            self._connected = None

    async def _reconnect(self) -> trio.socket.SocketType:
        """Connect, trying again every ``reconnect`` seconds; the first
        failure since the last connection is reported (check_report_connect_error)."""
        assert self.reconnect
        while True:
            failure, self._failure = self._failure, None
            if failure is None:
                try:
                    sock = await self._connect()
                except GenericError as e:
                    failure = e
                else:
                    self._reported = False
                    return sock
            self._report(failure)
            await trio.sleep(self.reconnect)

    def _report(self, failure: GenericError) -> None:
        # check_report_connect_error: once until a connection succeeds
        if not self._reported:
            # QEMU's first attempt is asynchronous: its report names no option
            error_report(f"Unable to connect character device {self.id}: {failure.desc}",
                         located=False)
            self._reported = True

    async def _layers(self, sock: trio.socket.SocketType) -> trio.abc.Stream | None:
        """The connection with QEMU's layers over it (TLS, WebSocket,
        telnet), or None when a handshake failed (the socket is closed)."""
        stream: trio.abc.Stream = trio.SocketStream(sock)
        try:
            if self._tls is not None:
                stream = await self._start_tls(stream)
            if self.websocket:
                stream = await layers.WebSocketStream.accept(stream)
            if self._iac is not None:
                await stream.send_all(init_bytes(self.tn3270))
                stream = layers.TelnetStream(stream, self._iac)
        except (layers.Refused, trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _start_tls(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        if self.server:
            return await layers.tls_server(stream, self._tls,
                                           authz=self._authz if self._authz_x509 else None)
        from ..nodes.nbd_tls import TlsError, start_client  # loaded with tls-creds

        try:
            return await start_client(self._tls, stream)
        except TlsError as e:
            raise layers.Refused(str(e)) from None

    def _authz(self, dn: str | None) -> bool:
        """The tls-authz object, looked up for each client (a missing one denies)."""
        from ..exports.nbd.tls import authz_allows  # loaded with tls-creds

        authz = self._objects.get(self.tls_authz) if self.tls_authz else None
        return dn is not None and authz is not None and authz_allows(authz, dn)

    async def aclose(self) -> None:
        if self._first is not None:
            self._first.close()
            self._first = None
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


def socket_chardev(id: str, d: dict[str, Any]) -> SocketChardev:
    """A SocketChardev from ChardevSocket's QMP members (QMP's defaults:
    server=on, wait=off)."""
    return SocketChardev(
        id, d["addr"], server=d.get("server", True), wait=d.get("wait"),
        nodelay=d.get("nodelay", False), telnet=d.get("telnet", False),
        tn3270=d.get("tn3270", False), websocket=d.get("websocket", False),
        reconnect=d.get("reconnect"), tls_creds=d.get("tls-creds"),
        tls_authz=d.get("tls-authz"))


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
