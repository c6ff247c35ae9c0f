"""The vhdx driver: the conformance suite and a hypothesis workload on
dynamic and fixed images qemu-img made (each then clean in ``qemu-img
check`` and equal byte for byte to the model through ``qemu-img convert -O
raw``); images from ``qemu-img convert -O vhdx`` read back; the same writes
leave the same file as qemu-io's (but for random GUIDs and what covers
them); :func:`create_vhdx` lays images out as qemu-img does; corrupt images
are refused with QEMU's messages (the texts qemu-img prints for the same
files), reads and writes meeting a bad BAT entry fail as qemu-io's do, and
nothing is read past the file or written to a read-only image.  The log:
tests/nodes/test_vhdx_log.py."""

from __future__ import annotations

import contextlib
import errno
import struct
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.nodes.vhdx_create import create_vhdx
from qsd_trio.qapi.errors import GenericError
from tests.helpers import first_difference, qemu_img, qemu_io

from .conformance import check_block_node, pattern
from .vhdx_images import bat, bat_offset, convert, make_image, normalise, patch
from .workload import run_workload

MiB = 1 << 20
VARIANTS = {
    "dynamic": (),
    "dynamic-1m": ("block_size=1M",),
    "dynamic-not-zero": ("block_state_zero=off",),
    "fixed": ("subformat=fixed",),
    "fixed-present": ("subformat=fixed", "block_state_zero=off"),
}


def check_against(path: Path, model: bytes, tmp_path: Path) -> None:
    """qemu-img check finds the image clean and reads exactly ``model``."""
    r = qemu_img("check", "-f", "vhdx", str(path))
    assert "No errors were found on the image." in r.stdout, r.stdout + r.stderr
    raw = tmp_path / "check.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(path), str(raw))
    got = raw.read_bytes()
    assert got == bytes(model), first_difference(got, bytes(model))


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False):
    graph = BlockGraph()
    node = await graph.add({"driver": "vhdx", "node-name": "top", "read-only": read_only,
                            "file": {"driver": "file", "filename": str(path)}})
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_conformance(tmp_path, variant):
    img = tmp_path / "img.vhdx"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.unlink(missing_ok=True)
        make_image(img, size, *VARIANTS[variant])
        async with opened(img, read_only=read_only) as node:
            yield node

    async def after_close(model):
        check_against(img, model, tmp_path)

    await check_block_node(factory, size=4 * MiB, after_close=after_close, can_resize=False)


SIZE = 3 * MiB + 4096
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 2_500_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 300_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 300_000), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=15)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, variant=st.sampled_from(["dynamic-1m", "fixed", "fixed-present"]))
def test_random_workload(workload, variant):
    """Writes, zero writes and discards (vhdx keeps the data: QEMU's driver
    has no discard), concurrent in pairs, against a model; then qemu-img's
    check and view."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = tmp / "w.vhdx"
        make_image(img, SIZE, *VARIANTS[variant])

        async def main():
            async with opened(img) as node:
                return await run_workload(node, workload, SIZE)

        model = trio.run(main)
        check_against(img, model, tmp)


@pytest.mark.parametrize("variant", ["dynamic", "dynamic-1m", "fixed", "fixed-present"])
async def test_reads_qemu_img_convert(tmp_path, variant):
    """An image qemu-img converted from raw data reads back as that data, and
    every range is data to block status, as QEMU's driver (which has no
    block status) answers."""
    raw = tmp_path / "src.raw"
    data = bytearray(5 * MiB + 1536)
    data[100:5000] = pattern(1, 4900)
    data[3 * MiB + 7:3 * MiB + 70000] = pattern(2, 69993)
    data[-700:] = pattern(3, 700)
    raw.write_bytes(data)
    img = tmp_path / "c.vhdx"
    convert(raw, img, *VARIANTS[variant])
    async with opened(img, read_only=True) as node:
        assert node.length == len(data)
        assert node.info_extra() == {"cluster-size": 1 * MiB if variant == "dynamic-1m"
                                     else 8 * MiB}
        assert bytes(await node.read(0, len(data))) == bytes(data)
        st_ = await node.block_status(0, node.length)
        assert (st_.flags, st_.length) == (Status.DATA | Status.ALLOCATED, node.length)


async def test_same_file_as_qemu_io(tmp_path):
    """The same writes through qemu-io and through the node leave the same
    file: blocks allocated in the same places, the same BAT, the same
    header updates (sequence numbers), the same log entries, but for the
    random GUIDs and the checksums over them."""
    writes = [(512, b"\x11" * 512), (9 * MiB, b"\x22" * 4096), (100, b"a" * 3),
              (8 * MiB - 10, b"\x33" * 20), (30 * MiB, b"\x44" * 65536)]
    theirs, ours = tmp_path / "theirs.vhdx", tmp_path / "ours.vhdx"
    make_image(theirs, 64 * MiB)
    ours.write_bytes(theirs.read_bytes())
    qemu_io("-f", "vhdx", *[a for off, d in writes for a in
                            ("-c", f"write -P {d[0]:#x} {off} {len(d)}")], str(theirs))
    async with opened(ours) as node:
        for off, d in writes:
            await node.write(off, d)
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b) == 8 * MiB + 3 * 8 * MiB  # three blocks after the metadata
    assert normalise(a) == normalise(b), first_difference(normalise(a), normalise(b))
    assert [e & 7 for e in bat(a, 8)] == [6, 6, 2, 6, 2, 2, 2, 2]


async def test_reopened_session_updates_headers_once(tmp_path):
    """Each session's first write updates both headers once (a new
    data-write GUID); a read-write open without writes changes nothing."""
    img = tmp_path / "s.vhdx"
    make_image(img, 16 * MiB, "block_size=1M")
    before = img.read_bytes()
    async with opened(img) as node:
        await node.read(0, 4096)
    assert img.read_bytes() == before
    seq = [struct.unpack_from("<Q", before, at + 8)[0] for at in (0x10000, 0x20000)]
    async with opened(img) as node:
        await node.write(0, b"x" * 512)  # allocates: user-visible, log, log reset
        await node.write(1, b"y")  # in place
    after = img.read_bytes()
    assert [struct.unpack_from("<Q", after, at + 8)[0] for at in (0x10000, 0x20000)] == \
        [seq[0] + 6, seq[1] + 6]  # three updates of both copies
    # the two copies got different data-write GUIDs, the current one last
    assert after[0x10000 + 32:0x10000 + 48] != after[0x20000 + 32:0x20000 + 48]
    check_against(img, b"xy" + b"x" * 510 + bytes(16 * MiB - 512), tmp_path)


# --- creation ---------------------------------------------------------------------------

async def _create(path, size, **opts):
    path.write_bytes(b"")
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        await create_vhdx(f, size, **opts)
    finally:
        await graph.close_all()


CREATES = [
    (64 * MiB, {}, ()),
    (0, {}, ()),
    (1024, {}, ()),
    (64 * MiB, {"subformat": "fixed"}, ("subformat=fixed",)),
    (64 * MiB, {"subformat": "fixed", "block_state_zero": False},
     ("subformat=fixed", "block_state_zero=off")),
    (64 * MiB, {"block_state_zero": False}, ("block_state_zero=off",)),
    (3 << 30, {"log_size": 4 * MiB, "block_size": MiB}, ("log_size=4M", "block_size=1M")),
    (200 << 30, {}, ()),
    (40 << 40, {}, ()),
    ((1 << 30) + 512, {"block_size": 256 * MiB}, ("block_size=256M",)),
]


@pytest.mark.parametrize("size,opts,qemu_opts", CREATES,
                         ids=[f"{c[0]}-{'-'.join(c[2]) or 'default'}" for c in CREATES])
async def test_create_like_qemu_img(tmp_path, size, opts, qemu_opts):
    """create_vhdx lays the image out as qemu-img create does (but for the
    creator, which names the version, and the random sequence number and
    GUIDs); qemu-img finds it clean and reads zeroes."""
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    await _create(ours, size, **opts)
    make_image(theirs, size, *qemu_opts)
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.stat().st_blocks == theirs.stat().st_blocks  # the same bytes written
    with ours.open("rb") as a, theirs.open("rb") as b:
        head_a, head_b = a.read(16 * MiB), b.read(16 * MiB)
    assert normalise(head_a, created=True) == normalise(head_b, created=True), \
        first_difference(normalise(head_a, created=True), normalise(head_b, created=True))
    assert head_a[8:8 + 22].decode("utf-16-le") == "QEMU v7.2.0"
    r = qemu_img("check", "-f", "vhdx", str(ours))
    assert "No errors were found on the image." in r.stdout
    if size <= 64 * MiB:
        check_against(ours, bytes(size), tmp_path)


@pytest.mark.parametrize("opts,msg", [
    ({"size": (64 << 40) + 1}, "Image size too large; max of 64TB"),
    ({"size": MiB, "log_size": 1 << 32}, "Log size must be smaller than 4 GB"),
    ({"size": MiB, "log_size": MiB + 512}, "Log size must be a multiple of 1 MB"),
    ({"size": MiB, "log_size": 0}, "Log size must be a multiple of 1 MB"),
    ({"size": MiB, "block_size": 0}, "Block size must be a multiple of 1 MB"),
    ({"size": MiB, "block_size": 3 * MiB}, "Block size must be a power of two"),
    ({"size": MiB, "block_size": 512 * MiB}, "Block size must not exceed 268435456"),
])
async def test_create_errors(tmp_path, opts, msg):
    img = tmp_path / "e.vhdx"
    size = opts.pop("size")
    with pytest.raises(GenericError) as e:
        await _create(img, size, **opts)
    assert str(e.value) == msg
    assert img.stat().st_size == 0


# --- corrupt images ----------------------------------------------------------------------

def _written(tmp_path: Path) -> Path:
    """64 MiB, 8 MiB blocks; blocks 0 and 1 allocated at 8 and 16 MiB, the
    file 24 MiB long; the BAT at 2 MiB, the metadata at 3 MiB."""
    img = tmp_path / "written.vhdx"
    make_image(img, 64 * MiB)
    qemu_io("-f", "vhdx", "-c", "write -P 0x11 0 512", "-c", "write -P 0x22 9M 4k", str(img))
    return img


MD = 0x300000
BAT = 0x200000


def _md_entry(i: int) -> int:
    return MD + 32 + 32 * i


def _q(v: int) -> bytes:
    return struct.pack("<Q", v)


def _i(v: int) -> bytes:
    return struct.pack("<I", v)


PARENT_LOCATOR = bytes.fromhex("2d5fd3a80bb34d45abf7d3d84834ab0c")
EINVAL = "Invalid argument"
ENOTSUP = "Operation not supported"
EIO = "Input/output error"
# name: (changes, checksums to fix, the error's end, what QEMU also prints before it)
CORRUPT = {
    "file-signature": ([(0, b"vhdxfilx")], None, EINVAL, ()),
    "both-header-checksums": ([(0x10000 + 100, b"x"), (0x20000 + 100, b"x")], None,
                              "No valid VHDX header found", ()),
    "header-signature": ([(0x10000, b"heax"), (0x20000, b"heax")], "headers",
                         "No valid VHDX header found", ()),
    "header-version": ([(0x10000 + 66, b"\2\0"), (0x20000 + 66, b"\2\0")], "headers",
                       "No valid VHDX header found", ()),
    "equal-sequence-different": ([(0x10000 + 8, _q(5)), (0x20000 + 8, _q(5)),
                                  (0x20000 + 200, b"x")], "headers",
                                 "No valid VHDX header found", ()),
    "log-version": ([(0x10000 + 64, b"\1\0"), (0x20000 + 64, b"\1\0")], "headers", EINVAL, ()),
    "log-offset-unaligned": ([(0x10000 + 72, _q(12345)), (0x20000 + 72, _q(12345))], "headers",
                             EINVAL, ()),
    "log-offset-zero": ([(0x10000 + 72, _q(0)), (0x20000 + 72, _q(0))], "headers", EINVAL, ()),
    "log-over-bat": ([(0x10000 + 72, _q(BAT)), (0x20000 + 72, _q(BAT))], "headers", EINVAL,
                     ("VHDX region 2097152-3145728 overlaps with region 2097152-3145728",)),
    "region-checksum": ([(0x30000 + 100, b"x")], None, EINVAL, ()),
    "region-signature": ([(0x30000, b"regx")], "region", EINVAL, ()),
    "region-count": ([(0x30000 + 8, _i(2048))], "region", EINVAL, ()),
    "region-no-bat": ([(0x30000 + 8, _i(1))], "region", EINVAL, ()),
    "region-unknown-required": ([(0x30000 + 8, _i(3)),
                                 (0x30000 + 80, b"\1" * 16 + struct.pack("<QII", 5 * MiB, MiB, 1))],
                                "region", ENOTSUP, ()),
    "region-bat-over-log": ([(0x30000 + 32, _q(MiB))], "region", EINVAL,
                            ("VHDX region 1048576-2097152 overlaps with region 1048576-2097152",)),
    "region-metadata-past-file": ([(0x30000 + 64, _q(1 << 40))], "region", EINVAL, ()),
    "region-metadata-absurd": ([(0x30000 + 64, _q(1 << 63))], "region", EIO, ()),
    "region-bat-absurd": ([(0x30000 + 32, _q(1 << 63))], "region", EIO, ()),
    "region-bat-huge": ([(0x30000 + 32, _q(5 * MiB)), (0x30000 + 40, _i(0xFFF00000))], "region",
                        EIO, ()),
    "region-bat-huge-overlap": ([(0x30000 + 40, _i(0xFFF00000))], "region", EINVAL,
                                ("VHDX region 3145728-4194304 overlaps with region "
                                 "2097152-4296015872",)),
    "metadata-signature": ([(MD, b"metadatx")], None, EINVAL, ()),
    "metadata-count": ([(MD + 10, b"\x00\x08")], None, EINVAL, ()),
    "metadata-missing": ([(MD + 10, b"\4\0")], None, ENOTSUP, ()),
    "metadata-duplicate": ([(MD + 10, b"\6\0"), (_md_entry(5), b"COPY0")], None, EINVAL, ()),
    "metadata-unknown-required": ([(MD + 10, b"\6\0"),
                                   (_md_entry(5), b"\2" * 16 + struct.pack("<IIII", 65636, 4, 4, 0))],
                                  None, ENOTSUP, ()),
    "metadata-value-past-file": ([(_md_entry(1) + 16, _i(0xF0000000))], None, EINVAL, ()),
    "block-size-small": ([(MD + 0x10000, _i(512 * 1024))], None, EINVAL, ()),
    "block-size-large": ([(MD + 0x10000, _i(512 * MiB))], None, EINVAL, ()),
    "block-size-odd": ([(MD + 0x10000, _i(3 * MiB))], None, EINVAL, ()),
    "logical-sector-4k": ([(MD + 0x10000 + 32, _i(4096))], None, ENOTSUP, ()),
    "differencing": ([(MD + 0x10000 + 4, _i(2)), (MD + 10, b"\6\0"),
                      (_md_entry(5), PARENT_LOCATOR + struct.pack("<IIII", 65636, 4, 4, 0))],
                     None, ENOTSUP, ()),
    "has-parent-no-locator": ([(MD + 0x10000 + 4, _i(2))], None, EINVAL, ()),
    "parent-locator-not-parent": ([(MD + 10, b"\6\0"),
                                   (_md_entry(5), PARENT_LOCATOR + struct.pack("<IIII", 65636, 4, 0, 0))],
                                  None, ENOTSUP, ()),
    "size-zero": ([(MD + 0x10000 + 8, _q(0))], None, EINVAL, ()),
    "size-beyond-bat": ([(MD + 0x10000 + 8, _q(130818 << 23))], None, EINVAL, ()),
    "size-absurd": ([(MD + 0x10000 + 8, _q((1 << 64) - 512))], None, EINVAL, ()),
    "bat-past-file": ([(BAT + 16, _q((100 << 20) | 6))], None, EINVAL,
                      ("VHDX BAT entry 2 start offset 104857600 points after end of file "
                       "(25165824). Image has probably been truncated.",)),
    "bat-end-past-file": ([(BAT + 16, _q((17 << 20) | 6))], None, EINVAL,
                          ("VHDX BAT entry 2 end offset 26214399 points after end of file "
                           "(25165824). Image has probably been truncated.",)),
    "bat-overflow": ([(BAT + 16, _q(0xFFFFFFFFFFF00006))], None, EINVAL,
                     ("VHDX BAT entry 2 offset overflow.",)),
    "bat-in-header": ([(BAT + 16, _q(6))], None, EINVAL,
                      ("VHDX region 0-8388608 overlaps with region 3145728-4194304",)),
    "bat-over-bat": ([(BAT + 16, _q((2 << 20) | 6))], None, EINVAL,
                     ("VHDX region 2097152-10485760 overlaps with region 3145728-4194304",)),
}


def _corrupt(tmp_path: Path, what: str) -> Path:
    changes, fix, _, _ = CORRUPT[what]
    img = _written(tmp_path)
    if any(d == b"COPY0" for _, d in changes):
        first = img.read_bytes()[_md_entry(0):_md_entry(0) + 32]
        changes = [(o, first if d == b"COPY0" else d) for o, d in changes]
    patch(img, changes, fix=fix)
    return img


@pytest.mark.parametrize("what", list(CORRUPT))
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
async def test_corrupt(tmp_path, capsys, what, read_only):
    """Each check of vhdx_open with QEMU's result: qemu-img's message for the
    same file, and the same lines on stderr before it (error_report)."""
    img = _corrupt(tmp_path, what)
    _, _, msg, printed = CORRUPT[what]
    before = img.read_bytes()
    r = qemu_img("info", "-f", "vhdx", str(img), check=False)
    theirs = [line.removeprefix("qemu-img: ") for line in r.stderr.splitlines()]
    assert r.returncode == 1 and theirs[-1].endswith(msg), r.stderr
    assert theirs[:-1] == list(printed)
    capsys.readouterr()
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=read_only):
            pass
    assert theirs[-1].endswith(": " + str(e.value)), (theirs[-1], str(e.value))
    ours = [line.removeprefix("qsd-trio: ") for line in capsys.readouterr().err.splitlines()]
    assert ours == list(printed)
    assert img.read_bytes() == before


async def test_corruptions_that_open(tmp_path):
    """What QEMU accepts: the second header or region table broken, equal
    sequence numbers of identical headers, an optional unknown region or
    metadata item, a BAT partly past the end of the file (read as
    unallocated), a fully present entry ending exactly at the end of the
    file; each reads as qemu-io reads it."""
    cases = [
        ([(0x10000 + 100, b"x")], None),
        ([(0x40000 + 100, b"x")], None),
        ([(0x20000, b"HEADER1")], None),
        ([(0x30000 + 8, _i(3)), (0x30000 + 80, b"\1" * 16 + struct.pack("<QII", 5 * MiB, MiB, 0))],
         "region"),
        ([(MD + 10, b"\6\0"), (_md_entry(5), b"\2" * 16 + struct.pack("<IIII", 65636, 4, 0, 0))],
         None),
        ([(0x30000 + 32, _q(24 * MiB - 4096))], "region"),
        ([(BAT + 16, _q((16 << 20) | 6))], None),
        ([(MD + 0x10000 + 36, _i(1000))], None),
        ([(MD + 0x10000 + 8, _q(1000))], None),
    ]
    for i, (changes, fix) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        img = _written(d)
        if changes == [(0x20000, b"HEADER1")]:
            # identical copies, equal sequence numbers (as Disk2VHD writes them)
            changes = [(0x20000, img.read_bytes()[0x10000:0x11000])]
        patch(img, changes, fix=fix)
        want = tmp_path / f"{i}.raw"
        qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(want))
        async with opened(img, read_only=True) as node:
            assert bytes(await node.read(0, node.length)) == want.read_bytes(), i


@pytest.mark.parametrize("state", [4, 7])
async def test_bad_block_states(tmp_path, state):
    """A partially present block (differencing images only) or state 4:
    reads and writes of it fail with EIO, as qemu-io's; other blocks work."""
    img = _written(tmp_path)
    patch(img, [(BAT + 8, _q((16 << 20) | state))])
    r = qemu_io("-f", "vhdx", "-c", "read 9M 4k", str(img), check=False)
    assert "read failed: Input/output error" in r.stdout
    async with opened(img) as node:
        with pytest.raises(OSError) as e:
            await node.read(9 * MiB, 4096)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            await node.write(8 * MiB, b"z" * 512)
        assert e.value.errno == errno.EIO
        assert bytes(await node.read(0, 512)) == b"\x11" * 512


async def test_block_in_header_section(tmp_path):
    """A fully present block at file offset 0 (1 MiB blocks, so it overlaps
    no region): QEMU reads the file from its start for any request in that
    block, whatever the request's offset in it, and refuses to write there
    (EFAULT)."""
    img = tmp_path / "h.vhdx"
    make_image(img, 4 * MiB, "block_size=1M")
    patch(img, [(bat_offset(img.read_bytes()) + 8, _q(6))])
    for at in (MiB, MiB + 4096):
        r = qemu_io("-f", "vhdx", "-c", f"read -P 0x76 {at} 1", str(img), check=False)
        assert "read 1/1 bytes" in r.stdout, r.stdout  # 'v' of "vhdxfile"
    r = qemu_io("-f", "vhdx", "-c", "write 1M 512", str(img), check=False)
    assert "write failed: Bad address" in r.stdout
    async with opened(img) as node:
        assert bytes(await node.read(MiB, 8)) == b"vhdxfile"
        assert bytes(await node.read(MiB + 4096, 8)) == b"vhdxfile"
        with pytest.raises(OSError) as e:
            await node.write(MiB + 4096, b"z" * 512)
        assert e.value.errno == errno.EFAULT


@pytest.mark.parametrize("cut", [100, 0x10000 + 100, 0x30000, 3 * MiB + 100, 20 * MiB, 16 * MiB])
async def test_truncated(tmp_path, cut):
    """A file cut short: the open fails with qemu-img's message for the same
    file, or both read the same data (what lies past the end reads as
    zeroes; nothing is read there)."""
    img = _written(tmp_path)
    with img.open("r+b") as fh:
        fh.truncate(cut)
    r = qemu_img("info", "-f", "vhdx", str(img), check=False)
    try:
        async with opened(img, read_only=True) as node:
            assert r.returncode == 0, r.stderr
            got = bytes(await node.read(0, node.length))
    except GenericError as e:
        assert r.returncode != 0
        assert r.stderr.strip().endswith(": " + str(e)), (r.stderr, str(e))
        return
    out = tmp_path / "want.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(out))
    assert got == out.read_bytes()


@pytest.mark.parametrize("cut,opens", [(3 * MiB, True), (5 * MiB, False)])
async def test_last_block_partly_past_the_file(tmp_path, capsys, cut, opens):
    """QEMU accepts a last block that the file holds only as far as the disk
    reaches into it (the rest is past the disk's end) and refuses one cut
    shorter, with its message."""
    img = tmp_path / "p.vhdx"
    raw = tmp_path / "d.raw"
    data = pattern(5, 12 * MiB)
    raw.write_bytes(data)
    convert(raw, img)
    with img.open("r+b") as fh:
        fh.truncate(img.stat().st_size - cut)
    r = qemu_img("info", "-f", "vhdx", str(img), check=False)
    assert (r.returncode == 0) == opens
    if not opens:
        assert "VHDX BAT entry 1 end offset 20971519 points after end of file (19922944)" \
            in r.stderr
        with pytest.raises(GenericError):
            async with opened(img):
                pass
        assert "VHDX BAT entry 1 end offset 20971519" in capsys.readouterr().err
        return
    async with opened(img) as node:
        assert bytes(await node.read(0, node.length)) == data
        await node.write(12 * MiB - 512, b"e" * 512)
    check_against(img, data[:-512] + b"e" * 512, tmp_path)


async def test_read_only_never_written(tmp_path):
    img = _written(tmp_path)
    before = img.read_bytes()
    async with opened(img, read_only=True) as node:
        with pytest.raises(OSError):
            await node.write(0, b"x" * 512)
        with pytest.raises(OSError):
            await node.write_zeroes(20 * MiB, 512)
        await node.read(0, node.length)
    assert img.read_bytes() == before


async def test_zero_writes_allocate(tmp_path):
    """QEMU's vhdx has no zero write: a zero write is written as data (the
    block allocated), and NBD's fast zero is refused (ENOTSUP)."""
    img = tmp_path / "z.vhdx"
    make_image(img, 4 * MiB, "block_size=1M")
    size = img.stat().st_size
    async with opened(img) as node:
        with pytest.raises(OSError) as e:
            await node.write_zeroes(0, MiB, no_fallback=True)
        assert e.value.errno == errno.ENOTSUP
        await node.write_zeroes(MiB, 4096)
    assert img.stat().st_size == size + MiB
    assert [e & 7 for e in bat(img.read_bytes(), 4)] == [2, 6, 2, 2]
    check_against(img, bytes(4 * MiB), tmp_path)


async def test_huge_sparse_disk(tmp_path):
    """A 64 TiB image (1M BAT entries): the node opens it, reads and writes
    far in, and qemu-img reads the same."""
    img = tmp_path / "huge.vhdx"
    make_image(img, 64 << 40)
    async with opened(img) as node:
        assert node.length == 64 << 40
        await node.write((64 << 40) - 4096, b"\x77" * 4096)
        assert bytes(await node.read((64 << 40) - 8192, 8192)) == bytes(4096) + b"\x77" * 4096
    r = qemu_io("-f", "vhdx", "-c", f"read -P 0x77 {(64 << 40) - 4096} 4096", str(img))
    assert "read 4096/4096" in r.stdout
    assert "No errors were found" in qemu_img("check", "-f", "vhdx", str(img)).stdout



@pytest.mark.parametrize("file_opts", [{}, {"aio": "io_uring", "cache": {"direct": True}}],
                         ids=["cached", "io_uring-direct"])
async def test_paths_without_a_task(tmp_path, file_opts):
    """read_now, read_into_now, read_submit, write_now and write_submit (the
    exporters' paths) serve requests inside one fully present block; a
    write takes them only after the session's header update (which the
    first write() does); blocks without data read as zeroes without the
    file; what they leave is what write() leaves."""
    from qsd_trio.nodes.engine import buffers

    img = tmp_path / "paths.vhdx"
    make_image(img, 4 * MiB, "block_size=1M")
    qemu_io("-f", "vhdx", "-c", "write -P 0x10 1M 1M", str(img))
    graph = BlockGraph()
    node = await graph.add({"driver": "vhdx", "node-name": "v",
                            "file": {"driver": "file", "filename": str(img), **file_opts}})
    done = trio.Event()
    got: list = []

    def finished(res, err) -> None:
        got.append((res, err))
        done.set()

    try:
        mv = buffers.alloc(4096)
        mv[:] = b"\x21" * 4096
        assert not node.write_now(MiB, mv)
        assert not node.write_submit(MiB, mv, finished)
        await node.write(MiB, mv)  # the header update, then in place
        mv2 = buffers.alloc(4096)
        mv2[:] = b"\x22" * 4096
        if node.write_now(MiB + 4096, mv2):
            taken = "now"
        else:
            assert node.write_submit(MiB + 4096, mv2, finished)
            await done.wait()
            assert got[-1][1] is None
            taken = "submit"
        assert not node.write_now(2 * MiB, mv2)  # no block yet: the log is needed
        assert bytes(node.read_now(0, 4096) or b"") == bytes(4096)  # zeroes, no file read
        views = [memoryview(bytearray(2048)), memoryview(bytearray(2048))]
        assert node.read_into_now(3 * MiB, views)
        assert all(bytes(v) == bytes(2048) for v in views)
        data = node.read_now(MiB, 8192)
        if data is None:
            done = trio.Event()
            assert node.read_submit(MiB, 8192, finished)
            await done.wait()
            data = got[-1][0]
        assert bytes(data) == b"\x21" * 4096 + b"\x22" * 4096
        assert taken == ("now" if not file_opts else "submit")
    finally:
        await graph.close_all()
    model = bytearray(4 * MiB)
    model[MiB:2 * MiB] = b"\x10" * MiB
    model[MiB:MiB + 8192] = b"\x21" * 4096 + b"\x22" * 4096
    check_against(img, model, tmp_path)
