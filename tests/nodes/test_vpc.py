"""The vpc driver: the conformance suite and a hypothesis workload on
dynamic and fixed images qemu-img made, each compared afterwards byte for
byte with ``qemu-img convert -O raw`` and ``qemu-img info`` (QEMU has no
check for vpc); images made by ``qemu-img convert -O vpc`` read back;
:func:`create_vpc` lays images out as qemu-img does, with QEMU's geometry
rounding; corrupt images refused with QEMU's messages, never read past the
file."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.nodes.vpc import DEFAULT_BLOCK_SIZE, create_vpc, rounded_size, vpc_checksum
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .workload import run_workload

BLOCK = DEFAULT_BLOCK_SIZE


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, *, fixed: bool = False, force: bool = False) -> None:
    opts = ["-o", f"subformat={'fixed' if fixed else 'dynamic'},force_size={'on' if force else 'off'}"]
    r = qemu_img("create", "-q", "-f", "vpc", *opts, str(path), str(size))
    assert r.returncode == 0, r.stderr


def geometric(size: int) -> int:
    """The size qemu-img gives an image asked to be ``size`` bytes."""
    return rounded_size(size, False)[0] * 512


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img opens the image with the model's size and reads exactly ``model``."""
    r = qemu_img("info", "--output=json", "-f", "vpc", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virtual-size"] == len(model)
    raw = tmp_path / "check.raw"
    r = qemu_img("convert", "-f", "vpc", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False):
    graph = BlockGraph()
    node = await graph.add({"driver": "vpc", "node-name": "top", "read-only": read_only,
                            "file": {"driver": "file", "filename": str(path)}})
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
async def test_conformance(tmp_path, fixed):
    img = tmp_path / "img.vhd"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        make_image(img, size, fixed=fixed)
        async with opened(img, read_only=read_only) as node:
            yield node

    async def after_close(model):
        check_against(img, model, tmp_path)

    await check_block_node(factory, size=geometric(4 << 20), after_close=after_close,
                           can_resize=False)


SIZE = geometric(3 * BLOCK + 4096)
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 2_500_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=15)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, fixed=st.booleans())
def test_random_workload(workload, fixed):
    """Writes, zero writes and discards (which leave the data: vpc has no
    discard), concurrent in pairs, against a model; then qemu-img's view."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.vhd"
        make_image(img, SIZE, fixed=fixed)

        def clip(off, n):
            off = min(off, SIZE)
            return off, min(n, SIZE - off)

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, SIZE)

        model = trio.run(main)
        check_against(img, model, tmp)


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
async def test_reads_qemu_img_convert(tmp_path, fixed):
    """An image qemu-img converted from raw data reads back as that data
    (the size rounded up to the geometry), and block status maps what
    qemu-img map maps."""
    raw = tmp_path / "src.raw"
    data = bytearray(geometric(5 * BLOCK))
    data[100:5000] = pattern(1, 4900)
    data[3 * BLOCK + 7:3 * BLOCK + 70000] = pattern(2, 69993)
    raw.write_bytes(data)
    img = tmp_path / "c.vhd"
    sub = "fixed" if fixed else "dynamic"
    r = qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", str(raw), str(img))
    assert r.returncode == 0, r.stderr
    theirs = json.loads(qemu_img("map", "--output=json", "-f", "vpc", str(img)).stdout)
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == bytes(data)
        ours = []
        off = 0
        while off < node.length:
            s = await node.block_status(off, node.length - off)
            ours.append((off, s.length, bool(s.flags & Status.DATA), bool(s.flags & Status.ZERO)))
            off += s.length
    merged: list[list] = []
    for o, n, dt, z in ours:
        if merged and merged[-1][2:] == [dt, z]:
            merged[-1][1] += n
        else:
            merged.append([o, n, dt, z])
    assert [[m["start"], m["length"], m["data"], m["zero"]] for m in theirs] == merged
    if not fixed:
        allocated = {o // BLOCK for o, _, dt, _ in ours if dt}
        assert allocated == {0, 3}


# a fixed image of 200 GiB would be a large sparse file: dynamic covers that size
@pytest.mark.parametrize(("size", "sub"), [
    *((size, sub) for size in (0, 512, 10 << 20, 4212736, 1 << 30)
      for sub in ("dynamic", "fixed")),
    (200 << 30, "dynamic")])
async def test_create_like_qemu_img(tmp_path, size, sub):
    """create_vpc lays the image out as qemu-img create does (all but the
    timestamp, the random UUID and the checksum that covers them), for a size
    qemu-img rounds to the geometry and then creates."""
    size = geometric(size)
    ours = tmp_path / "ours.vhd"
    ours.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    await create_vpc(f, size, sub)
    await graph.close_all()
    theirs = tmp_path / "theirs.vhd"
    make_image(theirs, size, fixed=sub == "fixed")
    assert ours.stat().st_size == theirs.stat().st_size
    if sub == "fixed":
        # the data part is a hole in both; only the footer after it counts
        a, b = _tail(ours), _tail(theirs)
    else:
        a, b = ours.read_bytes(), theirs.read_bytes()

    def masked(img: bytes) -> bytes:
        out = bytearray(img)
        for at in {0, len(img) - 512}:
            if out[at:at + 8] == b"conectix":
                out[at + 24:at + 28] = bytes(4)  # timestamp
                out[at + 64:at + 68] = bytes(4)  # checksum
                out[at + 68:at + 84] = bytes(16)  # uuid
        return bytes(out)

    assert masked(a) == masked(b)
    if sub == "fixed" and size == 0:
        # the footer is then at offset 0, where it says "dynamic image" to
        # QEMU's vpc_open as to ours
        assert "Error reading dynamic VHD header" in qemu_open_error(ours)
        with pytest.raises(GenericError, match="^Error reading dynamic VHD header$"):
            async with opened(ours, read_only=True):
                pass
    elif size <= 16 << 20:
        check_against(ours, bytes(size), tmp_path)
    else:
        r = qemu_img("info", "--output=json", "-f", "vpc", str(ours))
        assert json.loads(r.stdout)["virtual-size"] == size, r.stderr


def _tail(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-512, 2)
        return fh.read()


async def test_create_force_size(tmp_path):
    """force-size keeps the size asked for (in whole sectors) with the
    maximum geometry and creator 'qem2', so the size comes from current_size."""
    ours = tmp_path / "f.vhd"
    ours.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    await create_vpc(f, 10 << 20, "dynamic", force_size=True)
    await graph.close_all()
    b = ours.read_bytes()
    assert b[28:32] == b"qem2"
    assert struct.unpack_from(">HBB", b, 56) == (65535, 16, 255)
    check_against(ours, bytes(10 << 20), tmp_path)
    async with opened(ours, read_only=True) as node:
        assert node.length == 10 << 20


async def test_create_errors(tmp_path):
    img = tmp_path / "e.vhd"
    img.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    try:
        with pytest.raises(GenericError, match="^The requested image size cannot be "
                                               "represented in CHS geometry$"):
            await create_vpc(f, 10 << 20)
        with pytest.raises(GenericError, match="cannot be represented in CHS geometry"):
            await create_vpc(f, (10 << 20) + 1, force_size=True)
        with pytest.raises(GenericError, match="^Disk size is too large, max size is 2040 GiB$"):
            await create_vpc(f, 2041 << 30, force_size=True)
        with pytest.raises(GenericError, match="^Disk size is too large, max size is 2040 GiB$"):
            await create_vpc(f, 2041 << 30)
    finally:
        await graph.close_all()
    assert img.stat().st_size == 0


def _patch(path: Path, offset: int, data: bytes, *, fix_footer: bool = True) -> None:
    """Write ``data`` at ``offset``; then the checksum of the footer at the
    start and at the end is made right again (unless ``fix_footer`` is off)."""
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    if fix_footer:
        for at in {0, len(b) - 512}:
            if b[at:at + 8] == b"conectix":
                b[at + 64:at + 68] = bytes(4)
                b[at + 64:at + 68] = struct.pack(">I", vpc_checksum(b[at:at + 512]))
    path.write_bytes(b)


def qemu_open_error(path: Path) -> str:
    r = qemu_img("info", "-f", "vpc", str(path))
    assert r.returncode != 0
    return r.stderr


# (fixed image?, offset, bytes, fix the checksum?, message)
CORRUPT = {
    "cookie": (True, -512, b"xonectix", True, "invalid VPC image"),
    "checksum": (False, 64, b"\x00\x00\x00\x01", False, "Incorrect header checksum"),
    "dyn-magic": (False, 512, b"cxsparsX", True, "Invalid header magic"),
    "block-size": (False, 512 + 32, struct.pack(">I", 3 << 20), True, "Invalid block size 3145728"),
    "block-size-small": (False, 512 + 32, struct.pack(">I", 256), True, "Invalid block size 256"),
    "table-small": (False, 512 + 28, struct.pack(">I", 2), True, "Page table too small"),
    "table-huge": (False, 512 + 28, struct.pack(">I", 0x7FFFFFFF), True,
                   "Max Table Entries too large (2147483647)"),
    "table-negative": (False, 512 + 28, struct.pack(">I", 0x80000000), True,
                       "Max Table Entries too large (-2147483648)"),
    "bat-outside": (False, 1536 + 4, struct.pack(">I", 0x100000), True,
                    "block-vpc: free_data_block_offset points after the end of file. "
                    "The image has been truncated."),
    "bat-offset-outside": (False, 512 + 16, struct.pack(">Q", 1 << 40), True,
                           "block-vpc: free_data_block_offset points after the end of file. "
                           "The image has been truncated."),
    "bat-offset-absurd": (False, 512 + 16, struct.pack(">Q", (1 << 64) - 512), True,
                          "Error reading pagetable"),
    "dyn-offset-absurd": (False, 16, struct.pack(">Q", (1 << 64) - 1), True,
                          "Error reading dynamic VHD header"),
    "dyn-offset-outside": (False, 16, struct.pack(">Q", 1 << 40), True, "Invalid header magic"),
    # the 1024-byte header, the 20-byte BAT (5 entries) end at BDRV_MAX_LENGTH
    # (2^63 - 2^30) or just past it
    "dyn-offset-last": (False, 16, struct.pack(">Q", (1 << 63) - (1 << 30) - 1024), True,
                        "Invalid header magic"),
    "dyn-offset-past": (False, 16, struct.pack(">Q", (1 << 63) - (1 << 30) - 1023), True,
                        "Error reading dynamic VHD header"),
    "bat-offset-last": (False, 512 + 16, struct.pack(">Q", (1 << 63) - (1 << 30) - 20), True,
                        "block-vpc: free_data_block_offset points after the end of file. "
                        "The image has been truncated."),
    "bat-offset-past": (False, 512 + 16, struct.pack(">Q", (1 << 63) - (1 << 30) - 19), True,
                        "Error reading pagetable"),
}


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt(tmp_path, what):
    """Each check of vpc_open, with QEMU's message (the text qemu-img prints
    for the same image)."""
    fixed, off, data, fix, msg = CORRUPT[what]
    img = tmp_path / "bad.vhd"
    make_image(img, 8 << 20, fixed=fixed)
    if off < 0:
        off += img.stat().st_size
    _patch(img, off, data, fix_footer=fix)
    assert msg in qemu_open_error(img)
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


@pytest.mark.parametrize("creator", [b"qem2", b"win ", b"vpc "])
async def test_absurd_size(tmp_path, creator):
    """A current_size (or a geometry) beyond 2040 GiB: QEMU's -EFBIG."""
    img = tmp_path / "big.vhd"
    make_image(img, 8 << 20)
    _patch(img, 28, creator)
    _patch(img, 48, struct.pack(">Q", 1 << 50))
    if creator == b"vpc ":
        # the geometry counts: the maximum one makes current_size count too
        _patch(img, 56, struct.pack(">HBB", 65535, 16, 255))
    assert "File too large" in qemu_open_error(img)
    with pytest.raises(GenericError, match=f"^Could not open '{img}': File too large$"):
        async with opened(img, read_only=True):
            pass


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("cut", [0, 100, 511, 700, 1600, -512, -100])
async def test_truncated(tmp_path, fixed, cut):
    """A file cut short: the open fails with the message qemu-img gives for
    the same file, or both read the same data."""
    img = tmp_path / "short.vhd"
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(4, geometric(3 * BLOCK)))
    sub = "fixed" if fixed else "dynamic"
    assert qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}",
                    str(raw), str(img)).returncode == 0
    with img.open("r+b") as fh:
        fh.truncate(cut if cut >= 0 else img.stat().st_size + cut)
    r = qemu_img("info", "-f", "vpc", str(img))
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            got = bytes(await node.read(0, node.length))
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e)), (r.stderr, str(e))
        return
    out = tmp_path / "want.raw"
    assert qemu_img("convert", "-f", "vpc", "-O", "raw", str(img), str(out)).returncode == 0
    assert got == out.read_bytes()


async def test_read_only_never_written(tmp_path):
    img = tmp_path / "ro.vhd"
    make_image(img, 4 << 20)
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError):
            await node.write(0, b"x" * 512)
        await node.read(0, node.length)
    assert img.read_bytes() == before


async def test_allocation_moves_the_footer(tmp_path):
    """A write to a new block: bitmap (all ones) where the footer was, the
    block, the footer after it, and the BAT entry pointing at the bitmap."""
    img = tmp_path / "a.vhd"
    make_image(img, 8 << 20)
    before = img.read_bytes()
    footer_at = len(before) - 512
    async with opened(img) as node:
        await node.write(BLOCK + 512, b"\x42" * 512)
    after = img.read_bytes()
    assert len(after) == footer_at + 512 + BLOCK + 512
    assert after[footer_at:footer_at + 512] == b"\xff" * 512
    assert after[-512:] == before[-512:]
    assert struct.unpack_from(">I", after, 1536 + 4)[0] == footer_at // 512
    assert after[footer_at + 512 + 512:footer_at + 1024 + 512] == b"\x42" * 512
