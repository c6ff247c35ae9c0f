"""The /dev/fuse codec: layouts the kernel reads (include/uapi/linux/fuse.h)."""

from __future__ import annotations

import struct

from qsd_trio.proto import fuse as fp


def test_header_round_trip():
    raw = fp.IN_HEADER.pack(56, fp.GETATTR, 0x1122334455, 1, 1000, 100, 4242, 0, 0)
    hdr = fp.parse_header(raw + bytes(16))
    assert hdr == fp.Header(56, fp.GETATTR, 0x1122334455, 1, 1000, 100, 4242)
    assert fp.IN_HEADER_PREFIX.unpack_from(raw) == (56, fp.GETATTR, 0x1122334455)


def test_replies_carry_length_and_negative_errno():
    assert fp.reply_error(7, 5) == struct.pack("<IiQ", 16, -5, 7)
    out = fp.reply(9, b"abcd")
    assert struct.unpack_from("<IiQ", out) == (20, 0, 9) and out[16:] == b"abcd"
    assert fp.reply_header(9, 4096) == struct.pack("<IiQ", 16 + 4096, 0, 9)



def test_write_reply_in_one_pack_is_header_and_write_out():
    # the export packs a WRITE's reply with one call on its hot path
    got = fp.WRITE_REPLY.pack(fp.WRITE_REPLY.size, 0, 77, 1 << 20, 0)
    assert got == fp.reply(77, fp.WRITE_OUT.pack(1 << 20, 0))


def test_read_request_is_header_and_read_in_in_one_unpack():
    # the export's loop unpacks every request so: a READ's offset and size
    # must be fuse_read_in's, whatever the header's other fields hold
    raw = (fp.IN_HEADER.pack(80, fp.READ, 0xAABBCCDD11, 1, 1000, 100, 4242, 7, 0)
           + fp.READ_IN.pack(0x55, (5 << 30) + 4096, 131072, 0) + bytes(16))
    assert fp.READ_REQUEST.unpack_from(raw) == (80, fp.READ, 0xAABBCCDD11,
                                                (5 << 30) + 4096, 131072)


def test_attr_out_layout():
    attr = fp.Attr(ino=1, size=1 << 30, blocks=8, mode=0o100600, uid=5, gid=6,
                   time=(1700000000, 0), blksize=512)
    out = fp.attr_out(attr, 1.5)
    assert len(out) == 104  # fuse_attr_out
    valid, valid_ns, _ = struct.unpack_from("<QII", out)
    assert (valid, valid_ns) == (1, 500_000_000)
    fields = fp.ATTR.unpack_from(out, 16)
    assert fields[:4] == (1, 1 << 30, 8, 1700000000)
    assert fields[9:14] == (0o100600, 1, 5, 6, 0) and fields[14] == 512
    assert len(fp.entry_out(1, attr, 1.0)) == 128  # fuse_entry_out


def test_init_out_and_setattr_in():
    out = fp.init_out(max_readahead=131072, flags=fp.MAX_PAGES, max_write=1 << 20,
                      max_pages=256)
    assert len(out) == 64
    major, minor, ra, flags, _bg, _cong, max_write, _gran, max_pages = \
        struct.unpack_from("<IIIIHHIIH", out)
    assert (major, minor, ra, flags, max_write, max_pages) == \
        (7, fp.KERNEL_MINOR_VERSION, 131072, fp.MAX_PAGES, 1 << 20, 256)
    body = fp.SETATTR_IN.pack(fp.FATTR_SIZE | fp.FATTR_FH, 0, 3, 4096, 0, 0, 0, 0, 0, 0, 0,
                              0o100644, 0, 10, 20, 0)
    req = fp.parse_setattr(body)
    assert req == fp.SetattrIn(fp.FATTR_SIZE | fp.FATTR_FH, 3, 4096, 0o100644, 10, 20)
    assert req.valid & fp.FATTR_ATTRIBUTES == fp.FATTR_SIZE  # FH names no attribute


def test_statfs_out_matches_libfuse_default():
    out = fp.statfs_out()
    assert len(out) == 80
    assert struct.unpack_from("<QQQQQIII", out) == (0, 0, 0, 0, 0, 512, 255, 512)
