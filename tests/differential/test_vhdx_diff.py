"""driver=vhdx on both daemons: the same image copies (dynamic and fixed,
from qemu-img convert and create) opened by qemu-storage-daemon and
qsd-trio give the same query-named-block-nodes, the same data and map over
NBD, and the same image file after the same writes over NBD; corrupt
images fail to open with the same output; an image with a log to replay is
refused read-only with the same message and hint, and replayed read-write
into the same file; a write whose BAT update fails (blkdebug) leaves the
same log behind, which qemu-img replays to the data written;
blockdev-create with driver=vhdx gives the same images and the same errors.

Normalised: the image's directory; in image files, the random GUIDs (file
write, data write, log, page 83) and the checksums over them, and in
created ones the creator field (it names the QEMU version) and the random
first sequence number."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from tests.differential.format_runs import assert_same_failure, export_and_probe, run_creates
from tests.helpers import (
    HAVE_QEMU,
    Daemon,
    first_difference,
    normalise_prog,
    qemu_img,
    qemu_io,
    run_cli,
)
from tests.nodes.vhdx_images import (
    bat_offset,
    convert,
    make_dirty,
    make_image,
    normalise,
    patch,
)

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("vhdx-src")
    raw = src / "data.raw"
    data = bytearray(20 * MiB)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[9 * MiB + 5:9 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    convert(raw, src / "dynamic.vhdx")
    convert(raw, src / "small-blocks.vhdx", "block_size=1M")
    convert(raw, src / "fixed.vhdx", "subformat=fixed", "block_state_zero=off")
    make_image(src / "fixed-zero.vhdx", 20 * MiB, "subformat=fixed")
    make_image(src / "empty.vhdx", 20 * MiB, "block_state_zero=off")
    return src


NAMES = ["dynamic.vhdx", "small-blocks.vhdx", "fixed.vhdx", "fixed-zero.vhdx", "empty.vhdx"]


@pytest.mark.parametrize("name", NAMES)
def test_open_read_write_as_qemu(images, tmp_path, name):
    # writes in place, into new blocks, across two blocks, zero writes (as
    # data: QEMU's vhdx has none), unaligned ones
    writes = ["write -P 0x11 0 512", "write -P 0x22 9437000 3000",
              "write -P 0x33 16773120 65536", "write -z 2500000 10000",
              "write -P 0x44 1000 513", "write -z 19M 1M"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        img = d / name
        shutil.copyfile(images / name, img)
        seen[kind] = export_and_probe(kind, d, img, "vhdx", writes)
        files[kind] = img.read_bytes()
        check = qemu_img("check", "-f", "vhdx", str(img))
        assert "No errors were found on the image." in check.stdout, check.stdout
    for key in ("info", "after", "data", "map", "nbd-size"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = next(n for n in seen["trio"]["info"] if n["node-name"] == "v")
    assert top["drv"] == "vhdx"
    assert top["image"]["cluster-size"] == (MiB if name == "small-blocks.vhdx" else 8 * MiB)
    # the same blocks allocated in the same places, the same header updates
    # and log entries
    a, b = normalise(files["trio"]), normalise(files["qemu"])
    assert len(a) == len(b) and a == b, first_difference(a, b)


def _patched(images, tmp_path, base, changes, fix=None):
    img = tmp_path / "bad.vhdx"
    shutil.copyfile(images / base, img)
    patch(img, changes, fix=fix)
    return img


def _q(v: int) -> bytes:
    return struct.pack("<Q", v)


BAD = {
    "signature": ("empty.vhdx", [(0, b"vhdxfilx")], None),
    "headers": ("empty.vhdx", [(0x10000 + 99, b"x"), (0x20000 + 99, b"x")], None),
    "region-checksum": ("empty.vhdx", [(0x30000 + 99, b"x")], None),
    "region-overlap": ("empty.vhdx", [(0x30000 + 64, _q(0x200000))], "region"),
    "metadata": ("empty.vhdx", [(0x300000, b"metadatx")], None),
    "differencing": ("empty.vhdx", [(0x300000 + 0x10000 + 4, b"\2")], None),
    "logical-sector": ("empty.vhdx", [(0x300000 + 0x10000 + 33, b"\x10")], None),
    "bat-past-file": ("dynamic.vhdx", [(0x200000 + 8, _q((200 << 20) | 6))], None),
    "bat-in-log": ("dynamic.vhdx", [(0x200000 + 8, _q((1 << 20) | 6))], None),
    "size": ("empty.vhdx", [(0x300000 + 0x10000 + 8, _q(1 << 62))], None),
    "tiny": ("empty.vhdx", [], None),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_open_errors_match(images, tmp_path, case, ro):
    base, changes, fix = BAD[case]
    img = _patched(images, tmp_path, base, changes, fix)
    if case == "tiny":
        img.write_bytes(b"vhdxfile" + bytes(92))
    args = ["--blockdev", f"driver=vhdx,node-name=v,read-only={'on' if ro else 'off'},"
                          f"file.driver=file,file.filename={img}"]
    assert_same_failure(args)


def _dirty_pair(tmp_path):
    base = tmp_path / "base.vhdx"
    make_image(base, 20 * MiB)
    qemu_io("-f", "vhdx", "-c", "write -P 0x11 0 4k", str(base))
    make_dirty(base, ["write -P 0x33 9M 4k"])
    return base


def test_dirty_log(images, tmp_path):
    """Read-only: refused with the same message and hint.  Read-write: both
    replay the log into the same file (header updates, the BAT sector, the
    log emptied) and read the data of the interrupted write."""
    base = _dirty_pair(tmp_path)
    for ro in ("on", "off"):
        out = {}
        files = {}
        for kind in ("qemu", "trio"):
            d = tmp_path / f"{kind}-{ro}"
            d.mkdir()
            img = d / "dirty.vhdx"
            shutil.copyfile(base, img)
            args = ["--blockdev", f"driver=file,node-name=f,filename={img},read-only={ro}",
                    "--blockdev", f"driver=vhdx,node-name=v,file=f,read-only={ro}"]
            if ro == "on":
                r = run_cli(kind, args)
                out[kind] = (r.returncode, normalise_prog(r.stderr).replace(str(d), "DIR"))
            else:
                sock = d / "nbd.sock"
                args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                         "--export", "type=nbd,id=e,node-name=v"]
                with Daemon(kind, d, args):
                    r = qemu_io("-f", "raw", "-r", "-c", "read -P 0x33 9M 4k",
                                f"nbd+unix:///v?socket={sock}")
                    out[kind] = r.stdout.splitlines()[0]
            files[kind] = img.read_bytes()
        assert out["trio"] == out["qemu"]
        if ro == "on":
            assert "contains a log that needs to be replayed" in out["qemu"][1]
            assert "To replay the log, run:" in out["qemu"][1]
            assert files["trio"] == files["qemu"] == base.read_bytes()
        else:
            assert out["qemu"] == "read 4096/4096 bytes at offset 9437184"
            a, b = normalise(files["trio"]), normalise(files["qemu"])
            assert a == b, first_difference(a, b)


def test_failed_bat_update_then_kill(tmp_path):
    """A write whose BAT sector write fails (blkdebug) fails over NBD on
    both daemons; a write into that block still works, one that allocates
    fails (the log is in use); then both are killed (SIGKILL): both files
    hold the same log entry and headers, and qemu-img check -r all replays
    each to the data written, clean."""
    files = {}
    outcome = {}
    base = tmp_path / "base.vhdx"
    make_image(base, 20 * MiB)
    sector = bat_offset(base.read_bytes()) // 512
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        img = d / "k.vhdx"
        shutil.copyfile(base, img)
        sock = d / "nbd.sock"
        rule = (f"driver=blkdebug,node-name=dbg,image.driver=file,image.filename={img},"
                f"inject-error.0.event=pwritev,inject-error.0.iotype=write,"
                f"inject-error.0.sector={sector},inject-error.0.once=on")
        args = ["--blockdev", rule, "--blockdev", "driver=vhdx,node-name=v,file=dbg",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=v,writable=on"]
        daemon = Daemon(kind, d, args).start()
        try:
            url = f"nbd+unix:///v?socket={sock}"
            r = qemu_io("-f", "raw", "-c", "write -P 0x11 8M 4k", url, check=False)
            assert "write failed: Input/output error" in r.stdout, r.stdout
            # the block is mapped in memory: a write into it goes in place;
            # another allocation would need the log, which is still in use
            r = qemu_io("-f", "raw", "-c", "write -P 0x22 8392704 4k", "-c",
                        "write -P 0x33 0 4k", url, check=False)
            # (without qemu-io's timing lines)
            outcome[kind] = [ln for ln in r.stdout.splitlines() if " ops; " not in ln]
        finally:
            daemon.proc.kill()
            daemon.proc.wait()
            daemon.stop()
        files[kind] = img.read_bytes()
    assert outcome["trio"] == outcome["qemu"]
    assert outcome["qemu"][0].startswith("wrote 4096/4096")
    assert outcome["qemu"][1] == "write failed: Operation not supported"
    a, b = normalise(files["trio"]), normalise(files["qemu"])
    assert a == b, first_difference(a, b)
    model = bytearray(20 * MiB)
    model[8 * MiB:8 * MiB + 8192] = b"\x11" * 4096 + b"\x22" * 4096
    for kind in ("qemu", "trio"):
        img = tmp_path / kind / "k.vhdx"
        assert "needs to be replayed" in qemu_img("info", str(img), check=False).stderr
        r = qemu_img("check", "-r", "all", "-f", "vhdx", str(img))
        assert "1 corruptions" in r.stdout and "No errors were found" in r.stdout, r.stdout
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(out))
        assert out.read_bytes() == bytes(model)


def _create(kind, tmp_path, creates) -> tuple[list, list[tuple[int, int, bytes]]]:
    """run_creates, with each image's size, allocated blocks and first 12 MiB
    (normalised when it is an image)."""
    out, files = run_creates(kind, tmp_path, creates, "vhdx")
    images = []
    for f in files:
        with f.open("rb") as fh:
            head = fh.read(12 * MiB)
        ok = head[:8] == b"vhdxfile" and len(head) > 0x310000
        images.append((f.stat().st_size, f.stat().st_blocks,
                       normalise(head, created=True) if ok else head))
    return out, images


def test_blockdev_create(tmp_path):
    creates = [
        {"driver": "vhdx", "size": 20 * MiB},
        {"driver": "vhdx", "size": 20 * MiB, "subformat": "fixed"},
        {"driver": "vhdx", "size": 20 * MiB, "subformat": "fixed", "block-state-zero": False},
        {"driver": "vhdx", "size": 20 * MiB, "block-state-zero": False},
        {"driver": "vhdx", "size": 0},
        {"driver": "vhdx", "size": 1000},
        {"driver": "vhdx", "size": 5 << 30, "log-size": 2 * MiB, "block-size": 2 * MiB},
        {"driver": "vhdx", "size": 2 << 40},
        {"driver": "vhdx", "size": (64 << 40) + 512},
        {"driver": "vhdx", "size": MiB, "log-size": 1 << 32},
        {"driver": "vhdx", "size": MiB, "log-size": 3 * 512 * 1024},
        {"driver": "vhdx", "size": MiB, "block-size": 3 * MiB},
        {"driver": "vhdx", "size": MiB, "block-size": 512 * MiB},
        {"driver": "vhdx", "size": MiB, "block-size": 1000},
        {"driver": "vhdx", "size": MiB, "subformat": "neither"},
    ]
    theirs, their_files = _create("qemu", tmp_path, creates)
    ours, our_files = _create("trio", tmp_path, creates)
    assert ours == theirs
    for n, (a, b) in enumerate(zip(our_files, their_files, strict=True)):
        assert a[:2] == b[:2], (n, creates[n])
        assert a[2] == b[2], (n, creates[n], first_difference(a[2], b[2]))
    assert theirs[0] == ("job", None) and theirs[5] == ("job", None)
    for n in (0, 2, 5):
        img = tmp_path / f"c{n}-trio.vhdx"
        assert "No errors were found" in qemu_img("check", "-f", "vhdx", str(img)).stdout
        info = json.loads(qemu_img("info", "--output=json", "-f", "vhdx", str(img)).stdout)
        assert info["virtual-size"] == creates[n]["size"] // 512 * 512
    assert re.search("Log size must be a multiple of 1 MB", str(theirs[10]))
