"""The parallels driver: the conformance suite and a hypothesis workload on
images qemu-img made (1 MiB and 4 KiB clusters, and the old
"WithoutFreeSpace" magic), each checked afterwards by ``qemu-img check -f
parallels`` and compared byte for byte with ``qemu-img convert -O raw``;
images from ``qemu-img convert -O parallels`` read back and mapped;
:func:`create_parallels` against ``qemu-img create``; the inuse flag, the
preallocation modes against qemu-io's files; corrupt headers, format
extensions, truncated files and BAT entries outside the file refused with
QEMU's messages or read as qemu-img reads them; the dirty bitmaps of a
format extension (written here from the specification, tests/nodes/
parallels_images.py) loaded as QEMU loads and exports them."""

from __future__ import annotations

import contextlib
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
from qsd_trio.nodes.parallels import HEADER_INUSE_MAGIC, create_parallels
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .parallels_images import (
    BITMAP_MAGIC,
    NAME1,
    NAME2,
    U1,
    add_extension,
    bitmap_feature,
    feature,
    model_extents,
    set_ext_off,
    two_bitmaps,
)
from .qemu_dirty import qemu_dirty_extents
from .workload import run_workload

MiB = 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def make_image(path: Path, size: int, *, cluster: int = MiB, old_magic: bool = False) -> None:
    r = qemu_img("create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}",
                 str(path), str(size))
    assert r.returncode == 0, r.stderr
    if old_magic:
        _patch(path, 0, "16s", b"WithoutFreeSpace")


def _patch(path: Path, offset: int, fmt: str, value: object) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack("<" + fmt, value))


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img finds the image clean and reads exactly ``model`` from it."""
    r = qemu_img("check", "-f", "parallels", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    raw = tmp_path / "check.raw"
    r = qemu_img("convert", "-f", "parallels", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes() == bytes(model)


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False, **opts: object):
    graph = BlockGraph()
    node = await graph.add({"driver": "parallels", "node-name": "top", "read-only": read_only,
                            **opts, "file": {"driver": "file", "filename": str(path)}})
    try:
        yield node
    finally:
        await graph.close_all()


KINDS = {"1M": {"cluster": MiB}, "4K": {"cluster": 4096},
         "old-magic": {"cluster": 4096, "old_magic": True}}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_conformance(tmp_path, kind):
    img = tmp_path / "img.parallels"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        make_image(img, size, **KINDS[kind])
        async with opened(img, read_only=read_only) as node:
            yield node

    async def after_close(model):
        check_against(img, model, tmp_path)

    await check_block_node(factory, after_close=after_close, can_resize=False)


SIZE = 3 * MiB + 4096
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 1_500_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=15)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, cluster=st.sampled_from([4096, 65536, MiB]))
def test_random_workload(workload, cluster):
    """Writes, zero writes and discards (which leave the data: parallels 7.2
    has no discard), concurrent in pairs, against a model; then qemu-img's
    view."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.parallels"
        make_image(img, SIZE, cluster=cluster)

        async def main():
            async with opened(img, discard="unmap") as node:
                return await run_workload(node, workload, SIZE)

        model = trio.run(main)
        check_against(img, model, tmp)


async def test_reads_qemu_img_convert(tmp_path):
    """An image qemu-img converted from raw data reads back as that data, and
    block status maps what qemu-img map maps."""
    raw = tmp_path / "src.raw"
    data = bytearray(5 * MiB)
    data[100:5000] = pattern(1, 4900)
    data[3 * MiB + 7:3 * MiB + 70000] = pattern(2, 69993)
    raw.write_bytes(data)
    img = tmp_path / "c.parallels"
    r = qemu_img("convert", "-f", "raw", "-O", "parallels", str(raw), str(img))
    assert r.returncode == 0, r.stderr
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert bytes(await node.read(0, len(data))) == bytes(data)
        allocated = []
        off = 0
        while off < node.length:
            s = await node.block_status(off, node.length - off)
            if s.flags & Status.DATA:
                allocated.append((off, s.length, s.offset))
            else:
                assert s.flags == Status.ZERO
            off += s.length
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "parallels", str(img)).stdout)
    assert allocated == [(m["start"], m["length"], m["offset"]) for m in mapped if m["data"]]


@pytest.mark.parametrize("size,cluster", [(5 * MiB, MiB), (100 * 1024, 4096),
                                          (1 << 30, 65536), (0, MiB), (3 << 40, MiB)])
async def test_create_like_qemu_img(tmp_path, size, cluster):
    """create_parallels writes the file qemu-img create writes, byte for
    byte, and the image checks clean."""
    ours = tmp_path / "ours.parallels"
    ours.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
    await create_parallels(f, size, cluster)
    await graph.close_all()
    theirs = tmp_path / "theirs.parallels"
    make_image(theirs, size, cluster=cluster)
    assert ours.read_bytes() == theirs.read_bytes()
    if size <= 5 * MiB:
        check_against(ours, bytes(size), tmp_path)


async def test_create_errors(tmp_path):
    img = tmp_path / "e.parallels"
    img.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    try:
        with pytest.raises(GenericError, match="^Image size is too large for this cluster size$"):
            await create_parallels(f, 4096 << 32, 4096)
        with pytest.raises(GenericError, match="^Cluster size is too large$"):
            await create_parallels(f, MiB, 1 << 31)
        with pytest.raises(GenericError, match="^Image size must be a multiple of 512 bytes$"):
            await create_parallels(f, 1000, 1000)
        with pytest.raises(GenericError, match="^Cluster size must be a multiple of 512 bytes$"):
            await create_parallels(f, MiB, 1000)
    finally:
        await graph.close_all()


def qemu_open_error(path: Path, *, rw: bool = False) -> str:
    if rw:
        r = subprocess.run(["qemu-io", "-f", "parallels", "-c", "quit", str(path)],
                           capture_output=True, text=True, check=False)
        return r.stderr
    r = qemu_img("info", "-f", "parallels", str(path))
    assert r.returncode != 0
    return r.stderr


CORRUPT = {
    "magic": (0, "16s", b"WithoutFreeSpacX", "Image not in Parallels format"),
    "version": (16, "I", 3, "Image not in Parallels format"),
    "zero-tracks": (28, "I", 0, "Invalid image: Zero sectors per track"),
    "big-cluster": (28, "I", (2**31 - 1) // 513 + 1, "Invalid image: Too big cluster"),
    "catalog": (32, "I", (2**31 - 1) // 4 + 1, "Catalog too large"),
    "ext-magic": (56, "Q", 2, "Wrong parallels Format Extension magic: 0x0, "
                              "expected: 0xab234cef23dcea87"),
}


@pytest.mark.parametrize("what", list(CORRUPT))
async def test_corrupt_header(tmp_path, what):
    """Each header check of parallels_open, with QEMU's message (the text
    qemu-img prints for the same image)."""
    img = tmp_path / "bad.parallels"
    make_image(img, 8 * MiB, cluster=4096)
    off, fmt, value, msg = CORRUPT[what]
    _patch(img, off, fmt, value)
    assert msg in qemu_open_error(img)
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg


async def test_dirty_bitmaps_loaded(tmp_path):
    """A read-only open gives the node the extension's bitmaps: named by
    their UUID, enabled, read-only, not persistent, with the bits the model
    says and QEMU exports."""
    img = tmp_path / "bm.parallels"
    make_image(img, 4 * MiB + 512, cluster=512)
    want = two_bitmaps(img)
    size = 4 * MiB + 512
    async with opened(img, read_only=True) as node:
        assert list(node.bitmaps) == [NAME1, NAME2]
        for name, (gran, dirty) in want.items():
            bm = node.bitmaps[name]
            assert (bm.granularity, bm.enabled, bm.readonly, bm.persistent) == \
                (gran, True, True, False)
            assert bm.count() == len(dirty) * gran  # whole granules, as hbitmap_count
            ours = [(off, n) for off, n, d in bm.dirty_extents() if d]
            assert ours == model_extents(gran, dirty, size)
            assert ours == qemu_dirty_extents(img, "parallels", name, tmp_path)
    async with opened(img) as node:  # read-write: ignored, with QEMU's warning
        assert node.bitmaps == {}


def _ext_case(img: Path, case: str) -> None:
    """Give ``img`` (1 MiB, 4 KiB clusters: 2048 sectors, one cluster of
    bitmap at one sector per granule) the extension of ``case``."""
    one = {7, 100}
    if case == "end":
        add_extension(img, b"")
    elif case == "unknown":
        add_extension(img, feature(0x1234))
    elif case == "checksum":
        add_extension(img, b"", corrupt=True)
    elif case == "magic":
        add_extension(img, b"", magic=0x1234)
    elif case == "flags":
        add_extension(img, feature(BITMAP_MAGIC, flags=2))
    elif case == "end-flags":
        add_extension(img, feature(0, flags=1))
    elif case == "data-size":
        add_extension(img, feature(0x1234, data_size=4049))
    elif case == "end-data-size":
        add_extension(img, feature(0, data_size=5000))
    elif case == "small-bitmap":
        add_extension(img, feature(BITMAP_MAGIC, bytes(31)))
    elif case == "bitmap-size":
        add_extension(img, bitmap_feature(img, U1, 1, one, size=7))
    elif case == "l1-past-data":
        f = bytearray(bitmap_feature(img, U1, 1, one))
        struct.pack_into("<I", f, 24 + 28, 2)
        add_extension(img, bytes(f))
    elif case == "table-size":
        add_extension(img, bitmap_feature(img, U1, 1, one, l1=[0, 0]))
    elif case == "duplicate":
        add_extension(img, bitmap_feature(img, U1, 1, one) + bitmap_feature(img, U1, 2, one,
                                                                          l1=[0, 0, 0]))
    elif case == "data-eio":
        add_extension(img, bitmap_feature(img, U1, 1, one, l1=[(1 << 54) + 5]))
    elif case == "data-past-eof":  # reads zeroes
        add_extension(img, bitmap_feature(img, U1, 1, one, l1=[100000]))
    elif case == "data-wraps":  # the sector number wraps to the header's cluster
        add_extension(img, bitmap_feature(img, U1, 1, one, l1=[1 << 55]))
    elif case == "ones":
        add_extension(img, bitmap_feature(img, U1, 1, one, l1=[1]))
    elif case == "big-granule":  # 2 GiB granules: one bit for the whole disk
        add_extension(img, bitmap_feature(img, U1, 1 << 22, {0}))
    elif case == "ext-past-eof":
        set_ext_off(img, 100000)
    else:
        raise AssertionError(case)


EXT_CASES = ["end", "unknown", "checksum", "magic", "flags", "end-flags", "data-size",
             "end-data-size", "small-bitmap", "bitmap-size", "l1-past-data", "table-size",
             "duplicate", "data-eio", "data-past-eof", "data-wraps", "ones", "big-granule",
             "ext-past-eof"]


@pytest.mark.parametrize("case", EXT_CASES)
async def test_format_extension(tmp_path, case):
    """A read-only open checks the format extension and loads its bitmaps as
    QEMU does: qemu-img info opens the same image, or fails with the same
    message; the bitmaps are the ones QEMU exports."""
    img = tmp_path / "ext.parallels"
    make_image(img, MiB, cluster=4096)
    _ext_case(img, case)
    r = qemu_img("info", "-f", "parallels", str(img))
    if r.returncode == 0:
        async with opened(img, read_only=True) as node:
            assert bytes(await node.read(0, 4096)) == bytes(4096)
            for name, bm in node.bitmaps.items():
                ours = [(off, n) for off, n, d in bm.dirty_extents() if d]
                assert ours == qemu_dirty_extents(img, "parallels", name, tmp_path)
        assert case in ("end", "data-past-eof", "data-wraps", "ones", "big-granule")
    else:
        with pytest.raises(GenericError) as e:
            async with opened(img, read_only=True):
                pass
        assert r.stderr.strip().endswith(": " + str(e.value))


@pytest.mark.parametrize(("case", "msg"), [
    ("granularity-3", "Granularity must be power of 2, and at least 512"),
    ("granularity-0", "Granularity must be power of 2, and at least 512"),
    ("ext-wraps", "Failed to read Format Extension cluster: Input/output error"),
    ("past-cluster", "Can not read feature header, as remaining bytes (0) in Format "
                     "Extension is less than Feature header size (24)")])
async def test_format_extension_where_qemu_asserts(tmp_path, case, msg):
    """Where QEMU 7.2 aborts on an assertion (a granularity that is no power
    of two of at least 512 bytes; an ext_off whose byte offset wraps to zero)
    or reads past the cluster (its count of the bytes left forgets the
    features' data), qsd-trio refuses the image with an error."""
    img = tmp_path / "ext.parallels"
    make_image(img, MiB, cluster=4096)
    if case.startswith("granularity"):
        add_extension(img, bitmap_feature(img, U1, int(case[-1]), set(), l1=[0]))
    elif case == "ext-wraps":
        set_ext_off(img, 1 << 55)
    else:  # a feature whose data ends the cluster: the next header is past it
        add_extension(img, feature(BITMAP_MAGIC, bitmap_feature(img, U1, 1, {1})[24:]
                                   + bytes(4096 - 48 - 40)))
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert str(e.value) == msg
    r = qemu_img("info", "-f", "parallels", str(img))
    if case == "past-cluster":  # QEMU reads on past the cluster: its result is chance
        assert r.returncode != 0
    else:
        assert r.returncode < 0 and "Assertion" in r.stderr, r.stderr


async def test_inuse_flag(tmp_path, capfd):
    """The flag is set while the image is open read-write and cleared at
    close; an image left in use opens read-only only (QEMU's message);
    a read-only node never writes."""
    img = tmp_path / "inuse.parallels"
    make_image(img, 4 * MiB, cluster=4096)
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        await node.read(0, node.length)
    assert img.read_bytes() == before
    async with opened(img) as node:
        assert struct.unpack_from("<I", img.read_bytes(), 44)[0] == HEADER_INUSE_MAGIC
        await node.write(0, b"x" * 512)
    assert struct.unpack_from("<I", img.read_bytes(), 44)[0] == 0
    _patch(img, 44, "I", HEADER_INUSE_MAGIC)
    msg = "parallels: Image was not closed correctly; cannot be opened read/write"
    assert msg in qemu_open_error(img, rw=True)
    with pytest.raises(GenericError, match=f"^{msg}$"):
        async with opened(img):
            pass
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(0, 512)) == b"x" * 512


def _qemu_io_writes(img: Path, opts: str, cmds: list[str]) -> None:
    args = ["qemu-io", "--image-opts", f"driver=parallels,file.filename={img}{opts}"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("opts", [{}, {"prealloc-mode": "truncate"},
                                  {"prealloc-size": 65536},
                                  {"prealloc-mode": "truncate", "prealloc-size": 0}])
async def test_preallocation_like_qemu(tmp_path, opts):
    """Clusters are taken at the end of the data, the file grown by
    prealloc-size beyond them when too short, and cut back at close: the
    same file as qemu-io's after the same writes, and the same length while
    open (checked before close)."""
    cmds = [(0, 512, 1), (200000, 70000, 2), (3 * MiB, 4096, 3), (100, 50, 4)]
    ours, theirs = tmp_path / "ours.parallels", tmp_path / "theirs.parallels"
    make_image(ours, 4 * MiB, cluster=4096)
    make_image(theirs, 4 * MiB, cluster=4096)
    _qemu_io_writes(theirs, "".join(f",{k}={v}" for k, v in opts.items()),
                    [f"write -P {p} {o} {n}" for o, n, p in cmds])
    data_off = struct.unpack_from("<I", ours.read_bytes(), 48)[0] * 512
    async with opened(ours, **opts) as node:
        await node.write(0, bytes([1]) * 512)
        length_open = ours.stat().st_size
        for o, n, p in cmds[1:]:
            await node.write(o, bytes([p]) * n)
    prealloc = opts.get("prealloc-size", 128 * MiB)
    assert length_open == data_off + 4096 + max(4096, prealloc // 512 * 512)
    assert ours.read_bytes() == theirs.read_bytes()
    check_against(ours, bytes(theirs_raw(theirs, tmp_path)), tmp_path)


def theirs_raw(img: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / "t.raw"
    assert qemu_img("convert", "-f", "parallels", "-O", "raw", str(img), str(raw)).returncode == 0
    return raw.read_bytes()


@pytest.mark.parametrize("cut", [0, 30, 64, 70, 4096, 4096 + 2048])
async def test_truncated(tmp_path, cut):
    """A file cut inside the header, the BAT or the data: the missing bytes
    read as zeroes, as in QEMU, so the open fails with the message qemu-img
    gives for the same file, or reads what qemu-img reads."""
    img = tmp_path / "short.parallels"
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(5, 64 * 1024))
    assert qemu_img("convert", "-f", "raw", "-O", "parallels", "-o", "cluster_size=4096",
                    str(raw), str(img)).returncode == 0
    with img.open("r+b") as fh:
        fh.truncate(cut)
    expect = tmp_path / "expect.raw"
    r = qemu_img("convert", "-f", "parallels", "-O", "raw", str(img), str(expect))
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            assert bytes(await node.read(0, node.length)) == expect.read_bytes()
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e))


async def test_entries_outside_the_file(tmp_path):
    """BAT entries that point past the end of the file read as zeroes (QEMU
    pads reads past the end of the file), as qemu-img reads them; block
    status gives the offset QEMU gives; nothing is read past the file."""
    img = tmp_path / "out.parallels"
    raw = tmp_path / "d.raw"
    raw.write_bytes(pattern(3, 3 * MiB))
    assert qemu_img("convert", "-f", "raw", "-O", "parallels", str(raw), str(img)).returncode == 0
    _patch(img, 64 + 4, "I", 1000)  # cluster 1 -> host cluster 1000, far past the end
    expect = tmp_path / "expect.raw"
    assert qemu_img("convert", "-f", "parallels", "-O", "raw", str(img),
                    str(expect)).returncode == 0
    want = expect.read_bytes()
    assert want[MiB:2 * MiB] == bytes(MiB)
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(0, node.length)) == want
        s = await node.block_status(MiB, MiB)
        assert s.flags & Status.DATA and s.offset == 1000 * MiB
    # the farthest entry a header can hold (2 GiB clusters, entry 2^32 - 1,
    # just below BDRV_MAX_LENGTH): zeroes, as qemu-io reads them
    tracks = (2**31 - 1) // 513
    _patch(img, 28, "I", tracks)
    _patch(img, 36, "Q", 3 * tracks)
    _patch(img, 64 + 8, "I", 0xFFFFFFFF)
    r = qemu_io("-r", "-f", "parallels", "-c", f"read -P 0 {2 * tracks * 512} 512", str(img))
    assert r.returncode == 0 and "read 512/512" in r.stdout, r.stdout + r.stderr
    async with opened(img, read_only=True) as node:
        assert bytes(await node.read(2 * tracks * 512, 512)) == bytes(512)
        s = await node.block_status(2 * tracks * 512, 512)
        assert s.offset == 0xFFFFFFFF * tracks * 512


async def test_write_beyond_data_end_entry(tmp_path):
    """A read-write open of an image whose BAT points past the end of the
    file takes new clusters after that entry and leaves the file that long
    at close, as QEMU 7.2 does (qemu-io on a copy)."""
    img = tmp_path / "far.parallels"
    make_image(img, MiB, cluster=4096, old_magic=True)
    _patch(img, 64 + 4, "I", 20000)  # sector 20000
    theirs = tmp_path / "theirs.parallels"
    theirs.write_bytes(img.read_bytes())
    _qemu_io_writes(theirs, "", ["write -P 9 0 4096"])
    async with opened(img) as node:
        await node.write(0, b"\x09" * 4096)
    assert img.read_bytes() == theirs.read_bytes()


async def test_fast_path(tmp_path):
    img = tmp_path / "fast.parallels"
    make_image(img, 4 * MiB, cluster=4096)
    async with opened(img) as node:
        assert bytes(node.read_now(4096, 512) or b"x") == bytes(512)
        assert not node.write_now(4096, memoryview(b"\x07" * 512))  # would allocate
        await node.write(4096, b"\x07" * 512)
        if not node.write_now(4608, memoryview(b"\x08" * 512)):
            await node.write(4608, b"\x08" * 512)
        got = node.read_now(4096, 1024)
        assert got is None or bytes(got) == b"\x07" * 512 + b"\x08" * 512
    model = bytearray(4 * MiB)
    model[4096:4608] = b"\x07" * 512
    model[4608:5120] = b"\x08" * 512
    check_against(img, model, tmp_path)
