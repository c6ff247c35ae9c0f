"""The NBD export's socket wrapper (exports/nbd/wire.py): the options it
sets on the connection's socket."""

from __future__ import annotations

import socket

import pytest
import trio

from qsd_trio.exports.nbd.wire import Wire, _Disconnect


async def test_tcp_connection_sends_without_a_notsent_limit():
    """trio's SocketStream limits a TCP socket's unsent bytes to 16 KiB
    (TCP_NOTSENT_LOWAT), which made a 1 MiB read reply leave in four or five
    pieces, each a wait for the socket (strace: 3512 sendmsg for 768 such
    replies, 214 without the limit); the export's connection has the
    system's default (0: no limit), as QEMU's."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0], await trio.open_tcp_stream("127.0.0.1", port):
        server = await listeners[0].accept()
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 16384
        wire = Wire(server)
        try:
            assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
        finally:
            await wire.aclose()



def _pair() -> tuple[Wire, socket.socket]:
    ours, peer = socket.socketpair()
    return Wire(trio.SocketStream(trio.socket.from_stdlib_socket(ours))), peer


async def test_receive_now_buffers_without_a_coroutine():
    """receive_now/take_now/take_into_now: a request's header and a WRITE's
    payload taken without the awaited path; what is not complete yet stays
    buffered for it, byte for byte."""
    wire, peer = _pair()
    try:
        assert not wire.receive_now(28)       # nothing there: EAGAIN, no exception
        assert wire.take_now(28) is None
        peer.sendall(b"h" * 10)
        assert not wire.receive_now(28)       # a partial header stays buffered
        assert wire.take_now(28) is None
        peer.sendall(b"H" * 18 + b"p" * 4096 + b"next")
        assert wire.receive_now(28)
        assert wire.take_now(28) == b"h" * 10 + b"H" * 18
        payload = memoryview(bytearray(4096))
        assert wire.take_into_now(payload)
        assert payload == b"p" * 4096
        rest = memoryview(bytearray(8))
        assert not wire.take_into_now(rest)   # only 4 of 8 bytes buffered: untouched
        assert rest == bytes(8)
        peer.sendall(b"more")
        await wire.recv_into(rest)            # the awaited path finds the first 4
        assert rest == b"nextmore"
        peer.close()
        with pytest.raises(_Disconnect):
            wire.receive_now(1)
    finally:
        await wire.aclose()
        peer.close()


async def test_receive_now_waits_inline_when_the_socket_is_expected_empty():
    """A client at queue depth 1 waits for the reply before it sends again:
    receive_now sends what was queued (before_wait), waits (wait_inline)
    and receives once, in that order."""
    wire, peer = _pair()
    calls = []

    def wait(fd: int) -> bool:
        calls.append("wait")
        peer.sendall(b"x" * 28)   # the next request arrives during the wait
        return True

    wire.before_wait = lambda: calls.append("before")
    wire.after_wait = lambda: calls.append("after")
    wire.wait_inline = wait
    wire.expect_empty = True
    try:
        assert wire.receive_now(28)
        assert calls == ["before", "wait", "after"]
        assert not wire.expect_empty
        assert wire.take_now(28) == b"x" * 28
    finally:
        await wire.aclose()
        peer.close()
