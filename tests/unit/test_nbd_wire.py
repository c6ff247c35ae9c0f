"""The NBD export's socket wrapper (exports/nbd/wire.py): the options it
sets on the connection's socket."""

from __future__ import annotations

import socket

import trio

from qsd_trio.exports.nbd.wire import Wire


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

