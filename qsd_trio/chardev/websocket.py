"""The server side of WebSocket (RFC 6455) for a socket chardev
(``websocket=on``), sans-I/O, as QEMU 7.2's io/channel-websock.c speaks it.

:func:`server_handshake` answers the client's HTTP upgrade request;
:class:`FrameDecoder` turns the client's frames into data for the chardev
(and the frames to send back: pongs, a close); :func:`binary_frames` frames
what the chardev writes.  Nothing here reads a clock or a socket: the caller
gives the ``Date`` header's text and moves the bytes.

QEMU's choices that a client sees, kept here:

- the request is at most 4096 bytes up to its blank line (a NUL byte ends
  the search, as the C string it is): else ``403 Request Entity Too
  Large``; every other fault gets the same ``400 Bad Request``, whose text
  lacks the blank line that should end it; the 101 reply names the
  ``binary`` subprotocol whatever the client asked (it must ask for one
  whose name contains "binary");
- a frame's header is looked at once 6 bytes are there (the shortest
  masked header), so a 2-byte close frame waits for 4 more bytes;
- a close frame, masked or not, is answered with status 1000 "peer
  requested close", and nothing more is read; other faults are answered
  with a close frame of QEMU's status and reason (1002, 1003, 1008);
  :class:`Decoded` still gives the data decoded before the close (QEMU
  drops it: that is its channel's choice, made in chardev/layers.py);
- a continuation frame takes the opcode of the last frame that had one,
  even when that was a control frame between fragments;
- RSV bits are ignored, pongs are ignored, a new binary frame may start in
  the middle of a fragmented one;
- what the server writes goes out in unmasked binary frames of at most
  8192 bytes of payload.

Where QEMU 7.2 answers a ping with the ping's payload *and whatever else it
had buffered after it* (the next frames, still masked), the pong here
carries the ping's payload only, as RFC 6455 section 5.5.3 requires.
"""

from __future__ import annotations

import base64
import hashlib

import attrs

HANDSHAKE_LIMIT = 4096   # QEMU reads at most this much before the blank line
MAX_HEADERS = 32
FRAME_PAYLOAD = 8192     # QEMU's QIO_CHANNEL_WEBSOCK_MAX_BUFFER
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
CONTROL = 0x8

STATUS_NORMAL, STATUS_PROTOCOL_ERROR, STATUS_INVALID_DATA = 1000, 1002, 1003
STATUS_POLICY_VIOLATION = 1008

_COMMON = "Server: QEMU VNC\r\nDate: {date}\r\n"
RESPONSE_OK = ("HTTP/1.1 101 Switching Protocols\r\n" + _COMMON
               + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: binary\r\n\r\n")
# sic: no blank line at the end, as QEMU 7.2 sends it
RESPONSE_BAD_REQUEST = ("HTTP/1.1 400 Bad Request\r\n" + _COMMON
                        + "Connection: close\r\nSec-WebSocket-Version: 13\r\n")
RESPONSE_TOO_LARGE = ("HTTP/1.1 403 Request Entity Too Large\r\n" + _COMMON
                      + "Connection: close\r\n\r\n")


def http_date(seconds: float) -> str:
    """The ``Date`` header's text for a Unix time, as QEMU formats it."""
    import email.utils

    return email.utils.formatdate(seconds, usegmt=True)


@attrs.frozen
class Accepted:
    """The upgrade is done: send ``response``; ``rest`` (bytes the client
    sent after its request) is the start of its first frame."""

    response: bytes
    rest: bytes


@attrs.frozen
class Rejected:
    """The request is refused: send ``response`` (empty: nothing) and
    close.  ``reason`` is QEMU's error text, which it keeps to itself."""

    response: bytes
    reason: str


class BadRequest(Exception):
    """What is wrong with a request (QEMU's error text)."""


def accept_key(key: bytes) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


def server_handshake(received: bytes, date: str, *, eof: bool = False) -> Accepted | Rejected | None:
    """The reply to what the client has sent so far, or None while its
    request may still be coming; ``eof``: the client sent no more."""
    head = received[:HANDSHAKE_LIMIT]
    nul = head.find(b"\0")
    end = (head if nul < 0 else head[:nul]).find(b"\r\n\r\n")
    if end < 0:
        if len(received) >= HANDSHAKE_LIMIT:
            return Rejected(RESPONSE_TOO_LARGE.format(date=date).encode(),
                            f"End of headers not found in first {HANDSHAKE_LIMIT} bytes")
        if eof:
            return Rejected(b"", "End of headers not found before connection closed")
        return None
    try:
        key = _check_request(received[:end])
    except BadRequest as e:
        return Rejected(RESPONSE_BAD_REQUEST.format(date=date).encode(), str(e))
    return Accepted(RESPONSE_OK.format(date=date, accept=accept_key(key)).encode(),
                    received[end + 4:])


def _headers(text: bytes) -> list[tuple[bytes, bytes]]:
    """qio_channel_websock_extract_headers: the request line checked, then
    (lower-case name, value after the colon's spaces) for each header."""
    nl = text.find(b"\r\n")
    if nl < 0:
        raise BadRequest("Missing HTTP header delimiter")
    method, sp, rest = text[:nl].partition(b" ")
    if not sp:
        raise BadRequest("Missing HTTP path delimiter")
    if method != b"GET":
        raise BadRequest(f"Unsupported HTTP method {method.decode('latin-1')}")
    path, sp, version = rest.partition(b" ")
    if not sp:
        raise BadRequest("Missing HTTP version delimiter")
    if path != b"/":
        raise BadRequest(f"Unexpected HTTP path {path.decode('latin-1')}")
    if version != b"HTTP/1.1":
        raise BadRequest(f"Unsupported HTTP version {version.decode('latin-1')}")
    headers: list[tuple[bytes, bytes]] = []
    for line in text[nl + 2:].split(b"\r\n"):
        if len(headers) >= MAX_HEADERS:
            raise BadRequest("Too many HTTP headers")
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest("Expected header delimiter")
        headers.append((name.lower(), value.lstrip(b" ")))
    return headers


def _check_request(text: bytes) -> bytes:
    """qio_channel_websock_handshake_process: the client's key, or BadRequest."""
    headers = _headers(text)

    def find(name: bytes, what: str) -> bytes:
        for n, v in headers:
            if n == name:
                return v
        raise BadRequest(f"Missing websocket {what} header data")

    protocols = find(b"sec-websocket-protocol", "protocol")
    version = find(b"sec-websocket-version", "version")
    key = find(b"sec-websocket-key", "key")
    find(b"host", "host")
    connection = find(b"connection", "connection")
    upgrade = find(b"upgrade", "upgrade")
    if b"binary" not in protocols:
        raise BadRequest(f"No 'binary' protocol is supported by client '{protocols.decode('latin-1')}'")
    if version != b"13":
        raise BadRequest(f"Version '13' is not supported by client '{version.decode('latin-1')}'")
    if len(key) != 24:
        raise BadRequest(f"Key length '{len(key)}' was not as expected '24'")
    if not any(t.strip().lower() == b"upgrade" for t in connection.split(b",")):
        raise BadRequest(f"No connection upgrade requested '{connection.decode('latin-1')}'")
    if upgrade.lower() != b"websocket":
        raise BadRequest(f"Incorrect upgrade method '{upgrade.decode('latin-1')}'")
    return key


# -- frames ----------------------------------------------------------------------

def encode_frame(opcode: int, payload: bytes | bytearray | memoryview, *, fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """One frame: final and unmasked as a server sends them, or with
    ``mask`` (4 bytes) as a client must."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    masked = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes([b0, masked | n])
    elif n < 1 << 16:
        header = bytes([b0, masked | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([b0, masked | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return header + bytes(payload)
    return header + mask + unmask(payload, mask, 0)


def binary_frames(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as binary frames of at most FRAME_PAYLOAD bytes each."""
    view = memoryview(data)
    return b"".join(encode_frame(OP_BINARY, view[i:i + FRAME_PAYLOAD])
                    for i in range(0, len(view), FRAME_PAYLOAD))


def close_frame(status: int, reason: str) -> bytes:
    return encode_frame(OP_CLOSE, status.to_bytes(2, "big") + reason.encode())


def unmask(data: bytes | bytearray | memoryview, mask: bytes, offset: int) -> bytes:
    """``data`` XOR the 4-byte ``mask``, starting ``offset`` bytes into the payload."""
    n = len(data)
    if not n:
        return b""
    k = offset % 4
    key = (mask[k:] + mask[:k]) * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(n, "little")


@attrs.frozen
class Decoded:
    """What some input came to: ``data`` for the chardev's reader,
    ``reply`` to send to the client (pongs, a close frame), and ``closed``
    once the connection is over (the reply sent, nothing more is read);
    ``error`` says why QEMU would close it (its error text), if it was a fault."""

    data: bytes = b""
    reply: bytes = b""
    closed: bool = False
    error: str | None = None


class FrameDecoder:
    """The client's frames (qio_channel_websock_decode_header/_payload),
    fed in pieces of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._opcode = 0        # of the last frame that had one
        self._frame_op = 0      # of the frame whose payload is coming
        self._remain = 0
        self._in_frame = False
        self._mask = b""
        self._offset = 0
        self.closed = False

    @property
    def buffered(self) -> int:
        """Bytes received and not decoded yet (a frame's incomplete part)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Decoded:
        if self.closed:
            return Decoded(closed=True)
        self._buf += data
        out = bytearray()
        reply = bytearray()
        while True:
            if not self._in_frame:
                fault = self._header()
                if fault is not None:
                    status, reason, error = fault
                    self.closed = True
                    self._buf.clear()
                    return Decoded(bytes(out), bytes(reply) + close_frame(status, reason),
                                   True, error)
                if not self._in_frame:
                    break  # the header is not all there
            if not self._payload(out, reply):
                break
        return Decoded(bytes(out), bytes(reply))

    def _header(self) -> tuple[int, str, str | None] | None:
        """Start the next frame if its header is there; a fault is (status,
        reason, QEMU's error text or None for a close)."""
        buf = self._buf
        if len(buf) < 6:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        if opcode:
            self._opcode = opcode
        else:
            opcode = self._opcode
        if opcode == OP_CLOSE:
            return STATUS_NORMAL, "peer requested close", None
        if not fin:
            if opcode != OP_BINARY:
                return (STATUS_POLICY_VIOLATION, "only binary frames may be fragmented",
                        "only binary websocket frames may be fragmented")
        elif opcode not in (OP_BINARY, OP_PING, OP_PONG):
            return (STATUS_INVALID_DATA, "only binary, close, ping, and pong frames are supported",
                    f"unsupported opcode: {opcode:#04x}; only binary, close, ping, and pong "
                    "websocket frames are supported")
        if not masked:
            return (STATUS_PROTOCOL_ERROR, "client frames must be masked",
                    "client websocket frames must be masked")
        if n < 126:
            size, length = 6, n
        elif opcode & CONTROL:
            return (STATUS_PROTOCOL_ERROR, "control frame is too large",
                    "websocket control frame is too large")
        elif n == 126:
            if len(buf) < 8:
                return None
            size, length = 8, int.from_bytes(buf[2:4], "big")
        else:
            if len(buf) < 14:
                return None
            size, length = 14, int.from_bytes(buf[2:10], "big")
        self._mask = bytes(buf[size - 4:size])
        del buf[:size]
        self._frame_op, self._remain, self._offset, self._in_frame = opcode, length, 0, True
        return None

    def _payload(self, out: bytearray, reply: bytearray) -> bool:
        """Take what there is of the current frame's payload; False when
        more input is needed."""
        buf = self._buf
        if self._frame_op & CONTROL:
            # control frames are taken whole (a ping's payload is echoed)
            if len(buf) < self._remain:
                return False
            payload = unmask(buf[:self._remain], self._mask, 0)
            del buf[:self._remain]
            if self._frame_op == OP_PING:
                reply += encode_frame(OP_PONG, payload)
            self._remain, self._in_frame = 0, False
            return True
        take = min(len(buf), self._remain)
        if take:
            out += unmask(buf[:take], self._mask, self._offset)
            del buf[:take]
            self._offset += take
            self._remain -= take
        if self._remain:
            return False
        self._in_frame = False
        return True
