"""qsd_trio/chardev/websocket.py alone: the handshake replies and the frame
codec.  The expected bytes were measured against qemu-storage-daemon 7.2
(``--chardev socket,...,websocket=on``); the differential test
tests/differential/test_chardev_socket_diff.py compares the two daemons
on the wire."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.chardev import websocket as ws
from tests.chardev_socket_clients import (
    ACCEPTED_REQUESTS,
    REFUSED_REQUESTS,
    client_frame,
    upgrade_request,
)

DATE = "Mon, 07 Dec 2026 14:45:33 GMT"


def test_accept():
    # the request's key is RFC 6455's example, whose accept value is known
    got = ws.server_handshake(upgrade_request() + b"\x82", DATE)
    assert got == ws.Accepted(
        (f"HTTP/1.1 101 Switching Protocols\r\nServer: QEMU VNC\r\nDate: {DATE}\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
         "Sec-WebSocket-Protocol: binary\r\n\r\n").encode(), b"\x82")


BAD = (f"HTTP/1.1 400 Bad Request\r\nServer: QEMU VNC\r\nDate: {DATE}\r\n"
       "Connection: close\r\nSec-WebSocket-Version: 13\r\n").encode()


@pytest.mark.parametrize("req", REFUSED_REQUESTS)
def test_refused_as_qemu(req):
    got = ws.server_handshake(req, DATE)
    assert isinstance(got, ws.Rejected)
    assert got.response == BAD


@pytest.mark.parametrize("req", ACCEPTED_REQUESTS)
def test_accepted_as_qemu(req):
    assert isinstance(ws.server_handshake(req, DATE), ws.Accepted)


def test_too_large():
    too_large = (f"HTTP/1.1 403 Request Entity Too Large\r\nServer: QEMU VNC\r\n"
                 f"Date: {DATE}\r\nConnection: close\r\n\r\n").encode()
    assert ws.server_handshake(b"x" * 4095, DATE) is None
    assert ws.server_handshake(b"x" * 4096, DATE).response == too_large
    # the blank line must end within the first 4096 bytes
    late = b"GET / HTTP/1.1\r\n" + b"x" * 4077 + b"\r\n\r\n"
    assert ws.server_handshake(late, DATE).response == too_large
    # a NUL ends the search, as it ends QEMU's C string
    assert ws.server_handshake(b"\0" + upgrade_request(), DATE) is None


def test_waits_for_the_blank_line():
    req = upgrade_request()
    for i in range(len(req)):
        assert ws.server_handshake(req[:i], DATE) is None
    assert ws.server_handshake(req.replace(b"\r\n", b"\n"), DATE) is None
    eof = ws.server_handshake(req[:10], DATE, eof=True)
    assert eof == ws.Rejected(b"", "End of headers not found before connection closed")


def close(status: int, reason: bytes) -> bytes:
    return bytes([0x88, 2 + len(reason)]) + struct.pack(">H", status) + reason


ONLY = b"only binary, close, ping, and pong frames are supported"
# (client bytes, data for the chardev, reply, closed): measured against QEMU 7.2
FRAMES = [
    (client_frame(b'{"execute":"x"}'), b'{"execute":"x"}', b"", False),
    (client_frame(b"abcd", masked=False), b"", close(1002, b"client frames must be masked"), True),
    (client_frame(b"abc", op=ws.OP_TEXT), b"", close(1003, ONLY), True),
    (client_frame(b"abc", op=ws.OP_TEXT, fin=False), b"",
     close(1008, b"only binary frames may be fragmented"), True),
    (client_frame(b"hello", op=ws.OP_PING), b"", b"\x8a\x05hello", False),
    (client_frame(b"", op=ws.OP_PING), b"", b"\x8a\x00", False),
    (client_frame(b"hello", op=ws.OP_PONG), b"", b"", False),
    (client_frame(b"x", op=ws.OP_PING, fin=False), b"",
     close(1008, b"only binary frames may be fragmented"), True),
    (client_frame(b"x" * 200, op=ws.OP_PING), b"", close(1002, b"control frame is too large"), True),
    (b"\x89\xfe\x00\x64abcd" + b"x" * 100, b"", close(1002, b"control frame is too large"), True),
    (client_frame(b"x", op=3), b"", close(1003, ONLY), True),
    (client_frame(b"x", op=0), b"", close(1003, ONLY), True),          # nothing to continue
    (b"\x00" * 20, b"", close(1008, b"only binary frames may be fragmented"), True),
    (client_frame(b"\x03\xe8bye", op=ws.OP_CLOSE), b"", close(1000, b"peer requested close"), True),
    (client_frame(b"", op=ws.OP_CLOSE), b"", close(1000, b"peer requested close"), True),
    (client_frame(b"x", op=ws.OP_CLOSE, masked=False) + b"zzzz", b"",
     close(1000, b"peer requested close"), True),
    (client_frame(b"ab", fin=False) + client_frame(b"cd", op=0), b"abcd", b"", False),
    (bytes([0xC2]) + client_frame(b"rsv")[1:], b"rsv", b"", False),    # RSV bits ignored
    (client_frame(b""), b"", b"", False),
    # a continuation after a ping between fragments continues the ping
    (client_frame(b"ab", fin=False) + client_frame(b"hi", op=ws.OP_PING)
     + client_frame(b"cd", op=0), b"ab", b"\x8a\x02hi\x8a\x02cd", False),
    # a new binary frame may interrupt a fragmented one
    (client_frame(b"ab", fin=False) + client_frame(b"cd"), b"abcd", b"", False),
    # what follows a fault is not read
    (client_frame(b"x", op=3) + client_frame(b"data"), b"", close(1003, ONLY), True),
    (client_frame(b"data") + client_frame(b"", op=ws.OP_CLOSE) + client_frame(b"more"), b"data",
     close(1000, b"peer requested close"), True),
]


@pytest.mark.parametrize(("sent", "data", "reply", "closed"), FRAMES)
def test_frames_as_qemu(sent, data, reply, closed):
    got = ws.FrameDecoder().feed(sent)
    assert (got.data, got.reply, got.closed) == (data, reply, closed)


def test_header_waits_for_six_bytes():
    # QEMU looks at a header once the shortest masked one could be there
    d = ws.FrameDecoder()
    assert d.feed(b"\x88\x00") == ws.Decoded()
    assert d.feed(b"abc").closed is False
    assert d.feed(b"d").closed is True


def test_closed_decoder_reads_nothing():
    d = ws.FrameDecoder()
    d.feed(client_frame(b"", op=ws.OP_CLOSE))
    assert d.feed(client_frame(b"data")) == ws.Decoded(closed=True)


def test_long_lengths():
    d = ws.FrameDecoder()
    for n in (125, 126, 65535, 65536, 70000):
        payload = bytes(i % 251 for i in range(n))
        assert d.feed(client_frame(payload, mask=b"\x01\x82\xff\x10")).data == payload


def test_server_frames():
    assert ws.binary_frames(b"") == b""
    assert ws.binary_frames(b"x" * 125) == b"\x82\x7d" + b"x" * 125
    assert ws.binary_frames(b"x" * 126) == b"\x82\x7e\x00\x7e" + b"x" * 126
    big = ws.binary_frames(b"y" * 20000)
    # QEMU's limit: 8192 bytes of payload a frame
    assert big == ((b"\x82\x7e\x20\x00" + b"y" * 8192) * 2 + b"\x82\x7e\x0e\x20" + b"y" * 3616)
    assert ws.encode_frame(ws.OP_BINARY, b"z" * 70000)[:10] == b"\x82\x7f" + struct.pack(">Q", 70000)


def test_http_date():
    assert ws.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


frame_specs = st.lists(st.tuples(
    st.sampled_from([ws.OP_BINARY, ws.OP_PING, ws.OP_PONG, 0]),
    st.booleans(),
    st.binary(max_size=300),
    st.binary(min_size=4, max_size=4)), max_size=8)


def build(specs) -> bytes:
    out = b""
    for op, fin, payload, mask in specs:
        if op & 8:
            payload, fin = payload[:125], True
        out += client_frame(payload, op=op, fin=fin, mask=mask)
    return out


@given(frame_specs, st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
       st.booleans())
def test_any_split_gives_the_same_result(specs, cuts, end_with_close):
    stream = build(specs) + (client_frame(b"", op=ws.OP_CLOSE) if end_with_close else b"")
    whole = ws.FrameDecoder().feed(stream)
    d = ws.FrameDecoder()
    data, reply, closed = b"", b"", False
    last = 0
    for cut in sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]:
        got = d.feed(stream[last:cut])
        data, reply, closed = data + got.data, reply + got.reply, got.closed
        last = cut
    assert (data, reply, closed) == (whole.data, whole.reply, whole.closed)


@given(st.binary(max_size=50), st.binary(min_size=4, max_size=4), st.integers(0, 7))
def test_unmask_is_its_own_inverse(data, mask, offset):
    assert ws.unmask(ws.unmask(data, mask, offset), mask, offset) == data
    assert ws.unmask(data, mask, offset) == bytes(
        c ^ mask[(i + offset) % 4] for i, c in enumerate(data))
