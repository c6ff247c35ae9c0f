"""The NBD server: the daemon's one listener for NBD clients.

:class:`NbdServer` is a service (``run(task_status)``) listening on one
address.  Each accepted connection is negotiated in the server's nursery;
once the client picks an export (``NBD_OPT_GO`` / ``NBD_OPT_EXPORT_NAME``)
the connection moves into that export's nursery, so deleting an export ends
exactly its clients and stopping the server ends everything.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import TYPE_CHECKING, Any

import trio

from ...objects.tls_creds import find_creds
from ...sockets import addr_dict, open_listeners
from .connection import Connection
from .tls import prop, server_context

if TYPE_CHECKING:
    from ...daemon import Daemon
    from .export import NbdExport


class NbdServer:
    """The daemon's one NBD server (nbd-server-start / --nbd-server).

    Resources: the listening sockets and the negotiating connections live in
    :meth:`run`'s nursery and are closed when its cancel scope is cancelled
    (:meth:`stop`); exports (and their clients) are separate tasks that
    nbd-server-stop deletes first.
    """

    def __init__(self, daemon: Daemon, addr: Any, *, tls_creds: str | None = None,
                 tls_authz: str | None = None, max_connections: int | None = None):
        self.daemon = daemon
        self.addr = addr_dict(addr)
        # ids, as daemon.object_users() looks them up; the objects are read
        # when a client asks for TLS, so they always reflect what is defined
        self.tls_creds = tls_creds
        self.tls_x509 = False
        # an SSLContext, or for PSK the keys file (see tls.server_context)
        self.tls_context: ssl.SSLContext | str | None = None
        # looked up per client, as QEMU does: a missing object denies access
        self.tls_authz = tls_authz
        self.max_connections = max_connections or 0
        self.exports: dict[str, NbdExport] = {}
        self.connections = 0
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self._slots = trio.Semaphore(self.max_connections) if self.max_connections else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.cancel_scope:
                listeners = await open_listeners(self.addr)
                try:
                    # after binding, as nbd_server_start: a bad address is
                    # reported before bad credentials
                    self._load_creds()
                    async with trio.open_nursery() as nursery:
                        for lst in listeners:
                            nursery.start_soon(self._accept_loop, lst, nursery)
                        task_status.started()
                finally:
                    for lst in listeners:
                        with trio.CancelScope(shield=True):
                            await lst.aclose()
                    if self.addr["type"] == "unix":
                        # QEMU removes its socket file when the server stops
                        with contextlib.suppress(OSError):
                            os.unlink(self.addr["path"])
        finally:
            self.finished.set()

    def _load_creds(self) -> None:
        if self.tls_creds is not None:
            creds = find_creds(self.daemon.objects, self.tls_creds, "server")
            self.tls_context = server_context(creds)
            # QEMU checks tls-authz with the client's certificate, so only
            # for x509 credentials that verify it (verify-peer, the default)
            self.tls_x509 = (creds.qom_type == "tls-creds-x509"
                             and prop(creds, "verify-peer", True))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # the socket listens from the start, but clients are served only once
        # startup is complete and the pidfile written (the man page's promise)
        await self.daemon.accepting.wait()
        while True:
            # at max-connections QEMU stops accepting: new clients wait in
            # the listen backlog until someone leaves
            if self._slots is not None:
                await self._slots.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                if self._slots is not None:
                    self._slots.release()
                raise
            self.connections += 1
            conn = Connection(self, stream)
            nursery.start_soon(conn.negotiate)

    def connection_closed(self) -> None:
        """A connection closed its stream: its slot is free for the next client."""
        self.connections -= 1
        if self._slots is not None:
            self._slots.release()

    async def stop(self) -> None:
        """Stop listening and end the connections still negotiating."""
        self.cancel_scope.cancel()
        await self.finished.wait()
