"""TLS with pre-shared keys (tls-creds-psk) for the NBD server.

Python's ``ssl`` module has no TLS-PSK before 3.13, so this speaks TLS
through pyOpenSSL with memory BIOs: :class:`PskTlsStream` is a trio stream
over the client's stream, the way ``trio.SSLStream`` wraps ``ssl.SSLObject``.
pyOpenSSL has no PSK methods of its own; the PSK server callback is set with
OpenSSL's ``SSL_CTX_set_psk_server_callback`` through the cffi bindings
pyOpenSSL itself uses (cryptography's).

Keys are read as QEMU's gnutls reads them: ``<dir>/keys.psk`` holds
``identity:hexkey`` lines, looked up at every handshake (keys added to the
file later are used by later clients).  The client's identity is the
connection's user name for ``tls-authz``, as QEMU checks it.

The ciphers are those a GnuTLS client offers for PSK (QEMU's and libnbd's
priority ``NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK``): TLS 1.3 with an external PSK
(OpenSSL treats the callback's key as a SHA-256 PSK, as GnuTLS does), and
TLS 1.2 ECDHE-PSK / DHE-PSK / PSK suites.
"""

from __future__ import annotations

from typing import Any

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

_CIPHERS = b"ECDHE-PSK:DHE-PSK:PSK"
_BIO_CHUNK = 64 * 1024
_RECV_CHUNK = 256 * 1024


def lookup_key(path: str, identity: str) -> bytes | None:
    """The key of ``identity`` in a gnutls PSK file (``identity:hexkey`` lines)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        name, sep, hexkey = line.partition(":")
        if sep and name == identity:
            try:
                return bytes.fromhex(hexkey.strip())
            except ValueError:
                return None
    return None


class PskTlsStream(trio.abc.Stream):
    """A TLS server session with PSK over ``transport``.

    One task may receive while another sends (the NBD connection's reader
    and writer); bytes the TLS engine produces are sent under one lock, in
    the order they were produced.  ``identity`` is the client's PSK identity
    once the handshake has passed.  Closed by :meth:`aclose`, which sends
    close_notify when it can and closes the transport; a peer that breaks
    the session raises ``trio.BrokenResourceError``.
    """

    def __init__(self, transport: trio.abc.Stream, key_file: str, *,
                 client: tuple[str, bytes] | None = None):
        """A server session looking keys up in ``key_file``; with ``client``
        (identity, key) the client end instead (used to test the server)."""
        self.transport = transport
        self.identity: str | None = None
        self._key_file = key_file
        self._client = client
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD if client else SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(_CIPHERS)
        # the callbacks live as long as the context that points to them
        if client:
            self._callback = _ffi.callback(
                "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *,"
                " unsigned int)", self._psk_client)
            _lib.SSL_CTX_set_psk_client_callback(ctx._context, self._callback)
        else:
            self._callback = _ffi.callback(
                "unsigned int(SSL *, const char *, unsigned char *, unsigned int)", self._psk)
            _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._callback)
        self._ctx = ctx
        self._conn = SSL.Connection(ctx, None)
        if client:
            self._conn.set_connect_state()
        else:
            self._conn.set_accept_state()
        self._send_lock = trio.Lock()
        self._closed = False
        self._offered: str | None = None  # identity whose key the callback gave

    def _psk_client(self, ssl: Any, hint: Any, identity: Any, max_identity: int, psk: Any,
                    max_psk: int) -> int:
        try:
            assert self._client is not None
            name, key = self._client
            raw = name.encode()
            if len(raw) >= max_identity or len(key) > max_psk:
                return 0
            _ffi.memmove(identity, raw + b"\0", len(raw) + 1)
            _ffi.memmove(psk, key, len(key))
            self._offered = name
            return len(key)
        except Exception:  # noqa: BLE001 - an exception cannot cross OpenSSL's C frames
            return 0

    def _psk(self, ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
        # runs inside OpenSSL during the handshake; must not raise
        try:
            name = _ffi.string(identity).decode(errors="replace") if identity else ""
            key = lookup_key(self._key_file, name)
            if key is None or len(key) > max_len:
                return 0
            _ffi.memmove(psk, key, len(key))
            self._offered = name
            return len(key)
        except Exception:  # noqa: BLE001 - an exception cannot cross OpenSSL's C frames
            return 0

    def _pending(self, bio: Any) -> int:
        # bytes waiting in a memory BIO (BIO_get_mem_data with no pointer):
        # asking first is much cheaper than a WantReadError from an empty one
        return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))

    async def _flush(self) -> None:
        """Send what the TLS engine has produced, in order."""
        out_bio = self._conn._from_ssl
        if not self._pending(out_bio):
            return
        async with self._send_lock:
            while n := self._pending(out_bio):
                await self.transport.send_all(self._conn.bio_read(n))

    async def _feed(self) -> None:
        """Give the TLS engine the next bytes from the peer."""
        data = await self.transport.receive_some(_RECV_CHUNK)
        if not data:
            self._conn.bio_shutdown()
            raise trio.BrokenResourceError("peer closed the connection during TLS")
        self._conn.bio_write(data)

    async def do_handshake(self) -> None:
        """Run the TLS handshake; raises ``trio.BrokenResourceError`` if it fails."""
        while True:
            try:
                self._conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
            except SSL.Error as e:
                # send the alert, if any, before giving up
                try:
                    await self._flush()
                except trio.BrokenResourceError:
                    pass
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from None
        await self._flush()
        self.identity = self._offered  # the peer proved it knows the key

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        n = max_bytes or _BIO_CHUNK
        conn = self._conn
        while True:
            if not conn.pending() and not self._pending(conn._into_ssl):
                await self._flush()
                try:
                    await self._feed()
                except trio.BrokenResourceError:
                    return b""  # the peer went away without close_notify
            try:
                data = conn.recv(n)
            except SSL.WantReadError:
                # a record the engine answers (key update) goes out first
                await self._flush()
                try:
                    await self._feed()
                except trio.BrokenResourceError:
                    return b""  # the peer went away without close_notify
                continue
            except SSL.ZeroReturnError:
                return b""
            except SSL.SysCallError:
                return b""
            except SSL.Error as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from None
            await self._flush()  # a record the engine sent back (ticket, key update)
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        view = memoryview(data)
        try:
            while view:
                n = self._conn.send(view)
                view = view[n:]
        except SSL.Error as e:
            raise trio.BrokenResourceError(f"TLS error: {e}") from None
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # close_notify is a courtesy a second at most; the transport closes anyway
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                try:
                    self._conn.shutdown()
                    await self._flush()
                except (SSL.Error, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await self.transport.aclose()
