"""The client's side of the NBD wire format, for tests that speak raw NBD.

Encoders of what a client sends (options, requests) and decoders of what a
server answers (option replies, reply headers, chunks), over bytes, next to
the server's side in qsd_trio/proto/nbd.py whose constants they use.  They
live with the tests because only tests are NBD clients so far; an NBD
client driver would take them back into the codec.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import attrs

from qsd_trio.proto.nbd import (
    CHUNK_HEADER_SIZE,
    EXT_CHUNK_HEADER_SIZE,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_FLAG_DONE,
    REPLY_MAGIC_OPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_MAGIC,
    NbdProtocolError,
)

_GREETING = struct.Struct(">8sQH")
_OPT_HDR = struct.Struct(">QII")
_OPT_REP = struct.Struct(">QIII")
_REQ = struct.Struct(">IHHQQI")
_EXT_REQ = struct.Struct(">IHHQQQ")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_EXT_CHUNK = struct.Struct(">IHHQQQ")

REPLY_MAGIC_SIZE = 4


def parse_server_greeting(data: bytes) -> int:
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdProtocolError("not a newstyle NBD server")
    return flags


def client_flags(flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPT_HDR.pack(IHAVEOPT, option, len(data)) + data


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """(option, reply type, payload length) of a server option reply."""
    magic, option, reply, length = _OPT_REP.unpack(data)
    if magic != REPLY_MAGIC_OPT:
        raise NbdProtocolError(f"Bad option reply magic 0x{magic:x}")
    return option, reply, length


def encode_info_request(name: str, infos: Sequence[int] = ()) -> bytes:
    n = name.encode()
    return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def encode_meta_request(name: str, queries: Iterable[str]) -> bytes:
    n = name.encode()
    qs = [q.encode() for q in queries]
    return (struct.pack(">I", len(n)) + n + struct.pack(">I", len(qs))
            + b"".join(struct.pack(">I", len(q)) + q for q in qs))


def encode_request(type: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return _REQ.pack(REQUEST_MAGIC, flags, type, handle, offset, length)


def encode_ext_request(type: int, handle: int, offset: int = 0, length: int = 0,
                       flags: int = 0) -> bytes:
    return _EXT_REQ.pack(EXTENDED_REQUEST_MAGIC, flags, type, handle, offset, length)


@attrs.frozen
class Reply:
    """A decoded reply header: simple (``type`` None) or a structured chunk."""

    handle: int
    error: int = 0
    type: int | None = None
    flags: int = 0
    length: int = 0
    offset: int | None = None  # extended replies echo the request's offset

    @property
    def done(self) -> bool:
        return self.type is None or bool(self.flags & REPLY_FLAG_DONE)


def reply_header_size(magic_bytes: bytes) -> int:
    """How long the header is, given its first four bytes."""
    (magic,) = struct.unpack(">I", magic_bytes)
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if magic == STRUCTURED_REPLY_MAGIC:
        return CHUNK_HEADER_SIZE
    if magic == EXTENDED_REPLY_MAGIC:
        return EXT_CHUNK_HEADER_SIZE
    raise NbdProtocolError(f"invalid reply magic 0x{magic:x}")


def parse_reply_header(data: bytes) -> Reply:
    (magic,) = struct.unpack_from(">I", data)
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, handle = _SIMPLE.unpack(data)
        return Reply(handle, error)
    if magic == STRUCTURED_REPLY_MAGIC:
        _, flags, type_, handle, length = _CHUNK.unpack(data)
        return Reply(handle, 0, type_, flags, length)
    if magic == EXTENDED_REPLY_MAGIC:
        _, flags, type_, handle, offset, length = _EXT_CHUNK.unpack(data)
        return Reply(handle, 0, type_, flags, length, offset)
    raise NbdProtocolError(f"invalid reply magic 0x{magic:x}")


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    error, n = struct.unpack_from(">IH", payload)
    return error, payload[6:6 + n].decode(errors="replace")


def parse_block_status_chunk(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    (ctx,) = struct.unpack_from(">I", payload)
    ext = [struct.unpack_from(">II", payload, p) for p in range(4, len(payload), 8)]
    return ctx, ext


def parse_block_status_ext_chunk(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) of a BLOCK_STATUS_EXT payload."""
    ctx, count = struct.unpack_from(">II", payload)
    if len(payload) != 8 + 16 * count or not count:
        raise NbdProtocolError(f"bad BLOCK_STATUS_EXT payload length {len(payload)}")
    return ctx, [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(count)]
