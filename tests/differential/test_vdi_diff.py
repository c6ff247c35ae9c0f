"""driver=vdi on both daemons: the same image copies opened by
qemu-storage-daemon and qsd-trio give the same query-named-block-nodes, the
same data and block status over NBD, and the same image file after the same
writes over NBD; corrupt images fail to open with the same message.

Normalised: the image path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, qemu_io, run_cli

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = src / "data.raw"
    data = bytearray(6 * MiB + 512)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "vdi", str(raw), str(src / "dynamic.vdi"))
    qemu_img("convert", "-f", "raw", "-O", "vdi", "-o", "static=on", str(raw),
             str(src / "static.vdi"))
    qemu_img("create", "-q", "-f", "vdi", str(src / "empty.vdi"), "3M")
    return src


def _export_and_probe(kind, tmp_path, img, writes) -> dict:
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=vdi,node-name=v,file=f",
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


@pytest.mark.parametrize("name", ["dynamic.vdi", "static.vdi", "empty.vdi"])
def test_open_read_write_as_qemu(images, tmp_path, name):
    writes = ["write -P 0x11 0 512", "write -P 0x22 1048000 3000",
              "write -P 0x33 2097152 65536", "write -z 2500000 10000"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}-{name}"
        shutil.copyfile(images / name, img)
        seen[kind] = _export_and_probe(kind, tmp_path, img, writes)
        files[kind] = img.read_bytes()
        check = qemu_img("check", "-f", "vdi", str(img), check=False)
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    for key in ("info", "after", "data", "map"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = seen["trio"]["info"][0]
    assert top["drv"] == "vdi" and top["image"]["cluster-size"] == MiB
    # the same allocations in the same places: the files are equal
    assert len(files["trio"]) == len(files["qemu"])
    assert files["trio"] == files["qemu"]


def _patched(images, tmp_path, name, offset, fmt, value):
    img = tmp_path / f"bad-{name}"
    shutil.copyfile(images / "dynamic.vdi", img)
    with img.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))
    return img


BAD = {
    "signature": (64, "<I", 0),
    "version": (68, "<I", 0x00010000),
    "sector-size": (360, "<I", 0),
    "block-size": (376, "<I", 1 << 21),
    "too-many-blocks": (384, "<I", 0xFFFFFFFF),
    "disk-size": (368, "<Q", 1 << 60),
    "parent-uuid": (447, "<B", 7),
}


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    img = _patched(images, tmp_path, case, *BAD[case])
    args = ["--blockdev", f"driver=vdi,node-name=v,file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))
