"""NBD wire format: a sans-I/O codec of the server's side of the protocol.

Pure functions over bytes, no sockets, shared by the NBD export
(exports/nbd/) and the NBD client driver (nodes/nbd.py): the constants,
decoders of what a client sends and encoders of what a server answers, and
the client's side (encoding options and requests, decoding option replies,
reply headers and chunk payloads).  Names and numbers follow the NBD protocol
specification (doc/proto.md of the NBD project: "Fixed newstyle
negotiation", "Transmission phase", "Structured reply chunk message types",
and the extended headers extension) and QEMU's extensions in its
docs/interop/nbd.rst (``qemu:allocation-depth``, ``qemu:dirty-bitmap:NAME``).

Decoders take exactly the bytes of one fixed-size header (the caller knows
how many to read) and raise :class:`NbdProtocolError` on a wrong magic;
option payload parsers raise :class:`OptionError` carrying the reply type
the server should answer with.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import attrs

from ..qapi.cstr import c_bytes

# -- magics ------------------------------------------------------------------
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT"
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
# extended headers (the NBD specification's extension: "Request message",
# "Extended reply chunk message")
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# -- handshake flags ------------------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags -----------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12  # extended headers only; not offered

# -- options ------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# QEMU's names (nbd_opt_lookup), used in its error texts; it has none for PEEK_EXPORT
OPT_NAMES = {
    OPT_EXPORT_NAME: "export name",
    OPT_ABORT: "abort",
    OPT_LIST: "list",
    OPT_STARTTLS: "starttls",
    OPT_INFO: "info",
    OPT_GO: "go",
    OPT_STRUCTURED_REPLY: "structured reply",
    OPT_LIST_META_CONTEXT: "list meta context",
    OPT_SET_META_CONTEXT: "set meta context",
    OPT_EXTENDED_HEADERS: "extended headers",
}

# -- option replies -------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9
REP_ERR_EXT_HEADER_REQD = _REP_ERR | 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands ------------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write zeroes",
    CMD_BLOCK_STATUS: "block status",
    CMD_RESIZE: "resize",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5  # extended headers: length is a payload length

# -- structured replies ---------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6  # extended headers only
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# block status flags per context
STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1  # base:allocation
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME

# -- error numbers on the wire ------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# host errno -> the protocol's small set (anything else is EINVAL, as QEMU does)
# QEMU's system_errno_to_nbd_errno: EPERM, EROFS; EIO; ENOMEM; ENOSPC, EFBIG,
# EDQUOT; EOVERFLOW; ENOTSUP; ESHUTDOWN; anything else is EINVAL
_ERRNO_MAP = {1: EPERM, 30: EPERM, 5: EIO, 12: ENOMEM, 28: ENOSPC, 27: ENOSPC, 122: ENOSPC,
              75: EOVERFLOW, 95: ENOTSUP, 108: ESHUTDOWN, 22: EINVAL}


def errno_to_nbd(err: int | None) -> int:
    """Map a host errno (EROFS, EFBIG, ...) to one the protocol defines."""
    return _ERRNO_MAP.get(err or EIO, EINVAL)


MAX_STRING_SIZE = 4096  # names, descriptions, query strings (QEMU's NBD_MAX_STRING_SIZE)
MAX_BUFFER_SIZE = 32 * 1024 * 1024  # the advertised maximum payload
MAX_OPTION_SIZE = 64 * 1024  # anything longer is not a real client

# context ids the server hands out (QEMU's numbering): fixed ones, then bitmaps
META_BASE_ALLOCATION = "base:allocation"
META_ALLOCATION_DEPTH = "qemu:allocation-depth"
META_DIRTY_BITMAP = "qemu:dirty-bitmap:"


class NbdProtocolError(Exception):
    """The peer broke the protocol; the connection must end."""


@attrs.frozen
class OptionError(Exception):
    """An option request to refuse with ``reply`` (an NBD_REP_ERR_*) and ``message``."""

    reply: int
    message: str


# -- handshake ------------------------------------------------------------------------
_GREETING = struct.Struct(">8sQH")


def server_greeting() -> bytes:
    """The server's first 18 bytes (fixed newstyle, no zeroes supported)."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


GREETING_SIZE = _GREETING.size


# -- options: the client's request, the server's reply ------------------------------
_OPT_HDR = struct.Struct(">QII")
OPTION_HEADER_SIZE = _OPT_HDR.size


def parse_option_header(data: bytes) -> tuple[int, int]:
    """(option, payload length) of a client option header."""
    magic, option, length = _OPT_HDR.unpack(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"Bad magic received 0x{magic:x}")
    return option, length


_OPT_REP = struct.Struct(">QIII")
OPTION_REPLY_HEADER_SIZE = _OPT_REP.size


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPT_REP.pack(REPLY_MAGIC_OPT, option, reply, len(data)) + data


def option_error(option: int, err: OptionError) -> bytes:
    return option_reply(option, err.reply, c_bytes(err.message))


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def rep_server(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER payload for NBD_OPT_LIST; QEMU appends the description."""
    n = c_bytes(name)
    return struct.pack(">I", len(n)) + n + c_bytes(description)


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + c_bytes(name)


def info_description(description: str) -> bytes:
    return struct.pack(">H", INFO_DESCRIPTION) + c_bytes(description)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def _inconsistent(opt_name: str) -> OptionError:
    return OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {opt_name}")


def _take_name(data: bytes, pos: int, opt_name: str) -> tuple[str, int]:
    """The export name that starts an option payload, and where it ends."""
    s, pos = _take_string(data, pos, opt_name, name=True)
    assert s is not None  # an over-long name is refused, not skipped
    return s, pos


def _take_string(data: bytes, pos: int, opt_name: str, *, name: bool) -> tuple[str | None, int]:
    """A length-prefixed string at ``pos``; (None, next) for an over-long query."""
    if len(data) - pos < 4:
        raise _inconsistent(opt_name)
    (n,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if n > MAX_STRING_SIZE:
        if name:
            raise OptionError(REP_ERR_INVALID, f"Invalid name length: {n}")
        if n > len(data) - pos:
            raise _inconsistent(opt_name)
        return None, pos + n  # QEMU skips over-long queries silently
    if n > len(data) - pos:
        raise _inconsistent(opt_name)
    # the bytes kept as they came (QEMU compares names with strcmp): a
    # name that is not UTF-8 matches only an export named by those bytes
    return data[pos:pos + n].decode(errors="surrogateescape"), pos + n


def parse_info_request(data: bytes, opt_name: str = "info") -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO payload: (export name, requested info types)."""
    name, pos = _take_name(data, 0, opt_name)
    if len(data) - pos < 2:
        raise _inconsistent(opt_name)
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise _inconsistent(opt_name)
    infos = list(struct.unpack_from(f">{count}H", data, pos))
    return name, infos


def parse_meta_request(data: bytes, opt_name: str = "set meta context") -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT payload: (export name, queries)."""
    name, pos = _take_name(data, 0, opt_name)
    if len(data) - pos < 4:
        raise _inconsistent(opt_name)
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        q, pos = _take_string(data, pos, opt_name, name=False)
        if q is not None:
            queries.append(q)
    if pos != len(data):
        raise _inconsistent(opt_name)
    return name, queries


def meta_context_reply(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + c_bytes(name)


def match_meta_contexts(queries: Sequence[str], available: Sequence[str],
                        listing: bool) -> list[str]:
    """The contexts of ``available`` that ``queries`` select.

    ``base:`` and ``qemu:`` namespaces with an empty leaf (``qemu:``,
    ``qemu:dirty-bitmap:``) select everything below them, but only when
    listing, as the spec allows; an empty query list when listing selects
    everything.  Unknown queries select nothing (they are not errors).
    """
    if listing and not queries:
        return list(available)
    chosen: list[str] = []
    for q in queries:
        for ctx in available:
            hit = ctx == q
            if listing and not hit:
                if q in ("base:", "qemu:"):
                    hit = ctx.startswith(q)
                elif q == META_DIRTY_BITMAP:
                    hit = ctx.startswith(q)
            if hit and ctx not in chosen:
                chosen.append(ctx)
    # keep the server's order, not the client's, as QEMU does
    return [c for c in available if c in chosen]


# -- transmission: requests ----------------------------------------------------------
_REQ = struct.Struct(">IHHQQI")
REQUEST_SIZE = _REQ.size  # 28


class Request(NamedTuple):
    """One transmission request (a tuple: built on the hot path)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int


def parse_request(data: bytes | bytearray | memoryview) -> Request:
    magic, flags, type_, handle, offset, length = _REQ.unpack(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"invalid magic (got 0x{magic:x})")
    return _new_request(Request, (flags, type_, handle, offset, length))


_new_request = tuple.__new__

# with extended headers (NBD_OPT_EXTENDED_HEADERS): a 64-bit length, which is
# a payload length when flags has CMD_FLAG_PAYLOAD_LEN and an effect length
# otherwise
_EXT_REQ = struct.Struct(">IHHQQQ")
EXT_REQUEST_SIZE = _EXT_REQ.size  # 32


def parse_ext_request(data: bytes | bytearray | memoryview) -> Request:
    magic, flags, type_, handle, offset, length = _EXT_REQ.unpack(data)
    if magic != EXTENDED_REQUEST_MAGIC:
        raise NbdProtocolError(f"invalid magic (got 0x{magic:x})")
    return _new_request(Request, (flags, type_, handle, offset, length))


# -- transmission: replies -------------------------------------------------------------
_SIMPLE = struct.Struct(">IIQ")
SIMPLE_REPLY_SIZE = _SIMPLE.size  # 16
_CHUNK = struct.Struct(">IHHQI")
CHUNK_HEADER_SIZE = _CHUNK.size  # 20
_EXT_CHUNK = struct.Struct(">IHHQQQ")
EXT_CHUNK_HEADER_SIZE = _EXT_CHUNK.size  # 32


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header; READ data, when any, follows it."""
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, type: int, length: int, flags: int = 0,
                 ext_offset: int | None = None) -> bytes:
    """A structured reply chunk header, or with ``ext_offset`` (the request's
    offset) an extended one; the chunk functions below take it too."""
    if ext_offset is not None:
        return _EXT_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, type, handle, ext_offset, length)
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, type, handle, length)


def chunk_none(handle: int, ext_offset: int | None = None) -> bytes:
    return chunk_header(handle, REPLY_TYPE_NONE, 0, REPLY_FLAG_DONE, ext_offset)


def chunk_offset_data_header(handle: int, offset: int, length: int, done: bool,
                             ext_offset: int | None = None) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` data bytes follow it."""
    return (chunk_header(handle, REPLY_TYPE_OFFSET_DATA, 8 + length,
                         REPLY_FLAG_DONE if done else 0, ext_offset)
            + struct.pack(">Q", offset))


def chunk_offset_hole(handle: int, offset: int, length: int, done: bool,
                      ext_offset: int | None = None) -> bytes:
    return (chunk_header(handle, REPLY_TYPE_OFFSET_HOLE, 12, REPLY_FLAG_DONE if done else 0,
                         ext_offset)
            + struct.pack(">QI", offset, length))


def chunk_error(handle: int, error: int, message: str = "", done: bool = True,
                ext_offset: int | None = None) -> bytes:
    msg = c_bytes(message)[:MAX_STRING_SIZE]
    return (chunk_header(handle, REPLY_TYPE_ERROR, 6 + len(msg), REPLY_FLAG_DONE if done else 0,
                         ext_offset)
            + struct.pack(">IH", error, len(msg)) + msg)


def chunk_block_status(handle: int, context_id: int, extents: Sequence[tuple[int, int]],
                       done: bool) -> bytes:
    """BLOCK_STATUS chunk: ``extents`` are (length, flags) pairs."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, len(body),
                        REPLY_FLAG_DONE if done else 0) + body


def chunk_block_status_ext(handle: int, ext_offset: int, context_id: int,
                           extents: Sequence[tuple[int, int]], done: bool) -> bytes:
    """BLOCK_STATUS_EXT chunk (extended headers): 64-bit (length, flags) pairs."""
    body = (struct.pack(">II", context_id, len(extents))
            + b"".join(struct.pack(">QQ", n, f) for n, f in extents))
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS_EXT, len(body),
                        REPLY_FLAG_DONE if done else 0, ext_offset) + body



# -- the client's side -------------------------------------------------------------
# What a client sends (the greeting's answer, options, requests) and decoders
# of what a server answers.  Decoders raise NbdProtocolError on anything a
# correct server cannot send, so a client drops the connection.
_OPT_REQ = struct.Struct(">QII")


def parse_server_greeting(data: bytes) -> int:
    """The handshake flags of the server's 18-byte greeting."""
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise NbdProtocolError("Bad initial magic received")
    if opt_magic != IHAVEOPT:
        # QEMU's client speaks only newstyle (oldstyle magic 0x00420281861253)
        raise NbdProtocolError("Bad server magic received")
    return int(flags)


def client_flags(flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPT_REQ.pack(IHAVEOPT, option, len(data)) + data


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """(option, reply type, payload length) of a server option reply."""
    magic, option, reply, length = _OPT_REP.unpack(data)
    if magic != REPLY_MAGIC_OPT:
        raise NbdProtocolError(f"Bad option reply magic 0x{magic:x}")
    return int(option), int(reply), int(length)


def encode_info_request(name: str, infos: Sequence[int] = ()) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO payload."""
    n = name.encode()
    return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def encode_meta_request(name: str, queries: Iterable[str]) -> bytes:
    """LIST/SET_META_CONTEXT payload."""
    n = name.encode()
    qs = [q.encode() for q in queries]
    return (struct.pack(">I", len(n)) + n + struct.pack(">I", len(qs))
            + b"".join(struct.pack(">I", len(q)) + q for q in qs))


def parse_info_reply(payload: bytes) -> tuple[int, bytes]:
    """(info type, rest) of an NBD_REP_INFO payload."""
    if len(payload) < 2:
        raise NbdProtocolError(f"Invalid length {len(payload)} for info reply")
    (info,) = struct.unpack_from(">H", payload)
    return int(info), payload[2:]


def parse_info_export(rest: bytes) -> tuple[int, int]:
    """(size, transmission flags) of NBD_INFO_EXPORT (after its type)."""
    if len(rest) != 10:
        raise NbdProtocolError(f"Invalid length {len(rest) + 2} for info export")
    size, flags = struct.unpack(">QH", rest)
    return int(size), int(flags)


def parse_info_block_size(rest: bytes) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) of NBD_INFO_BLOCK_SIZE (after its type)."""
    if len(rest) != 12:
        raise NbdProtocolError(f"Invalid length {len(rest) + 2} for info block size")
    lo, pref, hi = struct.unpack(">III", rest)
    return int(lo), int(pref), int(hi)


def parse_meta_context_reply(payload: bytes) -> tuple[int, str]:
    """(context id, name) of an NBD_REP_META_CONTEXT payload."""
    if len(payload) < 4 or len(payload) > 4 + MAX_STRING_SIZE:
        raise NbdProtocolError(f"Invalid length {len(payload)} for meta context reply")
    (ctx,) = struct.unpack_from(">I", payload)
    return int(ctx), payload[4:].decode(errors="replace")


def encode_request(type: int, handle: int, offset: int = 0, length: int = 0,
                   flags: int = 0) -> bytes:
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


REPLY_MAGIC_SIZE = 4


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
    """(error, message) of an ERROR / ERROR_OFFSET chunk payload."""
    if len(payload) < 6:
        raise NbdProtocolError("Protocol error: invalid payload for NBD_REPLY_TYPE_ERROR")
    error, n = struct.unpack_from(">IH", payload)
    if 6 + n > len(payload):
        raise NbdProtocolError("Protocol error: server sent too long error message")
    return int(error), payload[6:6 + n].decode(errors="replace")


def parse_block_status_chunk(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) of a BLOCK_STATUS payload."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise NbdProtocolError("Protocol error: invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
    (ctx,) = struct.unpack_from(">I", payload)
    ext = [struct.unpack_from(">II", payload, p) for p in range(4, len(payload), 8)]
    return int(ctx), [(int(n), int(f)) for n, f in ext]


def parse_block_status_ext_chunk(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) of a BLOCK_STATUS_EXT payload."""
    if len(payload) < 8:
        raise NbdProtocolError(f"bad BLOCK_STATUS_EXT payload length {len(payload)}")
    ctx, count = struct.unpack_from(">II", payload)
    if len(payload) != 8 + 16 * count or not count:
        raise NbdProtocolError(f"bad BLOCK_STATUS_EXT payload length {len(payload)}")
    ext = [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(count)]
    return int(ctx), [(int(n), int(f)) for n, f in ext]


# -- the client's hot path: reply headers decoded in place ------------------------------
# The NBD client driver keeps received bytes in one buffer and decodes each
# header where it lies (no bytes object per header).  With extended headers
# negotiated every reply is an extended chunk; without, an extended one is
# as wrong as a simple reply would be with them (the specification's
# "Extended reply chunk message": "all server replies MUST use an extended
# reply").
_MAGIC = struct.Struct(">I")


def reply_header_size_at(data: bytes | bytearray | memoryview, pos: int,
                         extended: bool) -> int:
    """The length of the reply header that starts at ``data[pos]`` (its
    first four bytes must be there), for a client that did (``extended``)
    or did not negotiate extended headers."""
    (magic,) = _MAGIC.unpack_from(data, pos)
    if extended:
        if magic == EXTENDED_REPLY_MAGIC:
            return EXT_CHUNK_HEADER_SIZE
        if magic in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
            raise NbdProtocolError("Protocol error: compact reply with extended headers "
                                   f"negotiated (magic 0x{magic:x})")
    elif magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    elif magic == STRUCTURED_REPLY_MAGIC:
        return CHUNK_HEADER_SIZE
    elif magic == EXTENDED_REPLY_MAGIC:
        raise NbdProtocolError("Protocol error: extended reply without extended headers")
    raise NbdProtocolError(f"invalid reply magic 0x{magic:x}")


def parse_reply_header_at(data: bytes | bytearray | memoryview, pos: int, size: int) -> Reply:
    """The reply header of ``size`` bytes (from :func:`reply_header_size_at`)
    at ``data[pos]``."""
    if size == EXT_CHUNK_HEADER_SIZE:
        _, flags, type_, handle, offset, length = _EXT_CHUNK.unpack_from(data, pos)
        return Reply(handle, 0, type_, flags, length, offset)
    if size == CHUNK_HEADER_SIZE:
        _, flags, type_, handle, length = _CHUNK.unpack_from(data, pos)
        return Reply(handle, 0, type_, flags, length)
    _, error, handle = _SIMPLE.unpack_from(data, pos)
    return Reply(handle, error)
