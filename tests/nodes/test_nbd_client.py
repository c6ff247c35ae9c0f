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
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.nbd import open_socket, parse_filename
from qsd_trio.nodes.node import Status
from qsd_trio.proto import nbd as P
from qsd_trio.qapi.errors import GenericError

SIZE = 1 << 20
Respond = Callable[[P.Request], bytes]


def good(req: P.Request, extended: bool = False) -> bytes:
    """A correct answer: zeroes for reads, one allocated extent for status;
    extended chunks (echoing the request's offset) when ``extended``."""
    xo = req.offset if extended else None
    if req.type == P.CMD_READ:
        return P.chunk_offset_data_header(req.handle, req.offset, req.length, True, xo) + \
            bytes(req.length)
    if req.type == P.CMD_BLOCK_STATUS:
        if extended:
            return P.chunk_block_status_ext(req.handle, req.offset, 1, [(req.length, 0)], True)
        return P.chunk_block_status(req.handle, 1, [(req.length, 0)], True)
    return P.chunk_none(req.handle, xo) if extended else P.simple_reply(req.handle)


class Server:
    """Scripted NBD server: ``answers[i]`` answers the first request of the
    i-th connection (then the connection closes); later connections and
    later requests get :func:`good` answers, or ``respond``'s.  It offers
    extended headers only when ``extended`` (and refuses them with
    NBD_REP_ERR_UNSUP otherwise, as QEMU 7.2's servers do); ``requests``
    records every request received."""

    def __init__(self, path: str, answers: list[Respond], extended: bool = False,
                 respond: Respond | None = None, size: int = SIZE):
        self.path = path
        self.answers = answers
        self.extended = extended
        self.respond = respond
        self.size = size
        self.sessions = 0
        self.requests: list[P.Request] = []

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

        ext = False
        async with stream:
            try:
                await stream.send_all(P.server_greeting())
                await recv(4)
                while True:
                    opt, length = P.parse_option_header(await recv(P.OPTION_HEADER_SIZE))
                    await recv(length)
                    if opt == P.OPT_EXTENDED_HEADERS:
                        reply = P.REP_ACK if self.extended else P.REP_ERR_UNSUP
                        ext = self.extended
                        await stream.send_all(P.option_reply(opt, reply))
                        continue
                    if opt == P.OPT_SET_META_CONTEXT:
                        await stream.send_all(P.option_reply(
                            opt, P.REP_META_CONTEXT, P.meta_context_reply(1, "base:allocation")))
                    elif opt == P.OPT_GO:
                        flags = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA
                                 | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_TRIM)
                        await stream.send_all(P.option_reply(opt, P.REP_INFO,
                                                             P.info_export(self.size, flags)))
                        await stream.send_all(P.option_reply(opt, P.REP_ACK))
                        break
                    await stream.send_all(P.option_reply(opt, P.REP_ACK))
                first = True
                while True:
                    if ext:
                        req = P.parse_ext_request(await recv(P.EXT_REQUEST_SIZE))
                    else:
                        req = P.parse_request(await recv(P.REQUEST_SIZE))
                    self.requests.append(req)
                    if req.type == P.CMD_DISC:
                        return
                    if req.type == P.CMD_WRITE:
                        assert not ext or req.flags & P.CMD_FLAG_PAYLOAD_LEN
                        await recv(req.length)
                    if first and n < len(self.answers):
                        await stream.send_all(self.answers[n](req))
                        return  # the connection closes after a scripted answer
                    first = False
                    await stream.send_all(self.respond(req) if self.respond else good(req, ext))
            except (EOFError, trio.BrokenResourceError, P.NbdProtocolError):
                return


async def with_node(answers: list[Respond], body, extended: bool = False,
                    respond: Respond | None = None, size: int = SIZE, **opts) -> Server:
    """Open a null-co node and an nbd node on a scripted server; run body(node)."""
    with tempfile.TemporaryDirectory() as d, trio.fail_after(30):
        path = str(Path(d) / "s.sock")
        server = Server(path, answers, extended, respond, size)
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


# -- extended headers ----------------------------------------------------------------
def ext_chunk(r: P.Request, type_: int, payload: bytes, done: bool = True,
              offset: int | None = None) -> bytes:
    return P.chunk_header(r.handle, type_, len(payload), P.REPLY_FLAG_DONE if done else 0,
                          r.offset if offset is None else offset) + payload


async def test_extended_headers_when_offered():
    """Requests go as 32-byte extended headers (a write with PAYLOAD_LEN),
    and data, status and completions come back as extended chunks."""
    async def body(node):
        await node.write(8192, b"y" * 4096)
        assert await node.read(4096, 4096) == bytes(4096)
        st = await node.block_status(0, 65536)
        assert st.length == 65536
    server = await with_node([], body, extended=True)
    types = [r.type for r in server.requests]
    assert P.CMD_WRITE in types and P.CMD_READ in types and P.CMD_BLOCK_STATUS in types


async def test_without_extended_headers_nothing_changes():
    """A server that refuses them (QEMU 7.2's) gets compact requests: the
    scripted server parses 28-byte headers, so anything else would break."""
    async def body(node):
        await node.write(8192, b"y" * 4096)
        assert await node.read(4096, 4096) == bytes(4096)
        assert (await node.block_status(0, 65536)).length == 65536
    await with_node([], body, extended=False)


@pytest.mark.parametrize("extended,requests", [(True, 1), (False, 3)])
async def test_64_bit_effect_lengths(extended, requests):
    """Zeroing 6 GiB takes one request with extended headers; compact ones
    hold 32 bits, so it takes three (2 GiB at most each, as QEMU 7.2)."""
    size = 6 << 30

    async def body(node):
        await node.write_zeroes(0, size)
    server = await with_node([], body, extended=extended, size=size)
    zeroes = [r for r in server.requests if r.type == P.CMD_WRITE_ZEROES]
    assert len(zeroes) == requests
    assert sum(r.length for r in zeroes) == size
    assert [r.offset for r in zeroes] == [sum(z.length for z in zeroes[:i])
                                           for i in range(len(zeroes))]


async def test_extended_block_status_longer_than_32_bits():
    size = 6 << 30

    async def body(node):
        st = await node.block_status(0, size)
        assert st.length == size and not st.flags & Status.DATA

    def respond(r: P.Request) -> bytes:
        if r.type == P.CMD_BLOCK_STATUS:
            return P.chunk_block_status_ext(r.handle, r.offset, 1,
                                            [(r.length, P.STATE_HOLE | P.STATE_ZERO)], True)
        return good(r, True)
    server = await with_node([], body, extended=True, respond=respond, size=size)
    assert [r.length for r in server.requests if r.type == P.CMD_BLOCK_STATUS] == [size]


EXT_HOSTILE: dict[str, Respond] = {
    "simple reply": lambda r: P.simple_reply(r.handle),
    "structured chunk": lambda r: P.chunk_offset_data_header(r.handle, r.offset, r.length,
                                                             True) + bytes(r.length),
    "wrong offset in the header": lambda r: P.chunk_offset_data_header(
        r.handle, r.offset, r.length, True, r.offset + 1) + bytes(r.length),
    "data beyond the request": lambda r: P.chunk_offset_data_header(
        r.handle, r.offset + 512, r.length, True, r.offset) + bytes(r.length),
    "payload length beyond 32 bits": lambda r: P.chunk_header(
        r.handle, P.REPLY_TYPE_OFFSET_DATA, (1 << 40) + 8, P.REPLY_FLAG_DONE, r.offset),
    "none with a 64-bit length": lambda r: P.chunk_header(
        r.handle, P.REPLY_TYPE_NONE, 1 << 40, P.REPLY_FLAG_DONE, r.offset),
    "unknown chunk type": lambda r: ext_chunk(r, 77, b""),
}


@pytest.mark.parametrize("name", list(EXT_HOSTILE))
async def test_hostile_extended_read_reply_fails_with_eio(name):
    await with_node([EXT_HOSTILE[name]], expect_eio, extended=True)


EXT_STATUS_HOSTILE: dict[str, Respond] = {
    "compact status chunk": lambda r: P.chunk_block_status(r.handle, 1, [(r.length, 0)], True),
    "compact status in an extended chunk": lambda r: ext_chunk(
        r, P.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, r.length, 0)),
    "flags beyond 32 bits": lambda r: P.chunk_block_status_ext(
        r.handle, r.offset, 1, [(r.length, 1 << 32)], True),
    "count of zero": lambda r: ext_chunk(r, P.REPLY_TYPE_BLOCK_STATUS_EXT,
                                         struct.pack(">II", 1, 0)),
    "count beyond the payload": lambda r: ext_chunk(
        r, P.REPLY_TYPE_BLOCK_STATUS_EXT, struct.pack(">IIQQ", 1, 2, r.length, 0)),
    "zero-length extent": lambda r: P.chunk_block_status_ext(r.handle, r.offset, 1, [(0, 0)],
                                                            True),
    "wrong context": lambda r: P.chunk_block_status_ext(r.handle, r.offset, 9,
                                                       [(r.length, 0)], True),
}


@pytest.mark.parametrize("name", list(EXT_STATUS_HOSTILE))
async def test_hostile_extended_status_reply_fails_with_eio(name):
    async def body(node):
        await expect_eio(node, "status")
    await with_node([EXT_STATUS_HOSTILE[name]], body, extended=True)


@pytest.mark.parametrize("name", ["extended chunk", "extended status",
                                  "status ext in a structured chunk"])
async def test_extended_replies_without_negotiation_fail_with_eio(name):
    answers: dict[str, Respond] = {
        "extended chunk": lambda r: P.chunk_none(r.handle, r.offset),
        "extended status": lambda r: P.chunk_block_status_ext(r.handle, r.offset, 1,
                                                              [(r.length, 0)], True),
        "status ext in a structured chunk": lambda r: chunk(
            r.handle, P.REPLY_TYPE_BLOCK_STATUS_EXT, struct.pack(">IIQQ", 1, 1, r.length, 0)),
    }

    async def body(node):
        await expect_eio(node, "status")
    await with_node([answers[name]], body, extended=False)


async def test_structured_read_zeroes_what_no_chunk_covered():
    """Read buffers come from a pool and are not zero-filled: a reply whose
    chunks leave part of the request uncovered reads as zeroes there, not as
    a previous read's data."""
    reads = 0

    def respond(r: P.Request) -> bytes:
        nonlocal reads
        if r.type != P.CMD_READ or reads == 2:
            return good(r)  # the second read is the test's; then with_node's check
        reads += 1
        if reads == 1:
            return P.chunk_offset_data_header(r.handle, r.offset, r.length, True) + \
                b"x" * r.length
        # the middle only, in two chunks out of order: the ends are not covered
        return (P.chunk_offset_data_header(r.handle, r.offset + 2048, 1024, False) + b"b" * 1024
                + P.chunk_offset_data_header(r.handle, r.offset + 1024, 1024, True)
                + b"a" * 1024)

    async def body(node):
        assert bytes(await node.read(0, 4096)) == b"x" * 4096
        data = bytes(await node.read(0, 4096))
        assert data == bytes(1024) + b"a" * 1024 + b"b" * 1024 + bytes(1024)
    await with_node([], body, respond=respond)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([0, 1, 2, 5, 6, 0x8001, 0x8002]), st.integers(0, 0xFFFF),
              st.integers(-2, 2), st.sampled_from([0, 1, -1, 4096]),
              st.integers(0, (1 << 64) - 1), st.binary(max_size=64)),
))
def test_fuzzed_extended_replies_never_crash(reply):
    """With extended headers: random bytes, or an extended chunk with a
    random type, flags, handle, offset (the request's, or off by a little)
    and 64-bit length, to a read and then to a block status request."""
    def answer(r: P.Request) -> bytes:
        if isinstance(reply, bytes):
            return reply
        type_, flags, dh, doff, length, payload = reply
        return (struct.pack(">IHHQQQ", P.EXTENDED_REPLY_MAGIC, flags, type_,
                            (r.handle + dh) % (1 << 64),
                            max(0, r.offset + doff), length) + payload)

    async def body(node):
        for kind in ("read", "status"):
            try:
                if kind == "read":
                    assert len(await node.read(4096, 4096)) == 4096
                else:
                    assert 0 < (await node.block_status(4096, 4096)).length <= 4096
            except OSError as e:
                assert e.errno == errno.EIO

    trio.run(with_node, [answer, answer], body, True)


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


async def test_tcp_connection_sends_without_a_notsent_limit():
    """trio's SocketStream limits a TCP socket's unsent bytes to 16 KiB
    (TCP_NOTSENT_LOWAT), which made a 1 MiB write leave in pieces, each a
    wait for the socket; the client's connection has the system's default
    (0: no limit), as QEMU's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        stream, std = await open_socket({"type": "inet", "host": "127.0.0.1", "port": str(port)})
        try:
            assert std.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
        finally:
            await stream.aclose()
