"""The NBD codec over bytes: layouts checked against the NBD protocol specification."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.proto import nbd as P
from tests import nbd_client as C


def test_greeting_is_fixed_newstyle_without_zeroes():
    g = P.server_greeting()
    assert g == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert C.parse_server_greeting(g) == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    with pytest.raises(P.NbdProtocolError):
        C.parse_server_greeting(b"NBDMAGIX" + g[8:])


def test_option_header_roundtrip_and_bad_magic():
    msg = C.encode_option(P.OPT_GO, b"abc")
    assert msg[:8] == b"IHAVEOPT" and len(msg) == 16 + 3
    assert P.parse_option_header(msg[:16]) == (P.OPT_GO, 3)
    with pytest.raises(P.NbdProtocolError, match="Bad magic"):
        P.parse_option_header(b"\0" * 16)


def test_option_reply_layout():
    r = P.option_reply(P.OPT_LIST, P.REP_SERVER, P.rep_server("disk", "desc"))
    magic, opt, rep, ln = struct.unpack(">QIII", r[:20])
    assert (magic, opt, rep) == (0x3E889045565A9, 3, 2)
    assert r[20:] == b"\0\0\0\x04disk" + b"desc" and ln == 12
    assert C.parse_option_reply_header(r[:20]) == (3, 2, 12)
    err = P.option_error(7, P.OptionError(P.REP_ERR_UNKNOWN, "export 'x' not present"))
    assert struct.unpack(">I", err[12:16])[0] == 0x80000006
    assert err[20:] == b"export 'x' not present"


def test_info_payloads():
    assert P.info_export(1 << 30, 0x1234) == b"\0\0" + (1 << 30).to_bytes(8, "big") + b"\x12\x34"
    assert P.info_block_size(1, 4096, 32 << 20) == struct.pack(">HIII", 3, 1, 4096, 32 << 20)
    assert P.info_name("n") == b"\0\x01n"
    assert P.info_description("d") == b"\0\x02d"
    assert P.export_name_reply(512, 3, no_zeroes=False) == struct.pack(">QH", 512, 3) + bytes(124)
    assert len(P.export_name_reply(512, 3, no_zeroes=True)) == 10


@given(st.text(max_size=50), st.lists(st.integers(0, 0xFFFF), max_size=10))
def test_info_request_roundtrip(name, infos):
    assert P.parse_info_request(C.encode_info_request(name, infos)) == (name, infos)


@pytest.mark.parametrize("payload", [
    b"",                                  # no name length
    b"\0\0\0\x05ab",                      # name longer than payload
    b"\0\0\0\x01a",                       # no info count
    b"\0\0\0\x01a\0\x02\0\x01",           # count says 2, one given
    b"\0\0\0\x01a\0\0\xff",               # trailing garbage
])
def test_info_request_malformed_is_invalid(payload):
    with pytest.raises(P.OptionError) as e:
        P.parse_info_request(payload)
    assert e.value.reply == P.REP_ERR_INVALID


def test_info_request_name_too_long():
    with pytest.raises(P.OptionError, match="Invalid name length: 4097"):
        P.parse_info_request(C.encode_info_request("x" * 4097, []))


@given(st.text(max_size=20), st.lists(st.text(max_size=30), max_size=5))
def test_meta_request_roundtrip(name, queries):
    assert P.parse_meta_request(C.encode_meta_request(name, queries)) == (name, queries)


def test_meta_request_trailing_bytes_invalid():
    with pytest.raises(P.OptionError):
        P.parse_meta_request(C.encode_meta_request("e", ["base:allocation"]) + b"x")


AVAIL = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]


@pytest.mark.parametrize("queries,listing,expect", [
    ([], True, AVAIL),
    ([], False, []),
    (["base:allocation"], False, ["base:allocation"]),
    (["qemu:"], True, AVAIL[1:]),
    (["qemu:"], False, []),                      # wildcards only when listing
    (["qemu:dirty-bitmap:"], True, AVAIL[2:]),
    (["base:"], True, ["base:allocation"]),
    (["qemu:dirty-bitmap:b1", "base:allocation"], False, ["base:allocation", AVAIL[3]]),
    (["nope:x", "qemu:dirty-bitmap:zz"], False, []),
])
def test_match_meta_contexts(queries, listing, expect):
    assert P.match_meta_contexts(queries, AVAIL, listing) == expect


def test_request_roundtrip_and_bad_magic():
    raw = C.encode_request(P.CMD_WRITE, 0xDEADBEEF, 4096, 512, P.CMD_FLAG_FUA)
    assert len(raw) == 28 and raw[:4] == b"\x25\x60\x95\x13"
    assert P.parse_request(raw) == P.Request(P.CMD_FLAG_FUA, P.CMD_WRITE, 0xDEADBEEF, 4096, 512)
    with pytest.raises(P.NbdProtocolError, match="invalid magic"):
        P.parse_request(b"\0" * 28)


def test_simple_reply():
    r = P.simple_reply(7, P.EIO)
    assert r == b"\x67\x44\x66\x98" + b"\0\0\0\x05" + (7).to_bytes(8, "big")
    assert C.reply_header_size(r[:4]) == 16
    rep = C.parse_reply_header(r)
    assert (rep.handle, rep.error, rep.type, rep.done) == (7, 5, None, True)


def test_structured_chunks():
    h = P.chunk_offset_data_header(9, 4096, 100, done=True)
    assert C.reply_header_size(h[:4]) == 20
    rep = C.parse_reply_header(h[:20])
    assert (rep.handle, rep.type, rep.length, rep.done) == (9, P.REPLY_TYPE_OFFSET_DATA, 108, True)
    assert h[20:] == (4096).to_bytes(8, "big")

    hole = P.chunk_offset_hole(9, 0, 65536, done=False)
    rep = C.parse_reply_header(hole[:20])
    assert (rep.type, rep.length, rep.done) == (P.REPLY_TYPE_OFFSET_HOLE, 12, False)
    assert struct.unpack(">QI", hole[20:]) == (0, 65536)

    err = P.chunk_error(9, P.EINVAL, "bad")
    rep = C.parse_reply_header(err[:20])
    assert rep.type == 0x8001 and rep.done
    assert C.parse_error_chunk(err[20:]) == (P.EINVAL, "bad")

    bs = P.chunk_block_status(9, 2, [(4096, 3), (8192, 0)], done=True)
    rep = C.parse_reply_header(bs[:20])
    assert rep.length == 4 + 16
    assert C.parse_block_status_chunk(bs[20:]) == (2, [(4096, 3), (8192, 0)])

    none = P.chunk_none(5)
    assert C.parse_reply_header(none).type == P.REPLY_TYPE_NONE
    with pytest.raises(P.NbdProtocolError):
        C.reply_header_size(b"\0\0\0\0")


@pytest.mark.parametrize("host,wire", [(1, 1), (30, 1), (5, 5), (12, 12), (28, 28), (27, 28),
                                       (95, 95), (108, 108), (2, 22), (None, 5)])
def test_errno_mapping(host, wire):
    assert P.errno_to_nbd(host) == wire
