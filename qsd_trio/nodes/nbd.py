"""driver=nbd: a node whose data is an export of an NBD server (QEMU's block/nbd.c).

One connection per node, or up to ``x-multi-conn`` (qsd-trio's member of
BlockdevOptionsNbd) when the server sets NBD_FLAG_CAN_MULTI_CONN.  On each
connection requests are written under a lock and answered in any order: a
reader task (a trio system task, as the I/O engines' reapers:
nodes are plain objects without a nursery) decodes reply headers and chunks
with the codec in qsd_trio/proto/nbd.py and hands each reply to the request
waiting on its handle, so many requests are in flight at once.

Negotiation (the NBD specification's "Fixed newstyle negotiation"):
extended headers, or structured replies from a server without them (QEMU
7.2's, nbdkit 1.32), one meta context (``base:allocation``, or the one
``x-dirty-bitmap`` names, ``qemu:dirty-bitmap:NAME``, whose dirty bit QEMU
reads as "hole"), then NBD_OPT_GO with NBD_INFO_BLOCK_SIZE.  With ``tls-creds`` (an object
with endpoint=client: x509, psk or anon) NBD_OPT_STARTTLS comes first and
everything after it goes through the TLS session (nbd_tls.py), on every
reconnect too.

Reconnect, as QEMU 7.2: when the connection breaks (the peer closed it, or
sent something a correct server cannot send: a protocol error drops the
connection), requests in flight and new ones wait while the driver
reconnects, for up to ``reconnect-delay`` seconds from the break, and are
then sent again; after that, or with ``reconnect-delay`` 0 (the default),
they fail with EIO, and later requests try one reconnect each before
failing.  ``open-timeout`` lets the first connect retry for that long.

Multi-conn: each request goes to the live connection with the fewest
requests in flight (ties taken round robin).  A connection that breaks while
others live is reconnected in the background (a system task per connection,
retrying until ``reconnect-delay`` after its break); with ``reconnect-delay``
set, the requests it lost are sent again on a live connection at once.
When every connection is broken, requests wait for one as above.  With
CAN_MULTI_CONN the server makes a FLUSH's effect cover the writes it
completed on every connection (the specification's "Transmission flags"),
so one FLUSH, sent after the writes it covers were answered (the block
layer's promise), is enough.

Resources: the sockets, reader tasks and reconnect tasks belong to the node;
``_close`` sends NBD_CMD_DISC on each connection, closes the sockets and
cancels the readers and reconnects.  I/O errors
are raised as ``OSError`` with the errno the server sent (the protocol's
errnos are Linux's), or EIO when the connection failed.
"""

from __future__ import annotations

import errno
import os
import socket as _stdsocket
import struct
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..proto import nbd as P
from ..qapi.errors import GenericError
from ..sockets import addr_dict, no_notsent_limit
from .engine import buffers
from .graph import register_driver
from .nbd_tls import ClientTls, TlsError, client_tls, start_client
from .node import BlockNode, BlockStatus, Buffer, Status, json_filename

NBD_DEFAULT_PORT = 10809
# a chunk that carries no read data is never longer than this (QEMU's
# NBD_MAX_MALLOC_PAYLOAD is about 1000 + its status limit; a status reply
# for one extent is 12 bytes)
MAX_META_PAYLOAD = 64 * 1024
# the reader's receive buffer: many reply headers and short payloads per recv
RECV_BUFFER = 256 * 1024
# read data at least this long is received straight into the request's buffer
DIRECT_MIN = 32 * 1024
# the socket's send buffer (the kernel doubles it): room for a 1 MiB write
# and more, which otherwise goes out in pieces, each a wait for the socket
# (a unix socket's default is 208 KiB; TCP's starts at 16 KiB and grows
# with the window); docs/nbd-client.md, "Measurements"
SEND_BUFFER = 2 * 1024 * 1024
# replies the reader decodes without blocking before it lets other tasks run
YIELD_EVERY = 16
# retries of a reconnect start here and double up to the maximum (QEMU's
# connect thread waits 1 s doubling to 16 s; shorter here so that a server
# back within reconnect-delay is found quickly)
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
# x-multi-conn's range (QAPI's uint8; more would only add sockets)
MULTI_CONN_MAX = 16
# commands whose length is a range of the export, not a payload: one request
# may cover at most the connection's effect_limit
_RANGED = frozenset({P.CMD_WRITE_ZEROES, P.CMD_TRIM, P.CMD_BLOCK_STATUS})


class ConnectError(Exception):
    """Connecting or negotiating failed; ``args[0]`` is QEMU's text."""


@attrs.define(eq=False)
class _Pending:
    """One request waiting for its reply.

    The requesting task parks itself (``wait``) and the reader reschedules it
    (``complete``): what a ``trio.Event`` does, without an Event and its
    parking lot per request.

    A read's data lands in ``buf``, a buffer of the pool in engine/buffers.py
    (page-aligned and not zero-filled, so a 1 MiB read costs no memset and no
    page faults).  A structured reply may fill it in any order and need not
    cover it: ``cursor`` (how far chunks arrived in order) and ``spans`` (the
    others) say what was filled, and ``seal`` zeroes the rest, which a
    zero-filled buffer would have read as, instead of leaving what the
    buffer's previous user wrote there."""

    type: int
    offset: int
    length: int
    buf: memoryview | None = None  # read data lands here
    status: tuple[int, int] | None = None  # first extent: (length, flags)
    error: int = 0
    lost: bool = False  # the connection broke before the reply was complete
    done: bool = False
    cursor: int = 0  # buf[:cursor] is filled
    spans: list[tuple[int, int]] | None = None  # (start, length) filled out of order
    _task: trio.lowlevel.Task | None = None

    def filled(self, rel: int, n: int) -> None:
        """``buf[rel:rel + n]`` holds data (or zeroes) from the server."""
        if rel == self.cursor:
            self.cursor += n
        elif self.spans is None:
            self.spans = [(rel, n)]
        else:
            self.spans.append((rel, n))

    def seal(self) -> None:
        """Zero what no chunk of a successful read filled."""
        buf = self.buf
        if buf is None or (self.cursor == self.length and self.spans is None):
            return
        pos = 0
        for start, n in sorted([(0, self.cursor), *(self.spans or ())]):
            if start > pos:
                buffers.zero_tail(buf[pos:start], 0)
            pos = max(pos, start + n)
        if pos < self.length:
            buffers.zero_tail(buf[pos:], 0)

    def complete(self) -> None:
        self.done = True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Until ``complete``; cancelled, the reply still lands (and is dropped)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Connection:
    """One negotiated NBD connection and its reader task.

    On a socket (every connection ``open_socket`` makes) the reader and the
    senders use the socket itself, without trio's stream layer: replies land
    in a receive buffer that one ``recv_into`` fills with as many headers and
    small payloads as have arrived, and read data of at least ``DIRECT_MIN``
    bytes goes straight from the socket into the request's buffer; a request
    and its payload leave in one ``sendmsg``.  Each call that would block
    waits with ``trio.lowlevel.wait_readable`` / ``wait_writable``.  Any
    other stream (tests) goes through ``receive_some`` / ``send_all``.

    ``extended``: NBD_OPT_EXTENDED_HEADERS was negotiated, so requests are
    32-byte extended ones (64-bit lengths; a write says its payload length
    with NBD_CMD_FLAG_PAYLOAD_LEN), every reply is an extended chunk that
    echoes the request's offset, and block status comes as
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT (the specification's "Request message",
    "Extended reply chunk message").
    """

    def __init__(self, stream: trio.abc.Stream, size: int, flags: int, ctx_id: int | None,
                 structured: bool, block: tuple[int, int, int],
                 sock: _stdsocket.socket | None = None, extended: bool = False):
        self.stream = stream
        self.sock = sock
        self.size = size
        self.flags = flags
        self.ctx_id = ctx_id
        self.structured = structured or extended
        self.extended = extended
        self.min_block, _pref, self.max_block = block
        self.pending: dict[int, _Pending] = {}
        self.send_lock = trio.Lock()
        self.broken = False
        self.scope = trio.CancelScope()
        # received bytes not decoded yet: self._rbuf[self._rpos:self._rend]
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._unyielded = 0  # replies decoded since the reader last let others run
        self.dead = trio.Event()
        self.broken_at = 0.0  # when it broke (trio's clock)
        self.on_broken: Callable[[], None] | None = None  # called once the reader ends

    def feed(self, data: bytes) -> None:
        """Bytes the negotiation read past its end: the first replies' start."""
        self._compact(len(data))
        self._rbuf[self._rend:self._rend + len(data)] = data
        self._rend += len(data)

    def effect_limit(self, type_: int) -> int:
        """The longest range one request of ``type_`` may cover (write zeroes,
        trim, block status): a 64-bit effect length with extended headers,
        else what the 32-bit field holds, kept aligned (QEMU 7.2's limits)."""
        if self.extended:
            return 1 << 63
        if type_ == P.CMD_BLOCK_STATUS:
            return (1 << 32) - max(1, self.min_block)
        return 1 << 31

    # -- reading ---------------------------------------------------------------
    def _compact(self, need: int) -> None:
        """Make room for at least ``need`` more bytes after what is buffered
        (and for a useful ``recv_into``: a quarter of the buffer at least)."""
        room = len(self._rbuf) - self._rend
        if room >= need and room >= len(self._rbuf) // 4:
            return
        n = self._rend - self._rpos
        if n + need > len(self._rbuf):
            # a new buffer: the old one may still be exported by a view
            new = bytearray(n + need)
            new[:n] = self._rview[self._rpos:self._rend]
            self._rbuf, self._rview = new, memoryview(new)
        else:
            self._rbuf[:n] = self._rview[self._rpos:self._rend]
        self._rpos, self._rend = 0, n

    async def _recv_some_into(self, mv: memoryview) -> int:
        """Receive at least one byte into ``mv``; BrokenResourceError at EOF."""
        sock = self.sock
        if sock is None:
            data = await self.stream.receive_some(len(mv))
            n = len(data)
            mv[:n] = data
        else:
            while True:
                try:
                    n = sock.recv_into(mv)
                    break
                except BlockingIOError:
                    self._unyielded = 0
                    await trio.lowlevel.wait_readable(sock)
        if not n:
            raise trio.BrokenResourceError("server closed the connection")
        return n

    async def _fill(self, n: int) -> None:
        """Buffer at least ``n`` bytes."""
        have = self._rend - self._rpos
        if have >= n:
            return
        self._compact(n - have)
        while self._rend - self._rpos < n:
            self._rend += await self._recv_some_into(self._rview[self._rend:])

    async def _recv(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self._rview[self._rpos:self._rpos + n])
        self._rpos += n
        return out

    async def _recv_into(self, mv: memoryview) -> None:
        """Fill ``mv``: first from the buffer, then, for a long rest, from the
        socket directly; a short rest is read with whatever follows it."""
        k = min(self._rend - self._rpos, len(mv))
        mv[:k] = self._rview[self._rpos:self._rpos + k]
        self._rpos += k
        pos = k
        while len(mv) - pos >= DIRECT_MIN:
            pos += await self._recv_some_into(mv[pos:])
        if pos < len(mv):
            rest = len(mv) - pos
            await self._fill(rest)
            mv[pos:] = self._rview[self._rpos:self._rpos + rest]
            self._rpos += rest

    async def reader(self) -> None:
        """Decode replies until the connection ends; then every request still
        waiting is marked lost.  Never raises (it runs as a system task)."""
        try:
            with self.scope:
                while True:
                    await self._one_reply()
                    # a server that keeps the socket full never makes the
                    # reader wait: let the requests it woke run now and then
                    self._unyielded += 1
                    if self._unyielded >= YIELD_EVERY:
                        self._unyielded = 0
                        await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                P.NbdProtocolError, struct.error):
            pass
        finally:
            self.kill()
            for req in self.pending.values():
                req.lost = True
                req.complete()
            self.pending.clear()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            self.dead.set()
            if self.on_broken is not None:
                self.on_broken()

    async def _one_reply(self) -> None:
        await self._fill(P.REPLY_MAGIC_SIZE)
        size = P.reply_header_size_at(self._rview, self._rpos, self.extended)
        await self._fill(size)
        rep = P.parse_reply_header_at(self._rview, self._rpos, size)
        self._rpos += size
        req = self.pending.get(rep.handle)
        if req is None:
            raise P.NbdProtocolError(f"Protocol error: unexpected handle {rep.handle}")
        if rep.type is None:
            # a simple reply; a read's data follows it unless it failed
            if self.structured and req.type in (P.CMD_READ, P.CMD_BLOCK_STATUS):
                # QEMU's nbd_co_do_receive_one_chunk with only_structured
                raise P.NbdProtocolError("Protocol error: simple reply when structured reply "
                                         "chunk was expected")
            if rep.error:
                req.error = rep.error
            elif req.type == P.CMD_READ:
                assert req.buf is not None
                await self._recv_into(req.buf)
                req.cursor = req.length
            self._finish(rep.handle, req)
            return
        if not self.structured:
            raise P.NbdProtocolError("Protocol error: structured reply without negotiation")
        if rep.offset is not None and rep.offset != req.offset:
            raise P.NbdProtocolError(f"Protocol error: extended reply for offset {rep.offset}, "
                                     f"the request's is {req.offset}")
        await self._chunk(rep, req)
        if rep.done:
            if not req.error:
                req.seal()
            self._finish(rep.handle, req)

    def _finish(self, handle: int, req: _Pending) -> None:
        del self.pending[handle]
        req.complete()

    async def _chunk(self, rep: P.Reply, req: _Pending) -> None:
        """One structured chunk (the NBD specification's "Structured reply
        chunk message types"), checked as QEMU's nbd_co_receive_* do."""
        t = rep.type
        if t == P.REPLY_TYPE_OFFSET_DATA:
            if req.type != P.CMD_READ or rep.length < 8:
                raise P.NbdProtocolError("Protocol error: invalid payload for "
                                         "NBD_REPLY_TYPE_OFFSET_DATA")
            (off,) = struct.unpack(">Q", await self._recv(8))
            n = rep.length - 8
            rel = off - req.offset
            if off < req.offset or rel + n > req.length:
                raise P.NbdProtocolError("Protocol error: server sent chunk exceeding "
                                         "requested region")
            assert req.buf is not None
            await self._recv_into(req.buf[rel:rel + n])
            req.filled(rel, n)
            return
        if rep.length > MAX_META_PAYLOAD:
            raise P.NbdProtocolError("Protocol error: server sent too long payload")
        payload = await self._recv(rep.length)
        if t == P.REPLY_TYPE_NONE:
            if not rep.done or rep.length:
                raise P.NbdProtocolError("Protocol error: NBD_REPLY_TYPE_NONE chunk without "
                                         "NBD_REPLY_FLAG_DONE flag set")
        elif t == P.REPLY_TYPE_OFFSET_HOLE:
            if req.type != P.CMD_READ or len(payload) != 12:
                raise P.NbdProtocolError("Protocol error: invalid payload for "
                                         "NBD_REPLY_TYPE_OFFSET_HOLE")
            off, n = struct.unpack(">QI", payload)
            rel = off - req.offset
            if off < req.offset or rel + n > req.length:
                raise P.NbdProtocolError("Protocol error: server sent hole exceeding "
                                         "requested region")
            assert req.buf is not None
            buffers.zero_tail(req.buf[rel:rel + n], 0)
            req.filled(rel, n)
        elif t in (P.REPLY_TYPE_BLOCK_STATUS, P.REPLY_TYPE_BLOCK_STATUS_EXT):
            self._status_chunk(t, payload, req)
        elif t in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
            err, _msg = P.parse_error_chunk(payload)
            if not err:
                raise P.NbdProtocolError("Protocol error: server sent error chunk with error "
                                         "= 0")
            req.error = req.error or err
        else:
            raise P.NbdProtocolError(f"Protocol error: unknown chunk type {t}")

    def _status_chunk(self, t: int, payload: bytes, req: _Pending) -> None:
        """A block status chunk: BLOCK_STATUS (32-bit extents) without extended
        headers, BLOCK_STATUS_EXT (64-bit extents) with them, never the other."""
        if req.type != P.CMD_BLOCK_STATUS:
            raise P.NbdProtocolError("Protocol error: unexpected block status chunk")
        if (t == P.REPLY_TYPE_BLOCK_STATUS_EXT) != self.extended:
            raise P.NbdProtocolError(f"Protocol error: block status chunk type {t} "
                                     f"{'without' if self.extended else 'with'} "
                                     f"extended headers")
        if t == P.REPLY_TYPE_BLOCK_STATUS_EXT:
            ctx, extents = P.parse_block_status_ext_chunk(payload)
        else:
            ctx, extents = P.parse_block_status_chunk(payload)
        if ctx != self.ctx_id:
            raise P.NbdProtocolError(f"Protocol error: unexpected context id {ctx} for "
                                     f"NBD_REPLY_TYPE_BLOCK_STATUS, expected {self.ctx_id}")
        if req.status is not None:
            raise P.NbdProtocolError("Protocol error: server sent status chunk more than once")
        n, f = extents[0]
        if n == 0:
            raise P.NbdProtocolError("Protocol error: server sent status chunk with zero length")
        if f >> 32:
            # the contexts asked for (base:allocation, qemu:dirty-bitmap:)
            # have 32-bit flags: the high half must be zero
            raise P.NbdProtocolError(f"Protocol error: server sent status flags 0x{f:x} "
                                     f"beyond 32 bits")
        # QEMU truncates an extent past the request and ignores the rest
        req.status = (min(n, req.length), f)

    # -- requests ----------------------------------------------------------------
    async def request(self, handle: int, req: _Pending, flags: int = 0,
                      data: Buffer | None = None) -> None:
        """Send one request and wait for its reply (``req.lost`` if the
        connection broke first)."""
        if self.broken:
            req.lost = True
            return
        self.pending[handle] = req
        if self.extended:
            if data is not None:
                flags |= P.CMD_FLAG_PAYLOAD_LEN
            head = P.encode_ext_request(req.type, handle, req.offset, req.length, flags)
        else:
            head = P.encode_request(req.type, handle, req.offset, req.length, flags)
        try:
            if self.send_lock.locked():
                async with self.send_lock:
                    await self._send(head, data)
            else:
                # nobody is sending: no scheduler round trip for the lock
                self.send_lock.acquire_nowait()
                try:
                    await self._send(head, data)
                finally:
                    self.send_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.pending.pop(handle, None)
            req.lost = True
            self.kill()
            return
        await req.wait()

    async def _send(self, head: bytes, data: Buffer | None) -> None:
        """Send a request header and its payload (one ``sendmsg`` on a socket).
        Cancelled after part of it went out, the connection is killed: the
        server would take what follows for the rest of this request."""
        sock = self.sock
        if sock is None:
            await self.stream.send_all(head)
            if data is not None:
                await self.stream.send_all(data)
            return
        parts: list[Buffer] = [head]
        if data is not None:
            parts.append(data if isinstance(data, bytes) else memoryview(data).cast("B"))
        total = sum(len(x) for x in parts)
        sent = 0
        try:
            while True:
                try:
                    n = sock.sendmsg(parts)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                sent += n
                if sent == total:
                    return
                while n >= len(parts[0]):
                    n -= len(parts.pop(0))
                parts[0] = memoryview(parts[0])[n:]
                await trio.lowlevel.wait_writable(sock)
        except BaseException:
            if 0 < sent < total:
                self.kill()
            raise

    def kill(self) -> None:
        """Break the connection: the reader ends and fails what is waiting."""
        if not self.broken:
            self.broken = True
            self.broken_at = trio.current_time()
        self.scope.cancel()

    async def aclose(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if still connected, then close."""
        with trio.move_on_after(1, shield=True):
            if not self.broken:
                try:
                    async with self.send_lock:
                        encode = P.encode_ext_request if self.extended else P.encode_request
                        await self.stream.send_all(encode(P.CMD_DISC, 0))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            self.kill()
            await self.stream.aclose()


# -- connecting and negotiating ------------------------------------------------------
def describe(server: dict[str, Any]) -> str:
    """How QEMU names the address in "Failed to connect to '...'"."""
    if server["type"] == "unix":
        return str(server["path"])
    if server["type"] == "inet":
        return f"{server['host']}:{server['port']}"
    return str(server.get("str", ""))


def _strerror(e: OSError) -> str:
    # trio's connect puts the address into strerror; QEMU prints the errno's text
    return os.strerror(e.errno) if e.errno else str(e)


def _wrap(std: _stdsocket.socket) -> tuple[trio.socket.SocketType, _stdsocket.socket]:
    """A trio socket over ``std``, and ``std`` itself, which the connection's
    reader and senders use directly (trio's socket wraps this very object)."""
    try:
        std.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass  # a passed socket that refuses keeps its own buffer: slower, not wrong
    return trio.socket.from_stdlib_socket(std), std


def _stream(sock: trio.socket.SocketType) -> trio.SocketStream:
    """The stream over a connected socket.  trio's SocketStream sets
    TCP_NOTSENT_LOWAT to 16 KiB on a TCP socket, so that a send returns as
    soon as that much waits unsent: a 1 MiB write left in pieces of 3-4
    segments, each a wait for the socket (12 per MiB on localhost).  0 is
    the system's default again (no limit), as for QEMU's client."""
    stream = trio.SocketStream(sock)
    no_notsent_limit(sock)
    return stream


async def open_socket(server: dict[str, Any]) -> tuple[trio.SocketStream, _stdsocket.socket]:
    """Connect to a flat SocketAddress: the stream and its (non-blocking)
    stdlib socket, which closing the stream closes.  ConnectError with
    QEMU's text."""
    kind = server["type"]
    if kind == "unix":
        sock, std = _wrap(_stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM))
        try:
            await sock.connect(server["path"])
        except OSError as e:
            sock.close()
            raise ConnectError(f"Failed to connect to '{describe(server)}': "
                               f"{_strerror(e)}") from None
        return _stream(sock), std
    if kind == "inet":
        host, port = server["host"], str(server["port"])
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM)
        except _stdsocket.gaierror as e:
            raise ConnectError(f"address resolution failed for {host}:{port}: "
                               f"{e.strerror}") from None
        err: OSError | None = None
        for family, type_, proto, _canon, addr in infos:
            sock, std = _wrap(_stdsocket.socket(family, type_, proto))
            try:
                await sock.connect(addr)
            except OSError as e:
                sock.close()
                err = e
                continue
            return _stream(sock), std
        assert err is not None
        raise ConnectError(f"Failed to connect to '{describe(server)}': {_strerror(err)}")
    if kind == "fd":
        fd = server["str"]
        if not fd.isdigit():
            raise ConnectError("only QEMU supports file descriptor passing")
        try:
            std = _stdsocket.socket(fileno=int(fd))
        except OSError as e:
            raise ConnectError(f"Failed to use socket fd {fd}: {e.strerror}") from None
        sock, std = _wrap(std)
        return _stream(sock), std
    raise ConnectError(f"Unsupported socket address type '{kind}'")


_TLS_READ = "Failed to read option reply: Cannot read from TLS channel: "


def _tls_read_error(e: BaseException) -> str:
    """QEMU's text when the TLS channel fails while it waits for an option
    reply: GnuTLS reads a close without close_notify as ECONNABORTED (the
    empty read, see ``_recv_tls``) and anything else as EIO.  A server that
    refuses our certificate after the handshake resets the connection, as
    QEMU's client sees it from qemu-nbd and qemu-storage-daemon (its option
    arrives before the server closes); this client's first option may go out
    later, after the server's close, and fail on the send with EPIPE: that
    is reported as QEMU reports the reset."""
    del e
    return _TLS_READ + "Input/output error"


class _Negotiation:
    """The client's side of fixed newstyle negotiation over a stream.

    After NBD_OPT_STARTTLS ``stream`` is the TLS session, which the
    connection then uses (and closes)."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.buf = bytearray()
        self.tls = False

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data: bytes | bytearray
            if self.tls:
                data = await self._recv_tls()
            else:
                data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectError("Failed to read initial magic: Unexpected end-of-file "
                                   "before all data were read")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _recv_tls(self) -> bytes | bytearray:
        # QEMU's texts for a TLS channel that fails (qio_channel_tls_readv):
        # a server that drops the connection without close_notify (as one
        # that refused our certificate does) is ECONNABORTED, any other
        # failure (an alert, a reset) EIO
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, OSError) as e:
            raise ConnectError(_tls_read_error(e)) from None
        if not data:
            raise ConnectError(_TLS_READ + "Software caused connection abort")
        return data

    async def starttls(self, tls: ClientTls) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake (nbd_receive_starttls)."""
        await self.option(P.OPT_STARTTLS)
        rep, payload = await self.reply(P.OPT_STARTTLS)
        if rep != P.REP_ACK:
            if rep & (1 << 31):
                raise ConnectError(_option_error(rep, payload, P.OPT_STARTTLS))
            raise P.NbdProtocolError(f"Server answered option {P.OPT_STARTTLS} (starttls) "
                                     f"with unexpected reply {rep}")
        if self.buf:
            raise P.NbdProtocolError("Unexpected data after NBD_OPT_STARTTLS reply")
        try:
            self.stream = await start_client(tls, self.stream)
        except TlsError as e:
            raise ConnectError(str(e.args[0])) from None
        self.tls = True

    async def option(self, option: int, data: bytes = b"") -> None:
        try:
            await self.stream.send_all(P.encode_option(option, data))
        except (trio.BrokenResourceError, OSError) as e:
            if not self.tls:
                raise
            # a server that refused our certificate drops the session right
            # after the handshake: QEMU's client sees it when it reads the
            # reply (its send got through), so say what it says
            raise ConnectError(_tls_read_error(e)) from None

    async def reply(self, option: int) -> tuple[int, bytes]:
        opt, rep, n = P.parse_option_reply_header(await self.recv(P.OPTION_REPLY_HEADER_SIZE))
        if opt != option:
            raise P.NbdProtocolError(f"Unexpected option reply for option {opt}")
        if n > P.MAX_OPTION_SIZE:
            raise P.NbdProtocolError(f"server's option reply is too long ({n})")
        return rep, await self.recv(n)

    async def run(self, export: str, meta: str,
                  tls: ClientTls | None = None) -> tuple[_Connection, bytes]:
        flags = P.parse_server_greeting(await self.recv(P.GREETING_SIZE))
        if not flags & P.FLAG_FIXED_NEWSTYLE:
            raise ConnectError("Server does not support fixed newstyle negotiation")
        cflags = P.FLAG_C_FIXED_NEWSTYLE
        if flags & P.FLAG_NO_ZEROES:
            cflags |= P.FLAG_C_NO_ZEROES
        await self.stream.send_all(P.client_flags(cflags))
        if tls is not None:
            await self.starttls(tls)
        # extended headers first; a server without them (QEMU 7.2's, nbdkit
        # before 1.36) refuses the option and gets structured replies asked
        # for instead, as QEMU 8.2's client does
        await self.option(P.OPT_EXTENDED_HEADERS)
        rep, _ = await self.reply(P.OPT_EXTENDED_HEADERS)
        if rep != P.REP_ACK and not rep & (1 << 31):
            raise P.NbdProtocolError(f"Unexpected reply type {rep} to NBD_OPT_EXTENDED_HEADERS")
        extended = structured = rep == P.REP_ACK
        if not extended:
            await self.option(P.OPT_STRUCTURED_REPLY)
            rep, _ = await self.reply(P.OPT_STRUCTURED_REPLY)
            structured = rep == P.REP_ACK
        ctx_id: int | None = None
        if structured:
            await self.option(P.OPT_SET_META_CONTEXT, P.encode_meta_request(export, [meta]))
            while True:
                rep, payload = await self.reply(P.OPT_SET_META_CONTEXT)
                if rep != P.REP_META_CONTEXT:
                    break
                cid, name = P.parse_meta_context_reply(payload)
                if name != meta or ctx_id is not None:
                    raise P.NbdProtocolError(f"Unexpected context name '{name}'")
                ctx_id = cid
        await self.option(P.OPT_GO, P.encode_info_request(export, [P.INFO_BLOCK_SIZE]))
        size = tflags = -1
        block = (1, 4096, P.MAX_BUFFER_SIZE)
        while True:
            rep, payload = await self.reply(P.OPT_GO)
            if rep == P.REP_ACK:
                break
            if rep == P.REP_INFO:
                info, rest = P.parse_info_reply(payload)
                if info == P.INFO_EXPORT:
                    size, tflags = P.parse_info_export(rest)
                elif info == P.INFO_BLOCK_SIZE:
                    block = P.parse_info_block_size(rest)
                continue
            if rep & (1 << 31):
                raise ConnectError(_option_error(rep, payload, P.OPT_GO))
            raise P.NbdProtocolError(f"Unexpected reply type {rep} to NBD_OPT_GO")
        if size < 0:
            raise ConnectError("server sent no export information")
        conn = _Connection(self.stream, size, tflags, ctx_id, structured, block,
                           extended=extended)
        return conn, bytes(self.buf)


def _option_error(rep: int, payload: bytes, option: int) -> str:
    """QEMU's text for an option's error reply (nbd_handle_reply_err)."""
    opt = f"option {option} ({P.OPT_NAMES.get(option, '<unknown>')})"
    if rep == P.REP_ERR_UNKNOWN:
        return "Requested export not available"
    if rep == P.REP_ERR_TLS_REQD:
        return f"TLS negotiation required before {opt}"
    if rep == P.REP_ERR_POLICY:
        return f"Denied by server for {opt}"
    if rep == P.REP_ERR_SHUTDOWN:
        return f"Server shutting down before {opt}"
    msg = payload.decode(errors="replace")
    return f"Unknown error returned by server for {opt}" + (f": {msg}" if msg else "")


# -- legacy file names (QEMU's nbd_parse_uri / nbd_parse_filename) ---------------------
def parse_filename(filename: str) -> dict[str, Any]:
    """``nbd://host[:port]/export``, ``nbd+tcp://``, ``nbd+unix:///export?socket=PATH``
    or ``nbd:HOST:PORT[:exportname=E]`` / ``nbd:unix:PATH[:exportname=E]`` ->
    options (``server``, ``export``).  Raises GenericError with QEMU's text."""
    if "://" in filename:
        parsed = _parse_uri(filename)
        if parsed is None:
            raise GenericError("No valid URL specified")
        return parsed
    opts: dict[str, Any] = {}
    file = filename
    en = file.find(":exportname=")
    if en >= 0:
        name = file[en + len(":exportname="):]
        if not name:
            return opts
        file = file[:en]
        opts["export"] = name
    if not file.startswith("nbd:"):
        raise GenericError("File name string for NBD must start with 'nbd:'")
    spec = file[4:]
    if not spec:
        return opts
    if spec.startswith("unix:"):
        opts["server"] = {"type": "unix", "path": spec[5:]}
        return opts
    host, sep, port = spec.rpartition(":")
    if not sep or not host:
        raise GenericError(f"error parsing address '{spec}'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    opts["server"] = {"type": "inet", "host": host, "port": port}
    return opts


def _parse_uri(filename: str) -> dict[str, Any] | None:
    try:
        uri = urllib.parse.urlsplit(filename)
        port = uri.port
    except ValueError:
        return None
    if uri.scheme in ("nbd", "nbd+tcp"):
        is_unix = False
    elif uri.scheme == "nbd+unix":
        is_unix = True
    else:
        return None
    opts: dict[str, Any] = {}
    path = urllib.parse.unquote(uri.path)
    if path.startswith("/"):
        path = path[1:]
    if path:
        opts["export"] = path
    qp = urllib.parse.parse_qsl(uri.query, keep_blank_values=True)
    if len(qp) > 1 or (is_unix and not qp) or (not is_unix and qp):
        return None
    if is_unix:
        if uri.hostname or port or qp[0][0] != "socket":
            return None
        opts["server"] = {"type": "unix", "path": qp[0][1]}
    else:
        if not uri.hostname:
            return None
        opts["server"] = {"type": "inet", "host": uri.hostname,
                          "port": str(port or NBD_DEFAULT_PORT)}
    return opts


@register_driver
class NbdNode(BlockNode):
    driver = "nbd"
    has_info = False  # QEMU's nbd driver has no bdrv_get_info

    async def open(self, options: dict[str, Any]) -> None:
        if options.get("filename"):
            parsed = parse_filename(options["filename"])
            for k in ("server", "export"):
                if k in options and k in parsed:
                    raise GenericError("Cannot use 'filename' with options")
            options = {**parsed, **options}
        if options.get("server") is None:
            raise GenericError("Parameter 'server' is missing")
        self.server = addr_dict(options["server"])
        self.export: str = options.get("export") or ""
        self.has_export = options.get("export") is not None
        self.tls: ClientTls | None = None
        if options.get("tls-creds") is not None:
            # QEMU's nbd_process_options: the inet host is the default name
            # the server's certificate must have
            hostname = options.get("tls-hostname")
            if hostname is None and self.server["type"] == "inet":
                hostname = self.server["host"]
            self.tls = client_tls(self.graph.objects, options["tls-creds"], hostname)
        self.bitmap: str | None = options.get("x-dirty-bitmap")
        # the whole context name ("qemu:dirty-bitmap:NAME"), asked for instead
        # of base:allocation, as QEMU does
        self.meta = self.bitmap if self.bitmap is not None else P.META_BASE_ALLOCATION
        self.reconnect_delay: int = options.get("reconnect-delay") or 0
        open_timeout: int = options.get("open-timeout") or 0
        multi: int | None = options.get("x-multi-conn")
        if multi is None:
            multi = 1
        if not 1 <= multi <= MULTI_CONN_MAX:
            raise GenericError(f"Parameter 'x-multi-conn' expects a value between 1 and "
                               f"{MULTI_CONN_MAX}")
        self._handles = iter(range(1, 1 << 64))
        # the connections, live or broken; never empty once open.  The first
        # one's export flags, context and block sizes stand for all of them.
        self._conns: list[_Connection] = []
        self._want = multi
        self._next = 0  # where the next search for a connection starts
        self._reconnect_lock = trio.Lock()
        self._healing: dict[int, trio.CancelScope] = {}  # background reconnects by slot
        self._heal_next: dict[int, float] = {}  # a slot's next background try, not before
        self._closed = False
        # the first connect retries for up to open-timeout seconds
        deadline = trio.current_time() + open_timeout
        delay = RETRY_FIRST
        while True:
            try:
                conn = await self._connect()
                break
            except ConnectError as e:
                if trio.current_time() + delay >= deadline:
                    raise GenericError(str(e.args[0])) from None
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        if self.bitmap is not None and conn.ctx_id is None:
            await conn.aclose()
            raise GenericError("Could not open image: Invalid argument")
        if conn.flags & P.FLAG_READ_ONLY and not self.read_only:
            if not self.auto_read_only:
                await conn.aclose()
                raise GenericError("NBD export is read-only")
            self.read_only = True
        self.size = conn.size
        self.request_alignment = max(1, conn.min_block)
        self._use(0, conn)
        if multi > 1 and conn.flags & P.FLAG_CAN_MULTI_CONN:
            await self._open_more(multi - 1)

    async def _open_more(self, n: int) -> None:
        """Open ``n`` more connections (multi-conn).  One that fails fails the
        open, with its error; one to an export that differs (size, flags) is
        closed and no more are opened: a server must not mix them."""
        first = self._conns[0]
        for _ in range(n):
            try:
                conn = await self._connect()
            except ConnectError as e:
                await self._close()
                raise GenericError(str(e.args[0])) from None
            if conn.size != first.size or conn.flags != first.flags:
                await conn.aclose()
                return
            self._use(len(self._conns), conn)

    async def _connect(self) -> _Connection:
        stream, sock = await open_socket(self.server)
        neg = _Negotiation(stream)
        try:
            conn, rest = await neg.run(self.export, self.meta, self.tls)
        except P.NbdProtocolError as e:
            await neg.stream.aclose()
            raise ConnectError(str(e)) from None
        except ConnectError:
            await neg.stream.aclose()
            raise
        except (trio.BrokenResourceError, OSError) as e:
            await neg.stream.aclose()
            raise ConnectError(f"Failed to read initial magic: {e}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await neg.stream.aclose()
            raise
        if self.tls is None:
            # the socket itself only without TLS: the session is a stream
            conn.sock = sock
        conn.feed(rest)
        return conn

    def _use(self, slot: int, conn: _Connection) -> None:
        """Put ``conn`` in ``slot`` (one past the end: a new slot) and start
        its reader."""
        if slot == len(self._conns):
            self._conns.append(conn)
        else:
            self._conns[slot] = conn
        conn.on_broken = lambda: self._broken(conn)
        trio.lowlevel.spawn_system_task(conn.reader,
                                        name=f"nbd-client-{self.node_name}-{slot}")

    def _length(self) -> int:
        return self.size

    # -- the connection, reconnected when it breaks --------------------------------
    def _broken(self, conn: _Connection) -> None:
        """``conn``'s reader ended: with other connections live, reconnect it
        in the background now (when none is, the next request does it)."""
        if self._closed or conn not in self._conns:
            return
        slot = self._conns.index(conn)
        if slot not in self._healing and any(not c.broken for c in self._conns):
            self._heal_in_background(slot)

    def _heal_in_background(self, slot: int) -> None:
        self._healing[slot] = scope = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._heal, slot, scope,
                                        name=f"nbd-reconnect-{self.node_name}-{slot}")

    def _pick(self) -> _Connection | None:
        """The live connection with the fewest requests in flight (ties go
        round robin), or None; a broken one beside live ones gets a
        background reconnect (again, when an earlier one gave up)."""
        conns = self._conns
        if len(conns) == 1:
            conn = conns[0]
            return None if conn.broken else conn
        best: _Connection | None = None
        broken = -1
        n = len(conns)
        start = self._next
        self._next = (start + 1) % n
        for k in range(n):
            i = (start + k) % n
            c = conns[i]
            if c.broken:
                broken = i
            elif best is None or len(c.pending) < len(best.pending):
                best = c
        if best is not None and broken >= 0 and broken not in self._healing \
                and not self._closed \
                and trio.current_time() >= self._heal_next.get(broken, 0.0):
            self._heal_in_background(broken)
        return best

    async def _connected(self) -> _Connection:
        """A live connection; reconnects (waiting up to reconnect-delay from
        the last one's break) when all are broken.  OSError(EIO) when there
        is none."""
        conn = self._pick()
        if conn is not None:
            return conn
        if self._closed:
            raise OSError(errno.EIO, "Input/output error")
        async with self._reconnect_lock:
            conn = self._pick()
            if conn is not None:
                return conn
            if self._closed:
                raise OSError(errno.EIO, "Input/output error")
            deadline = max(c.broken_at for c in self._conns) + self.reconnect_delay
            slot = next((i for i in range(len(self._conns)) if i not in self._healing), 0)
            new = await self._reconnect(deadline)
            if new is None:
                raise OSError(errno.EIO, "Input/output error")
            if self._want > 1 and not new.flags & P.FLAG_CAN_MULTI_CONN:
                # the server came back without multi-conn: this one only
                old, self._conns = self._conns, []
                for c in old:
                    c.kill()
                slot = 0
            self._use(slot, new)
            return new

    async def _reconnect(self, deadline: float) -> _Connection | None:
        """Connect again, retrying until ``deadline`` (one try at least);
        None when no connection to an export of the node's size came."""
        delay = RETRY_FIRST
        while True:
            try:
                new: _Connection | None = await self._connect()
            except ConnectError:
                new = None
            if new is not None:
                if new.size == self.size:
                    return new
                await new.aclose()
            if trio.current_time() + delay > deadline:
                return None
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _heal(self, slot: int, scope: trio.CancelScope) -> None:
        """Reconnect the broken connection in ``slot`` while others serve
        (multi-conn), until reconnect-delay after its break (one try at
        least; after a failed one the slot waits RETRY_MAX for the next).
        A system task: never raises; the node's close cancels ``scope``."""
        try:
            with scope:
                if self._closed or slot >= len(self._conns):
                    return
                deadline = self._conns[slot].broken_at + self.reconnect_delay
                new = await self._reconnect(deadline)
                if new is None:
                    self._heal_next[slot] = trio.current_time() + RETRY_MAX
                    return
                if self._closed or slot >= len(self._conns) \
                        or not self._conns[slot].broken \
                        or not new.flags & P.FLAG_CAN_MULTI_CONN:
                    # closed, given up meanwhile, or a server without multi-conn
                    # now: one connection is all it may have
                    with trio.CancelScope(shield=True):
                        await new.aclose()
                    return
                self._use(slot, new)
        finally:
            self._healing.pop(slot, None)

    async def _request(self, type_: int, offset: int, length: int, flags: int = 0,
                       data: Buffer | None = None, buf: memoryview | None = None) -> _Pending:
        """Send a request and return its completed record, sending it again on a
        new connection when the old one broke within reconnect-delay.

        A read's data goes to ``buf`` (by default a pool buffer of ``length``
        bytes).  Write zeroes, trim and block status cover as much of the
        range as one request on the connection may (``effect_limit``); the
        record's ``length`` says how much that was."""
        if type_ == P.CMD_READ and buf is None:
            buf = buffers.alloc(length)
        while True:
            conn = await self._connected()
            n = min(length, conn.effect_limit(type_)) if type_ in _RANGED else length
            req = _Pending(type_, offset, n, buf)
            await conn.request(next(self._handles), req, flags, data)
            if not req.lost:
                if req.error:
                    raise OSError(req.error, os.strerror(req.error))
                return req
            if not self.reconnect_delay:
                raise OSError(errno.EIO, "Input/output error")

    async def _ranged(self, type_: int, offset: int, length: int, flags: int = 0) -> None:
        """Write zeroes or trim ``length`` bytes, in as few requests as the
        connection allows (one with extended headers)."""
        pos, end = offset, offset + length
        while pos < end:
            pos += (await self._request(type_, pos, end - pos, flags)).length

    def _max(self) -> int:
        conns = self._conns
        return min(conns[0].max_block if conns else P.MAX_BUFFER_SIZE, P.MAX_BUFFER_SIZE)

    def _flags(self) -> int:
        return self._conns[0].flags if self._conns else 0

    # -- I/O ---------------------------------------------------------------------------
    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        step = self._max()
        if length <= step:
            req = await self._request(P.CMD_READ, offset, length)
            assert req.buf is not None
            return req.buf
        out = buffers.alloc(length)
        for pos in range(0, length, step):
            await self._request(P.CMD_READ, offset + pos, min(step, length - pos),
                                buf=out[pos:pos + step])
        return out

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        flags = P.CMD_FLAG_FUA if fua and self._flags() & P.FLAG_SEND_FUA else 0
        step = self._max()
        for pos in range(0, len(data), step):
            chunk = data[pos:pos + step]
            await self._request(P.CMD_WRITE, offset + pos, len(chunk), flags, chunk)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        sflags = self._flags()
        if not sflags & P.FLAG_SEND_WRITE_ZEROES:
            await super()._co_pwrite_zeroes(offset, length, may_unmap, fua, no_fallback)
            return
        # QEMU's nbd_client_co_pwrite_zeroes: NO_HOLE unless the caller may
        # unmap, FAST_ZERO for BDRV_REQ_NO_FALLBACK (refused when the server
        # cannot promise it)
        flags = 0 if may_unmap else P.CMD_FLAG_NO_HOLE
        if fua and sflags & P.FLAG_SEND_FUA:
            flags |= P.CMD_FLAG_FUA
        if no_fallback:
            if not sflags & P.FLAG_SEND_FAST_ZERO:
                raise OSError(errno.ENOTSUP, "Operation not supported")
            flags |= P.CMD_FLAG_FAST_ZERO
        await self._ranged(P.CMD_WRITE_ZEROES, offset, length, flags)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        if self._flags() & P.FLAG_SEND_TRIM:
            await self._ranged(P.CMD_TRIM, offset, length)

    async def _co_flush(self) -> None:
        if self._flags() & P.FLAG_SEND_FLUSH:
            await self._request(P.CMD_FLUSH, 0, 0)

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        if not self._conns or self._conns[0].ctx_id is None:
            return BlockStatus(Status.DATA | Status.OFFSET_VALID, length, offset=offset)
        req = await self._request(P.CMD_BLOCK_STATUS, offset, length, P.CMD_FLAG_REQ_ONE)
        if req.status is None:
            # a reply without the context's chunk (QEMU: "server did not reply
            # with any status extents")
            raise OSError(errno.EIO, "Input/output error")
        got, f = req.status
        st = Status.OFFSET_VALID
        if not f & P.STATE_HOLE:
            st |= Status.DATA
        if f & P.STATE_ZERO:
            st |= Status.ZERO
        return BlockStatus(st, got, offset=offset)

    async def _close(self) -> None:
        self._closed = True
        for scope in self._healing.values():
            scope.cancel()
        conns, self._conns = self._conns, []
        for conn in conns:
            await conn.aclose()

    def actual_size(self) -> int | None:
        return None

    @property
    def filename(self) -> str:
        """QEMU's nbd_refresh_filename."""
        s = self.server
        exp = self.export if self.has_export else None
        if s["type"] == "unix":
            if exp is not None:
                return f"nbd+unix:///{exp}?socket={s['path']}"
            return f"nbd+unix://?socket={s['path']}"
        if s["type"] == "inet" and ":" not in s["host"]:
            base = f"nbd://{s['host']}:{s['port']}"
            return f"{base}/{exp}" if exp is not None else base
        opts = {k: v for k, v in self.options.items()
                if k in ("server", "export", "tls-creds", "tls-hostname")}
        return json_filename({"driver": "nbd", **opts})


__all__ = ["NbdNode", "parse_filename"]
