"""The vmdk driver: the conformance suite and a hypothesis workload on every
writable subformat qemu-img makes (monolithicSparse, with zeroed grains,
monolithicFlat, twoGbMaxExtentSparse/Flat) and on a descriptor mixing flat
and sparse extents, each then clean in ``qemu-img check`` and equal byte
for byte to the model through ``qemu-img convert -O raw``; images from
``qemu-img convert -O vmdk`` (streamOptimized too) read and map as
qemu-img maps them; streamOptimized writes as QEMU allows them; seSparse,
VMware streams and COWD extents read (images built in vmdk_images.py);
backing files with copy-on-write and the CID check; corrupt images fail
with qemu-img's message for the same file, or read as qemu-img reads them.
Creation is in test_vmdk_create.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.qapi.errors import GenericError

from . import vmdk_images
from .conformance import check_block_node, pattern
from .workload import run_workload

MiB = 1 << 20
GRAIN = 64 << 10
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, subformat: str = "monolithicSparse", *opts: str) -> None:
    o = ",".join([f"subformat={subformat}", *opts])
    r = qemu_img("create", "-q", "-f", "vmdk", "-o", o, str(path), str(size))
    assert r.returncode == 0, r.stderr


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img check finds the image clean and reads exactly ``model``."""
    r = qemu_img("check", "-f", "vmdk", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    raw = tmp_path / "check.raw"
    r = qemu_img("convert", "-f", "vmdk", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


def qemu_open_error(path: Path) -> str:
    r = qemu_img("info", "-f", "vmdk", str(path))
    assert r.returncode != 0, r.stdout
    return r.stderr.strip()


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False, **extra):
    graph = BlockGraph()
    node = await graph.add({"driver": "vmdk", "node-name": "top", "read-only": read_only,
                            "file": {"driver": "file", "filename": str(path)}, **extra})
    try:
        yield node
    finally:
        await graph.close_all()


def mixed_image(d: Path, sizes: tuple[int, ...] = (MiB, 2 * MiB, MiB + 512 * 1024)) -> Path:
    """A descriptor naming a flat, a sparse and a flat extent (each file made
    by qemu-img), laid end to end."""
    lines = []
    for i, size in enumerate(sizes):
        sub = "monolithicSparse" if i % 2 else "monolithicFlat"
        part = d / f"part{i}.vmdk"
        make_image(part, size, sub)
        if sub == "monolithicFlat":
            part.unlink()  # only its flat file is an extent
            lines.append(f'{size // 512} FLAT "part{i}-flat.vmdk" 0')
        else:
            lines.append(f'{size // 512} SPARSE "part{i}.vmdk"')
    desc = d / "mixed.vmdk"
    desc.write_bytes(vmdk_images.descriptor("twoGbMaxExtentSparse", lines))
    return desc


WRITABLE = ["monolithicSparse", "zeroed", "monolithicFlat", "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat", "mixed"]


def writable_image(d: Path, kind: str, size: int) -> Path:
    img = d / "img.vmdk"
    if kind == "zeroed":
        make_image(img, size, "monolithicSparse", "zeroed_grain=on")
    elif kind == "mixed":
        assert size == 4 * MiB + 512 * 1024
        img = mixed_image(d)
    else:
        make_image(img, size, kind)
    return img


@pytest.mark.parametrize("kind", WRITABLE)
async def test_conformance(tmp_path, kind):
    size = 4 * MiB + 512 * 1024 if kind == "mixed" else 4 * MiB
    holder: list[Path] = []

    @contextlib.asynccontextmanager
    async def factory(n, *, read_only=False):
        for p in tmp_path.iterdir():
            if p.is_file():
                p.unlink()
        holder[:] = [writable_image(tmp_path, kind, n)]
        async with opened(holder[0], read_only=read_only, discard="unmap") as node:
            yield node

    async def after_close(model):
        check_against(holder[0], model, tmp_path)

    await check_block_node(factory, size=size, after_close=after_close, can_resize=False)


SIZE = 3 * MiB + 512 * 1024
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 300_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, kind=st.sampled_from(["monolithicSparse", "zeroed", "monolithicFlat",
                                           "twoGbMaxExtentSparse", "mixed"]))
def test_random_workload(workload, kind):
    """Writes, zero writes and discards (which vmdk ignores), concurrent in
    pairs, against a model; then qemu-img's check and view."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        size = 4 * MiB + 512 * 1024 if kind == "mixed" else SIZE
        img = writable_image(tmp, kind, size)

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, size)

        model = trio.run(main)
        check_against(img, model, tmp)


def source(tmp_path: Path, size: int = 6 * MiB) -> tuple[Path, bytes]:
    raw = tmp_path / "src.raw"
    data = bytearray(size)
    for i, (off, n) in enumerate([(0, 70000), (MiB, 200000), (3 * MiB + 7, 5000),
                                  (size - 100, 100)]):
        data[off:off + n] = pattern(i + 1, n)
    raw.write_bytes(data)
    return raw, bytes(data)


def our_map(runs: list[tuple[int, int, bool, bool]]) -> list[list]:
    merged: list[list] = []
    for o, n, dt, z in runs:
        if merged and merged[-1][2:] == [dt, z]:
            merged[-1][1] += n
        else:
            merged.append([o, n, dt, z])
    return merged


@pytest.mark.parametrize("sub", SUBFORMATS)
async def test_reads_qemu_img_convert(tmp_path, sub):
    """An image qemu-img converted from raw data reads back as that data,
    and block status maps what qemu-img map maps."""
    raw, data = source(tmp_path)
    img = tmp_path / "c.vmdk"
    r = qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                 str(img))
    assert r.returncode == 0, r.stderr
    theirs = json.loads(qemu_img("map", "--output=json", "-f", "vmdk", str(img)).stdout)
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == data
        # and in odd pieces, across grains
        for off, n in [(65535, 3), (MiB - 1000, 300000), (len(data) - 1, 1)]:
            assert bytes(await node.read(off, n)) == data[off:off + n]
        runs = []
        off = 0
        while off < node.length:
            s = await node.block_status(off, node.length - off)
            runs.append((off, s.length, bool(s.flags & Status.DATA), bool(s.flags & Status.ZERO)))
            off += s.length
    assert [[m["start"], m["length"], m["data"], m["zero"]] for m in theirs] == our_map(runs)


def _stream(tmp_path: Path) -> Path:
    raw, _ = source(tmp_path)
    img = tmp_path / "s.vmdk"
    r = qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                 str(raw), str(img))
    assert r.returncode == 0, r.stderr
    return img


async def test_stream_optimized_small_reads_inflate_without_a_task(tmp_path):
    """A read inside one compressed grain whose bytes the file has at hand
    is inflated on the spot (read_now); one across grains, or of a grain
    with a bad marker, is left to read(), which reports QEMU's error."""
    img = _stream(tmp_path)
    model = (tmp_path / "src.raw").read_bytes()
    async with opened(img) as node:
        await node.read(0, 512)  # the grain tables are loaded, the file is cached
        for off, n in [(0, 4096), (100, 1000), (MiB + 4096, 8192), (GRAIN - 512, 512)]:
            assert node.read_now(off, n) == model[off:off + n], (off, n)
        assert node.read_now(GRAIN - 512, 1024) is None  # two grains
        assert await node.read(GRAIN - 512, 1024) == model[GRAIN - 512:GRAIN + 512]
    # a grain whose marker says more than two grains: EINVAL, as QEMU
    raw = bytearray(img.read_bytes())
    async with opened(img) as node:
        await node.read(0, 512)
        ext = node._find_extent(0)
        _kind, sector, _t, _i = ext.lookup_cached(MiB)
    struct.pack_into("<I", raw, sector * 512 + 8, 3 * GRAIN)
    img.write_bytes(raw)
    async with opened(img) as node:
        await node.read(0, 512)
        assert node.read_now(MiB, 4096) is None
        with pytest.raises(OSError) as e:
            await node.read(MiB, 4096)
        assert e.value.errno == errno.EINVAL


async def test_stream_optimized_writes(tmp_path):
    """QEMU writes a streamOptimized grain once and whole (or the image's
    last, partial one), compressed after the last one written; a write into
    a written grain is EIO, a partial grain EINVAL, a zero write that is not
    a whole unwritten grain falls back to writing zeroes."""
    img = _stream(tmp_path)
    model = bytearray((tmp_path / "src.raw").read_bytes())
    size_before = img.stat().st_size
    async with opened(img) as node:
        whole = pattern(9, GRAIN)
        await node.write(2 * MiB, whole)
        model[2 * MiB:2 * MiB + GRAIN] = whole
        with pytest.raises(OSError) as e:
            await node.write(2 * MiB, whole)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            await node.write(4 * MiB + 512, b"x" * 512)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            await node.write(0, b"x" * 512)  # grain 0 holds data
        assert e.value.errno == errno.EIO
        # a whole unwritten grain of zeroes: a compressed grain of zeroes
        await node.write_zeroes(5 * MiB, GRAIN)
        assert bytes(await node.read(0, len(model))) == model
    assert img.stat().st_size > size_before
    check_against(img, model, tmp_path)


async def test_stream_grain_packing(tmp_path):
    """Grains follow one another sector by sector, each behind its marker
    (guest sector, compressed size) as a zlib stream; the table entries
    point at the markers."""
    img = _stream(tmp_path)
    async with opened(img) as node:
        for i in range(3):
            await node.write((4 + i) * GRAIN, bytes([i + 1]) * GRAIN)
    b = img.read_bytes()
    gd = struct.unpack_from("<Q", b, 56)[0]
    gt = struct.unpack_from("<I", b, gd * 512)[0]
    at = [struct.unpack_from("<I", b, gt * 512 + (4 + i) * 4)[0] * 512 for i in range(3)]
    for i in range(3):
        lba, n = struct.unpack_from("<QI", b, at[i])
        assert lba == (4 + i) * GRAIN // 512
        import zlib
        assert zlib.decompress(b[at[i] + 12:at[i] + 12 + n]) == bytes([i + 1]) * GRAIN
        if i:
            assert at[i] == -(-(at[i - 1] + 12 + struct.unpack_from("<I", b, at[i - 1] + 8)[0])
                              // 512) * 512


async def test_corrupt_compressed_grain(tmp_path):
    """A grain whose stream is damaged fails its read with EINVAL, as
    qemu-io's read of the same image; the other grains read."""
    img = _stream(tmp_path)
    b = bytearray(img.read_bytes())
    gd = struct.unpack_from("<Q", b, 56)[0]
    gt = struct.unpack_from("<I", b, gd * 512)[0]
    first = struct.unpack_from("<I", b, gt * 512)[0] * 512
    b[first + 12 + 40:first + 12 + 60] = bytes(20)
    img.write_bytes(b)
    r = qemu_io("-r", "-f", "vmdk", "-c", "read 0 512", str(img))
    assert "Invalid argument" in r.stdout + r.stderr
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError) as e:
            await node.read(0, 512)
        assert e.value.errno == errno.EINVAL
        assert bytes(await node.read(MiB, 512)) == pattern(2, 200000)[:512]


async def test_vmware_stream(tmp_path):
    """A stream with its grain directory in the footer (the header says
    "at the end") reads as its data."""
    img = tmp_path / "vmw.vmdk"
    data = bytearray(5 * MiB + 3 * 512)
    data[100:70000] = pattern(3, 69900)
    data[4 * MiB:4 * MiB + 9000] = pattern(4, 9000)
    want = vmdk_images.vmware_stream(img, bytes(data))
    async with opened(img, read_only=True) as node:
        assert node.length == len(want)
        assert bytes(await node.read(0, len(want))) == want
        st_ = await node.block_status(2 * MiB, GRAIN)
        assert not st_.flags & Status.ALLOCATED


async def test_write_without_grain_table(tmp_path):
    """A grain whose grain table VMware left out (its directory entry is 0):
    QEMU writes such a grain at an offset it never set; here the write
    fails with EIO and the file stays as it was.  A grain in a table that
    is there is written as qemu-io writes it: compressed, at the first
    64 KiB boundary after the end of the file, so past the footer (which
    then no longer ends the file: QEMU cannot open the image again)."""
    img = tmp_path / "vmw.vmdk"
    n_tables = 3  # 32 MiB per grain table
    data = bytearray(n_tables * 32 * MiB)
    data[100:200] = b"x" * 100
    want = bytearray(vmdk_images.vmware_stream(img, bytes(data)))
    before = img.read_bytes()
    theirs = tmp_path / "theirs.vmdk"
    theirs.write_bytes(before)
    r = qemu_io("-f", "vmdk", "-c", f"write -P 0x7a {GRAIN} {GRAIN}", str(theirs))
    assert r.returncode == 0, r.stdout + r.stderr
    async with opened(img) as node:
        with pytest.raises(OSError) as e:
            await node.write(40 * MiB, b"y" * GRAIN)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            await node.write_zeroes(40 * MiB, GRAIN)
        assert e.value.errno == errno.EIO
        assert img.read_bytes() == before
        await node.write(GRAIN, b"z" * GRAIN)
        want[GRAIN:2 * GRAIN] = b"z" * GRAIN
        assert bytes(await node.read(0, 4 * MiB)) == want[:4 * MiB]
    assert norm_image(img.read_bytes()) == norm_image(theirs.read_bytes())
    assert "Invalid footer" in qemu_open_error(theirs)


async def test_sesparse(tmp_path):
    """An seSparse extent: allocated grains, zero and unmapped ones, and
    unallocated ones read as QEMU reads them; the node must be read-only
    (auto-read-only makes it so)."""
    g = 4096
    grains: dict[int, bytes | str] = {0: pattern(1, g), 5: pattern(2, g), 4096: pattern(3, g),
                                      6: "zero", 7: "unmapped", 9000: pattern(4, g)}
    desc, want = vmdk_images.sesparse(tmp_path / "se", 80 * MiB // 512, grains)
    async with opened(desc, read_only=True) as node:
        assert bytes(await node.read(0, len(want))) == want
        s = await node.block_status(6 * g, g)
        assert s.flags & Status.ZERO and s.flags & Status.ALLOCATED
        s = await node.block_status(5 * g, g)
        assert s.flags & Status.DATA
        with pytest.raises(OSError):
            await node.write(0, b"x")
    with pytest.raises(GenericError, match="^No write support for seSparse images available$"):
        async with opened(desc):
            pass
    async with opened(desc, **{"auto-read-only": True}) as node:
        assert node.read_only
        assert bytes(await node.read(5 * g, g)) == grains[5]


async def test_cowd(tmp_path):
    """A COWD (vmfsSparse) extent, alone and under a descriptor: reads, and
    writes that allocate grains at its end."""
    img = tmp_path / "c.vmdk"
    gsize = 16 * 512
    want = bytearray(vmdk_images.cowd(img, 4096, {0: pattern(1, gsize), 7: pattern(2, gsize)}))
    async with opened(img) as node:
        assert node.length == 4096 * 512
        assert bytes(await node.read(0, len(want))) == want
        await node.write(100 * gsize + 10, b"abc")
        want[100 * gsize + 10:100 * gsize + 13] = b"abc"
        assert bytes(await node.read(0, len(want))) == want
    raw = tmp_path / "out.raw"
    assert qemu_img("convert", "-f", "vmdk", "-O", "raw", str(img), str(raw)).returncode == 0
    assert raw.read_bytes() == want
    desc = tmp_path / "d.vmdk"
    desc.write_bytes(vmdk_images.descriptor("vmfsSparse", [f'4096 VMFSSPARSE "{img.name}"']))
    async with opened(desc, read_only=True) as node:
        assert bytes(await node.read(0, len(want))) == want


async def test_backing_chain(tmp_path):
    """An overlay reads what it does not hold from its parent (zeroes past
    the parent's end), fills a new grain from it, and keeps the parent
    untouched; qemu-img reads the overlay the same."""
    base = tmp_path / "base.vmdk"
    make_image(base, 2 * MiB)
    async with opened(base) as node:
        await node.write(0, pattern(1, 2 * MiB))
    top = tmp_path / "top.vmdk"
    r = qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(top),
                 str(3 * MiB))
    assert r.returncode == 0, r.stderr
    model = bytearray(pattern(1, 2 * MiB) + bytes(MiB))
    base_bytes = base.read_bytes()
    async with opened(top) as node:
        assert node.backing is not None and node.backing.driver == "vmdk"
        assert bytes(await node.read(0, node.length)) == model
        await node.write(GRAIN + 100, b"new")
        model[GRAIN + 100:GRAIN + 103] = b"new"
        assert bytes(await node.read(0, node.length)) == model
        s = await node.block_status(0, GRAIN)
        assert s.depth == 2 and s.flags & Status.DATA
        s = await node.block_status(GRAIN, GRAIN)
        assert s.depth == 1
        info = node.info_extra()
        assert info["backing-filename"] == "base.vmdk"
        assert info["backing-filename-format"] == "vmdk"
    assert base.read_bytes() == base_bytes
    check_against(top, model, tmp_path)


async def test_backing_cid_mismatch(tmp_path):
    """A parent whose CID is not the parentCID recorded: unallocated grains
    fail with EINVAL (allocated ones read); so does a parent that is not a
    vmdk image."""
    base = tmp_path / "base.vmdk"
    make_image(base, MiB)
    top = tmp_path / "top.vmdk"
    assert qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
                    str(top), str(MiB)).returncode == 0
    # another CID in the parent's descriptor
    b = bytearray(base.read_bytes())
    m = re.search(rb"\nCID=([0-9a-f]+)\n", b)
    assert m
    b[m.start(1):m.end(1)] = b"0" * (m.end(1) - m.start(1))
    base.write_bytes(b)
    async with opened(top) as node:
        with pytest.raises(OSError) as e:
            await node.read(0, 512)
        assert e.value.errno == errno.EINVAL
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    async with opened(top, backing={"driver": "raw", "file": {"driver": "file",
                                                                 "filename": str(raw)}}) as node:
        with pytest.raises(OSError) as e:
            await node.read(0, 512)
        assert e.value.errno == errno.EINVAL


def _norm_cid(desc: bytes) -> bytes:
    return re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", desc)


def norm_image(b: bytes) -> bytes:
    """A vmdk file with its descriptor's random CID masked: the whole
    descriptor file, or the embedded descriptor's 20 sectors (the masked
    text padded back, as the CID has from 1 to 8 digits)."""
    if b[:4] != b"KDMV":
        return _norm_cid(b)
    text = b[512:512 + 10240].split(b"\0", 1)[0]
    return b[:512] + _norm_cid(text).ljust(10240, b"\0") + b[512 + 10240:]


def qemu_read(img: Path, length: int, tmp_path: Path) -> bytes:
    """The first ``length`` bytes (whole 64 KiB blocks) as qemu-img reads them."""
    out = tmp_path / "dd.raw"
    r = qemu_img("dd", "-f", "vmdk", "-O", "raw", f"if={img}", f"of={out}", "bs=65536",
                 f"count={-(-length // GRAIN)}")
    assert r.returncode == 0, r.stderr
    return out.read_bytes()[:length]


def qemu_size(img: Path) -> int:
    """The image's size as qemu-img map sees it (info asserts on an image
    without extents)."""
    r = qemu_img("map", "--output=json", "-f", "vmdk", str(img))
    assert r.returncode == 0, r.stderr
    return sum(m["length"] for m in json.loads(r.stdout))


# corrupt images: (subformat, offset into the (first) sparse file or None for
# the descriptor, bytes); each fails as qemu-img fails on the same file
def _hdr(field: str) -> int:
    return {"version": 4, "flags": 8, "capacity": 12, "granularity": 20, "desc_offset": 28,
            "num_gtes": 44, "rgd": 48, "gd": 56, "grain_offset": 64, "compress": 77}[field]


CORRUPT = {
    "version": (_hdr("version"), struct.pack("<I", 4)),
    "version3-rw": (_hdr("version"), struct.pack("<I", 3)),
    "gtes-big": (_hdr("num_gtes"), struct.pack("<I", 513)),
    "gtes-zero": (_hdr("num_gtes"), struct.pack("<I", 0)),
    "granularity-big": (_hdr("granularity"), struct.pack("<Q", 0x200001)),
    "granularity-wraps": (_hdr("granularity"), struct.pack("<Q", 1 << 32)),
    "l1-size-big": (_hdr("capacity"), struct.pack("<Q", 1 << 40)),
    "grain-offset": (_hdr("grain_offset"), struct.pack("<Q", 1 << 20)),
    "gd-absurd": (_hdr("gd"), struct.pack("<Q", 1 << 60)),
    "rgd-absurd": (_hdr("rgd"), struct.pack("<Q", 1 << 60)),
    "gd-at-end": (_hdr("gd"), struct.pack("<Q", (1 << 64) - 1)),
    "no-cid": (512, b"# Disk DescriptorFile\nversion=1\n" + bytes(200)),
    "hint-open": (512 + 80, b'parentFileNameHint="oops'),
    "magic": (0, b"KDMX"),
    "capacity-zero": (_hdr("capacity"), struct.pack("<Q", 0)),
    "desc-at-absurd": (_hdr("capacity"), struct.pack("<QQQ", 0, 128, 1 << 60)),
}


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt(tmp_path, what):
    """Each check of the open, with the message qemu-img prints for the
    same file; nothing else reads differently."""
    off, data = CORRUPT[what]
    img = tmp_path / "bad.vmdk"
    make_image(img, 8 * MiB)
    b = bytearray(img.read_bytes())
    b[off:off + len(data)] = data
    img.write_bytes(b)
    # qemu-io opens it read-write, as here
    theirs = qemu_io("-f", "vmdk", "-c", "read 0 512", str(img))
    try:
        async with opened(img) as node:
            length = node.length
            got = bytes(await node.read(0, min(length, MiB)))
    except GenericError as e:
        assert theirs.returncode != 0, theirs.stdout
        assert theirs.stderr.strip().endswith(": " + e.desc), (theirs.stderr, e.desc)
        return
    assert theirs.returncode == 0, theirs.stderr
    info = json.loads(qemu_img("info", "--output=json", "-f", "vmdk", str(img)).stdout)
    assert info["virtual-size"] == length
    assert got == qemu_read(img, min(length, MiB), tmp_path)


def _tables(img: Path) -> tuple[int, int]:
    """The byte offsets of the first grain directory entry and of the first
    grain table (both as the header's gd_offset names them)."""
    b = img.read_bytes()
    gd = struct.unpack_from("<Q", b, 56)[0] * 512
    return gd, struct.unpack_from("<I", b, gd)[0] * 512


# name -> (which table, entry index, value (None: grain table entry 0's),
# whether to compare a write into grain 16 too)
TABLES = {
    # the table would be read (and its entry written) 2 TiB into the file
    "gd-outside": ("gd", 0, 0xFFFFFFF0, False),
    # no table: QEMU's write would go where an unset variable points
    "gd-zero": ("gd", 0, 0, False),
    "gt-outside": ("gt", 0, 0x7FFFFFF0, True),
    "gt-alias": ("gt", 16, None, True),
    "gt-descriptor": ("gt", 16, 1, True),
}


@pytest.mark.parametrize("what", list(TABLES))
async def test_corrupt_tables(tmp_path, what):
    """Table entries pointing outside the file or at the descriptor, two
    entries at one grain: reads give what qemu-img reads (zeroes past the
    end of the file), and a write into grain 16 leaves the file byte for
    byte as qemu-io's same write leaves it."""
    raw, _ = source(tmp_path, 2 * MiB)
    img = tmp_path / "t.vmdk"
    assert qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(img)).returncode == 0
    gd, gt = _tables(img)
    table, index, value, write = TABLES[what]
    b = bytearray(img.read_bytes())
    if value is None:
        value = struct.unpack_from("<I", b, gt)[0]
    struct.pack_into("<I", b, (gd if table == "gd" else gt) + index * 4, value)
    img.write_bytes(b)
    theirs = tmp_path / "theirs.vmdk"
    theirs.write_bytes(b)
    async with opened(img) as node:
        assert bytes(await node.read(0, MiB)) == qemu_read(theirs, MiB, tmp_path)
        if write:
            await node.write(16 * GRAIN + 100, b"\x77" * 3000)
    if write:
        r = qemu_io("-f", "vmdk", "-c", f"write -P 0x77 {16 * GRAIN + 100} 3000", str(theirs))
        assert r.returncode == 0, r.stdout + r.stderr
        assert norm_image(img.read_bytes()) == norm_image(theirs.read_bytes())


DESCRIPTORS = {
    "no-create-type": lambda s: s.replace(b'createType="monolithicFlat"', b""),
    "create-type": lambda s: s.replace(b'"monolithicFlat"', b'"monolithicSparse"'),
    "flat-no-offset": lambda s: s.replace(b'-flat.vmdk" 0', b'-flat.vmdk"'),
    "missing-extent": lambda s: s.replace(b"-flat.vmdk", b"-gone.vmdk"),
    "no-parent-cid": lambda s: re.sub(rb"parentCID=\w+\n", b"", s),
    "negative-size": lambda s: s.replace(b"RW 16384", b"RW -5"),
    "not-rw": lambda s: s.replace(b"RW 16384", b"RDONLY 16384"),
    "huge-size": lambda s: s.replace(b"RW 16384", b"RW 9223372036854775807"),
    "size-wraps": lambda s: s.replace(b"RW 16384", b"RW 36028797018963968"),
    "unknown-type": lambda s: s.replace(b" FLAT ", b" ZZZ "),
    "vmfs-offset": lambda s: s.replace(b" FLAT ", b" VMFS "),
    "blank-before-extent": lambda s: s.replace(b"RW 16384", b"\nRW 16384"),
    "empty": lambda s: b"",
    "binary": lambda s: b"\0\1\2\3" * 100,
}


@pytest.mark.parametrize("what", list(DESCRIPTORS))
async def test_bad_descriptor(tmp_path, what):
    """A descriptor file changed: the open fails with qemu-img's message, or
    both read the same data (which may then be of another size)."""
    img = tmp_path / "d.vmdk"
    make_image(img, 8 * MiB, "monolithicFlat")
    with (tmp_path / "d-flat.vmdk").open("r+b") as fh:
        fh.write(pattern(5, 100000))
    img.write_bytes(DESCRIPTORS[what](img.read_bytes()))
    theirs = qemu_io("-r", "-f", "vmdk", "-c", "read 0 0", str(img))
    try:
        async with opened(img, read_only=True) as node:
            length = node.length
            got = bytes(await node.read(0, min(length, MiB)))
    except GenericError as e:
        assert theirs.returncode != 0 or what == "size-wraps", theirs.stdout
        if what == "size-wraps":
            # 2^55 sectors: QEMU's uint64_t product wraps to 0, so it opens
            # the image, and then cannot tell its size; refused here
            assert e.desc == "Could not refresh total sector count: File too large"
            r = qemu_img("map", "-f", "vmdk", str(img))
            assert "Failed to get size" in r.stderr, r.stderr
            return
        assert (theirs.stdout + theirs.stderr).strip().endswith(": " + e.desc), \
            (theirs.stdout + theirs.stderr, e.desc)
        return
    assert theirs.returncode == 0, theirs.stderr
    assert qemu_size(img) == length
    assert got == qemu_read(img, min(length, MiB), tmp_path)


async def test_no_extents(tmp_path):
    """A descriptor without an extent line opens as an empty disk; its
    information has no cluster size and no dirty flag (qemu-img info and
    qemu-storage-daemon's query abort on an assertion there)."""
    img = tmp_path / "none.vmdk"
    img.write_bytes(vmdk_images.descriptor("monolithicFlat", []))
    async with opened(img, read_only=True) as node:
        assert node.length == 0
        assert not node.has_info
        info = node.info_extra()
        assert "cluster-size" not in info
        assert info["format-specific"]["data"]["extents"] == []
    assert "Assertion" in qemu_img("info", str(img)).stderr


@pytest.mark.parametrize("cut", [0, 3, 100, 600, 10 * 512, 300 * 512, -65536, -100])
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
async def test_truncated(tmp_path, sub, cut):
    """A sparse file cut short: the open fails with qemu-img's message for
    the same file, or both read the same data."""
    raw, _ = source(tmp_path, 2 * MiB)
    img = tmp_path / "short.vmdk"
    assert qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                    str(img)).returncode == 0
    with img.open("r+b") as fh:
        fh.truncate(cut if cut >= 0 else img.stat().st_size + cut)
    r = qemu_img("info", "--image-opts",
                 f"driver=vmdk,read-only=on,file.driver=file,file.filename={img}")
    try:
        async with opened(img, read_only=True) as node:
            got = []
            for off in range(0, node.length, GRAIN):
                try:
                    got.append(bytes(await node.read(off, GRAIN)))
                except OSError as e:
                    got.append(os.strerror(e.errno))
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + e.desc), (r.stderr, e.desc)
        return
    assert r.returncode == 0, r.stderr
    for i, mine in enumerate(got):
        q = qemu_io("-r", "-f", "vmdk", "-c", f"read -P 0 {i * GRAIN} {GRAIN}", str(img))
        if isinstance(mine, str):
            assert mine in q.stdout + q.stderr, (i, q.stdout)
        else:
            zero = mine == bytes(GRAIN)
            assert ("Pattern verification failed" not in q.stdout) == zero, (i, q.stdout)


async def test_read_only_never_written(tmp_path):
    """A read-only node writes nothing, not even the CID a first write sets."""
    img = tmp_path / "ro.vmdk"
    make_image(img, 4 * MiB)
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        for op in (lambda: node.write(0, b"x" * 512), lambda: node.write_zeroes(0, GRAIN)):
            with pytest.raises(OSError):
                await op()
        await node.read(0, node.length)
    assert img.read_bytes() == before


async def test_first_write_sets_cid(tmp_path):
    """The first write after open writes a new CID into the descriptor (the
    descriptor file is rewritten in whole sectors); the next writes don't."""
    img = tmp_path / "f.vmdk"
    make_image(img, 4 * MiB, "monolithicFlat")
    before = img.read_bytes()
    cid = re.search(rb"\nCID=([0-9a-f]+)\n", before)
    assert cid
    async with opened(img) as node:
        await node.write(0, b"a")
        after = img.read_bytes()
        await node.write(512, b"b")
        assert img.read_bytes() == after
    assert len(after) == -(-len(before) // 512) * 512
    assert after.rstrip(b"\0") != before
    assert _norm_cid(after.rstrip(b"\0")) == _norm_cid(before)
    assert after[len(before):] == bytes(len(after) - len(before))
