"""The NBD client driver against a scripted server: malformed and hostile replies.

The server is real I/O (a unix socket in a temporary directory) that
negotiates correctly with the codec's server side and then answers the
first request of a connection with bytes a test chose: wrong handles,
oversized chunks, data or block status beyond the request, random bytes
(hypothesis).  The connection must be dropped and the request failed with
EIO (or retried on a new connection with reconnect-delay), while the graph,
its other nodes and the trio run go on.  Legacy file names are checked here
too (QEMU's nbd_parse_uri / nbd_parse_filename).
"""

from __future__ import annotations

import errno
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.nbd import parse_filename
from qsd_trio.proto import nbd as P
from qsd_trio.qapi.errors import GenericError

SIZE = 1 << 20
Respond = Callable[[P.Request], bytes]


def good(req: P.Request) -> bytes:
    """A correct answer: zeroes for reads, one allocated extent for status."""
    if req.type == P.CMD_READ:
        return P.chunk_offset_data_header(req.handle, req.offset, req.length, True) + \
            bytes(req.length)
    if req.type == P.CMD_BLOCK_STATUS:
        return P.chunk_block_status(req.handle, 1, [(req.length, 0)], True)
    return P.simple_reply(req.handle)


class Server:
    """Scripted NBD server: ``answers[i]`` answers the first request of the
    i-th connection (then the connection closes); later connections and
    later requests get :func:`good` answers."""

    def __init__(self, path: str, answers: list[Respond]):
        self.path = path
        self.answers = answers
        self.sessions = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(8)
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self.session, stream, self.sessions)
                self.sessions += 1

    async def session(self, stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()

        async def recv(k: int) -> bytes:
            while len(buf) < k:
                data = await stream.receive_some()
                if not data:
                    raise EOFError
                buf.extend(data)
            out = bytes(buf[:k])
            del buf[:k]
            return out

        async with stream:
            try:
                await stream.send_all(P.server_greeting())
                await recv(4)
                while True:
                    opt, length = P.parse_option_header(await recv(P.OPTION_HEADER_SIZE))
                    await recv(length)
                    if opt == P.OPT_SET_META_CONTEXT:
                        await stream.send_all(P.option_reply(
                            opt, P.REP_META_CONTEXT, P.meta_context_reply(1, "base:allocation")))
                    elif opt == P.OPT_GO:
                        flags = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA
                                 | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_TRIM)
                        await stream.send_all(P.option_reply(opt, P.REP_INFO,
                                                             P.info_export(SIZE, flags)))
                        await stream.send_all(P.option_reply(opt, P.REP_ACK))
                        break
                    await stream.send_all(P.option_reply(opt, P.REP_ACK))
                first = True
                while True:
                    req = P.parse_request(await recv(P.REQUEST_SIZE))
                    if req.type == P.CMD_DISC:
                        return
                    if req.type == P.CMD_WRITE:
                        await recv(req.length)
                    if first and n < len(self.answers):
                        await stream.send_all(self.answers[n](req))
                        return  # the connection closes after a scripted answer
                    first = False
                    await stream.send_all(good(req))
            except (EOFError, trio.BrokenResourceError, P.NbdProtocolError):
                return


async def with_node(answers: list[Respond], body, **opts) -> Server:
    """Open a null-co node and an nbd node on a scripted server; run body(node)."""
    with tempfile.TemporaryDirectory() as d, trio.fail_after(30):
        path = str(Path(d) / "s.sock")
        server = Server(path, answers)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            graph = BlockGraph()
            other = await graph.add({"driver": "null-co", "node-name": "other",
                                     "size": SIZE})
            node = await graph.add({"driver": "nbd", "node-name": "n",
                                    "server": {"type": "unix", "path": path}, **opts})
            try:
                await body(node)
                # the other node and a new nbd node on the same server still work
                await other.write(0, b"x" * 512)
                again = await graph.add({"driver": "nbd", "node-name": "again",
                                         "server": {"type": "unix", "path": path}})
                try:
                    assert await again.read(0, 512) == bytes(512)
                finally:
                    await again.close()
            finally:
                await node.close()
                await other.close()
            nursery.cancel_scope.cancel()
    return server


async def expect_eio(node, kind: str = "read") -> None:
    with pytest.raises(OSError) as e:
        if kind == "read":
            await node.read(4096, 4096)
        else:
            await node.block_status(4096, 4096)
    assert e.value.errno == errno.EIO


def chunk(handle: int, type_: int, payload: bytes, done: bool = True) -> bytes:
    return P.chunk_header(handle, type_, len(payload), P.REPLY_FLAG_DONE if done else 0) + payload


HOSTILE: dict[str, Respond] = {
    "wrong handle": lambda r: P.simple_reply(r.handle + 1),
    "bad magic": lambda r: b"\x12\x34\x56\x78" + bytes(12),
    "oversized status chunk": lambda r: P.chunk_header(r.handle, P.REPLY_TYPE_BLOCK_STATUS,
                                                       1 << 30, P.REPLY_FLAG_DONE),
    "data beyond the request": lambda r: P.chunk_offset_data_header(
        r.handle, r.offset + 4096, r.length, True) + bytes(r.length),
    "data before the request": lambda r: P.chunk_offset_data_header(
        r.handle, r.offset - 1, 1, True) + b"x",
    "hole beyond the request": lambda r: P.chunk_offset_hole(r.handle, r.offset, r.length + 1,
                                                            True),
    "unknown chunk type": lambda r: chunk(r.handle, 77, b""),
    "error chunk with error 0": lambda r: chunk(r.handle, P.REPLY_TYPE_ERROR,
                                                struct.pack(">IH", 0, 0)),
    "short error chunk": lambda r: chunk(r.handle, P.REPLY_TYPE_ERROR, b"\0\0"),
    "none without done": lambda r: chunk(r.handle, P.REPLY_TYPE_NONE, b"", done=False),
    "status for a read": lambda r: P.chunk_block_status(r.handle, 1, [(r.length, 0)], True),
    "truncated reply": lambda r: P.simple_reply(r.handle)[:10],
    "closed": lambda r: b"",
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_read_reply_fails_with_eio(name):
    await with_node([HOSTILE[name]], expect_eio)


@pytest.mark.parametrize("name", ["wrong context", "zero-length extent", "read data for status",
                                  "no extent"])
async def test_hostile_status_reply_fails_with_eio(name):
    answers: dict[str, Respond] = {
        "wrong context": lambda r: P.chunk_block_status(r.handle, 9, [(r.length, 0)], True),
        "zero-length extent": lambda r: P.chunk_block_status(r.handle, 1, [(0, 0)], True),
        "read data for status": lambda r: P.chunk_offset_data_header(r.handle, r.offset, 1,
                                                                     True) + b"x",
        "no extent": lambda r: P.chunk_none(r.handle),
    }

    async def body(node):
        await expect_eio(node, "status")
    await with_node([answers[name]], body)


async def test_status_beyond_the_request_is_truncated():
    async def body(node):
        st = await node.block_status(4096, 4096)
        assert st.length == 4096
    extents = [(1 << 20, P.STATE_HOLE | P.STATE_ZERO), (4096, 0)]
    await with_node([lambda r: P.chunk_block_status(r.handle, 1, extents, True)], body)


async def test_error_chunk_fails_only_the_request():
    async def body(node):
        with pytest.raises(OSError) as e:
            await node.read(0, 4096)
        assert e.value.errno == errno.ENOSPC
    await with_node([lambda r: P.chunk_error(r.handle, P.ENOSPC, "full")], body)


async def test_protocol_error_with_reconnect_delay_retries_on_a_new_connection():
    async def body(node):
        assert await node.read(4096, 4096) == bytes(4096)
    server = await with_node([HOSTILE["wrong handle"]], body, **{"reconnect-delay": 5})
    # the broken connection, the one the read was sent again on, and the
    # check's new node
    assert server.sessions == 3


async def test_many_requests_in_flight():
    async def body(node):
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = bytes(await node.read(i * 4096, 4096))
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(one, i)
        assert results == {i: bytes(4096) for i in range(64)}
    await with_node([], body)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([0, 1]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.integers(0, 1 << 32 - 1), st.binary(max_size=48)),
))
def test_fuzzed_replies_never_crash(reply):
    """Random bytes, or a structured chunk with a random handle offset, type,
    flags and length: the read completes correctly or fails with EIO, and
    nothing else breaks."""
    def answer(r: P.Request) -> bytes:
        if isinstance(reply, bytes):
            return reply
        dh, type_, flags, length, payload = reply
        return (struct.pack(">IHHQI", P.STRUCTURED_REPLY_MAGIC, flags, type_, r.handle + dh,
                            length) + payload)

    async def body(node):
        try:
            data = await node.read(4096, 4096)
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert len(data) == 4096

    trio.run(with_node, [answer], body)


# -- legacy file names -------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [
    ("nbd://h/e", {"export": "e", "server": {"type": "inet", "host": "h", "port": "10809"}}),
    ("nbd+tcp://h:99/", {"server": {"type": "inet", "host": "h", "port": "99"}}),
    ("nbd+unix:///e?socket=/s", {"export": "e", "server": {"type": "unix", "path": "/s"}}),
    ("nbd:unix:/s:exportname=e", {"export": "e", "server": {"type": "unix", "path": "/s"}}),
    ("nbd:h:99", {"server": {"type": "inet", "host": "h", "port": "99"}}),
    ("nbd:h:99:exportname=", {}),
])
def test_parse_filename(name, opts):
    assert parse_filename(name) == opts


@pytest.mark.parametrize("name,error", [
    ("nbd+foo://x", "No valid URL specified"),
    ("nbd+unix:///e", "No valid URL specified"),
    ("nbd://h/e?socket=x", "No valid URL specified"),
    ("nbd+unix://h/e?socket=/x", "No valid URL specified"),
    ("nbd+unix:///e?socket=/x&y=1", "No valid URL specified"),
    ("nbds://h/e", "No valid URL specified"),  # TLS URLs came after QEMU 7.2
    ("foo:h:1", "File name string for NBD must start with 'nbd:'"),
])
def test_parse_filename_errors(name, error):
    with pytest.raises(GenericError) as e:
        parse_filename(name)
    assert e.value.desc == error
