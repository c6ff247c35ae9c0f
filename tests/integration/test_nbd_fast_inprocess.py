"""The NBD reader's inline serving, in-process, over a memory node that has
a synchronous fast path (tests/nodes/test_fast_path.py covers the drivers).

Replies queued by the reader are sent when it would wait: before a DISC
ends the connection, when the client stops reading (the writer task takes
over a half-sent batch), and a client that keeps the reader busy still lets
the rest of the daemon run.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qsd_trio.exports import nbd as nbd_export
from qsd_trio.monitor import exports as mx
from qsd_trio.proto import nbd as P
from tests import nbd_client as C
from tests.helpers import other_task_turns

from .nbd_helpers import MemoryNode, make_daemon, ns
from .nbd_raw import RawClient, raw_clients  # noqa: F401 - autouse fixture


class FastMemoryNode(MemoryNode):
    """Serves reads and writes below ``slow_from`` synchronously."""

    slow_from = 1 << 62

    def _preadv_now(self, offset, length):
        if offset + length > self.slow_from:
            return None
        return bytes(self.data[offset:offset + length])

    def _pwritev_now(self, offset, mv):
        if offset + len(mv) > self.slow_from:
            return False
        self.data[offset:offset + len(mv)] = mv
        self._mark(offset, len(mv), True)
        return True


@pytest.fixture
async def env(nursery, tmp_path):
    d = await make_daemon(nursery)
    node = FastMemoryNode(d.graph, "fast")
    await node.open({"size": 64 << 20})
    d.graph.nodes["fast"] = node
    d.node = node
    sock = str(tmp_path / "nbd.sock")
    await mx.nbd_server_start(d, ns(addr={"type": "unix", "data": {"path": sock}}))
    await mx.block_export_add(d, ns(id="e", node_name="fast", name="fast", writable=True))
    d.sock = sock
    yield d
    await mx.nbd_server_stop(d, None)


def _blob(reqs) -> bytes:
    return b"".join(C.encode_request(t, h, off, ln, fl) + data
                    for h, (t, off, ln, fl, data) in enumerate(reqs, 1))


async def test_replies_before_disc_are_sent(env):
    env.node.data[:1 << 20] = bytes(range(256)) * 4096
    c = await RawClient.connect(env.sock)
    await c.go("fast")
    reqs = [(P.CMD_READ, i * 4096, 4096, P.CMD_FLAG_DF, b"") for i in range(40)]
    # 53 requests: with MAX_REQUESTS (16) slots, 5 replies are still queued at DISC
    reqs += [(P.CMD_WRITE, (2 << 20) + i * 4096, 4096, 0, bytes([i]) * 4096) for i in range(13)]
    await c.s.send_all(_blob(reqs) + C.encode_request(P.CMD_DISC, 0))
    got = {}
    for _ in reqs:
        rep, payload = await c.reply()
        got[rep.handle] = payload
    assert await c.closed()
    for h in range(1, 41):
        off = (h - 1) * 4096
        assert got[h][8:] == bytes(env.node.data[off:off + 4096])
    assert env.node.data[2 << 20:(2 << 20) + 13 * 4096] == b"".join(
        bytes([i]) * 4096 for i in range(13))
    assert env.node.stats["wr_operations"] == 13 and env.node.stats["rd_operations"] == 40


async def test_client_not_reading_replies_gets_them_all_later(env):
    # 48 MiB of replies: the socket fills, the reader's own send stops half
    # way and the writer task finishes it; at most MAX_REQUESTS in flight
    env.node.data[:] = bytes(range(251)) * ((64 << 20) // 251) + bytes((64 << 20) % 251)
    c = await RawClient.connect(env.sock)
    await c.go("fast")
    reqs = [(P.CMD_READ, i << 20, 1 << 20, P.CMD_FLAG_DF, b"") for i in range(48)]
    await c.s.send_all(_blob(reqs))
    await trio.testing.wait_all_tasks_blocked()
    conn = next(iter(env.exports["e"].clients))
    assert conn._slots.value == 0  # replies it could not send hold their slots
    seen = set()
    for _ in reqs:
        rep, payload = await c.reply()
        off = (rep.handle - 1) << 20
        assert payload[8:] == bytes(env.node.data[off:off + (1 << 20)])
        seen.add(rep.handle)
    assert seen == set(range(1, 49))


async def test_inline_and_task_requests_mixed(env):
    env.node.slow_from = 32 << 20  # the upper half takes the request tasks
    c = await RawClient.connect(env.sock)
    await c.go("fast")
    reqs = [(P.CMD_WRITE, (i * 997 % 8192) * 4096, 4096, 0, bytes([i % 255 + 1]) * 4096)
            for i in range(300)]
    await c.s.send_all(_blob(reqs))
    for _ in reqs:
        rep, _ = await c.reply()
        assert rep.error == 0
    model = bytearray(64 << 20)
    for _t, off, ln, _f, data in reqs:
        model[off:off + ln] = data
    assert env.node.data == model
    assert env.node.stats["wr_operations"] == 300  # each counted once, either way


async def test_busy_client_lets_other_tasks_run(env):
    env.node.data[:1 << 20] = b"\x42" * (1 << 20)
    c = await RawClient.connect(env.sock)
    await c.go("fast")
    # one-byte reads: the requests arrive in one receive and all the replies
    # fit in the socket's buffer, so nothing but the reader's own stops
    # would let other tasks in
    n = 20 * nbd_export.MAX_REQUESTS
    reqs = [(P.CMD_READ, (i % 256) * 4096, 1, P.CMD_FLAG_DF, b"") for i in range(n)]
    blob = _blob(reqs)
    async with other_task_turns() as turns:
        await c.s.send_all(blob)
        before = turns.n
        for _ in reqs:
            rep, payload = await c.reply()
            assert payload[8:] == b"\x42"
        # the reader stopped for the rest at least once per MAX_REQUESTS requests
        assert turns.n - before >= n // nbd_export.MAX_REQUESTS // 2


async def test_queue_depth_1_requests_take_no_coroutine_to_receive(env):
    """A client at queue depth 1 (in a thread, so that the reader's inline
    wait sees its socket): each request's header, and a WRITE's payload
    with it, is received by Wire.receive_now, not by the awaited
    recv_exactly/recv_into, once the first request has come."""
    import os
    import socket
    import sys

    from qsd_trio.exports.nbd.wire import Wire

    c = await RawClient.connect(env.sock)
    await c.go("fast", structured=False)
    sock = socket.socket(fileno=os.dup(c.s.socket.fileno()))
    sock.setblocking(True)
    n = 50
    model = bytearray(64 << 20)

    def client() -> None:
        def recv(k: int) -> bytes:
            out = b""
            while len(out) < k:
                d = sock.recv(k - len(out))
                assert d
                out += d
            return out
        for i in range(n):
            off = (i * 7919 % 4096) * 4096
            data = bytes([i + 1]) * 4096
            model[off:off + 4096] = data
            sock.sendall(C.encode_request(P.CMD_WRITE, 2 * i, off, 4096, 0) + data)
            rep = C.parse_reply_header(recv(16))
            assert (rep.handle, rep.error) == (2 * i, 0)
            sock.sendall(C.encode_request(P.CMD_READ, 2 * i + 1, off, 4096, 0))
            rep = C.parse_reply_header(recv(16))
            assert (rep.handle, rep.error) == (2 * i + 1, 0)
            assert recv(4096) == data

    awaited = {Wire.recv_exactly.__code__, Wire.recv_into.__code__}
    calls = [0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in awaited:
            calls[0] += 1

    sys.setprofile(profile)
    try:
        await trio.to_thread.run_sync(client)
    finally:
        sys.setprofile(None)
        sock.close()
    assert env.node.data == model
    # the first request finds the reader in trio; a few more may find it
    # elsewhere (the thread's start and end wake trio), not one per request
    assert calls[0] <= 5, calls[0]
