"""Pure qcow2 metadata code: header round trip, refcount entries of every
width, compressed L2 entries of images qemu-img wrote."""

from __future__ import annotations

import random

import pytest

from qsd_trio.nodes.qcow2.compress import decompress
from qsd_trio.nodes.qcow2.header import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    Extension,
    Header,
    HeaderError,
    feature_table,
    parse_header,
)
from qsd_trio.nodes.qcow2.l2 import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    compressed_entry,
    compressed_extent,
    pack_table,
    unpack_table,
)
from qsd_trio.nodes.qcow2.refcount import get_entry, set_entry
from tests.helpers import qemu_img


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


def _compressible_clusters(cs: int, count: int, seed: int) -> bytes:
    """Clusters that compress to many different sizes (so the compressed
    data starts and ends at every kind of sector offset), with one that does
    not compress and one of zeroes among them."""
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(count):
        if i == 3:
            out += rnd.randbytes(cs)  # stored uncompressed
        elif i == 5:
            out += bytes(cs)  # not allocated at all
        else:
            words = [rnd.randbytes(rnd.randrange(1, 6)).hex() for _ in range(rnd.randrange(2, 60))]
            text = " ".join(words).encode() or b"x"
            out += (text * (cs // len(text) + 1))[:cs]
    return bytes(out)


@pytest.mark.parametrize("cluster_bits,ctype", [(9, "zlib"), (12, "zlib"), (16, "zlib"),
                                               (16, "zstd"), (21, "zlib")])
def test_compressed_entries_of_qemu_img(tmp_path, cluster_bits, ctype):
    """Every compressed L2 entry of an image ``qemu-img convert -c`` wrote
    decodes to data that decompresses to the cluster it was made from, and
    encodes back to the same entry."""
    cs = 1 << cluster_bits
    count = 40 if cluster_bits < 21 else 8
    raw = _compressible_clusters(cs, count, seed=cluster_bits)
    src, img = tmp_path / "src.raw", tmp_path / "img.qcow2"
    src.write_bytes(raw)
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cs},compression_type={ctype}", str(src), str(img))
    blob = img.read_bytes()
    h = parse_header(blob[:cs])
    assert h.compression_type == (1 if ctype == "zstd" else 0)
    l1 = unpack_table(blob[h.l1_table_offset:h.l1_table_offset + h.l1_size * 8])
    l2_entries = cs // 8
    seen = set()
    for l1i, l1e in enumerate(l1):
        l2off = l1e & L1E_OFFSET_MASK
        if not l2off:
            continue
        for i, e in enumerate(unpack_table(blob[l2off:l2off + cs])):
            gc = l1i * l2_entries + i
            if not e & QCOW_OFLAG_COMPRESSED:
                continue
            off, length = compressed_extent(e, cluster_bits)
            assert (off + length) % 512 == 0 and off + length <= len(blob) + 511
            want = raw[gc * cs:(gc + 1) * cs]
            assert decompress(blob[off:off + length], cs, h.compression_type) == want, gc
            assert compressed_entry(off, length, cluster_bits) == e
            seen.add(gc)
    # every cluster but the incompressible one and the zero one
    assert seen == set(range(count)) - {3, 5}
    # the data of neighbouring clusters shares sectors (not sector-aligned starts)
    assert any(compressed_extent(e, cluster_bits)[0] % 512
               for e in _compressed_entries(blob, h, cs))


def _compressed_entries(blob: bytes, h, cs: int) -> list[int]:
    l1 = unpack_table(blob[h.l1_table_offset:h.l1_table_offset + h.l1_size * 8])
    return [e for l1e in l1 if l1e & L1E_OFFSET_MASK
            for e in unpack_table(blob[l1e & L1E_OFFSET_MASK:(l1e & L1E_OFFSET_MASK) + cs])
            if e & QCOW_OFLAG_COMPRESSED]


def test_compressed_entry_layout():
    """The field boundary moves with the cluster size (qcow2.rst: x = 62 -
    (cluster_bits - 8)); the sector count is of sectors after the first."""
    e = compressed_entry(0x10200, 1, 16)  # one byte: 0 additional sectors
    assert e == QCOW_OFLAG_COMPRESSED | 0x10200
    assert compressed_extent(e, 16) == (0x10200, 512)
    e = compressed_entry(0x101FF, 2, 16)  # two bytes across a sector boundary
    assert e == QCOW_OFLAG_COMPRESSED | (1 << 54) | 0x101FF
    assert compressed_extent(e, 16) == (0x101FF, 513)
    # 2 MiB clusters: 13 bits of sector count from bit 49
    e = compressed_entry(0x4000_0000, 4096, 21)
    assert e == QCOW_OFLAG_COMPRESSED | (7 << 49) | 0x4000_0000
    assert compressed_extent(e, 21) == (0x4000_0000, 4096)


class _MemFile:
    """A byte array standing in for the image file under a bare Refcounts."""

    def __init__(self, size: int):
        self.buf = bytearray(size)

    async def read(self, off: int, n: int) -> bytes:
        return bytes(self.buf[off:off + n])

    async def write(self, off: int, data: bytes) -> None:
        if off + len(data) > len(self.buf):
            self.buf.extend(bytes(off + len(data) - len(self.buf)))
        self.buf[off:off + len(data)] = data

    async def flush(self) -> None:
        pass


def _refcounts(order: int = 4, cluster_bits: int = 9):
    """A tiny image's refcounts: table in cluster 1, refblock 0 in cluster 2,
    clusters 0-2 in use (header, table, block)."""
    from qsd_trio.nodes.qcow2.refcount import Refcounts

    cs = 1 << cluster_bits
    f = _MemFile(3 * cs)
    f.buf[cs:cs + 8] = (2 * cs).to_bytes(8, "big")
    block = bytearray(cs)
    for c in range(3):
        set_entry(block, c, order, 1)
    f.buf[2 * cs:3 * cs] = block

    async def moved(off: int, clusters: int) -> None:
        pass

    return Refcounts(cluster_bits=cluster_bits, order=order,
                     table=Refcounts.parse_table(bytes(f.buf[cs:2 * cs]), cs // 8),
                     table_offset=cs, table_clusters=1, read=f.read, write=f.write,
                     flush=f.flush, on_table_moved=moved)


@pytest.mark.parametrize("order", [0, 4, 6])
async def test_free_cluster_search_moves_on(order):
    """Allocating N clusters one by one scans O(N) refcounts, not O(N**2)."""
    refs = _refcounts(order)
    cs = refs.cluster_size
    offs = [await refs.alloc(1) for _ in range(3000)]
    assert len(set(offs)) == len(offs) and min(offs) == 3 * cs
    assert refs.free_hint == max(offs) // cs + 1
    # each allocation passes over its own cluster plus the refblocks created
    # on the way (one per block); a restart from 0 would count ~4.5 million
    assert refs.scanned < 2 * len(offs), refs.scanned
    for off in offs:
        assert await refs.get(off // cs) == 1


async def test_free_hint_moves_back_on_free_and_runs_stay_contiguous():
    refs = _refcounts(4)
    cs = refs.cluster_size
    a = await refs.alloc(8)
    b = await refs.alloc(8)
    assert b == a + 8 * cs
    for c in range(a // cs + 2, a // cs + 5):
        assert await refs.update(c, -1) == 0
    assert refs.free_hint == a // cs + 2
    # a hole of 3 clusters: too small for 4, reused by 3
    c4 = await refs.alloc(4)
    assert c4 == b + 8 * cs
    assert refs.free_hint == c4 // cs + 4
    await refs.update(a // cs + 2, 1)  # take one back: hole is now 2 clusters
    await refs.update(a // cs + 2, -1)
    assert await refs.alloc(3) == a + 2 * cs
    assert [await refs.get(c) for c in range(a // cs, b // cs + 8)] == [1] * 16
