"""The vhdx log, against QEMU's: an image QEMU left with a log to replay
(qemu-io whose write fails where the BAT sector is written in place) is
refused read-only with QEMU's message and hint, and replayed read-write
into the same file ``qemu-img check -r all`` makes; the same failure in our
node leaves the same file QEMU leaves, which qemu-img replays to the data
written; logs written here from the specification's layout (zero
descriptors, runs of entries, an entry wrapping at the log's end, a file to
extend, stale entries) are replayed as qemu-img replays them; corrupt logs
fail or are ignored as QEMU does (an image whose log cannot be replayed
opens, and its allocating writes then fail with ENOTSUP)."""

from __future__ import annotations

import contextlib
import errno
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.qapi.errors import GenericError
from tests.helpers import first_difference, qemu_img, qemu_io

from .conformance import pattern
from .vhdx_images import (
    HEADERS,
    bat_offset,
    fix_checksum,
    log_entry,
    make_dirty,
    make_image,
    normalise,
    set_log,
)

MiB = 1 << 20
LOG = MiB  # where qemu-img puts the log (1 MiB long)


@contextlib.asynccontextmanager
async def opened(path: Path, *, read_only: bool = False, blkdebug_sector: int | None = None):
    graph = BlockGraph()
    file = {"driver": "file", "filename": str(path)}
    if blkdebug_sector is not None:
        file = {"driver": "blkdebug", "image": file,
                "inject-error": [{"event": "pwritev", "iotype": "write",
                                  "sector": blkdebug_sector, "once": True}]}
    node = await graph.add({"driver": "vhdx", "node-name": "top", "read-only": read_only,
                            "file": file})
    try:
        yield node
    finally:
        await graph.close_all()


def replayed_by_qemu(img: Path, tmp_path: Path) -> bytes:
    """A copy of ``img`` after qemu-img check -r all (which replays the log)."""
    copy = tmp_path / f"qemu-{img.name}"
    shutil.copyfile(img, copy)
    r = qemu_img("check", "-r", "all", "-f", "vhdx", str(copy), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return copy.read_bytes()


def assert_same(ours: bytes, theirs: bytes) -> None:
    a, b = normalise(ours), normalise(theirs)
    assert len(a) == len(b) and a == b, first_difference(a, b)


def raw_of(img: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def _dirty(tmp_path: Path) -> Path:
    img = tmp_path / "dirty.vhdx"
    make_image(img, 64 * MiB)
    make_dirty(img, ["write -P 0x11 0 4k", "write -P 0x33 9M 4k"])
    return img


async def test_read_only_refused_with_qemus_message(tmp_path):
    img = _dirty(tmp_path)
    before = img.read_bytes()
    r = qemu_img("info", "-f", "vhdx", str(img), check=False)
    lines = [line.removeprefix("qemu-img: ") for line in r.stderr.splitlines()]
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    # qemu-img's own prefix: "Could not open 'X': " before the driver's message
    assert lines[0].endswith(": " + str(e.value)), (lines, str(e.value))
    assert str(e.value) == (f"VHDX image file '{img}' opened read-only, but contains a log "
                            f"that needs to be replayed")
    assert lines[1:] == e.value.hint.splitlines() == [
        "To replay the log, run:", f"qemu-img check -r all '{img}'"]
    assert img.read_bytes() == before


async def test_replay_of_qemus_log(tmp_path):
    """A read-write open replays QEMU's log into the file qemu-img check -r
    all makes of it (the same header updates, the BAT sector, the log
    emptied), and the write whose BAT update was interrupted is there."""
    img = _dirty(tmp_path)
    theirs = replayed_by_qemu(img, tmp_path)
    async with opened(img) as node:
        assert node.log_replayed_on_open
        assert bytes(await node.read(9 * MiB, 4096)) == b"\x33" * 4096
    assert_same(img.read_bytes(), theirs)
    assert "No errors were found" in qemu_img("check", "-f", "vhdx", str(img)).stdout


async def test_our_interrupted_write_leaves_qemus_log(tmp_path):
    """The node's BAT update fails where QEMU's did: the file is the one
    qemu-io leaves (the log entry, the header naming it), qemu-img refuses
    it read-only, and its replay shows the data written."""
    theirs, ours = tmp_path / "theirs.vhdx", tmp_path / "ours.vhdx"
    make_image(theirs, 64 * MiB)
    qemu_io("-f", "vhdx", "-c", "write -P 0x11 0 4k", str(theirs))
    shutil.copyfile(theirs, ours)
    make_dirty(theirs, ["write -P 0x33 9M 4k"])
    sector = bat_offset(ours.read_bytes()) // 512
    async with opened(ours, blkdebug_sector=sector) as node:
        with pytest.raises(OSError) as e:
            await node.write(9 * MiB, b"\x33" * 4096)
        assert e.value.errno == errno.EIO
    assert_same(ours.read_bytes(), theirs.read_bytes())
    r = qemu_img("info", "-f", "vhdx", str(ours), check=False)
    assert "contains a log that needs to be replayed" in r.stderr
    replayed = tmp_path / "replayed.vhdx"
    replayed.write_bytes(replayed_by_qemu(ours, tmp_path))
    model = bytearray(64 * MiB)
    model[:4096] = b"\x11" * 4096
    model[9 * MiB:9 * MiB + 4096] = b"\x33" * 4096
    assert raw_of(replayed, tmp_path) == bytes(model)


def _log_guid() -> bytes:
    return uuid.uuid4().bytes


def _sector(seed: int) -> bytes:
    return pattern(seed, 4096)


def _base(tmp_path: Path) -> Path:
    """An image with data in block 0 (8 MiB blocks), 24 MiB of file."""
    img = tmp_path / "base.vhdx"
    make_image(img, 64 * MiB)
    qemu_io("-f", "vhdx", "-c", "write -P 0x55 0 8M", "-c", "write -P 0x66 8M 64k", str(img))
    return img


def _crafted(img: Path, what: str) -> None:
    """Each crafted log: entries placed in the log by offset."""
    g = _log_guid()
    size = img.stat().st_size
    d = 8 * MiB  # block 0's data in the file
    if what == "data-and-zero":
        e = log_entry(1, g, data=[(d + 4096, _sector(1))], zero=[(d + 65536, 3 * 4096)],
                      flushed=size, last=size)
        set_log(img, g, [(0, e)])
    elif what == "run-of-two":
        e1 = log_entry(7, g, data=[(d, _sector(2))], flushed=size, last=size)
        e2 = log_entry(8, g, data=[(d + 8192, _sector(3)), (d + 12288, _sector(4))],
                       flushed=size, last=size)
        set_log(img, g, [(4096 * 10, e1), (4096 * 10 + len(e1), e2)])
    elif what == "wrapping":
        e = log_entry(3, g, data=[(d, _sector(5)), (d + 4096, _sector(6))], flushed=size,
                      last=size)
        set_log(img, g, [(MiB - 4096, e)])
    elif what == "extends-file":
        e = log_entry(2, g, data=[(size + 4096, _sector(7))], flushed=size,
                      last=size + MiB + 12345)
        set_log(img, g, [(0, e)])
    elif what == "newest-wins":
        old = log_entry(4, g, data=[(d, _sector(8))], flushed=size, last=size)
        new = log_entry(9, g, data=[(d, _sector(9))], flushed=size, last=size)
        set_log(img, g, [(0, new), (65536, old)])
    elif what == "stale-guid-ignored":
        stale = log_entry(20, _log_guid(), data=[(d, _sector(10))], flushed=size, last=size)
        e = log_entry(5, g, data=[(d + 4096, _sector(11))], flushed=size, last=size)
        set_log(img, g, [(0, stale), (65536, e)])
    elif what == "bat-entry":
        # a block mapped by the log alone: the BAT's first sector with entry 2 set
        b = img.read_bytes()
        at = bat_offset(b)
        sector = bytearray(b[at:at + 4096])
        sector[16:24] = struct.pack("<Q", (8 << 20) | 6)
        e = log_entry(1, g, data=[(at, bytes(sector))], flushed=size, last=size)
        set_log(img, g, [(0, e)])
    else:
        raise AssertionError(what)


CRAFTED = ["data-and-zero", "run-of-two", "wrapping", "extends-file", "newest-wins",
           "stale-guid-ignored", "bat-entry"]


@pytest.mark.parametrize("what", CRAFTED)
async def test_crafted_logs(tmp_path, what):
    img = _base(tmp_path)
    _crafted(img, what)
    theirs = replayed_by_qemu(img, tmp_path)
    with pytest.raises(GenericError, match="contains a log that needs to be replayed"):
        async with opened(img, read_only=True):
            pass
    async with opened(img) as node:
        assert node.log_replayed_on_open
        got = bytes(await node.read(0, node.length))
    assert_same(img.read_bytes(), theirs)
    replayed = tmp_path / "theirs.vhdx"
    replayed.write_bytes(theirs)
    assert got == raw_of(replayed, tmp_path)
    if what == "bat-entry":
        assert got[16 * MiB:24 * MiB] == b"\x55" * (8 * MiB)


def _log_change(offset: int, data: bytes) -> tuple[int, bytes]:
    return LOG + offset, data


# a log QEMU wrote (make_dirty), changed: (changes inside it, fix the entry's
# checksum?, how QEMU's open ends: None when it opens)
CORRUPT_LOGS = {
    "entry-checksum": ([_log_change(100, b"x")], False, None),
    "entry-signature": ([_log_change(0, b"logx")], True, None),
    "descriptor-signature": ([_log_change(64, b"desx")], True, "Invalid argument"),
    "zero-descriptor-length": ([_log_change(64, b"zero"),
                                _log_change(72, struct.pack("<Q", 100))], True, "Invalid argument"),
    "descriptor-sequence": ([_log_change(88, struct.pack("<Q", 7))], True, "Invalid argument"),
    "descriptor-offset": ([_log_change(80, struct.pack("<Q", 0x200001))], True,
                          "Invalid argument"),
    "data-signature": ([_log_change(4096, b"datx")], True, "replayed"),
    "data-sequence": ([_log_change(4096 + 4, struct.pack("<I", 1))], True, "Invalid argument"),
    "flushed-offset": ([_log_change(48, struct.pack("<Q", 1 << 40))], True, "Invalid argument"),
    "entry-length-huge": ([_log_change(8, struct.pack("<I", 4 * MiB))], True, None),
    "entry-length-odd": ([_log_change(8, struct.pack("<I", 8000))], True, None),
    "descriptor-count": ([_log_change(24, struct.pack("<I", 1000))], True, None),
    "sequence-zero": ([_log_change(16, struct.pack("<Q", 0))], True, None),
    "other-guid": ([_log_change(32, b"\1" * 16)], True, None),
}


@pytest.mark.parametrize("what", list(CORRUPT_LOGS))
async def test_corrupt_logs(tmp_path, what):
    """Each change to QEMU's own log: the open fails with qemu-img's
    message, or replays, or (no valid entry) opens with the log left as it
    is, and then a write that must allocate fails with ENOTSUP, as
    qemu-io's, while a write in place works."""
    img = _dirty(tmp_path)
    changes, fix, outcome = CORRUPT_LOGS[what]
    b = bytearray(img.read_bytes())
    for offset, data in changes:
        b[offset:offset + len(data)] = data
    if fix:
        fix_checksum(b, LOG, 8192)
    img.write_bytes(bytes(b))
    copy = tmp_path / "q.vhdx"
    shutil.copyfile(img, copy)
    r = qemu_io("-f", "vhdx", "-c", "write -P 0x44 20M 4k", str(copy), check=False)
    if outcome not in (None, "replayed"):
        assert r.stderr.strip().endswith(outcome), r.stderr
        with pytest.raises(GenericError) as e:
            async with opened(img):
                pass
        theirs = r.stderr.strip().replace(str(copy), str(img))
        assert theirs.endswith(": " + str(e.value)), (theirs, str(e.value))
        # a replay that fails midway has updated the headers, in both
        assert_same(img.read_bytes(), copy.read_bytes())
        return
    if outcome == "replayed":
        assert "wrote 4096/4096" in r.stdout, r.stdout + r.stderr
    else:
        assert "write failed: Operation not supported" in r.stdout, r.stdout + r.stderr
    async with opened(img) as node:
        assert node.log_replayed_on_open == (outcome == "replayed")
        if outcome is None:
            with pytest.raises(OSError) as e:
                await node.write(20 * MiB, b"\x44" * 4096)
            assert e.value.errno == errno.ENOTSUP
            await node.write(0, b"\x77" * 512)  # block 0 is allocated
        else:
            await node.write(20 * MiB, b"\x44" * 4096)
    if outcome == "replayed":
        assert_same(img.read_bytes(), copy.read_bytes())


async def test_log_length_not_whole_mib(tmp_path):
    """A log that is not whole MiB: invalid when the header names a log, as
    QEMU says; the log offset and version are checked even without one."""
    img = _dirty(tmp_path)
    b = bytearray(img.read_bytes())
    for at in HEADERS:
        b[at + 68:at + 72] = struct.pack("<I", 4096)
        fix_checksum(b, at, 4096)
    img.write_bytes(bytes(b))
    r = qemu_img("info", "-f", "vhdx", str(img), check=False)
    assert r.stderr.strip().endswith("Invalid argument")
    with pytest.raises(GenericError) as e:
        async with opened(img, read_only=True):
            pass
    assert r.stderr.strip().endswith(": " + str(e.value))
