"""The qed driver: the conformance suite and a hypothesis workload on images
qemu-img made (default and small clusters), each then clean in ``qemu-img
check`` and equal byte for byte to the model through ``qemu-img convert -O
raw``; images from ``qemu-img convert -O qed`` read and map as qemu-img
maps them; backing files (raw, probed qcow2) with copy-on-write;
:func:`create_qed` lays images out as qemu-img does; the need-check flag
and the repair at open; corrupt headers, truncated files and tables
pointing outside the file give QEMU's messages, and nothing is read past
the file."""

from __future__ import annotations

import contextlib
import errno
import json
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
from qsd_trio.nodes.qed import QED_F_NEED_CHECK, create_qed
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .workload import run_workload

MiB = 1 << 20
SMALL = ("-o", "cluster_size=4096,table_size=2")


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, *opts: str) -> None:
    r = qemu_img("create", "-q", "-f", "qed", *opts, str(path), str(size))
    assert r.returncode == 0, r.stderr


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img check finds the image clean and reads exactly ``model``."""
    r = qemu_img("check", "-f", "qed", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    raw = tmp_path / "check.raw"
    r = qemu_img("convert", "-f", "qed", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


def features(path: Path) -> int:
    with path.open("rb") as fh:
        fh.seek(16)
        return int(struct.unpack("<Q", fh.read(8))[0])


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False, **extra):
    graph = BlockGraph()
    node = await graph.add({"driver": "qed", "node-name": "top", "read-only": read_only,
                            "file": {"driver": "file", "filename": str(path)}, **extra})
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("opts", [(), SMALL], ids=["64k", "4k"])
async def test_conformance(tmp_path, opts):
    img = tmp_path / "img.qed"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        make_image(img, size, *opts)
        async with opened(img, read_only=read_only) as node:
            yield node

    async def after_close(model):
        assert not features(img) & QED_F_NEED_CHECK
        check_against(img, model, tmp_path)

    await check_block_node(factory, size=4 * MiB, after_close=after_close, can_resize=False)


SIZE = 3 * MiB + 8192
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 300_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 400_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, small=st.booleans())
def test_random_workload(workload, small):
    """Writes, zero writes (whole clusters become zero clusters) and
    discards (nothing: qed has none), concurrent in pairs, against a model;
    then qemu-img's view."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.qed"
        make_image(img, SIZE, *(SMALL if small else ()))

        def clip(off, n):
            off = min(off, SIZE)
            return off, min(n, SIZE - off)

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, SIZE)

        model = trio.run(main)
        check_against(img, model, tmp)


async def _map(node) -> list[list]:
    ours: list[list] = []
    off = 0
    while off < node.length:
        s = await node.block_status(off, node.length - off)
        key = [bool(s.flags & Status.DATA), bool(s.flags & Status.ZERO)]
        if ours and ours[-1][2:] == key:
            ours[-1][1] += s.length
        else:
            ours.append([off, s.length, *key])
        off += s.length
    return ours


def _their_map(path: Path, fmt: str = "qed") -> list[list]:
    theirs = json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout)
    out: list[list] = []
    for m in theirs:
        key = [m["data"], m["zero"]]
        if out and out[-1][2:] == key:
            out[-1][1] += m["length"]
        else:
            out.append([m["start"], m["length"], *key])
    return out


@pytest.mark.parametrize("opts", [(), SMALL], ids=["64k", "4k"])
async def test_reads_qemu_img_convert(tmp_path, opts):
    """An image qemu-img converted from raw data reads back as that data and
    maps as qemu-img maps it."""
    raw = tmp_path / "src.raw"
    data = bytearray(5 * MiB)
    data[100:5000] = pattern(1, 4900)
    data[3 * MiB + 7:3 * MiB + 70000] = pattern(2, 69993)
    raw.write_bytes(data)
    img = tmp_path / "c.qed"
    r = qemu_img("convert", "-f", "raw", "-O", "qed", *opts, str(raw), str(img))
    assert r.returncode == 0, r.stderr
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == bytes(data)
        assert await _map(node) == _their_map(img)
        assert node.info_extra() == {"cluster-size": 4096 if opts else 65536,
                                     "dirty-flag": False}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_backing(tmp_path, fmt):
    """A backing file named in the header (raw: QED_F_BACKING_FORMAT_NO_PROBE;
    qcow2: probed) shows through where nothing is allocated; a write copies
    the rest of its clusters from it; a zero write makes zero clusters;
    reads past the backing file's end are zeroes."""
    base = tmp_path / f"base.{fmt}"
    assert qemu_img("create", "-q", "-f", fmt, str(base), str(2 * MiB)).returncode == 0
    r = qemu_io("-f", fmt, "-c", "write -P 0xaa 0 2M", str(base))
    assert r.returncode == 0, r.stderr
    img = tmp_path / "top.qed"
    make_image(img, 3 * MiB, "-b", base.name, "-F", fmt)
    model = bytearray(b"\xaa" * (2 * MiB) + bytes(MiB))
    async with opened(img) as node:
        info = node.info_extra()
        assert info["backing-filename"] == base.name
        assert info["full-backing-filename"] == str(base)
        assert info.get("backing-filename-format") == ("raw" if fmt == "raw" else None)
        assert node.backing is not None and node.backing.driver == fmt
        assert bytes(await node.read(0, len(model))) == bytes(model)
        await node.write(70000, b"\x11" * 1000)
        model[70000:71000] = b"\x11" * 1000
        await node.write(2 * MiB - 500, b"\x22" * 1000)
        model[2 * MiB - 500:2 * MiB + 500] = b"\x22" * 1000
        await node.write_zeroes(MiB, 128 * 1024)
        model[MiB:MiB + 128 * 1024] = bytes(128 * 1024)
        # into a zero cluster: the rest of it stays zero (QEMU 7.2 copies
        # the backing file's bytes there, undoing the zero write)
        await node.write(MiB + 65536 + 512, b"\x33" * 512)
        model[MiB + 65536 + 512:MiB + 65536 + 1024] = b"\x33" * 512
        assert bytes(await node.read(0, len(model))) == bytes(model)
        # with a backing file the allocation is flushed, not flagged
        assert not node.h["features"] & QED_F_NEED_CHECK
        st0 = await node.block_status(0, MiB)
        assert st0.depth == 2 and st0.flags & Status.DATA and st0.length == 65536
        st1 = await node.block_status(MiB, MiB)
        assert st1.flags == Status.ZERO | Status.ALLOCATED and st1.length == 65536
        # past the backing file's end: zeroes allocated in it, as QEMU's
        # bdrv_co_common_block_status_above says
        st2 = await node.block_status(2 * MiB + 65536, 65536)
        assert st2.flags == Status.ZERO | Status.ALLOCATED and st2.depth == 2
    check_against(img, model, tmp_path)


async def test_backing_missing(tmp_path):
    img = tmp_path / "top.qed"
    make_image(img, MiB, "-b", "nowhere.raw", "-F", "raw", "-u")
    with pytest.raises(GenericError, match="^Could not open backing file: Could not open "
                                           f"'{tmp_path}/nowhere.raw': No such file"):
        async with opened(img, read_only=True):
            pass
    async with opened(img, read_only=True, backing=None) as node:
        assert node.backing is None
        assert bytes(await node.read(0, 4096)) == bytes(4096)


@pytest.mark.parametrize("opts", [
    {}, {"cluster_size": 4096, "table_size": 2}, {"table_size": 16},
    {"backing_file": "b.raw", "backing_fmt": "raw"}, {"backing_file": "/x/y.qcow2",
                                                      "backing_fmt": "qcow2"},
])
@pytest.mark.parametrize("size", [0, 10 * MiB, 1 << 40])
async def test_create_like_qemu_img(tmp_path, opts, size):
    """create_qed writes what qemu-img create writes, byte for byte."""
    theirs = tmp_path / "theirs.qed"
    o = [f"{k}={v}" for k, v in opts.items()]
    args = ["-o", ",".join(o)] if o else []
    if "backing_file" in opts:
        args.append("-u")
    r = qemu_img("create", "-q", "-f", "qed", *args, str(theirs), str(size))
    ours = tmp_path / "ours.qed"
    ours.write_bytes(b"junk" * 100000)  # emptied first
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    try:
        await create_qed(f, size, **opts)
    except GenericError as e:
        assert r.returncode != 0 and str(e) in r.stderr, (str(e), r.stderr)
        return
    finally:
        await graph.close_all()
    assert r.returncode == 0, r.stderr
    assert ours.read_bytes() == theirs.read_bytes()


async def test_change_backing_file(tmp_path):
    """set_header_names (bdrv_qed_change_backing_file) writes what
    ``qemu-img rebase -u`` writes."""
    ours = tmp_path / "ours.qed"
    make_image(ours, MiB)
    theirs = tmp_path / "theirs.qed"
    theirs.write_bytes(ours.read_bytes())
    r = qemu_img("rebase", "-u", "-f", "qed", "-b", "b.raw", "-F", "raw", str(theirs))
    assert r.returncode == 0, r.stderr
    async with opened(ours) as node:
        await node.set_header_names(backing_file="b.raw", backing_fmt="raw")
        assert node.info_extra()["backing-filename-format"] == "raw"
    assert ours.read_bytes() == theirs.read_bytes()
    r = qemu_img("rebase", "-u", "-f", "qed", "-b", "", str(theirs))
    assert r.returncode == 0, r.stderr
    async with opened(ours, backing=None) as node:
        await node.set_header_names(backing_file=None, backing_fmt=None)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_create_errors(tmp_path):
    img = tmp_path / "e.qed"
    img.write_bytes(b"keep")
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    try:
        with pytest.raises(GenericError, match=r"^QED cluster size must be within range "
                                               r"\[4096, 67108864\] and power of 2$"):
            await create_qed(f, MiB, cluster_size=3 * 4096)
        with pytest.raises(GenericError, match=r"^QED table size must be within range "
                                               r"\[1, 16\] and power of 2$"):
            await create_qed(f, MiB, table_size=32)
        with pytest.raises(GenericError, match="^QED image size must be a non-zero multiple "
                                               "of cluster size and less than "
                                               "70368744177664 bytes$"):
            await create_qed(f, MiB + 1)
        with pytest.raises(GenericError, match="less than 70368744177664 bytes$"):
            await create_qed(f, 1 << 47)
    finally:
        await graph.close_all()
    assert img.read_bytes() == b"keep"


def _patch(path: Path, offset: int, data: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(b)


def qemu_open_error(path: Path) -> str:
    r = qemu_img("info", "-f", "qed", str(path))
    assert r.returncode != 0
    return r.stderr


# (header offset, bytes, message); on a 10 MiB image with 64 KiB clusters
CORRUPT = {
    "magic": (0, b"QEX\0", "Image not in QED format"),
    "features": (16, struct.pack("<Q", 0x108), "Unsupported QED features: 108"),
    "cluster-size": (4, struct.pack("<I", 3 << 16), "QED cluster size is invalid"),
    "cluster-small": (4, struct.pack("<I", 2048), "QED cluster size is invalid"),
    "cluster-large": (4, struct.pack("<I", 128 << 20), "QED cluster size is invalid"),
    "table-size": (8, struct.pack("<I", 3), "QED table size is invalid"),
    "table-large": (8, struct.pack("<I", 32), "QED table size is invalid"),
    # a one-cluster table never passes qed_check_table_offset
    "table-one": (8, struct.pack("<I", 1), "QED table offset is invalid"),
    "image-size": (48, struct.pack("<Q", 10 * MiB + 1), "QED image size is invalid"),
    "image-huge": (48, struct.pack("<Q", 1 << 62), "QED image size is invalid"),
    "l1-unaligned": (40, struct.pack("<Q", 65536 + 512), "QED table offset is invalid"),
    "l1-outside": (40, struct.pack("<Q", 1 << 30), "QED table offset is invalid"),
    "l1-zero": (40, struct.pack("<Q", 0), "QED table offset is invalid"),
    "l1-wraps": (40, struct.pack("<Q", (1 << 64) - 65536), "QED table offset is invalid"),
    "header-covers-l1": (12, struct.pack("<I", 2), "QED table offset is invalid"),
    "backing-range": (16, struct.pack("<QQQQQII", 1, 0, 0, 65536, 10 * MiB, 65000, 1000),
                      "QED backing filename offset is invalid"),
    "backing-long": (16, struct.pack("<QQQQQII", 1, 0, 0, 65536, 10 * MiB, 64, 5000),
                     "Failed to read backing filename"),
}


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt(tmp_path, what):
    """Each check of bdrv_qed_do_open, with QEMU's message (the text qemu-img
    prints for the same file)."""
    off, data, msg = CORRUPT[what]
    img = tmp_path / "bad.qed"
    make_image(img, 10 * MiB)
    _patch(img, off, data)
    assert msg in qemu_open_error(img)
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


async def test_header_size_too_large(tmp_path):
    img = tmp_path / "bad.qed"
    make_image(img, 10 * MiB)
    # a header of 2^16 clusters of 64 KiB overflows uint32_t; the L1 table
    # must then lie past it for the table check to pass first
    _patch(img, 12, struct.pack("<I", 0x10000))
    _patch(img, 40, struct.pack("<Q", 0x10000 * 65536))
    with img.open("r+b") as fh:
        fh.truncate(0x10000 * 65536 + 5 * 65536)
    assert "QED header size is too large" in qemu_open_error(img)
    with pytest.raises(GenericError, match="^QED header size is too large$"):
        async with opened(img, read_only=True):
            pass


@pytest.mark.parametrize("cut", [0, 2, 63, 64, 65536, 65536 + 4096, 5 * 65536 - 1,
                                 5 * 65536, 5 * 65536 + 100, -65536, -1])
async def test_truncated(tmp_path, cut):
    """A file cut short: the open fails with the message qemu-img gives for
    the same file, or reads fail (EINVAL) where qemu-img's do, or both read
    the same data."""
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(4, 3 * MiB))
    img = tmp_path / "short.qed"
    assert qemu_img("convert", "-f", "raw", "-O", "qed", str(raw), str(img)).returncode == 0
    with img.open("r+b") as fh:
        fh.truncate(cut if cut >= 0 else img.stat().st_size + cut)
    r = qemu_img("info", "-f", "qed", str(img))
    out = tmp_path / "want.raw"
    conv = qemu_img("convert", "-f", "qed", "-O", "raw", str(img), str(out))
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            try:
                got = bytes(await node.read(0, node.length))
            except OSError as e:
                assert e.errno == errno.EINVAL
                assert conv.returncode != 0 and "Invalid argument" in conv.stderr
                return
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e)), (r.stderr, str(e))
        return
    assert conv.returncode == 0, conv.stderr
    assert got == out.read_bytes()


@pytest.mark.parametrize("where", ["l1", "l2", "l2-unaligned"])
async def test_tables_outside_file(tmp_path, where):
    """An L1 entry or L2 entry pointing past the file (or between clusters):
    the read fails with EINVAL as QEMU's does; nothing is read past the file;
    other clusters still read."""
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(5, MiB))
    img = tmp_path / "t.qed"
    assert qemu_img("convert", "-f", "raw", "-O", "qed", str(raw), str(img)).returncode == 0
    # 64 KiB clusters, L1 at 64 KiB, the first L2 table at 320 KiB
    l2 = struct.unpack_from("<Q", img.read_bytes(), 65536)[0]
    if where == "l1":
        _patch(img, 65536, struct.pack("<Q", 1 << 40))
    else:
        bad = (1 << 40) if where == "l2" else l2 + 4 * 65536 + 512
        _patch(img, l2 + 8, struct.pack("<Q", bad))
    conv = qemu_img("convert", "-f", "qed", "-O", "raw", str(img), str(tmp_path / "o.raw"))
    assert conv.returncode != 0 and "Invalid argument" in conv.stderr
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError) as e:
            await node.read(65536, 512)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            await node.block_status(65536, 512)
        if where != "l1":
            assert bytes(await node.read(0, 65536)) == pattern(5, MiB)[:65536]


async def test_need_check_flag(tmp_path):
    """QED_F_NEED_CHECK is on disk from the first allocating write until the
    node is drained (QEMU's need-check timer, stopped in
    qemu-storage-daemon, fires on a drain) or closed; a write in place sets
    nothing."""
    img = tmp_path / "n.qed"
    make_image(img, 4 * MiB)
    async with opened(img) as node:
        await node.write(0, b"a" * 4096)
        assert features(img) & QED_F_NEED_CHECK
        assert node.info_extra()["dirty-flag"] is True
        with trio.fail_after(5):
            async with node.drained():
                pass
        assert not features(img) & QED_F_NEED_CHECK
        assert node.info_extra()["dirty-flag"] is False
        await node.write(100, b"b" * 100)  # in place
        assert not features(img) & QED_F_NEED_CHECK
        await node.write(MiB, b"c" * 100)
        assert features(img) & QED_F_NEED_CHECK
    assert not features(img) & QED_F_NEED_CHECK
    check_against(img, b"a" * 100 + b"b" * 100 + b"a" * 3896 + bytes(MiB - 4096) + b"c" * 100
                  + bytes(3 * MiB - 100), tmp_path)


async def test_need_check_repair(tmp_path):
    """A read-write open of an image left with QED_F_NEED_CHECK runs
    qed_check: an L2 entry past the end of the file is dropped, the flag
    cleared; a read-only open changes nothing and reports the flag."""
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(6, MiB))
    img = tmp_path / "r.qed"
    assert qemu_img("convert", "-f", "raw", "-O", "qed", str(raw), str(img)).returncode == 0
    l2 = struct.unpack_from("<Q", img.read_bytes(), 65536)[0]
    _patch(img, l2 + 8, struct.pack("<Q", 1 << 40))
    _patch(img, 16, struct.pack("<Q", QED_F_NEED_CHECK))
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        assert node.info_extra()["dirty-flag"] is True
        with pytest.raises(OSError):
            await node.read(65536, 512)
    assert img.read_bytes() == before
    async with opened(img) as node:
        assert node.info_extra()["dirty-flag"] is False
        assert bytes(await node.read(65536, 65536)) == bytes(65536)
    assert not features(img) & QED_F_NEED_CHECK
    # the cluster the entry lost is a leak, as after QEMU's own repair
    r = qemu_img("check", "-f", "qed", str(img))
    assert r.returncode == 3 and "1 leaked clusters were found" in r.stdout, r.stdout
    want = bytearray(pattern(6, MiB))
    want[65536:131072] = bytes(65536)
    out = tmp_path / "o.raw"
    assert qemu_img("convert", "-f", "qed", "-O", "raw", str(img), str(out)).returncode == 0
    assert out.read_bytes() == bytes(want)
    # QEMU repairs the same image to the same bytes
    theirs = tmp_path / "theirs.qed"
    theirs.write_bytes(before)
    r2 = qemu_io("-f", "qed", "-c", "read 0 512", str(theirs))
    assert r2.returncode == 0, r2.stderr
    assert theirs.read_bytes() == img.read_bytes()


async def test_truncate(tmp_path):
    img = tmp_path / "g.qed"
    make_image(img, MiB)
    async with opened(img) as node:
        await node.write(MiB - 3, b"end")
        await node.truncate(3 * MiB)
        assert node.length == 3 * MiB
        with pytest.raises(GenericError, match="^Shrinking images is currently not supported$"):
            await node.truncate(2 * MiB)
        with pytest.raises(GenericError, match="^Invalid image size specified$"):
            await node.truncate(3 * MiB + 1)
        with pytest.raises(GenericError, match="^Unsupported preallocation mode 'full'$"):
            await node.truncate(4 * MiB, prealloc="full")
    check_against(img, bytes(MiB - 3) + b"end" + bytes(2 * MiB), tmp_path)


async def test_read_only_never_written(tmp_path):
    img = tmp_path / "ro.qed"
    make_image(img, 4 * MiB)
    _patch(img, 32, struct.pack("<Q", 0x80))  # an unknown autoclear bit stays
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError):
            await node.write(0, b"x" * 512)
        await node.read(0, node.length)
    assert img.read_bytes() == before
    async with opened(img):
        pass
    assert struct.unpack_from("<Q", img.read_bytes(), 32)[0] == 0


async def test_allocation_layout(tmp_path):
    """An allocating write: the data cluster at the end of the file, then a
    new L2 table after it, written whole, then its L1 entry."""
    img = tmp_path / "a.qed"
    make_image(img, 8 * MiB)
    async with opened(img) as node:
        await node.write(65536 + 512, b"\x42" * 512)
    b = img.read_bytes()
    data, l2 = 5 * 65536, 6 * 65536
    assert len(b) == l2 + 4 * 65536
    assert struct.unpack_from("<Q", b, 65536)[0] == l2
    assert struct.unpack_from("<Q", b, l2 + 8)[0] == data
    assert b[data:data + 512] == bytes(512) and b[data + 512:data + 1024] == b"\x42" * 512
