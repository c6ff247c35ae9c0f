"""The vhost-user codec over bytes: layouts from vhost-user.rst, written
here with struct as a front-end would, and fuzzed: malformed input is a
MessageError and nothing else."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd_trio.proto import vhost_user as V


def msg(request, payload=b"", flags=V.VERSION):
    return struct.pack("<III", request, flags, len(payload)) + payload


def decode(raw, fds=()):
    header = V.decode_header(raw[:12])
    return V.decode_message(header, raw[12:], fds)


def test_header_version_reply_and_size_checks():
    h = V.decode_header(msg(1)[:12])
    assert (h.request, h.size, h.need_reply) == (1, 0, False)
    assert V.decode_header(struct.pack("<III", 3, 1 | 8, 0)).need_reply
    with pytest.raises(V.MessageError, match="version 2"):
        V.decode_header(struct.pack("<III", 1, 2, 0))
    with pytest.raises(V.MessageError, match="version 0"):
        V.decode_header(struct.pack("<III", 1, 0, 0))
    with pytest.raises(V.MessageError, match="reply flag"):
        V.decode_header(struct.pack("<III", 1, 1 | 4, 0))
    with pytest.raises(V.MessageError, match="too big"):
        V.decode_header(struct.pack("<III", 24, 1, 269))
    with pytest.raises(V.MessageError, match="short"):
        V.decode_header(b"\1\0\0\0")


def test_no_payload_and_u64_messages():
    m = decode(msg(V.Request.GET_FEATURES))
    assert m.request == V.Request.GET_FEATURES and m.payload is None
    m = decode(msg(V.Request.SET_FEATURES, struct.pack("<Q", 1 << 32 | 1 << 30)))
    assert m.payload == 1 << 32 | 1 << 30
    m = decode(msg(V.Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0x8f2b)))
    assert m.payload == 0x8f2b
    with pytest.raises(V.MessageError, match="payload size 4, expected 8"):
        decode(msg(V.Request.SET_FEATURES, b"\0" * 4))
    with pytest.raises(V.MessageError, match="expected 0"):
        decode(msg(V.Request.SET_OWNER, b"\0" * 8))


def test_vring_state_and_addr():
    m = decode(msg(V.Request.SET_VRING_NUM, struct.pack("<II", 1, 256)))
    assert m.payload == V.VringState(1, 256)
    m = decode(msg(V.Request.GET_VRING_BASE, struct.pack("<II", 0, 0)))
    assert m.payload == V.VringState(0, 0)
    m = decode(msg(V.Request.SET_VRING_ENABLE, struct.pack("<II", 3, 1)))
    assert m.payload == V.VringState(3, 1)
    m = decode(msg(V.Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 2, 0, 0x1000, 0x3000, 0x2000, 0)))
    assert m.payload == V.VringAddr(2, 0, 0x1000, 0x3000, 0x2000, 0)
    with pytest.raises(V.MessageError):
        decode(msg(V.Request.SET_VRING_ADDR, b"\0" * 32))


def test_vring_kick_call_err_with_and_without_fd():
    for req in (V.Request.SET_VRING_KICK, V.Request.SET_VRING_CALL, V.Request.SET_VRING_ERR):
        m = decode(msg(req, struct.pack("<Q", 5)), fds=[17])
        assert m.payload == V.VringFile(5, False) and m.fds == (17,) and m.unused_fds == ()
        m = decode(msg(req, struct.pack("<Q", 5 | 1 << 8)), fds=[])
        assert m.payload == V.VringFile(5, True) and m.fds == ()
        # a descriptor sent with the NOFD flag is surplus: the transport closes it
        m = decode(msg(req, struct.pack("<Q", 5 | 1 << 8)), fds=[9])
        assert m.fds == () and m.unused_fds == (9,)
        with pytest.raises(V.MessageError, match="0 file descriptors, expected 1"):
            decode(msg(req, struct.pack("<Q", 5)))
        with pytest.raises(V.MessageError, match="reserved bits"):
            decode(msg(req, struct.pack("<Q", 1 << 9)), fds=[3])


def region(guest, size, user, off):
    return struct.pack("<QQQQ", guest, size, user, off)


def test_mem_table_regions_and_fd_count():
    body = struct.pack("<II", 2, 0) + region(0, 0x10000, 0x7f0000000000, 0) + region(
        0x100000, 0x2000, 0x7f0000100000, 0x10000)
    m = decode(msg(V.Request.SET_MEM_TABLE, body), fds=[10, 11])
    assert m.payload == V.MemTable((V.MemRegion(0, 0x10000, 0x7f0000000000, 0),
                                    V.MemRegion(0x100000, 0x2000, 0x7f0000100000, 0x10000)))
    assert m.fds == (10, 11)
    # the full 8-region struct some front-ends send is accepted too
    full = body + b"\0" * (6 * 32)
    assert decode(msg(V.Request.SET_MEM_TABLE, full), fds=[10, 11]).payload == m.payload
    with pytest.raises(V.MessageError, match="1 file descriptors for 2 regions"):
        decode(msg(V.Request.SET_MEM_TABLE, body), fds=[10])
    with pytest.raises(V.MessageError, match="3 file descriptors for 2 regions"):
        decode(msg(V.Request.SET_MEM_TABLE, body), fds=[10, 11, 12])
    with pytest.raises(V.MessageError, match="0 regions"):
        decode(msg(V.Request.SET_MEM_TABLE, struct.pack("<II", 0, 0)))
    with pytest.raises(V.MessageError, match="9 regions"):
        decode(msg(V.Request.SET_MEM_TABLE, struct.pack("<II", 9, 0) + b"\0" * 256))
    with pytest.raises(V.MessageError, match="payload size"):
        decode(msg(V.Request.SET_MEM_TABLE, body[:-1]), fds=[10, 11])
    with pytest.raises(V.MessageError, match="size 0"):
        decode(msg(V.Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, 0, 0, 0)), fds=[3])
    with pytest.raises(V.MessageError, match="wraps"):
        decode(msg(V.Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(2**64 - 4096, 8192, 0, 0)),
               fds=[3])


def test_add_and_rem_mem_reg():
    body = b"\0" * 8 + region(0x200000, 0x1000, 0x7f0000200000, 0)
    m = decode(msg(V.Request.ADD_MEM_REG, body), fds=[4])
    assert m.payload == V.MemRegion(0x200000, 0x1000, 0x7f0000200000, 0) and m.fds == (4,)
    with pytest.raises(V.MessageError, match="expected 1"):
        decode(msg(V.Request.ADD_MEM_REG, body))
    m = decode(msg(V.Request.REM_MEM_REG, body), fds=[4])
    assert m.fds == () and m.unused_fds == (4,)
    assert decode(msg(V.Request.REM_MEM_REG, body)).fds == ()


def test_config_space_messages():
    m = decode(msg(V.Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + b"\0" * 60))
    assert m.payload == V.ConfigSpace(0, 60, 0, b"\0" * 60)
    m = decode(msg(V.Request.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\1"))
    assert m.payload == V.ConfigSpace(32, 1, 0, b"\1")
    with pytest.raises(V.MessageError):
        decode(msg(V.Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + b"\0" * 59))
    with pytest.raises(V.MessageError, match="config size 257"):
        decode(msg(V.Request.GET_CONFIG, struct.pack("<III", 0, 257, 0) + b"\0" * 250))
    reply = V.reply_config(m.payload, b"\xab")
    assert reply == struct.pack("<III", 24, 5, 13) + struct.pack("<III", 32, 1, 0) + b"\xab"
    assert V.reply_config(m.payload, b"") == struct.pack("<III", 24, 5, 0)


def test_inflight_backend_req_and_status():
    m = decode(msg(V.Request.GET_INFLIGHT_FD, struct.pack("<QQHH", 0, 0, 1, 128) + b"\0" * 4))
    assert m.payload == V.Inflight(0, 0, 1, 128)
    m = decode(msg(V.Request.SET_INFLIGHT_FD, struct.pack("<QQHH", 4096, 0, 1, 128)), fds=[7])
    assert m.payload == V.Inflight(4096, 0, 1, 128) and m.fds == (7,)
    with pytest.raises(V.MessageError):
        decode(msg(V.Request.SET_INFLIGHT_FD, struct.pack("<QQHH", 4096, 0, 1, 128)))
    m = decode(msg(V.Request.SET_BACKEND_REQ_FD, flags=V.VERSION | V.FLAG_NEED_REPLY), fds=[8, 9])
    assert m.fds == (8,) and m.unused_fds == (9,) and m.need_reply
    assert decode(msg(V.Request.SET_STATUS, struct.pack("<Q", 0xf))).payload == 0xf
    reply = V.reply_inflight(V.Inflight(8192, 0, 2, 256))
    assert reply == struct.pack("<III", 31, 5, 24) + struct.pack("<QQHH", 8192, 0, 2, 256) + b"\0" * 4


def test_unknown_request_and_surplus_fds():
    with pytest.raises(V.MessageError, match="unknown request 99"):
        decode(msg(99))
    m = decode(msg(V.Request.GET_FEATURES), fds=[5, 6])
    assert m.fds == () and m.unused_fds == (5, 6)
    with pytest.raises(V.MessageError, match="at most 8"):
        decode(msg(V.Request.GET_FEATURES), fds=list(range(9)))


def test_replies_layout():
    assert V.reply_u64(1, 0x1_0000_0000) == struct.pack("<IIIQ", 1, 5, 8, 0x1_0000_0000)
    assert V.reply_vring_state(11, 0, 42) == struct.pack("<IIIII", 11, 5, 8, 0, 42)
    req = V.encode_backend_request(V.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    assert req == struct.pack("<III", 2, 1 | 8, 0)
    assert V.decode_backend_reply(struct.pack("<III", 2, 5, 8), struct.pack("<Q", 0), 2) == 0
    with pytest.raises(V.MessageError):
        V.decode_backend_reply(struct.pack("<III", 3, 5, 8), struct.pack("<Q", 0), 2)
    with pytest.raises(V.MessageError):
        V.decode_backend_reply(struct.pack("<III", 2, 1, 8), struct.pack("<Q", 0), 2)


@settings(max_examples=2000, deadline=None)
@given(request=st.integers(0, 60), flags=st.integers(0, 2**32 - 1),
       payload=st.binary(max_size=300), nfds=st.integers(0, 10), size_delta=st.integers(-2, 2))
def test_fuzz_decode_never_raises_anything_else(request, flags, payload, nfds, size_delta):
    size = max(0, len(payload) + size_delta)
    raw = struct.pack("<III", request, flags, size)
    fds = list(range(100, 100 + nfds))
    try:
        header = V.decode_header(raw)
        m = V.decode_message(header, payload, fds)
    except V.MessageError:
        return
    # every descriptor is accounted for exactly once, in order
    assert m.fds + m.unused_fds == tuple(fds)
    assert len(payload) == size


@settings(max_examples=1000, deadline=None)
@given(request=st.sampled_from(list(V.Request)), body=st.binary(max_size=280),
       nfds=st.integers(0, 9))
def test_fuzz_known_requests(request, body, nfds):
    # a well-formed header for every known request, with random bodies
    try:
        m = decode(msg(request, body), fds=list(range(nfds)))
    except V.MessageError as e:
        assert e.request in (None, request)
        return
    assert m.request == request
    assert len(m.fds) + len(m.unused_fds) == nfds
