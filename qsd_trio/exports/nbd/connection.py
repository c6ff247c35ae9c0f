"""One NBD client connection: its lifecycle and the option negotiation.

A :class:`Connection` is created by the server for each accepted socket.
It negotiates in the server's nursery (fixed newstyle handshake, options,
STARTTLS); once the client chooses an export it is handed to that export's
nursery and runs the transmission phase (protocol.py, the base class).
Whichever task runs it last closes its stream and gives the server's
connection slot back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ...proto import nbd as P
from .protocol import Transmission
from .tls import _authz_allows, _peer_dn
from .wire import Wire, _Disconnect

if TYPE_CHECKING:
    from .export import NbdExport
    from .server import NbdServer

log = logging.getLogger(__name__)

_PREFERRED_BLOCK = 4096


class Connection(Transmission):
    """A client: negotiation, then transmission inside its export's nursery.

    The connection owns its stream; whichever task runs it last closes it
    (``_close``) and gives the server's connection slot back.
    """

    def __init__(self, server: NbdServer, stream: trio.abc.Stream):
        super().__init__()
        self.server = server
        self.wire = Wire(stream)
        self.structured = False
        # NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths and
        # only extended reply chunks (structured is then set too)
        self.extended = False
        self.no_zeroes = False
        self.tls_done = False
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
        self.server._connection_closed()

    # -- negotiation (runs in the server's nursery) ---------------------------
    async def negotiate(self) -> None:
        try:
            export, last_reply = await self._negotiate()
            if export is not None and export.nursery is not None:
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

    async def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.wire.send(P.option_reply(option, reply, data))

    async def _error(self, option: int, reply: int, message: str) -> None:
        await self._reply(option, reply, message.encode())

    async def _negotiate(self) -> tuple[NbdExport | None, bytes]:
        """Run the option phase; returns the export chosen and the reply that ends it."""
        await self.wire.send(P.server_greeting())
        flags = int.from_bytes(await self.wire.recv_exactly(4), "big")
        fixed = bool(flags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & P.FLAG_C_NO_ZEROES)
        if flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _Disconnect(f"Unknown client flags 0x{flags:x} received")
        while True:
            option, length = P.parse_option_header(await self.wire.recv_exactly(P.OPTION_HEADER_SIZE))
            if length > P.MAX_BUFFER_SIZE:
                raise _Disconnect(f"len ({length}) is larger than max len ({P.MAX_BUFFER_SIZE})")
            if self.server.tls_creds is not None and not self.tls_done:
                if option == P.OPT_STARTTLS:
                    await self.wire.skip(length)
                    if length:
                        await self._error(option, P.REP_ERR_INVALID, "option 'starttls' has unexpected length")
                        continue
                    await self._starttls()
                    continue
                # read the payload first: closing on unread data would reset
                # the connection before the client sees the close
                await self.wire.skip(length)
                if option in (P.OPT_EXPORT_NAME, P.OPT_ABORT):
                    raise _Disconnect(f"Option 0x{option:x} not permitted before TLS")
                await self._error(option, P.REP_ERR_TLS_REQD,
                                  f"Option 0x{option:x} not permitted before TLS")
                continue
            known = option in (P.OPT_EXPORT_NAME, P.OPT_INFO, P.OPT_GO,
                               P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT)
            if known and length > P.MAX_OPTION_SIZE:
                if option == P.OPT_EXPORT_NAME:
                    raise _Disconnect("export name too long")
                await self.wire.skip(length)
                await self._error(option, P.REP_ERR_INVALID, "option too long")
                continue
            payload = await self.wire.recv_exactly(length) if known else b""
            if option == P.OPT_EXPORT_NAME:
                if self.extended:
                    # the spec forbids it; QEMU hangs up
                    raise _Disconnect("Extended headers already negotiated, "
                                      "no more NBD_OPT_EXPORT_NAME")
                name = payload.decode(errors="replace")
                export = self.server.exports.get(name)
                if export is None:
                    raise _Disconnect(f"export '{name}' not present")
                return export, P.export_name_reply(export.size, export.flags, self.no_zeroes)
            if option in (P.OPT_INFO, P.OPT_GO):
                try:
                    export = await self._info(option, payload)
                except P.OptionError as e:
                    await self.wire.send(P.option_error(option, e))
                    continue
                if option == P.OPT_GO:
                    return export, P.option_reply(option, P.REP_ACK)
                await self._reply(option, P.REP_ACK)
                continue
            if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                try:
                    await self._meta(option, payload)
                except P.OptionError as e:
                    await self.wire.send(P.option_error(option, e))
                continue
            # options without a payload we care about: drop it unread
            await self.wire.skip(length)
            if option == P.OPT_ABORT:
                try:
                    await self._reply(option, P.REP_ACK)
                finally:
                    raise _Disconnect("client aborted")  # noqa: B012 - abort ends negotiation
            if not fixed:
                raise _Disconnect(f"Unsupported option {option} without fixed newstyle")
            if option == P.OPT_LIST:
                if length:
                    await self._error(option, P.REP_ERR_INVALID, "option 'list' has unexpected length")
                    continue
                for exp in list(self.server.exports.values()):
                    await self._reply(option, P.REP_SERVER, P.rep_server(exp.name, exp.description or ""))
                await self._reply(option, P.REP_ACK)
            elif option == P.OPT_STRUCTURED_REPLY:
                if length:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "option 'structured reply' has unexpected length")
                elif self.extended:
                    await self._error(option, P.REP_ERR_EXT_HEADER_REQD,
                                      "extended headers already negotiated")
                elif self.structured:
                    await self._error(option, P.REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self.structured = True
                    await self._reply(option, P.REP_ACK)
            elif option == P.OPT_EXTENDED_HEADERS:
                if length:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "option 'extended headers' has unexpected length")
                elif self.extended:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "extended headers already negotiated")
                else:
                    self.extended = self.structured = True
                    await self._reply(option, P.REP_ACK)
            elif option == P.OPT_STARTTLS:
                if self.tls_done:
                    await self._error(option, P.REP_ERR_INVALID, "TLS already enabled")
                else:
                    await self._error(option, P.REP_ERR_POLICY, "TLS not configured")
            else:
                await self._error(option, P.REP_ERR_UNSUP,
                                  f"Unsupported option {option} ({P.OPT_NAMES.get(option, '<unknown>')})")

    async def _starttls(self) -> None:
        """NBD_OPT_STARTTLS: ACK, TLS handshake, then the authz identity check."""
        await self._reply(P.OPT_STARTTLS, P.REP_ACK)
        self.wire.detach_raw()
        context = self.server.tls_context
        if isinstance(context, str):
            from ..tls_psk import PskTlsStream

            tls = PskTlsStream(self.wire.stream, context)
        else:
            tls = trio.SSLStream(self.wire.stream, context, server_side=True)
        self.wire = Wire(tls)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise _Disconnect(f"TLS handshake failed: {e}") from None
        self.tls_done = True
        authz_id = self.server.tls_authz
        # QEMU 7.2 checks tls-authz against x509 client certificates only: a
        # PSK session (whose identity was checked by knowing the key) or an
        # anonymous one passes whatever the authz object says
        if authz_id is not None and self.server.tls_x509:
            dn = _peer_dn(tls.getpeercert())
            authz = self.server.daemon.objects.get(authz_id)
            if dn is None or authz is None or not _authz_allows(authz, dn):
                raise _Disconnect(f"TLS x509 authz check for {dn} is denied")

    async def _info(self, option: int, payload: bytes) -> NbdExport:
        """Send the NBD_REP_INFO replies; the caller sends the final ACK."""
        name, infos = P.parse_info_request(payload, P.OPT_NAMES[option])
        export = self.server.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        if P.INFO_NAME in infos:
            await self._reply(option, P.REP_INFO, P.info_name(export.name))
        if export.description:
            await self._reply(option, P.REP_INFO, P.info_description(export.description))
        align = max(getattr(export.node, "request_alignment", 1), 1)
        minimum = align if P.INFO_BLOCK_SIZE in infos else 1
        maximum = P.MAX_BUFFER_SIZE
        node_max = getattr(export.node, "max_transfer", None)
        if node_max:
            maximum = min(maximum, node_max)
        await self._reply(option, P.REP_INFO,
                          P.info_block_size(minimum, max(_PREFERRED_BLOCK, minimum), maximum))
        await self._reply(option, P.REP_INFO, P.info_export(export.size, export.flags))
        if option == P.OPT_INFO and P.INFO_BLOCK_SIZE not in infos and align > 1:
            raise P.OptionError(P.REP_ERR_BLOCK_SIZE_REQD,
                                "request NBD_INFO_BLOCK_SIZE to use this export")
        return export

    async def _meta(self, option: int, payload: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if not self.structured:
            raise P.OptionError(P.REP_ERR_INVALID,
                                f"request option '{P.OPT_NAMES[option]}' when structured reply "
                                "is not negotiated")
        name, queries = P.parse_meta_request(payload, P.OPT_NAMES[option])
        export = self.server.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        available = export.meta_contexts()
        chosen = P.match_meta_contexts(queries, available, listing=not setting)
        ids = [(available.index(c), c) for c in chosen]
        for cid, ctx in ids:
            # ids only mean something once set; QEMU lists every context as 0
            await self._reply(option, P.REP_META_CONTEXT,
                              P.meta_context_reply(cid if setting else 0, ctx))
        if setting:
            self.meta_export = name
            self.meta_ids = ids
        await self._reply(option, P.REP_ACK)
