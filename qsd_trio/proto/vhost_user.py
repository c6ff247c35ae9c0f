"""vhost-user wire format: a sans-I/O codec of the back-end's side.

Pure functions over bytes, no sockets, for the vhost-user-blk export: the
constants, a decoder of what a front-end (QEMU) sends and encoders of what
a back-end answers.  Names and numbers follow QEMU's
docs/interop/vhost-user.rst ("Message Specification", "Front-end message
types", "Back-end message types", "Protocol features").

A message is a 12-byte header (request, flags, payload size; native byte
order, little-endian on every host QEMU runs vhost-user on) followed by the
payload.  File descriptors travel beside the message as SCM_RIGHTS
ancillary data; receiving them is the transport's job.  The codec says how
many a message must carry and checks the count it is given:

* :func:`decode_header` checks the header alone (version, payload size), so
  a transport knows how many payload bytes to read;
* :func:`decode_message` decodes the payload of one request and takes the
  descriptors that arrived with it.  It returns a :class:`Message` whose
  ``fds`` the handler now owns and whose ``unused_fds`` the transport must
  close (descriptors a message does not use are closed, not kept, as
  libvhost-user does).

Malformed input raises :class:`MessageError`, the only exception this
module raises on bytes from a peer; the transport then closes every
descriptor of the message and decides, as libvhost-user's ``vu_panic``
does, that the connection is broken.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

import attrs

# -- header (vhost-user.rst "Header") ------------------------------------------
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# The largest payload a front-end sends: a GET_CONFIG/SET_CONFIG of the
# whole 256-byte config space (12-byte header + 256) and the 8-region memory
# table (8 + 8 * 32 = 264) are the largest; libvhost-user rejects a message
# longer than its payload union.
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD_SIZE = 12 + MAX_CONFIG_SIZE
# VHOST_MEMORY_BASELINE_NREGIONS: the regions SET_MEM_TABLE may carry, and
# so the most descriptors one message carries.
MAX_MEM_REGIONS = 8
MAX_FDS = MAX_MEM_REGIONS

# -- feature bits (virtio and vhost) ------------------------------------------
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # SET_SLAVE_REQ_FD in QEMU 7.2
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end message types, sent on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Requests answered with a reply of their own; any other request is
# answered only when it sets NEED_REPLY and REPLY_ACK was negotiated.
REPLYING_REQUESTS = frozenset({
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
})

# SET_VRING_KICK/CALL/ERR: bits 0-7 of the u64 are the ring index, bit 8 says
# no descriptor travels with the message (the ring is polled instead).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# SET_CONFIG flags (VHOST_SET_CONFIG_TYPE_*)
CONFIG_TYPE_FRONTEND = 0
CONFIG_TYPE_MIGRATION = 1


class MessageError(Exception):
    """A message that breaks the protocol: bad header, wrong payload size
    for its type, missing descriptors, an unknown request.

    ``request`` is the request number when the header could be read
    (``None`` otherwise); the text says what was wrong.
    """

    def __init__(self, text: str, request: int | None = None):
        super().__init__(text)
        self.request = request


# -- payloads (vhost-user.rst "Payload") ----------------------------------------
@attrs.frozen
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@attrs.frozen
class VringState:
    """A vring state description: ``index`` and ``num`` (size, base,
    enable)."""

    index: int
    num: int


@attrs.frozen
class VringAddr:
    """A vring address description.  The ring addresses are front-end
    virtual (user) addresses; ``log`` is a guest-physical address."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@attrs.frozen
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: a ring index and whether a
    descriptor came with it (``nofd`` set: none, poll instead)."""

    index: int
    nofd: bool


@attrs.frozen
class MemRegion:
    """A memory region description: where the region is in guest-physical
    space, in the front-end's address space (``user_addr``, the addresses
    rings are given in), and where it starts in its file descriptor."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@attrs.frozen
class MemTable:
    regions: tuple[MemRegion, ...]


@attrs.frozen
class LogArea:
    """SET_LOG_BASE with LOG_SHMFD: the dirty log's size and offset in its fd."""

    size: int
    offset: int


@attrs.frozen
class ConfigSpace:
    """A virtio device config space access: ``offset``, ``size``, ``flags``
    and, for SET_CONFIG, the bytes written (GET_CONFIG carries ``size``
    placeholder bytes)."""

    offset: int
    size: int
    flags: int
    data: bytes


@attrs.frozen
class Inflight:
    """An inflight description (GET_INFLIGHT_FD / SET_INFLIGHT_FD)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


Payload = (int | VringState | VringAddr | VringFile | MemTable | MemRegion
           | LogArea | ConfigSpace | Inflight | bytes | None)


@attrs.frozen
class Message:
    """One decoded front-end message.

    ``payload`` is None for the messages without one, an int for a u64,
    else one of the payload classes above; messages the back-end does not
    decode keep their raw bytes.  ``fds`` are the descriptors the message
    uses, in order (the handler owns them and must close them);
    ``unused_fds`` are the ones that came with it but have no use (the
    transport closes them).
    """

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()
    unused_fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_HDR = struct.Struct("<II")
_LOG = struct.Struct("<QQ")
_CONFIG_HDR = struct.Struct("<III")
_INFLIGHT = struct.Struct("<QQHH")
# the C struct (u64, u64, u16, u16) is padded to 24 bytes; QEMU sends
# sizeof() of it, other front-ends the 20 bytes the specification lists
_INFLIGHT_SIZES = (_INFLIGHT.size, 24)

_NO_PAYLOAD = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_OWNER,
    Request.RESET_OWNER, Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS,
    Request.SET_BACKEND_REQ_FD, Request.GET_STATUS, Request.SET_LOG_FD,
    Request.RESET_DEVICE, Request.POSTCOPY_ADVISE, Request.POSTCOPY_LISTEN,
    Request.POSTCOPY_END, Request.GPU_SET_SOCKET,
})
_U64_PAYLOAD = frozenset({
    Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS,
    Request.SEND_RARP, Request.NET_SET_MTU,
})
_STATE_PAYLOAD = frozenset({
    Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE, Request.SET_VRING_ENDIAN, Request.VRING_KICK,
})
_VRING_FILE = frozenset({
    Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR,
})
# messages that carry exactly one descriptor, whatever their payload
_ONE_FD = frozenset({
    Request.SET_LOG_FD, Request.SET_BACKEND_REQ_FD, Request.SET_INFLIGHT_FD,
    Request.ADD_MEM_REG, Request.GPU_SET_SOCKET,
})


def request_name(request: int) -> str:
    try:
        return "VHOST_USER_" + Request(request).name
    except ValueError:
        return f"request {request}"


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode and check a message header (exactly :data:`HEADER_SIZE` bytes).

    Raises:
        MessageError: short header, a version other than 1, the reply flag
            set on a request, or a payload longer than any message's.
    """
    if len(data) != HEADER_SIZE:
        raise MessageError(f"short message header: {len(data)} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise MessageError(f"unsupported protocol version {flags & VERSION_MASK}", request)
    if flags & FLAG_REPLY:
        raise MessageError(f"{request_name(request)}: reply flag set on a request", request)
    if size > MAX_PAYLOAD_SIZE:
        raise MessageError(
            f"too big message {request_name(request)}: size {size}, "
            f"at most {MAX_PAYLOAD_SIZE}", request)
    return Header(request, flags, size)


def _expect_size(header: Header, payload: bytes | bytearray | memoryview,
                 *sizes: int) -> None:
    if len(payload) != header.size:
        raise MessageError(
            f"{request_name(header.request)}: payload of {len(payload)} bytes, "
            f"header says {header.size}", header.request)
    if header.size not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise MessageError(
            f"{request_name(header.request)}: payload size {header.size}, "
            f"expected {want}", header.request)


def _decode_region(payload: bytes | bytearray | memoryview, offset: int,
                   request: int) -> MemRegion:
    guest, size, user, mmap_offset = _REGION.unpack_from(payload, offset)
    if size == 0:
        raise MessageError(f"{request_name(request)}: memory region of size 0", request)
    if guest + size > 1 << 64 or user + size > 1 << 64 or mmap_offset + size > 1 << 64:
        raise MessageError(f"{request_name(request)}: memory region wraps around", request)
    return MemRegion(guest, size, user, mmap_offset)


def _take_fds(header: Header, fds: Sequence[int], want: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(fds) < want:
        raise MessageError(
            f"{request_name(header.request)}: {len(fds)} file descriptors, "
            f"expected {want}", header.request)
    return tuple(fds[:want]), tuple(fds[want:])


def decode_message(header: Header, payload: bytes | bytearray | memoryview,
                   fds: Sequence[int] = ()) -> Message:
    """Decode the payload of the request ``header`` introduced.

    ``fds`` are the descriptors that arrived with the message; they are
    neither closed nor used here.  On success they are split into
    ``Message.fds`` and ``Message.unused_fds``; on :class:`MessageError`
    the caller closes them all.

    Raises:
        MessageError: an unknown request, a payload size wrong for the
            request, a field out of range, too few descriptors, or (for
            SET_MEM_TABLE) a descriptor count other than the region count.
    """
    req = header.request
    try:
        request = Request(req)
    except ValueError:
        raise MessageError(f"unknown request {req}", req) from None
    if len(fds) > MAX_FDS:
        raise MessageError(f"{request_name(req)}: {len(fds)} file descriptors, at most {MAX_FDS}", req)
    result: Payload
    want_fds = 0
    if request in _NO_PAYLOAD:
        _expect_size(header, payload, 0)
        result = None
    elif request in _U64_PAYLOAD:
        _expect_size(header, payload, _U64.size)
        (result,) = _U64.unpack(payload)
    elif request in _STATE_PAYLOAD:
        _expect_size(header, payload, _STATE.size)
        result = VringState(*_STATE.unpack(payload))
    elif request in _VRING_FILE:
        _expect_size(header, payload, _U64.size)
        (value,) = _U64.unpack(payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise MessageError(f"{request_name(req)}: reserved bits set in {value:#x}", req)
        result = VringFile(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))
        want_fds = 0 if result.nofd else 1
    elif request is Request.SET_VRING_ADDR:
        _expect_size(header, payload, _ADDR.size)
        result = VringAddr(*_ADDR.unpack(payload))
    elif request is Request.SET_MEM_TABLE:
        if len(payload) != header.size or header.size < _MEM_HDR.size:
            raise MessageError(f"{request_name(req)}: payload of {header.size} bytes", req)
        nregions, _pad = _MEM_HDR.unpack_from(payload, 0)
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise MessageError(f"{request_name(req)}: {nregions} regions", req)
        exact = _MEM_HDR.size + nregions * _REGION.size
        _expect_size(header, payload, exact, _MEM_HDR.size + MAX_MEM_REGIONS * _REGION.size)
        result = MemTable(tuple(
            _decode_region(payload, _MEM_HDR.size + i * _REGION.size, req)
            for i in range(nregions)))
        if len(fds) != nregions:
            raise MessageError(
                f"{request_name(req)}: {len(fds)} file descriptors for {nregions} regions", req)
        want_fds = nregions
    elif request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        _expect_size(header, payload, 8 + _REGION.size)
        result = _decode_region(payload, 8, req)
        # REM_MEM_REG: a descriptor some front-ends send is closed unused
        want_fds = 1 if request is Request.ADD_MEM_REG else 0
    elif request is Request.SET_LOG_BASE:
        # with LOG_SHMFD: size and offset of the log in the descriptor
        _expect_size(header, payload, _LOG.size)
        result = LogArea(*_LOG.unpack(payload))
        want_fds = 1
    elif request in (Request.GET_CONFIG, Request.SET_CONFIG):
        if len(payload) != header.size or header.size < _CONFIG_HDR.size:
            raise MessageError(f"{request_name(req)}: payload of {header.size} bytes", req)
        offset, size, flags = _CONFIG_HDR.unpack_from(payload, 0)
        if size > MAX_CONFIG_SIZE:
            raise MessageError(f"{request_name(req)}: config size {size}", req)
        _expect_size(header, payload, _CONFIG_HDR.size + size)
        result = ConfigSpace(offset, size, flags, bytes(payload[_CONFIG_HDR.size:]))
    elif request in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        _expect_size(header, payload, *_INFLIGHT_SIZES)
        result = Inflight(*_INFLIGHT.unpack_from(payload, 0))
    else:
        # IOTLB, crypto sessions: kept as bytes; the back-end refuses them
        if len(payload) != header.size:
            raise MessageError(f"{request_name(req)}: payload of {len(payload)} bytes, "
                               f"header says {header.size}", req)
        result = bytes(payload)
    if request in _ONE_FD:
        want_fds = 1
    used, unused = _take_fds(header, fds, want_fds)
    return Message(req, header.flags, result, used, unused)


# -- replies --------------------------------------------------------------------
def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A reply to ``request``: version 1 with the reply flag, then ``payload``."""
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def reply_u64(request: int, value: int) -> bytes:
    """A u64 reply (GET_FEATURES, GET_QUEUE_NUM, and REPLY_ACK's status:
    0 for success, non-zero for failure)."""
    return encode_reply(request, _U64.pack(value))


def reply_vring_state(request: int, index: int, num: int) -> bytes:
    return encode_reply(request, _STATE.pack(index, num))


def reply_config(space: ConfigSpace, data: bytes) -> bytes:
    """GET_CONFIG's answer: the request's offset, size and flags with ``data``
    (``size`` bytes).  An empty ``data`` is the specification's error
    answer (a zero-length payload)."""
    if not data:
        return encode_reply(Request.GET_CONFIG)
    return encode_reply(Request.GET_CONFIG,
                        _CONFIG_HDR.pack(space.offset, len(data), space.flags) + data)


def reply_inflight(inflight: Inflight) -> bytes:
    """GET_INFLIGHT_FD's answer; the shared memory descriptor travels with it."""
    return encode_reply(Request.GET_INFLIGHT_FD,
                        _INFLIGHT.pack(inflight.mmap_size, inflight.mmap_offset,
                                       inflight.num_queues, inflight.queue_size)
                        + b"\0" * (24 - _INFLIGHT.size))


def encode_backend_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A message on the back-end channel (``CONFIG_CHANGE_MSG``, ...)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def decode_backend_reply(header: bytes | bytearray | memoryview,
                         payload: bytes | bytearray | memoryview, request: int) -> int:
    """The front-end's u64 answer to a back-end request sent with
    NEED_REPLY: 0 on success.

    Raises:
        MessageError: a header that is not a version-1 reply to ``request``,
            or a payload that is not a u64.
    """
    if len(header) != HEADER_SIZE:
        raise MessageError(f"short reply header: {len(header)} bytes", request)
    req, flags, size = HEADER.unpack(header)
    if req != request or flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
        raise MessageError(f"unexpected reply {req} flags {flags:#x} to {request}", request)
    if size != _U64.size or len(payload) != size:
        raise MessageError(f"reply to {request} with a {size}-byte payload", request)
    return int(_U64.unpack(payload)[0])
