"""driver=qed on both daemons: the same image copies (64 KiB and 4 KiB
clusters, a raw backing file, an empty image) opened by qemu-storage-daemon
and qsd-trio give the same query-named-block-nodes, the same data and
``qemu-img map`` over NBD, and byte-identical image files after the same
writes over NBD; the need-check flag is set and cleared alike; corrupt
images fail to open with the same message; blockdev-create with driver=qed
gives the same images and the same errors.

Normalised: the image's directory and the numbers of implicit node
names (``#blockNNN``)."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from tests.differential.format_runs import run_creates
from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, qemu_io, run_cli

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("qed-src")
    raw = src / "data.raw"
    data = bytearray(6 * MiB)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "qed", str(raw), str(src / "plain.qed"))
    qemu_img("convert", "-f", "raw", "-O", "qed", "-o", "cluster_size=4096,table_size=2",
             str(raw), str(src / "small.qed"))
    qemu_img("create", "-q", "-f", "qed", str(src / "empty.qed"), str(6 * MiB))
    base = src / "base.raw"
    base.write_bytes(bytes([0xAA]) * (5 * MiB))
    qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw",
             str(src / "overlay.qed"), str(6 * MiB))
    return src


def _export_and_probe(kind, tmp_path, img, writes) -> dict:
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=qed,node-name=v,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=v,writable=on"]
    url = f"nbd+unix:///v?socket={sock}"
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        for cmd in writes:
            qemu_io("-f", "raw", "-c", cmd, url)
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
    def norm(value):
        text = re.sub(r"#block\d+", "#blockN", json.dumps(value))
        return json.loads(text.replace(str(img.parent), "DIR"))

    return {"info": norm(info), "after": norm(after),
            "data": out.read_bytes(), "map": mapping}


@pytest.mark.parametrize("name", ["plain.qed", "small.qed", "empty.qed", "overlay.qed"])
def test_open_read_write_as_qemu(images, tmp_path, name):
    # writes in place, into new clusters and a new L2 table, across an L2
    # table's reach (4 KiB clusters), zero writes of whole clusters and not
    writes = ["write -P 0x11 0 512", "write -P 0x22 2096000 3000",
              "write -P 0x33 4194304 65536", "write -z 2500000 10000",
              "write -z 3145728 196608", "write -P 0x44 1000 512",
              "write -P 0x55 5242000 2000"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        img = d / name
        shutil.copyfile(images / name, img)
        if name == "overlay.qed":
            shutil.copyfile(images / "base.raw", d / "base.raw")
        seen[kind] = _export_and_probe(kind, tmp_path, img, writes)
        files[kind] = img.read_bytes()
        check = qemu_img("check", "-f", "qed", str(img), check=False)
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    for key in ("info", "after", "data", "map"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = next(n for n in seen["trio"]["info"] if n["node-name"] == "v")
    after = next(n for n in seen["trio"]["after"] if n["node-name"] == "v")
    assert top["drv"] == "qed"
    assert top["image"]["cluster-size"] == (4096 if name == "small.qed" else 65536)
    if name == "overlay.qed":
        assert top["backing_file"] == "DIR/base.raw"
        assert top["image"]["backing-filename-format"] == "raw"
    else:
        # allocated without a backing file: flagged until drained or closed
        assert after["image"]["dirty-flag"] is True
    # the same allocations in the same places: the files are equal
    assert len(files["trio"]) == len(files["qemu"])
    assert files["trio"] == files["qemu"]


def test_need_check_cleared(images, tmp_path):
    """After an allocating write both daemons show the dirty flag, and the
    header has QED_F_NEED_CHECK, until the node is drained (blockdev-reopen
    here): qemu-storage-daemon's need-check timer runs on a virtual clock
    that never advances, and a drain fires it."""
    daemons = {}
    imgs = {}
    try:
        for kind in ("qemu", "trio"):
            imgs[kind] = img = tmp_path / f"{kind}.qed"
            shutil.copyfile(images / "empty.qed", img)
            sock = tmp_path / f"{kind}.sock"
            daemons[kind] = Daemon(kind, tmp_path, [
                "--blockdev", f"driver=file,node-name=f,filename={img}",
                "--blockdev", "driver=qed,node-name=v,file=f",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=v,writable=on"]).start()
        for kind in daemons:
            qemu_io("-f", "raw", "-c", "write -P 1 0 4096", f"nbd+unix:///v?socket="
                    f"{tmp_path / kind}.sock")
        qmps = {k: d.qmp() for k, d in daemons.items()}
        for kind, q in qmps.items():
            assert q.cmd("query-named-block-nodes")[0]["image"]["dirty-flag"] is True, kind
            assert struct.unpack_from("<Q", imgs[kind].read_bytes(), 16)[0] & 2
        for kind, q in qmps.items():
            q.cmd("blockdev-reopen", options=[{"driver": "qed", "node-name": "v", "file": "f"}])
            assert q.cmd("query-named-block-nodes")[0]["image"]["dirty-flag"] is False, kind
            assert not struct.unpack_from("<Q", imgs[kind].read_bytes(), 16)[0] & 2
        for kind in daemons:
            qemu_io("-f", "raw", "-c", "write -P 2 4096 4096", f"nbd+unix:///v?socket="
                    f"{tmp_path / kind}.sock")
            assert not struct.unpack_from("<Q", imgs[kind].read_bytes(), 16)[0] & 2
    finally:
        for d in daemons.values():
            d.stop()
    assert imgs["trio"].read_bytes() == imgs["qemu"].read_bytes()


BAD = {
    "magic": ("plain.qed", 0, b"QEX\0"),
    "features": ("plain.qed", 16, struct.pack("<Q", 0x10)),
    "cluster-size": ("plain.qed", 4, struct.pack("<I", 1000)),
    "table-size": ("plain.qed", 8, struct.pack("<I", 5)),
    "image-size": ("plain.qed", 48, struct.pack("<Q", 1 << 60)),
    "l1-offset": ("plain.qed", 40, struct.pack("<Q", 1 << 40)),
    "backing-offset": ("overlay.qed", 56, struct.pack("<I", 65530)),
    "backing-missing": ("overlay.qed", 64, b"nope.raw"),
    "tiny": ("plain.qed", 0, b""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    base, offset, data = BAD[case]
    img = tmp_path / f"bad-{case}.qed"
    shutil.copyfile(images / base, img)
    b = bytearray(img.read_bytes())
    b[offset:offset + len(data)] = data
    img.write_bytes(b if case != "tiny" else b"QE")
    args = ["--blockdev", f"driver=qed,node-name=v,file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


def _create(kind, tmp_path, creates) -> tuple[list, list[bytes]]:
    """Each blockdev-create on a fresh file node: the outcome of each and
    the image it left."""
    out, files = run_creates(kind, tmp_path, creates, "qed", b"old contents")
    return out, [f.read_bytes() for f in files]


def test_blockdev_create(tmp_path):
    creates = [
        {"driver": "qed", "size": 10 * MiB},
        {"driver": "qed", "size": 0},
        {"driver": "qed", "size": 10 * MiB, "cluster-size": 4096, "table-size": 1},
        {"driver": "qed", "size": 1 << 40, "cluster-size": 1 << 20, "table-size": 16},
        {"driver": "qed", "size": 10 * MiB, "backing-file": "base.raw", "backing-fmt": "raw"},
        {"driver": "qed", "size": 10 * MiB, "backing-file": "/x/base.qcow2",
         "backing-fmt": "qcow2"},
        {"driver": "qed", "size": 10 * MiB, "backing-file": "b.img"},
        # a NUL is written as QEMU holds it, modified UTF-8's C0 80
        {"driver": "qed", "size": 10 * MiB, "backing-file": "b\u0000.img", "backing-fmt": "raw"},
        {"driver": "qed", "size": 10 * MiB, "backing-fmt": "raw"},
        {"driver": "qed", "size": 10 * MiB + 1},
        {"driver": "qed", "size": 1 << 50},
        {"driver": "qed", "size": -512},
        {"driver": "qed", "size": MiB, "cluster-size": 2048},
        {"driver": "qed", "size": MiB, "cluster-size": 3 << 12},
        {"driver": "qed", "size": MiB, "table-size": 0},
        {"driver": "qed", "size": MiB, "table-size": 32},
        {"driver": "qed", "size": MiB, "table-size": -4},
    ]
    theirs, their_files = _create("qemu", tmp_path, creates)
    ours, our_files = _create("trio", tmp_path, creates)
    assert ours == theirs
    for n, (a, b) in enumerate(zip(our_files, their_files, strict=True)):
        assert a == b, (n, creates[n], len(a), len(b))
    assert theirs[0] == ("job", None) and theirs[4] == ("job", None)
    info = json.loads(qemu_img("info", "--output=json", "-f", "qed", "-U",
                               str(tmp_path / "c0-trio.qed")).stdout)
    assert info["virtual-size"] == 10 * MiB
