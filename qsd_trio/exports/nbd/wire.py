"""Buffered exact reads and gathered writes over a connection's stream.

The one place that touches a client's socket: the negotiation and the
transmission phase read and write through :class:`Wire`, and it is replaced
by a new one over the TLS stream after NBD_OPT_STARTTLS (as nbdkit's
connections.c keeps the socket behind ``conn->recv``/``conn->send``).
"""

from __future__ import annotations

import mmap
import socket as _stdsocket
from collections.abc import Callable, Sequence

import trio

from ...sockets import no_notsent_limit

# what a reply is made of: headers (bytes) and data (bytearray, memoryview)
Buffer = bytes | bytearray | memoryview

_RECV_CHUNK = 256 * 1024
# The socket's send buffer: a 1 MiB read reply (and a client's queue of
# them) goes out with one sendmsg instead of four or five, each a wait for
# the socket through the scheduler (a unix socket's default is 208 KiB).
# The kernel takes memory only for bytes queued, and caps the size at
# net.core.wmem_max (docs/formats.md, "Large sequential reads").
SEND_BUFFER = 4 * 1024 * 1024
_IOV_BATCH = 512  # buffers per sendmsg, under the kernel's IOV_MAX


class _Disconnect(Exception):
    """End this connection now (the peer misbehaved or asked to)."""


def _rest(parts: Sequence[Buffer], n: int) -> list[Buffer]:
    """What is left of ``parts`` once their first ``n`` bytes are sent."""
    for i, p in enumerate(parts):
        if n < len(p):
            return [memoryview(p)[n:], *parts[i + 1:]] if n else list(parts[i:])
        n -= len(p)
    return []


class Wire:
    """Buffered exact reads and gathered writes over a trio stream.

    For a plain socket stream it works on the socket directly: non-blocking
    ``recv_into``/``sendmsg`` first, waiting for readiness only when the
    kernel has nothing (the hot path takes no trip through the scheduler),
    and payloads go straight into their own buffers.  Any other stream (TLS)
    goes through ``receive_some``/``send_all``.  Closed by :meth:`aclose`;
    the peer vanishing shows as :class:`_Disconnect` or
    ``trio.BrokenResourceError``.
    """

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.raw: _stdsocket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            # a second socket object over the same fd, detached before close
            self.raw = _stdsocket.socket(fileno=stream.socket.fileno())
            self.raw.setblocking(False)
            try:
                self.raw.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass  # a socket that refuses keeps its own buffer: slower, not wrong
            no_notsent_limit(self.raw)  # a 1 MiB read reply in one piece
        # anonymous memory, not a bytearray: its pages become resident only
        # once data reaches them, so an idle client costs one page, not
        # 256 KiB (a bytearray is zero-filled, every page touched)
        self._buf = mmap.mmap(-1, _RECV_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # called when a raw receive would block, just before waiting: the
        # connection sends the replies it queued meanwhile (see _flush_now)
        self.before_wait: Callable[[], None] | None = None
        # then, instead of parking in trio, a wait on the socket that reaps
        # I/O completions meanwhile; False to park after all (nodes/engine/
        # inline_wait.py)
        self.wait_inline: Callable[[int], bool] | None = None
        # called once the wait is over (inline or through trio)
        self.after_wait: Callable[[], None] | None = None
        # the connection expects the socket to be empty (its client waits
        # for a reply): with wait_inline, the next receive waits first,
        # rather than failing with EAGAIN (a system call and an exception)
        self.expect_empty = False

    async def _recv_into(self, view: memoryview) -> int:
        raw = self.raw
        if raw is None:
            data = await self.stream.receive_some(len(view))
            view[:len(data)] = data
            return len(data)
        if self.expect_empty:
            self._wait_expected(raw)
        while True:
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                if self.before_wait is not None:
                    self.before_wait()
                if self.wait_inline is None or not self.wait_inline(raw.fileno()):
                    try:
                        await trio.lowlevel.wait_readable(raw)
                    finally:
                        if self.after_wait is not None:
                            self.after_wait()
                elif self.after_wait is not None:
                    self.after_wait()
            except OSError as e:
                raise trio.BrokenResourceError(e) from e

    def _wait_expected(self, raw: _stdsocket.socket) -> None:
        """For a socket expected empty (``expect_empty``, cleared here): the
        inline wait for it, where there is one, before the receive that
        follows (which is made whether it became readable or not)."""
        self.expect_empty = False
        wait = self.wait_inline
        if wait is not None and self.before_wait is not None:
            self.before_wait()
            wait(raw.fileno())
            if self.after_wait is not None:
                self.after_wait()

    def receive_now(self, need: int) -> bool:
        """Whether ``need`` bytes are buffered after one receive made
        without a coroutine (raw sockets): the wait :meth:`_recv_into`
        makes for a socket expected empty, then one non-blocking
        ``recv_into``.  False leaves the rest to the awaited path (what was
        received stays buffered).  At queue depth 1 a request's header (and
        a WRITE's payload with it) comes this way: the three coroutines of
        ``recv_exactly`` cost about as much as the receive itself."""
        raw = self.raw
        if raw is None:
            return False
        if self.expect_empty:
            self._wait_expected(raw)
        start = self._start
        if start and len(self._buf) - start < need:
            n = self._end - start
            self._buf.move(0, start, n)
            self._start, self._end = 0, n
        try:
            n = raw.recv_into(self._view[self._end:])
        except BlockingIOError:
            return False
        except OSError as e:
            raise trio.BrokenResourceError(e) from e
        if n == 0:
            raise _Disconnect("client closed the connection")
        self._end += n
        return self._end - self._start >= need

    def take_into_now(self, view: memoryview) -> bool:
        """recv_into(view) if all of it is buffered already (no coroutine);
        False leaves everything as it was."""
        start = self._start
        end = start + len(view)
        if end > self._end:
            return False
        view[:] = self._view[start:end]
        if end == self._end:
            self._start = self._end = 0
        else:
            self._start = end
        return True

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available at ``_start``."""
        if self._start and len(self._buf) - self._start < need:
            n = self._end - self._start
            self._buf.move(0, self._start, n)  # memmove: the ranges may overlap
            self._start, self._end = 0, n
        while self._end - self._start < need:
            n = await self._recv_into(self._view[self._end:])
            if n == 0:
                raise _Disconnect("client closed the connection")
            self._end += n

    async def recv_exactly(self, n: int) -> bytes:
        if self._end - self._start < n:
            if n > len(self._buf):
                big = bytearray(n)
                await self.recv_into(memoryview(big))
                return bytes(big)
            await self._fill(n)
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def take_now(self, n: int) -> bytes | None:
        """recv_exactly(n) if ``n`` bytes are buffered already (no
        coroutine to make and run); None leaves everything as it was."""
        start = self._start
        end = start + n
        if end > self._end:
            return None
        out = bytes(self._view[start:end])
        if end == self._end:
            self._start = self._end = 0
        else:
            self._start = end
        return out

    async def receive_some(self, max_bytes: int) -> bytes:
        """At least one and at most ``max_bytes`` bytes: what is buffered,
        else what one receive brings (negotiation reads this way, never
        past what it asked for)."""
        if self._end == self._start:
            self._start = self._end = 0
            await self._fill(1)
        n = min(max_bytes, self._end - self._start)
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return out

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, straight from the socket past what is buffered."""
        have = min(self._end - self._start, len(view))
        view[:have] = self._view[self._start:self._start + have]
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        filled = have
        while filled < len(view):
            n = await self._recv_into(view[filled:])
            if n == 0:
                raise _Disconnect("client closed the connection mid-request")
            filled += n

    async def skip(self, n: int) -> None:
        """Consume and drop ``n`` bytes without holding them."""
        while n:
            if self._end == self._start:
                self._start = self._end = 0
                await self._fill(1)
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def send_now(self, parts: Sequence[Buffer]) -> list[memoryview]:
        """Send what the socket takes now, without waiting (raw sockets
        only); returns the rest, as memoryviews, for :meth:`send`."""
        raw = self.raw
        assert raw is not None
        full = False
        if len(parts) <= _IOV_BATCH:
            # the usual case, all at once: parts as they are (sendmsg takes
            # any buffer, and empty ones), memoryviews only for a rest
            try:
                n = raw.sendmsg(parts)
            except BlockingIOError:
                n = 0
                full = True
            except OSError as e:
                raise trio.BrokenResourceError(e) from e
            if n == sum(map(len, parts)):
                return []
            parts = _rest(parts, n)
        bufs = [p if isinstance(p, memoryview) else memoryview(p) for p in parts if len(p)]
        if full:
            return bufs
        i = 0  # bufs[:i] are sent
        while i < len(bufs):
            batch = bufs[i:i + _IOV_BATCH]
            try:
                n = raw.sendmsg(batch)
            except BlockingIOError:
                break
            except OSError as e:
                raise trio.BrokenResourceError(e) from e
            for b in batch:
                if n < len(b):
                    bufs[i] = b[n:]
                    return bufs[i:]
                n -= len(b)
                i += 1
        return bufs[i:]

    async def send(self, *parts: Buffer) -> None:
        raw = self.raw
        if raw is None:
            await self.stream.send_all(b"".join(parts))
            return
        bufs: Sequence[Buffer] = parts
        while True:
            bufs = self.send_now(bufs)
            if not bufs:
                return
            await trio.lowlevel.wait_writable(raw)

    def detach_raw(self) -> None:
        """Stop using the socket directly (the stream is about to be wrapped)."""
        if self.raw is not None:
            self.raw.detach()
            self.raw = None

    async def aclose(self) -> None:
        if self.raw is not None:
            self.raw.detach()  # the trio stream owns the fd and closes it
            self.raw = None
        with trio.move_on_after(1, shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

