"""The vdi driver: the conformance suite and a hypothesis workload on images
qemu-img made (dynamic and static), each checked afterwards by
``qemu-img check -f vdi`` and compared byte for byte with ``qemu-img convert
-O raw``; images made by ``qemu-img convert -O vdi`` read back; images made
by :func:`create_vdi` laid out as qemu-img lays them out; corrupt images
refused with QEMU's messages or read without going past the file."""

from __future__ import annotations

import contextlib
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.nodes.vdi import BLOCK_SIZE, create_vdi
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .workload import run_workload


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, *, static: bool = False) -> None:
    r = qemu_img("create", "-q", "-f", "vdi", *(["-o", "static=on"] if static else []),
                 str(path), str(size))
    assert r.returncode == 0, r.stderr


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img finds the image clean and reads exactly ``model`` from it."""
    r = qemu_img("check", "-f", "vdi", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    raw = tmp_path / "check.raw"
    r = qemu_img("convert", "-f", "vdi", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False):
    graph = BlockGraph()
    node = await graph.add({"driver": "vdi", "node-name": "top", "read-only": read_only,
                            "discard": "unmap",
                            "file": {"driver": "file", "filename": str(path)}})
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
async def test_conformance(tmp_path, static):
    img = tmp_path / "img.vdi"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        make_image(img, size, static=static)
        async with opened(img, read_only=read_only) as node:
            yield node

    async def after_close(model):
        check_against(img, model, tmp_path)

    await check_block_node(factory, after_close=after_close, can_resize=False)


SIZE = 3 * BLOCK_SIZE + 4096
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 1_500_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=15)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, static=st.booleans())
def test_random_workload(workload, static):
    """Writes, zero writes and discards (which leave the data: vdi has no
    discard), concurrent in pairs, against a model; then qemu-img's view."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.vdi"
        make_image(img, SIZE, static=static)

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, SIZE)

        model = trio.run(main)
        check_against(img, model, tmp)


async def test_reads_qemu_img_convert(tmp_path):
    """An image qemu-img converted from raw data reads back as that data, and
    block status maps what qemu-img map maps."""
    raw = tmp_path / "src.raw"
    data = bytearray(5 * BLOCK_SIZE)
    data[100:5000] = pattern(1, 4900)
    data[3 * BLOCK_SIZE + 7:3 * BLOCK_SIZE + 70000] = pattern(2, 69993)
    raw.write_bytes(data)
    img = tmp_path / "c.vdi"
    r = qemu_img("convert", "-f", "raw", "-O", "vdi", str(raw), str(img))
    assert r.returncode == 0, r.stderr
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == bytes(data)
        allocated = []
        off = 0
        while off < node.length:
            s = await node.block_status(off, node.length - off)
            if s.flags & Status.DATA:
                allocated.append(off // BLOCK_SIZE)
            off += s.length
        assert allocated == [0, 3]


@pytest.mark.parametrize("prealloc", ["off", "metadata"])
async def test_create_like_qemu_img(tmp_path, prealloc):
    """create_vdi lays out the header and block map as qemu-img create does
    (all but the two random UUIDs), and the image checks clean."""
    size = 5 * BLOCK_SIZE + 512
    ours = tmp_path / "ours.vdi"
    ours.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    await create_vdi(f, size, prealloc)
    await graph.close_all()
    theirs = tmp_path / "theirs.vdi"
    make_image(theirs, size, static=prealloc == "metadata")
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    assert a[:392] == b[:392] and a[424:] == b[424:]
    check_against(ours, bytes(size), tmp_path)


async def test_create_errors(tmp_path):
    img = tmp_path / "e.vdi"
    img.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    try:
        with pytest.raises(GenericError, match="Preallocation mode not supported for vdi"):
            await create_vdi(f, 1 << 20, "full")
        with pytest.raises(GenericError, match=r"Unsupported VDI image size \(size is "
                                               r"0x4000000000000, max supported is "
                                               r"0x1fffff8000000\)"):
            await create_vdi(f, 1 << 50)
    finally:
        await graph.close_all()


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))


CORRUPT = {
    "signature": (64, "<I", 0x12345678, "Image not in VDI format (bad signature 12345678)"),
    "version": (68, "<I", 0x00020003, "unsupported VDI image (version 2.3)"),
    "bmap-unaligned": (340, "<I", 0x201, "unsupported VDI image (unaligned block map offset 0x201)"),
    "data-unaligned": (344, "<I", 0x403, "unsupported VDI image (unaligned data offset 0x403)"),
    "sector-size": (360, "<I", 4096, "unsupported VDI image (sector size 4096 is not 512)"),
    "block-size": (376, "<I", 4096, "unsupported VDI image (block size 4096 is not 1048576)"),
    "disk-size-room": (368, "<Q", 9 << 20,
                       "unsupported VDI image (disk size 9437184, image bitmap has room for "
                       "8388608)"),
    "absurd-size": (368, "<Q", 1 << 62, "Unsupported VDI image size (size is 0x4000000000000000, "
                                        "max supported is 0x1fffff8000000)"),
    "link-uuid": (424, "<I", 1, "unsupported VDI image (non-NULL link UUID)"),
    "parent-uuid": (440, "<I", 1, "unsupported VDI image (non-NULL parent UUID)"),
}


def qemu_open_error(path: Path) -> str:
    r = qemu_img("info", "-f", "vdi", str(path))
    assert r.returncode != 0
    return r.stderr


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt_header(tmp_path, what):
    """Each header check of vdi_open, with QEMU's message (the same text
    qemu-img prints for the same image)."""
    img = tmp_path / "bad.vdi"
    make_image(img, 8 << 20)
    off, fmt, value, msg = CORRUPT[what]
    _patch(img, off, fmt, value)
    assert msg in qemu_open_error(img)
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


async def test_too_many_blocks(tmp_path):
    img = tmp_path / "many.vdi"
    make_image(img, 1 << 20)
    _patch(img, 384, "<I", 0x40000000)
    msg = "unsupported VDI image (too many blocks 1073741824, max is 536870784)"
    assert msg in qemu_open_error(img)
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


@pytest.mark.parametrize("cut", [0, 60, 100, 380, 600])
async def test_truncated(tmp_path, cut):
    """A file cut inside the header or the block map: the missing bytes read
    as zeroes, as in QEMU, so the open fails with the message qemu-img gives
    for the same file, or succeeds where qemu-img's does."""
    img = tmp_path / "short.vdi"
    make_image(img, 4 << 20)
    with img.open("r+b") as fh:
        fh.truncate(cut)
    r = qemu_img("info", "-f", "vdi", str(img))
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            await node.read(0, node.length)
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e))


async def test_entries_outside_the_file(tmp_path):
    """Block map entries that point past the end of the file, and a block map
    cut short by a truncated file, read as zeroes (QEMU pads reads past the
    end of the file), as qemu-img reads them; nothing is read past the file."""
    img = tmp_path / "out.vdi"
    data = pattern(3, 3 << 20)
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    assert qemu_img("convert", "-f", "raw", "-O", "vdi", str(raw), str(img)).returncode == 0
    _patch(img, 512 + 4, "<I", 1000)  # block 1 -> host block 1000, far past the end
    expect = tmp_path / "expect.raw"
    assert qemu_img("convert", "-f", "vdi", "-O", "raw", str(img), str(expect)).returncode == 0
    want = expect.read_bytes()
    assert want[BLOCK_SIZE:2 * BLOCK_SIZE] == bytes(BLOCK_SIZE)
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(0, node.length)) == want
        s = await node.block_status(BLOCK_SIZE, BLOCK_SIZE)
        assert s.flags & Status.DATA and s.offset is not None and s.offset > img.stat().st_size
    # cut the file inside the last data block
    with img.open("r+b") as fh:
        fh.truncate(img.stat().st_size - BLOCK_SIZE // 2)
    assert qemu_img("convert", "-f", "vdi", "-O", "raw", str(img), str(expect)).returncode == 0
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(0, node.length)) == expect.read_bytes()


async def test_read_only_never_written(tmp_path):
    img = tmp_path / "ro.vdi"
    make_image(img, 4 << 20)
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError):
            await node.write(0, b"x" * 512)
        await node.read(0, node.length)
    assert img.read_bytes() == before


async def test_odd_disk_size_rounds_up(tmp_path):
    """VBoxManage writes sizes that are not whole sectors; QEMU rounds up."""
    img = tmp_path / "odd.vdi"
    make_image(img, 2 << 20)
    _patch(img, 368, "<Q", (1 << 20) + 1)
    async with opened(img) as node:
        assert node.length == (1 << 20) + 512
        await node.write(1 << 20, b"\x01" * 512)
    # the header written back after the allocation holds the rounded size
    assert struct.unpack_from("<Q", img.read_bytes(), 368)[0] == (1 << 20) + 512


async def test_fast_path(tmp_path):
    """read_now/write_now serve a request inside one block from the file
    (zeroes for an unallocated block, without the file) and leave allocation
    and requests across blocks to the full path."""
    img = tmp_path / "fast.vdi"
    make_image(img, 4 << 20)
    async with opened(img) as node:
        assert bytes(node.read_now(4096, 512) or b"x") == bytes(512)
        assert not node.write_now(4096, memoryview(b"\x07" * 512))  # would allocate
        await node.write(4096, b"\x07" * 512)
        # the file may decline to write or read inline; when it does, the
        # full path does the request
        if not node.write_now(8192, memoryview(b"\x08" * 512)):
            await node.write(8192, b"\x08" * 512)
        got = node.read_now(4096, 4608)
        assert got is None or bytes(got) == b"\x07" * 512 + bytes(3584) + b"\x08" * 512
        assert node.read_now(BLOCK_SIZE - 512, 1024) is None  # across blocks
    model = bytearray(4 << 20)
    model[4096:4608] = b"\x07" * 512
    model[8192:8704] = b"\x08" * 512
    check_against(img, model, tmp_path)
