"""The layers a socket chardev puts over a connection before its frontend
sees it, in QEMU 7.2's order (char-socket.c's ``tcp_chr_new_client``):
TLS, then WebSocket, then telnet.  Each is a ``trio.abc.Stream`` over the
one below; the protocols themselves are the sans-I/O codecs in
:mod:`.websocket` and :mod:`.telnet`, TLS is the project's (the NBD
server's contexts and authz, the NBD client's session).

Resources: a layer owns the stream below it and closes it in
:meth:`aclose`.  A layer that cannot be set up raises :class:`Refused`
(the caller closes the connection, as QEMU drops it without a word).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from . import websocket as ws
from .telnet import IacFilter

if TYPE_CHECKING:
    from collections.abc import Callable


class Refused(Exception):
    """The client's handshake failed (TLS, authz, WebSocket upgrade)."""


class _Layer(trio.abc.Stream):
    """A stream over ``transport`` whose reads are decoded into a buffer
    and handed out at most ``max_bytes`` at a time."""

    def __init__(self, transport: trio.abc.Stream):
        self.transport = transport
        self._pending = bytearray()

    def _take(self, max_bytes: int | None) -> bytes:
        n = len(self._pending) if max_bytes is None else max_bytes
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport.aclose()


class TelnetStream(_Layer):
    """A telnet (or TN3270) server's connection: telnet commands filtered out
    of what is read by ``iac`` (the chardev's, which outlives connections,
    as in QEMU); what is written goes as it is (QEMU does not double 0xff)."""

    def __init__(self, transport: trio.abc.Stream, iac: IacFilter):
        super().__init__(transport)
        self.iac = iac

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            data = await self.transport.receive_some(max_bytes)
            if not data:
                return b""
            # IAC BREAK is a break event, which a QMP monitor ignores
            self._pending += self.iac.feed(data)
        return self._take(max_bytes)


class WebSocketStream(_Layer):
    """A WebSocket server's connection after the upgrade: the client's
    binary frames in, what is written out as binary frames.  Pings are
    answered while reading; a close frame (or a fault) is answered and ends
    the stream: reads see end of file, writes fail with BrokenResourceError.
    Writes (the frontend's and the pongs) go out one at a time."""

    def __init__(self, transport: trio.abc.Stream, unread: bytes = b""):
        super().__init__(transport)
        self._decoder = ws.FrameDecoder()
        self._unread = unread
        self._send_lock = trio.Lock()
        self._ended = False

    @classmethod
    async def accept(cls, transport: trio.abc.Stream,
                     clock: Callable[[], float] = time.time) -> WebSocketStream:
        """Answer the client's upgrade request; raises Refused (after
        sending QEMU's refusal, if it sends one) when it is not one."""
        received = b""
        while True:
            data = await transport.receive_some(ws.HANDSHAKE_LIMIT)
            received += data
            got = ws.server_handshake(received, ws.http_date(clock()), eof=not data)
            if got is None:
                continue
            await transport.send_all(got.response)
            if isinstance(got, ws.Rejected):
                raise Refused(got.reason)
            return cls(transport, got.rest)

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._ended:
                raise trio.BrokenResourceError("the WebSocket connection is closed")
            await self.transport.send_all(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            await self._send(ws.binary_frames(data))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            if self._decoder.closed:
                return b""
            if self._unread:
                data, self._unread = self._unread, b""
            else:
                # QEMU reads its input 4096 bytes at a time, less what it
                # holds undecoded: the unit of what a close drops (below)
                want = max(1, ws.HANDSHAKE_LIMIT - self._decoder.buffered)
                data = bytes(await self.transport.receive_some(want))
                if not data:
                    return b""
            got = self._decoder.feed(data)
            if got.reply:
                await self._send(got.reply)
            if got.closed:
                # QEMU's channel fails the read once it decoded a close or a
                # fault: what that read decoded never reaches the monitor;
                # it shuts the connection down after its close frame
                async with self._send_lock:
                    self._ended = True
            else:
                self._pending += got.data
        return self._take(max_bytes)


async def tls_server(transport: trio.abc.Stream, context: Any, *,
                     authz: Callable[[str | None], bool] | None) -> trio.abc.Stream:
    """The server's TLS session over ``transport`` (``context``: an
    SSLContext, or a PSK keys file's path, as the NBD server's
    ``server_context`` makes them); ``authz`` checks an x509 client's DN
    (QEMU 7.2 checks x509 certificates only).  Raises Refused."""
    import ssl

    if isinstance(context, ssl.SSLContext):
        # no close_notify when it ends, as QEMU (which never calls gnutls_bye)
        tls = trio.SSLStream(transport, context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise Refused(f"TLS handshake failed: {e.__cause__ or e}") from None
        if authz is not None:
            from ..exports.nbd.tls import peer_dn  # with the TLS code, loaded with tls-creds

            dn = peer_dn(tls.getpeercert())
            if not authz(dn):
                raise Refused(f"TLS x509 authz check for {dn} is denied")
        return tls
    from ..exports.tls_psk import PskTlsStream  # pyOpenSSL, loaded with PSK credentials

    psk = PskTlsStream(transport, context)
    try:
        await psk.do_handshake()
    except trio.BrokenResourceError as e:
        raise Refused(str(e)) from None
    return psk
