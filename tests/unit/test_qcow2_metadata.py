"""Pure qcow2 metadata code: header round trip, refcount entries of every width."""

from __future__ import annotations

import pytest

from qsd_trio.nodes.qcow2.header import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    Extension,
    Header,
    HeaderError,
    feature_table,
    parse_header,
)
from qsd_trio.nodes.qcow2.l2 import pack_table, unpack_table
from qsd_trio.nodes.qcow2.refcount import get_entry, set_entry


def test_header_roundtrip_keeps_unknown_extensions():
    h = Header(version=3, cluster_bits=16, size=1 << 30, l1_size=2, l1_table_offset=0x30000,
               refcount_table_offset=0x10000, refcount_table_clusters=1, refcount_order=4,
               extensions=[Extension(EXT_BACKING_FORMAT, b"qcow2"),
                           Extension(0x12345678, b"opaque-bytes"),
                           Extension(EXT_FEATURE_TABLE, feature_table())],
               backing_file="base.qcow2")
    blob = h.pack()
    h2 = parse_header(blob)
    assert h2.backing_file == "base.qcow2" and h2.backing_format == "qcow2"
    assert [e.type for e in h2.extensions] == [EXT_BACKING_FORMAT, 0x12345678, EXT_FEATURE_TABLE]
    assert h2.ext(0x12345678) == b"opaque-bytes"
    assert h2.pack() == blob


@pytest.mark.parametrize("blob,msg", [
    (b"xx", "Image is not in qcow2 format"),
    (b"QFI\xfb\0\0\0\x01" + bytes(100), "Unsupported qcow2 version 1"),
    (b"QFI\xfb\0\0\0\x02" + bytes(12) + b"\0\0\0\x08" + bytes(60),
     "Unsupported cluster size: 2^8"),
])
def test_header_errors(blob, msg):
    with pytest.raises(HeaderError, match=msg.replace("^", r"\^")):
        parse_header(blob)


@pytest.mark.parametrize("order", range(7))
def test_refcount_entries(order):
    bits = 1 << order
    block = bytearray(512)
    n = 512 * 8 // bits
    values = [(i * 2654435761) % (1 << bits) for i in range(n)]
    for i, v in enumerate(values):
        set_entry(block, i, order, v)
    assert [get_entry(block, i, order) for i in range(n)] == values
    if bits == 16:
        assert block[:2] == values[0].to_bytes(2, "big")
    if bits == 1:
        # entry 0 is the least significant bit of byte 0 (as QEMU packs them)
        assert block[0] & 1 == values[0]


def test_l2_table_byte_order():
    t = unpack_table(bytes.fromhex("8000000000050000") + bytes(8))
    assert t[0] == 0x8000000000050000 and t[1] == 0
    assert pack_table(t)[:8] == bytes.fromhex("8000000000050000")
