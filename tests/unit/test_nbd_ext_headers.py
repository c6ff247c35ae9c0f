"""Extended headers in the NBD codec, over bytes (the NBD specification's extended headers extension:
"Request message", "Extended reply chunk message", NBD_REPLY_TYPE_BLOCK_STATUS_EXT)."""

from __future__ import annotations

import struct

import pytest

from qsd_trio.proto import nbd as P
from tests import nbd_client as C


def test_extended_request_layout():
    b = C.encode_ext_request(P.CMD_WRITE, 0x1122334455667788, 5 << 30, 4096,
                             P.CMD_FLAG_PAYLOAD_LEN | P.CMD_FLAG_FUA)
    assert len(b) == P.EXT_REQUEST_SIZE == 32
    assert b[:4] == bytes.fromhex("21e41c71")
    assert struct.unpack(">HHQQQ", b[4:]) == (0x21, P.CMD_WRITE, 0x1122334455667788,
                                              5 << 30, 4096)
    r = P.parse_ext_request(b)
    assert r == (0x21, P.CMD_WRITE, 0x1122334455667788, 5 << 30, 4096)
    assert (r.flags, r.type, r.handle, r.offset, r.length) == tuple(r)


def test_extended_request_takes_64_bit_effect_lengths():
    r = P.parse_ext_request(C.encode_ext_request(P.CMD_TRIM, 1, 0, (1 << 40) + 5))
    assert r.length == (1 << 40) + 5


def test_extended_request_wrong_magic():
    with pytest.raises(P.NbdProtocolError):
        P.parse_ext_request(C.encode_request(P.CMD_READ, 1, 0, 512) + bytes(4))


def test_extended_reply_header_layout():
    h = P.chunk_none(7, ext_offset=1 << 33)
    assert len(h) == P.EXT_CHUNK_HEADER_SIZE == 32
    assert h[:4] == bytes.fromhex("6e8a278c")
    assert struct.unpack(">HHQQQ", h[4:]) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 7,
                                              1 << 33, 0)
    assert C.reply_header_size(h[:4]) == 32
    rep = C.parse_reply_header(h)
    assert rep == C.Reply(7, 0, P.REPLY_TYPE_NONE, P.REPLY_FLAG_DONE, 0, 1 << 33)
    assert rep.done


def test_extended_chunks_keep_their_payloads():
    # the payloads are those of structured replies; only the header changes
    for ext, plain in [
        (P.chunk_offset_hole(3, 4096, 512, False, 0), P.chunk_offset_hole(3, 4096, 512, False)),
        (P.chunk_offset_data_header(3, 4096, 512, True, 0),
         P.chunk_offset_data_header(3, 4096, 512, True)),
        (P.chunk_error(3, P.EINVAL, "bad", True, 0), P.chunk_error(3, P.EINVAL, "bad")),
    ]:
        assert ext[32:] == plain[20:]
        e, s = C.parse_reply_header(ext[:32]), C.parse_reply_header(plain[:20])
        assert (e.handle, e.type, e.flags, e.length) == (s.handle, s.type, s.flags, s.length)
        assert e.offset == 0 and s.offset is None


def test_block_status_ext_chunk():
    ext = [(5 << 30, P.STATE_HOLE | P.STATE_ZERO), (4096, 0)]
    b = P.chunk_block_status_ext(9, 1 << 20, 1, ext, True)
    rep = C.parse_reply_header(b[:32])
    assert (rep.type, rep.offset, rep.done) == (P.REPLY_TYPE_BLOCK_STATUS_EXT, 1 << 20, True)
    payload = b[32:]
    assert rep.length == len(payload) == 8 + 16 * 2
    assert payload[:8] == struct.pack(">II", 1, 2)
    assert payload[8:24] == struct.pack(">QQ", 5 << 30, 3)
    assert C.parse_block_status_ext_chunk(payload) == (1, ext)


@pytest.mark.parametrize("payload", [struct.pack(">II", 1, 0),
                                     struct.pack(">II", 1, 2) + bytes(16)])
def test_block_status_ext_chunk_inconsistent(payload):
    with pytest.raises(P.NbdProtocolError):
        C.parse_block_status_ext_chunk(payload)


def test_option_and_error_numbers():
    assert P.OPT_EXTENDED_HEADERS == 11
    assert P.REP_ERR_EXT_HEADER_REQD == (1 << 31) + 10
    assert P.CMD_FLAG_PAYLOAD_LEN == 1 << 5
    assert P.REPLY_TYPE_BLOCK_STATUS_EXT == 6
    assert P.OPT_NAMES[P.OPT_EXTENDED_HEADERS] == "extended headers"
