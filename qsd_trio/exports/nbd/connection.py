"""One NBD client connection: its lifecycle, and the I/O of its negotiation.

A :class:`Connection` is created by the server for each accepted socket.
It runs the option phase in the server's nursery, driving the sans-I/O
:class:`~.handshake.Handshake` over its :class:`~.wire.Wire` and doing what
the state machine cannot: the TLS handshake after NBD_OPT_STARTTLS and the
tls-authz check.  Once the client chooses an export the connection is
handed to that export's nursery and runs the transmission phase
(:class:`~.protocol.Transmission`, its base class).  Whichever task runs it
last closes its stream and gives the server's connection slot back.
nbdkit's connections.c has the same role.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ...proto import nbd as P
from .handshake import Closed, ExportChosen, Handshake, NeedData, StartTls
from .protocol import Transmission
from .tls import authz_allows, peer_dn
from .wire import Wire, _Disconnect

if TYPE_CHECKING:
    from ..tls_psk import PskTlsStream
    from .export import NbdExport
    from .server import NbdServer

log = logging.getLogger(__name__)


class Connection(Transmission):
    """A client: negotiation, then transmission inside its export's nursery.

    The connection owns its stream; whichever task runs it last closes it
    (``_close``) and gives the server's connection slot back.  A client that
    breaks the protocol or vanishes during negotiation ends its own
    connection only (logged at debug level).
    """

    def __init__(self, server: NbdServer, stream: trio.abc.Stream):
        super().__init__()
        self.server = server
        self.wire = Wire(stream)
        self.handshake: Handshake[NbdExport] = Handshake(
            server.exports, tls_required=server.tls_creds is not None)
        # the negotiated state, copied from the handshake when it ends
        self.structured = False
        self.extended = False
        self.meta_export: str | None = None
        self.meta_ids: list[tuple[int, str]] = []  # (context id, name) after SET
        self.export: NbdExport | None = None
        self._closed = False
        self._handed_over = False

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.wire.aclose()
        self.server.connection_closed()

    # -- negotiation (runs in the server's nursery) ---------------------------
    async def negotiate(self) -> None:
        try:
            export, last_reply = await self._negotiate()
            if export.nursery is not None:
                # count the client before it can send a request, so that
                # block-export-del mode=safe sees it; then hand the connection
                # to the export's nursery: from now on the export (not the
                # server) decides when it ends
                export.clients.add(self)
                self._handed_over = True
                export.nursery.start_soon(self.serve, export, last_reply)
        except (_Disconnect, P.NbdProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as e:
            log.debug("nbd client negotiation ended: %s", e)
        finally:
            if not self._handed_over:
                with trio.CancelScope(shield=True):
                    await self._close()

    async def _negotiate(self) -> tuple[NbdExport, bytes]:
        """Run the option phase; returns the export chosen and the reply that ends it."""
        hs = self.handshake
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                await self.wire.send(out)
            if isinstance(event, NeedData):
                # never more than the handshake asked for: what follows may
                # be a TLS handshake or the first request
                hs.receive_data(await self.wire.receive_some(hs.bytes_wanted))
            elif isinstance(event, StartTls):
                await self._starttls()
                hs.tls_established()
            elif isinstance(event, ExportChosen):
                self.structured = hs.structured
                self.extended = hs.extended
                self.meta_export = hs.meta_export
                self.meta_ids = hs.meta_ids
                return event.export, event.reply
            else:
                assert isinstance(event, Closed)
                raise _Disconnect(event.reason)

    async def _starttls(self) -> None:
        """The TLS handshake after NBD_OPT_STARTTLS's ACK, then the authz check."""
        self.wire.detach_raw()
        context = self.server.tls_context
        assert context is not None  # the handshake asks for TLS only when configured
        tls: PskTlsStream | trio.SSLStream[trio.abc.Stream]
        if isinstance(context, str):
            from ..tls_psk import PskTlsStream  # pyOpenSSL, loaded with PSK credentials

            tls = PskTlsStream(self.wire.stream, context)
        else:
            tls = trio.SSLStream(self.wire.stream, context, server_side=True)
        self.wire = Wire(tls)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise _Disconnect(f"TLS handshake failed: {e}") from None
        authz_id = self.server.tls_authz
        # QEMU 7.2 checks tls-authz against x509 client certificates only: a
        # PSK session (whose identity was checked by knowing the key) or an
        # anonymous one passes whatever the authz object says
        if authz_id is not None and isinstance(tls, trio.SSLStream) and self.server.tls_x509:
            dn = peer_dn(tls.getpeercert())
            authz = self.server.daemon.objects.get(authz_id)
            if dn is None or authz is None or not authz_allows(authz, dn):
                raise _Disconnect(f"TLS x509 authz check for {dn} is denied")
