"""The qcow (version 1) driver: the conformance suite and a hypothesis
workload on images qemu-img made (4 KiB clusters, and 512-byte clusters
over a raw backing file), each compared afterwards with ``qemu-img convert
-O raw`` (QEMU has no check for qcow) and with the files qemu-io writes for
the same requests; images from ``qemu-img convert -O qcow`` (compressed
too) read back and mapped; :func:`create_qcow` against ``qemu-img
create``; AES-encrypted images; corrupt headers, truncated files and table
entries outside the file refused with QEMU's messages or read as qemu-img
reads them."""

from __future__ import annotations

import contextlib
import json
import random
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.nodes.qcow import create_qcow
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .workload import run_workload

MiB = 1 << 20
SECRET = "--object", "secret,id=s0,data=password"


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, *, backing: Path | None = None,
               encrypted: bool = False) -> None:
    args = ["create", "-q", "-f", "qcow"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "raw"]
    if encrypted:
        args += [*SECRET, "-o", "encrypt.format=aes,encrypt.key-secret=s0"]
    r = qemu_img(*args, str(path), str(size))
    assert r.returncode == 0, r.stderr


def raw_of(path: Path, tmp_path: Path, *, encrypted: bool = False) -> bytes:
    raw = tmp_path / "check.raw"
    if encrypted:
        r = qemu_img("convert", *SECRET, "--image-opts",
                     f"driver=qcow,file.filename={path},encrypt.key-secret=s0",
                     "-O", "raw", str(raw))
    else:
        r = qemu_img("convert", "-f", "qcow", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    return raw.read_bytes()


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False, encrypted: bool = False):
    graph = BlockGraph()
    opts: dict[str, object] = {}
    if encrypted:
        graph.secrets["s0"] = b"password"
        opts["encrypt"] = {"format": "aes", "key-secret": "s0"}
    node = await graph.add({"driver": "qcow", "node-name": "top", "read-only": read_only,
                            **opts, "file": {"driver": "file", "filename": str(path)}})
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("kind", ["plain", "backing", "encrypted"])
async def test_conformance(tmp_path, kind):
    img = tmp_path / "img.qcow"
    base = tmp_path / "base.raw"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        if kind == "backing":
            base.write_bytes(bytes(size))  # the suite's model starts as zeroes
        make_image(img, size, backing=base if kind == "backing" else None,
                   encrypted=kind == "encrypted")
        async with opened(img, read_only=read_only, encrypted=kind == "encrypted") as node:
            yield node

    async def after_close(model):
        assert raw_of(img, tmp_path, encrypted=kind == "encrypted") == bytes(model)

    await check_block_node(factory, after_close=after_close, can_resize=False)


SIZE = 3 * MiB + 4096
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 300_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 100_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 100_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, backed=st.booleans())
def test_random_workload(workload, backed):
    """Writes, zero writes and discards (which leave the data: qcow has no
    discard), concurrent in pairs, against a model; then qemu-img's view.
    Over a backing file the clusters are sectors, so the model holds (qcow
    does no copy-on-write: a partial write into a 4 KiB cluster would lose
    the backing file's bytes, in QEMU too)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.qcow"
        base = tmp / "base.raw"
        initial = bytes(SIZE)
        if backed:
            initial = pattern(9, SIZE)
            base.write_bytes(initial)
        make_image(img, SIZE, backing=base if backed else None)

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, SIZE, initial)

        model = trio.run(main)
        assert raw_of(img, tmp) == bytes(model)


WRITES = [(1000, 100, 1), (4096, 8192, 2), (70000, 3, 3), (2 * MiB + 100, 5000, 4),
          (1000, 10, 5)]


@pytest.mark.parametrize("kind", ["plain", "backing", "encrypted"])
async def test_same_file_as_qemu_io(tmp_path, kind):
    """The same writes give the file qemu-io leaves, byte for byte (sector
    padding read through the backing file, tables and clusters appended)."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(4, 3 * MiB))
    ours, theirs = tmp_path / "ours.qcow", tmp_path / "theirs.qcow"
    for p in (ours, theirs):
        make_image(p, 3 * MiB, backing=base if kind == "backing" else None,
                   encrypted=kind == "encrypted")
    cmds = [c for o, n, v in WRITES for c in ("-c", f"write -P {v} {o} {n}")]
    if kind == "encrypted":
        r = qemu_io(*SECRET, "--image-opts",
                    f"driver=qcow,file.filename={theirs},encrypt.key-secret=s0", *cmds)
    else:
        r = qemu_io("-f", "qcow", *cmds, str(theirs))
    assert r.returncode == 0 and "error" not in r.stdout, r.stdout + r.stderr
    async with opened(ours, encrypted=kind == "encrypted") as node:
        for o, n, v in WRITES:
            await node.write(o, bytes([v]) * n)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_reads_qemu_img_convert(tmp_path):
    """An image qemu-img converted from raw data reads back as that data;
    block status maps what qemu-img map maps."""
    raw = tmp_path / "src.raw"
    rnd = random.Random(2)
    data = bytearray(3 * MiB)
    data[100:5000] = rnd.randbytes(4900)
    data[MiB + 7:MiB + 70000] = b"xyz" * 23331
    raw.write_bytes(data)
    img = tmp_path / "c.qcow"
    r = qemu_img("convert", "-f", "raw", "-O", "qcow", str(raw), str(img))
    assert r.returncode == 0, r.stderr
    ours: list[list[int]] = []
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == bytes(data)
        off = 0
        while off < node.length:
            s = await node.block_status(off, node.length - off)
            if s.flags & Status.DATA:
                assert s.offset is not None
                if ours and ours[-1][0] + ours[-1][1] == off and \
                        ours[-1][2] + ours[-1][1] == s.offset:
                    ours[-1][1] += s.length
                else:
                    ours.append([off, s.length, s.offset])
            off += s.length
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "qcow", str(img)).stdout)
    assert ours == [[m["start"], m["length"], m["offset"]] for m in mapped if m["data"]]


def _compressed_image(path: Path) -> None:
    """qemu-img 7.2 fails to write compressed qcow images (convert -c exits
    1): one is made by hand, cluster 1 compressed (raw deflate, window 2^12),
    which qemu-io reads."""
    make_image(path, MiB)
    b = bytearray(path.read_bytes())
    l1_off = struct.unpack_from(">Q", b, 40)[0]
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    comp = c.compress(b"abcd" * 1024) + c.flush()
    l2 = len(b)
    b += bytes(4096)
    struct.pack_into(">Q", b, l1_off, l2)
    coff = len(b)
    b += comp
    struct.pack_into(">Q", b, l2 + 8, (1 << 63) | (len(comp) << (63 - 12)) | coff)
    path.write_bytes(b)


async def test_compressed(tmp_path):
    """A compressed cluster reads as qemu-io reads it; a write into part of
    it decompresses it into a new cluster first, as qemu-io does (same
    file); a corrupt one is an I/O error."""
    ours, theirs = tmp_path / "ours.qcow", tmp_path / "theirs.qcow"
    _compressed_image(ours)
    _compressed_image(theirs)
    async with opened(ours, read_only=True) as node:
        assert bytes(await node.read(4096, 4096)) == b"abcd" * 1024
        s = await node.block_status(4096, 4096)
        assert s.flags == Status.DATA | Status.ALLOCATED and s.offset is None
    assert raw_of(ours, tmp_path)[4096:8192] == b"abcd" * 1024
    r = qemu_io("-f", "qcow", "-c", "write -P 9 5000 100", "-c", "write -P 8 8192 4096",
                str(theirs))
    assert r.returncode == 0, r.stderr
    async with opened(ours) as node:
        await node.write(5000, b"\x09" * 100)
        await node.write(8192, b"\x08" * 4096)
    assert ours.read_bytes() == theirs.read_bytes()
    bad = tmp_path / "bad.qcow"
    _compressed_image(bad)
    with bad.open("r+b") as fh:
        fh.seek(-5, 2)
        fh.write(b"\xff\xff\xff\xff\xff")
    r = qemu_io("-r", "-f", "qcow", "-c", "read 4096 512", str(bad))
    assert "Input/output error" in r.stdout + r.stderr
    async with opened(bad, read_only=True) as node:
        with pytest.raises(OSError):
            await node.read(4096, 512)


@pytest.mark.parametrize("size,backing", [(5 * MiB, None), (100 * 1024 + 512, None),
                                          (1 << 40, None), (5 * MiB, "base.raw")])
async def test_create_like_qemu_img(tmp_path, size, backing):
    ours = tmp_path / "ours.qcow"
    ours.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    await create_qcow(f, size, backing)
    await graph.close_all()
    theirs = tmp_path / "theirs.qcow"
    args = ["-b", backing, "-F", "raw"] if backing else []
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    r = qemu_img("create", "-q", "-f", "qcow", "-u", *args, str(theirs), str(size))
    assert r.returncode == 0, r.stderr
    assert ours.read_bytes() == theirs.read_bytes()


async def test_create_errors(tmp_path):
    img = tmp_path / "e.qcow"
    img.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    try:
        with pytest.raises(GenericError, match="^Image size is too small, cannot be zero length$"):
            await create_qcow(f, 0)
        with pytest.raises(GenericError, match="^Unsupported encryption format$"):
            await create_qcow(f, MiB, encrypt={"format": "luks", "key-secret": "x"})
    finally:
        await graph.close_all()


def _patch(path: Path, offset: int, fmt: str, value: object) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(">" + fmt, value))


CORRUPT = {
    "magic": (0, "I", 0x12345678, "Image not in qcow format"),
    "version": (4, "I", 2, "qcow (v1) does not support qcow version 2"),
    "size": (24, "Q", 1, "Image size is too small (must be at least 2 bytes)"),
    "cluster-bits": (32, "B", 17, "Cluster size must be between 512 and 64k"),
    "l2-bits": (33, "B", 5, "L2 table size must be between 512 and 64k"),
    "crypt": (36, "I", 2, "invalid encryption method in qcow header"),
    "too-large": (24, "Q", (1 << 64) - 4096, "Image too large"),
    "l1-too-large": (24, "Q", 1 << 62, "Image too large"),
    "backing-name": (16, "I", 1024, "Backing file name too long"),
}


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt_header(tmp_path, what):
    img = tmp_path / "bad.qcow"
    make_image(img, 8 * MiB)
    off, fmt, value, msg = CORRUPT[what]
    _patch(img, off, fmt, value)
    if what == "backing-name":
        _patch(img, 8, "Q", 48)
    r = qemu_img("info", "-f", "qcow", str(img))
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


async def test_encryption_errors(tmp_path):
    img = tmp_path / "enc.qcow"
    make_image(img, MiB, encrypted=True)
    graph = BlockGraph()
    try:
        with pytest.raises(GenericError,
                           match="^Parameter 'encrypt.key-secret' is required for cipher$"):
            await graph.add({"driver": "qcow", "node-name": "a",
                             "file": {"driver": "file", "filename": str(img)}})
        with pytest.raises(GenericError, match="^Header reported 'aes' encryption format but "
                                               "options specify 'luks'$"):
            await graph.add({"driver": "qcow", "node-name": "b", "encrypt": {"format": "luks"},
                             "file": {"driver": "file", "filename": str(img)}})
    finally:
        await graph.close_all()


@pytest.mark.parametrize("cut", [0, 20, 48, 52, 600, 5000])
async def test_truncated(tmp_path, cut):
    """A file cut inside the header, the L1 table, an L2 table or data: the
    missing bytes read as zeroes, as in QEMU."""
    img = tmp_path / "short.qcow"
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(5, 64 * 1024))
    assert qemu_img("convert", "-f", "raw", "-O", "qcow", str(raw), str(img)).returncode == 0
    with img.open("r+b") as fh:
        fh.truncate(cut)
    expect = tmp_path / "expect.raw"
    r = qemu_img("convert", "-f", "qcow", "-O", "raw", str(img), str(expect))
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            assert bytes(await node.read(0, node.length)) == expect.read_bytes()
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e))


async def test_entries_outside_the_file(tmp_path):
    """An L1 entry and an L2 entry pointing past the end of the file read as
    zeroes (QEMU pads reads past the end); an unaligned cluster offset and an
    L2 table beyond BDRV_MAX_LENGTH are I/O errors, as qemu-io finds."""
    img = tmp_path / "out.qcow"
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(3, 6 << 20))  # three L2 tables of 2 MiB
    assert qemu_img("convert", "-f", "raw", "-O", "qcow", str(raw), str(img)).returncode == 0
    data = img.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0]
    _patch(img, l2_off + 8, "Q", 1 << 40)  # cluster 1 far past the end
    _patch(img, l1_off + 8, "Q", 1 << 41)  # the second L2 table too
    expect = tmp_path / "expect.raw"
    assert qemu_img("convert", "-f", "qcow", "-O", "raw", str(img), str(expect)).returncode == 0
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(0, node.length)) == expect.read_bytes()
    _patch(img, l2_off + 16, "Q", (1 << 40) + 3)  # unaligned
    _patch(img, l1_off + 16, "Q", (1 << 63) + 4096)  # beyond BDRV_MAX_LENGTH
    for at in (2 * 4096, 4 << 20):
        r = qemu_io("-r", "-f", "qcow", "-c", f"read {at} 512", str(img))
        assert "Input/output error" in r.stdout + r.stderr, (at, r.stdout)
        async with opened(img, read_only=True) as node:
            with pytest.raises(OSError):
                await node.read(at, 512)


@pytest.mark.parametrize("first", ["unaligned", "aligned"])
def test_padded_write_never_loses_an_overlapping_write(tmp_path, first):
    """A write that is not whole sectors is read-modify-written; an aligned
    write to the same sector started meanwhile (or before it, still in
    flight) must not be overwritten by the sector as it was read (the
    generic layer's serialising requests): the sector ends as one write or
    the other applied last, never as if the aligned write had not been."""
    img = tmp_path / "d.qcow"
    make_image(img, MiB)

    async def run() -> bytes:
        graph = BlockGraph()
        node = await graph.add({"driver": "qcow", "node-name": "q",
                                "file": {"driver": "file", "filename": str(img)}})
        await node.write(0, b"\x11" * 4096)  # the cluster exists
        try:
            async with trio.open_nursery() as n:
                writes = {"unaligned": lambda: node.write(100, b"\x22" * 10),
                          "aligned": lambda: node.write(0, b"\x33" * 512)}
                second = "aligned" if first == "unaligned" else "unaligned"
                n.start_soon(writes[first])
                n.start_soon(writes[second])
            return bytes(await node.read(0, 512))
        finally:
            await graph.close_all()

    got = trio.run(run)
    aligned_last = b"\x33" * 512
    unaligned_last = b"\x33" * 100 + b"\x22" * 10 + b"\x33" * 402
    assert got in (aligned_last, unaligned_last), got[:120]
