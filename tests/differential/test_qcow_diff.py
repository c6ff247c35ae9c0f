"""driver=qcow (version 1) on both daemons: the same image copies opened by
qemu-storage-daemon and qsd-trio give the same query-named-block-nodes, the
same data and block status over NBD, and the same image file after the same
writes over NBD (plain, over a raw backing file, AES-encrypted); corrupt
images fail to open with the same message; blockdev-create with driver=qcow
gives the same job results and the same files.

Normalised: the image directory, automatic node names (``#blockNNN``);
after the writes, actual-size (the files are compared byte for byte
instead)."""

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
SECRET = ["--object", "secret,id=s0,data=password"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("qcow-src")
    raw = src / "data.raw"
    data = bytearray(6 * MiB + 512)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "qcow", str(raw), str(src / "plain.qcow"))
    qemu_img("create", "-q", "-f", "qcow", "-b", "data.raw", "-F", "raw",
             str(src / "backed.qcow"), str(6 * MiB + 512))
    qemu_img("create", "-q", "-f", "qcow", *SECRET, "-o",
             "encrypt.format=aes,encrypt.key-secret=s0", str(src / "enc.qcow"), "3M")
    return src


def _export_and_probe(kind, tmp_path, img, writes) -> dict:
    sock = tmp_path / f"{kind}.sock"
    enc = ",encrypt.format=aes,encrypt.key-secret=s0" if "enc" in img.name else ""
    args = [*SECRET, "--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", f"driver=qcow,node-name=q,file=f{enc}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=q,writable=on"]
    url = f"nbd+unix:///q?socket={sock}"
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        for cmd in writes:
            qemu_io("-f", "raw", "-c", cmd, url)
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
    norm = str(img.parent) + "/"

    def normalised(nodes: list) -> list:
        text = json.dumps(nodes).replace(norm, "DIR/").replace(img.name, "IMG")
        return json.loads(re.sub(r"#block\d+", "#blockN", text))

    for n in after:  # the host's allocation after the writes (one 4 KiB block apart)
        n["image"].pop("actual-size", None)
    return {"info": normalised(info), "after": normalised(after),
            "data": out.read_bytes(), "map": mapping}


@pytest.mark.parametrize("name", ["plain.qcow", "backed.qcow", "enc.qcow"])
def test_open_read_write_as_qemu(images, tmp_path, name):
    writes = ["write -P 0x11 0 512", "write -P 0x22 1048000 3000",
              "write -P 0x33 2097152 65536", "write -z 2500000 10000",
              "write -P 0x44 1000 10"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        img = d / name
        shutil.copyfile(images / name, img)
        shutil.copyfile(images / "data.raw", d / "data.raw")
        seen[kind] = _export_and_probe(kind, tmp_path, img, writes)
        files[kind] = img.read_bytes()
    for key in ("info", "after", "data", "map"):
        assert seen["trio"][key] == seen["qemu"][key], key
    assert [n["drv"] for n in seen["trio"]["info"] if n["node-name"] == "q"] == ["qcow"]
    assert files["trio"] == files["qemu"]


BAD = {
    "magic": (0, ">I", 0),
    "version": (4, ">I", 3),
    "size": (24, ">Q", 0),
    "cluster-bits": (32, ">B", 8),
    "l2-bits": (33, ">B", 14),
    "crypt": (36, ">I", 7),
    "too-large": (24, ">Q", 1 << 62),
}


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    img = tmp_path / f"bad-{case}"
    shutil.copyfile(images / "plain.qcow", img)
    off, fmt, value = BAD[case]
    with img.open("r+b") as fh:
        fh.seek(off)
        fh.write(struct.pack(fmt, value))
    args = ["--blockdev", f"driver=qcow,node-name=q,file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


@pytest.mark.parametrize("opts", ["", ",encrypt.format=aes", ",encrypt.format=luks"])
def test_encrypted_open_errors_match(images, tmp_path, opts):
    img = images / "enc.qcow"
    args = [*SECRET, "--blockdev", f"driver=qcow,node-name=q,read-only=on,"
                                   f"file.driver=file,file.filename={img}{opts}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


def _backing_given(kind, tmp_path, img) -> tuple[list, str]:
    """blockdev-add of the backed image three times: backing null, "" and a
    node of its own; query-named-block-nodes after each, and stderr."""
    raw = img.parent / "data.raw"
    adds = [("q1", None), ("q2", ""), ("q3", "b")]
    seen = []
    with Daemon(kind, tmp_path, allow_stderr="deprecated") as d:
        q = d.qmp()
        q.cmd("blockdev-add", **{"driver": "raw", "node-name": "b", "read-only": True,
                                 "file": {"driver": "file", "filename": str(raw)}})
        for name, backing in adds:
            q.cmd("blockdev-add", **{"driver": "qcow", "node-name": name, "read-only": True,
                                     "backing": backing,
                                     "file": {"driver": "file", "filename": str(img)}})
            nodes = q.cmd("query-named-block-nodes", flat=True)
            seen.append(json.loads(re.sub(r"#block\d+", "#blockN", json.dumps(nodes))))
    return seen, normalise_prog(d.stderr())


def test_backing_given_as_qemu(images, tmp_path):
    """A backing node other than the header's (null, the deprecated "", a
    node of the user's) spells the qcow node out in its file name, as
    bdrv_refresh_filename; "" warns."""
    seen = {kind: _backing_given(kind, tmp_path, images / "backed.qcow")
            for kind in ("qemu", "trio")}
    assert seen["trio"] == seen["qemu"]
    names = {n["node-name"]: n["file"] for n in seen["trio"][0][-1]}
    assert names["q3"].startswith("json:") and '"backing": {' in names["q3"]
    assert names["q1"] == names["q2"]
    assert '"backing": null' in names["q1"]
    assert 'Use of "backing": "" is deprecated' in seen["trio"][1]


def _create(kind, tmp_path, creates) -> tuple[list, list[bytes]]:
    """Each blockdev-create on a file node holding old bytes: the outcome
    of each and the file it left."""
    out, files = run_creates(kind, tmp_path, creates, "qcow", b"\xee" * 3000, list(SECRET))
    return out, [f.read_bytes() for f in files]


def test_blockdev_create(tmp_path):
    creates = [
        {"driver": "qcow", "size": 10 * MiB},
        {"driver": "qcow", "size": 7},
        {"driver": "qcow", "size": 0},
        {"driver": "qcow", "size": 1 << 40},
        {"driver": "qcow", "size": 10 * MiB, "backing-file": "base.raw"},
        # a NUL is written as QEMU holds it, modified UTF-8's C0 80
        {"driver": "qcow", "size": 10 * MiB, "backing-file": "b\u0000.raw"},
        {"driver": "qcow", "size": 10 * MiB, "backing-file": "fat:"},
        {"driver": "qcow", "size": 10 * MiB, "encrypt": {"format": "qcow", "key-secret": "s0"}},
        {"driver": "qcow", "size": 10 * MiB, "encrypt": {"format": "qcow"}},
        {"driver": "qcow", "size": 10 * MiB, "encrypt": {"format": "qcow", "key-secret": "x"}},
        {"driver": "qcow", "size": 10 * MiB, "encrypt": {"format": "luks", "key-secret": "s0"}},
        {"driver": "qcow", "size": -512},
    ]
    seen = {kind: _create(kind, tmp_path, creates) for kind in ("qemu", "trio")}
    for n, opts in enumerate(creates):
        assert seen["trio"][0][n] == seen["qemu"][0][n], opts
        assert seen["trio"][1][n] == seen["qemu"][1][n], opts
