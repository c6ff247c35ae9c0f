"""driver=vpc on both daemons: the same image copies opened by
qemu-storage-daemon and qsd-trio give the same query-named-block-nodes, the
same data and block status over NBD, and the same image file after the same
writes over NBD; corrupt images fail to open with the same message;
blockdev-create with driver=vpc gives the same images and the same errors.

Normalised: the image path; in created images, the footer's timestamp, its
random UUID and the checksum that covers them."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from qsd_trio.nodes.vpc import vpc_checksum
from tests.differential.format_runs import run_creates
from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, qemu_io, run_cli

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("vpc-src")
    raw = src / "data.raw"
    # 6 MiB and a bit, which the geometry rounds up (to 6329856 bytes)
    data = bytearray(6 * MiB + 512)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    for sub in ("dynamic", "fixed"):
        qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", str(raw),
                 str(src / f"{sub}.vhd"))
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(src / "forced.vhd"), str(6 * MiB + 512))
    return src


def _export_and_probe(kind, tmp_path, img, writes) -> dict:
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=vpc,node-name=v,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=v,writable=on"]
    url = f"nbd+unix:///v?socket={sock}"
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        for cmd in writes:
            qemu_io("-f", "raw", "-c", cmd, url)
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
    return {"info": json.loads(json.dumps(info).replace(str(img), "IMG")),
            "after": json.loads(json.dumps(after).replace(str(img), "IMG")),
            "data": out.read_bytes(), "map": mapping}


@pytest.mark.parametrize("name", ["dynamic.vhd", "fixed.vhd", "forced.vhd"])
def test_open_read_write_as_qemu(images, tmp_path, name):
    # writes into an allocated block, a new block, two blocks at once, and
    # zero writes (vpc has none: they allocate like any write)
    writes = ["write -P 0x11 0 512", "write -P 0x22 2096000 3000",
              "write -P 0x33 4194304 65536", "write -z 2500000 10000",
              "write -P 0x44 1000 512"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}-{name}"
        shutil.copyfile(images / name, img)
        seen[kind] = _export_and_probe(kind, tmp_path, img, writes)
        files[kind] = img.read_bytes()
        check = qemu_img("check", "-f", "vpc", str(img), check=False)
        # QEMU has no check for vpc: qemu-img says so and exits 63
        assert check.returncode == 63 and "does not support checks" in check.stderr, check.stderr
    for key in ("info", "after", "data", "map"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = seen["trio"]["info"][0]
    assert top["drv"] == "vpc"
    assert top["image"].get("cluster-size") == (None if name == "fixed.vhd" else 2 * MiB)
    # the same allocations in the same places: the files are equal
    assert len(files["trio"]) == len(files["qemu"])
    assert files["trio"] == files["qemu"]


def _patched(images, tmp_path, name, base, offset, data):
    img = tmp_path / f"bad-{name}"
    shutil.copyfile(images / base, img)
    b = bytearray(img.read_bytes())
    if offset < 0:
        offset += len(b)
    b[offset:offset + len(data)] = data
    for at in {0, len(b) - 512}:
        if b[at:at + 8] == b"conectix" and name != "checksum":
            b[at + 64:at + 68] = bytes(4)
            b[at + 64:at + 68] = struct.pack(">I", vpc_checksum(b[at:at + 512]))
    img.write_bytes(b)
    return img


BAD = {
    "cookie": ("fixed.vhd", -512, b"xonectix"),
    "fixed-type": ("fixed.vhd", -512 + 60, struct.pack(">I", 3)),
    "checksum": ("dynamic.vhd", 64, b"\x00\x00\x00\x01"),
    "dyn-magic": ("dynamic.vhd", 512, b"cxsparsX"),
    "block-size": ("dynamic.vhd", 512 + 32, struct.pack(">I", 3 << 20)),
    "table-small": ("dynamic.vhd", 512 + 28, struct.pack(">I", 1)),
    "table-huge": ("dynamic.vhd", 512 + 28, struct.pack(">I", 0x7FFFFFFF)),
    "bat-outside": ("dynamic.vhd", 1536, struct.pack(">I", 0x100000)),
    "dyn-offset": ("dynamic.vhd", 16, struct.pack(">Q", (1 << 64) - 1)),
    "too-large": ("forced.vhd", 48, struct.pack(">Q", 1 << 50)),
    "tiny": ("fixed.vhd", 0, b""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    img = _patched(images, tmp_path, case, *BAD[case])
    if case == "tiny":
        img.write_bytes(b"\0" * 100)
    args = ["--blockdev", f"driver=vpc,node-name=v,file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


def _create(kind, tmp_path, creates) -> tuple[list, list[bytes]]:
    """Each blockdev-create on a fresh file node; the outcome of each and
    the image it left (timestamp, UUID and checksum masked)."""
    out, files = run_creates(kind, tmp_path, creates, "vhd")
    images = []
    for f in files:
        b = bytearray(f.read_bytes())
        for at in {0, len(b) - 512}:
            if at >= 0 and b[at:at + 8] == b"conectix":
                b[at + 24:at + 28] = bytes(4)
                b[at + 64:at + 84] = bytes(20)
        images.append(bytes(b))
    return out, images


def test_blockdev_create(tmp_path):
    creates = [
        {"driver": "vpc", "size": 10514432},  # 302/4/17, the geometry of 10 MiB
        {"driver": "vpc", "size": 10514432, "subformat": "fixed"},
        {"driver": "vpc", "size": 0},
        {"driver": "vpc", "size": 10 * MiB},
        {"driver": "vpc", "size": 10 * MiB, "force-size": True},
        {"driver": "vpc", "size": 10 * MiB, "force-size": True, "subformat": "fixed"},
        {"driver": "vpc", "size": 10 * MiB + 1, "force-size": True},
        {"driver": "vpc", "size": 2041 << 30, "force-size": True},
        {"driver": "vpc", "size": 2041 << 30},
        # beyond the largest geometry below 65535/16/255: the size is kept
        {"driver": "vpc", "size": 136899993600},
        {"driver": "vpc", "size": 127 << 30},
        {"driver": "vpc", "size": -512},  # 2^64 - 512: too large, as a uint64
        {"driver": "vpc", "size": -512, "force-size": True, "subformat": "fixed"},
        {"driver": "vpc", "size": 512, "force-size": True},
        {"driver": "vpc", "size": 1 << 20, "subformat": "neither"},
    ]
    theirs, their_files = _create("qemu", tmp_path, creates)
    ours, our_files = _create("trio", tmp_path, creates)
    assert ours == theirs
    for n, (a, b) in enumerate(zip(our_files, their_files, strict=True)):
        assert a == b, (n, creates[n], len(a), len(b))
    # the created images open, with the size asked for
    assert theirs[0] == ("job", None) and theirs[4] == ("job", None)
    for n in (0, 4):
        info = json.loads(qemu_img("info", "--output=json", "-f", "vpc",
                                   str(tmp_path / f"c{n}-trio.vhd")).stdout)
        assert info["virtual-size"] == creates[n]["size"]
