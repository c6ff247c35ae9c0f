"""driver=parallels on both daemons: the same image copies opened by
qemu-storage-daemon and qsd-trio give the same query-named-block-nodes, the
same data and block status over NBD, and the same image file after the same
writes over NBD (and the same file length while open: the preallocation);
corrupt images fail to open with the same message; blockdev-create with
driver=parallels gives the same job results and the same files; the dirty
bitmaps of a Format Extension look, behave and export the same.

Normalised: the image path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.differential.format_runs import run_creates
from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, qemu_io, run, run_cli
from tests.nodes.parallels_images import NAME1, NAME2, model_extents, two_bitmaps

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("parallels-src")
    raw = src / "data.raw"
    data = bytearray(6 * MiB + 512)
    data[4096:300000] = bytes(range(256)) * ((300000 - 4096) // 256) + bytes(
        (300000 - 4096) % 256)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    raw.write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "parallels", str(raw), str(src / "1m.img"))
    qemu_img("convert", "-f", "raw", "-O", "parallels", "-o", "cluster_size=4096", str(raw),
             str(src / "4k.img"))
    qemu_img("create", "-q", "-f", "parallels", str(src / "empty.img"), "3M")
    old = bytearray((src / "4k.img").read_bytes())
    old[0:16] = b"WithoutFreeSpace"  # entries count sectors: 8 per 4 KiB cluster
    bat = struct.unpack_from(f"<{(6 * MiB + 512 + 4095) // 4096}I", old, 64)
    struct.pack_into(f"<{len(bat)}I", old, 64, *(e * 8 for e in bat))
    (src / "old.img").write_bytes(old)
    return src


def _export_and_probe(kind, tmp_path, img, writes) -> dict:
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=parallels,node-name=p,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=p,writable=on"]
    url = f"nbd+unix:///p?socket={sock}"
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        inuse = struct.unpack_from("<I", img.read_bytes(), 44)[0]
        for cmd in writes:
            qemu_io("-f", "raw", "-c", cmd, url)
        length_open = img.stat().st_size
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
    for n in after:  # the host's allocation of the preallocated space
        n["image"].pop("actual-size", None)
    return {"info": json.loads(json.dumps(info).replace(str(img), "IMG")),
            "after": json.loads(json.dumps(after).replace(str(img), "IMG")),
            "data": out.read_bytes(), "map": mapping, "inuse": inuse,
            "length-open": length_open}


@pytest.mark.parametrize("name", ["1m.img", "4k.img", "empty.img", "old.img"])
def test_open_read_write_as_qemu(images, tmp_path, name):
    writes = ["write -P 0x11 0 512", "write -P 0x22 1048000 3000",
              "write -P 0x33 2097152 65536", "write -z 2500000 10000",
              "write -P 0x44 1500000 1400000"]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}-{name}"
        shutil.copyfile(images / name, img)
        seen[kind] = _export_and_probe(kind, tmp_path, img, writes)
        files[kind] = img.read_bytes()
        check = qemu_img("check", "-f", "parallels", str(img), check=False)
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    for key in ("info", "after", "data", "map", "inuse", "length-open"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = seen["trio"]["info"][0]
    assert top["drv"] == "parallels" and "cluster-size" not in top["image"]
    assert seen["trio"]["inuse"] == 0x746F6E59
    assert files["trio"] == files["qemu"]


def _patched(images, tmp_path, name, offset, fmt, value):
    img = tmp_path / f"bad-{name}"
    shutil.copyfile(images / "4k.img", img)
    with img.open("r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))
    return img


BAD = {
    "magic": (3, "<B", 0),
    "version": (16, "<I", 1),
    "zero-tracks": (28, "<I", 0),
    "big-cluster": (28, "<I", 1 << 30),
    "catalog": (32, "<I", 0x7FFFFFFF),
    "inuse": (44, "<I", 0x746F6E59),
    "extension-rw": (56, "<Q", 8),  # a warning on both, then the same data
}


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    img = _patched(images, tmp_path, case, *BAD[case])
    seen = {}
    for kind in ("qemu", "trio"):
        copy = tmp_path / f"{kind}.img"  # the same name: the messages hold it
        shutil.copyfile(img, copy)
        args = ["--blockdev",
                f"driver=parallels,node-name=p,file.driver=file,file.filename={img}"]
        if case == "extension-rw":
            # the node opens with a warning; a second node of the same name
            # then stops the daemon
            args += ["--blockdev", "driver=null-co,node-name=p"]
        r = run_cli(kind, args)
        seen[kind] = (r.returncode, normalise_prog(r.stderr), img.read_bytes())
        img.write_bytes(copy.read_bytes())
    assert "Traceback" not in seen["trio"][1]
    assert seen["qemu"][0] == 1
    assert seen["trio"][:2] == seen["qemu"][:2]
    ours, theirs = seen["trio"][2], seen["qemu"][2]
    if case == "extension-rw":
        # qemu-storage-daemon exits without closing the node, leaving the
        # image marked in use; qsd-trio closes what it opened
        assert struct.unpack_from("<I", theirs, 44)[0] == 0x746F6E59
        assert struct.unpack_from("<I", ours, 44)[0] == 0
        theirs = theirs[:44] + bytes(4) + theirs[48:]
    assert ours == theirs


def test_read_only_extension_error(images, tmp_path):
    img = _patched(images, tmp_path, "ext", 56, "<Q", 8)
    args = ["--blockdev", f"driver=parallels,node-name=p,read-only=on,"
                          f"file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Format Extension magic" in theirs.stderr
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


def _bitmaps_probe(kind, tmp_path, img) -> dict:
    """The image opened read-only: what QMP shows of its bitmaps and does
    with them, then both exported over NBD and mapped with nbdinfo."""
    sock = tmp_path / f"{kind}-bm.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=parallels,node-name=p,file=f,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    out: dict = {}
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        out["nodes"] = q.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
        out["block"] = q.cmd_raw("query-block", {})
        for name in (NAME1, NAME2):
            out[f"sha256 {name}"] = q.cmd_raw("x-debug-block-dirty-bitmap-sha256",
                                              {"node": "p", "name": name})
        # read-only bitmaps: no clearing, no removing; merging from them and
        # disabling them work
        out["clear"] = q.cmd_raw("block-dirty-bitmap-clear", {"node": "p", "name": NAME1})
        out["remove"] = q.cmd_raw("block-dirty-bitmap-remove", {"node": "p", "name": NAME2})
        out["persist"] = q.cmd_raw("block-dirty-bitmap-add",
                                   {"node": "p", "name": "x", "persistent": True})
        out["add"] = q.cmd_raw("block-dirty-bitmap-add",
                               {"node": "p", "name": "copy", "granularity": 65536})
        out["merge"] = q.cmd_raw("block-dirty-bitmap-merge",
                                 {"node": "p", "target": "copy", "bitmaps": [NAME1]})
        out["disable"] = q.cmd_raw("block-dirty-bitmap-disable", {"node": "p", "name": NAME2})
        out["export"] = q.cmd_raw("block-export-add", {
            "type": "nbd", "id": "e", "node-name": "p", "bitmaps": [NAME1, NAME2, "copy"]})
        for name in (NAME1, NAME2, "copy"):
            r = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}",
                    f"nbd+unix:///p?socket={sock}")
            out[f"map {name}"] = [(e["offset"], e["length"]) for e in json.loads(r.stdout)
                                  if e["type"] & 1]
        out["after"] = q.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
    return json.loads(json.dumps(out).replace(str(img), "IMG"))


def test_dirty_bitmaps_as_qemu(tmp_path):
    """A Format Extension with dirty bitmaps (written from the specification:
    qemu-img cannot make one) on an image with data: both daemons list the
    same bitmaps, refuse and allow the same operations on them, and export
    the same dirty ranges, which are the model's."""
    src = tmp_path / "src.img"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=512", str(src),
             str(4 * MiB + 512))
    qemu_io("-f", "parallels", "-c", "write -P 0x5a 65536 131072", str(src))
    want = two_bitmaps(src)
    seen = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}.img"
        shutil.copyfile(src, img)
        seen[kind] = _bitmaps_probe(kind, tmp_path, img)
        assert img.read_bytes() == src.read_bytes()  # opened read-only: untouched
    assert seen["trio"] == seen["qemu"]
    ours = seen["trio"]
    size = 4 * MiB + 512
    for name, (gran, dirty) in want.items():
        assert ours[f"map {name}"] == [list(e) for e in model_extents(gran, dirty, size)]
    assert ours["map copy"] == ours[f"map {NAME1}"]
    top = next(n for n in ours["nodes"] if n["node-name"] == "p")
    assert [(b["name"], b["granularity"], b["count"], b["persistent"], b["recording"])
            for b in top["dirty-bitmaps"]] == [
        (NAME2, 512, len(want[NAME2][1]) * 512, False, True),
        (NAME1, 65536, 3 * 65536, False, True)]  # the last granule counts whole
    assert "readonly" in ours["clear"]["error"]["desc"]
    assert "readonly" in ours["remove"]["error"]["desc"]
    assert ours["merge"] == ours["disable"] == ours["export"] == {"return": {}}


def test_dirty_bitmaps_ignored_read_write(tmp_path):
    """Opened read-write, the image's bitmaps are not loaded: both daemons
    warn that the Format Extension is ignored and list none."""
    img = tmp_path / "src.img"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=512", str(img),
             str(4 * MiB + 512))
    two_bitmaps(img)
    seen = {}
    for kind in ("qemu", "trio"):
        copy = tmp_path / f"{kind}.img"
        shutil.copyfile(img, copy)
        with Daemon(kind, tmp_path, ["--blockdev", f"driver=parallels,node-name=p,"
                                     f"file.driver=file,file.filename={copy}"],
                    allow_stderr="Format Extension ignored in RW mode") as d:
            nodes = d.qmp().cmd_raw("query-named-block-nodes", {"flat": True})["return"]
            # the image's name is in the warning (the option it comes from)
            seen[kind] = ([n.get("dirty-bitmaps") for n in nodes],
                          normalise_prog(d.stderr()).replace(str(copy), "IMG"))
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"][0] == [None, None]
    assert "warning: Format Extension ignored in RW mode" in seen["trio"][1]


def _create(kind, tmp_path, creates) -> tuple[list, list[bytes]]:
    """Each blockdev-create on a file node holding old bytes: the outcome
    of each and the file it left."""
    out, files = run_creates(kind, tmp_path, creates, "img", b"\xee" * 3000)
    return out, [f.read_bytes() for f in files]


def test_blockdev_create(tmp_path):
    creates = [
        {"driver": "parallels", "size": 10 * MiB},
        {"driver": "parallels", "size": 10 * MiB, "cluster-size": 4096},
        {"driver": "parallels", "size": 0},
        {"driver": "parallels", "size": 1000},  # not whole sectors
        {"driver": "parallels", "size": 1000, "cluster-size": 1000},
        {"driver": "parallels", "size": 10 * MiB, "cluster-size": 1000},
        {"driver": "parallels", "size": 10 * MiB, "cluster-size": 256},
        {"driver": "parallels", "size": 10 * MiB, "cluster-size": 1536},
        {"driver": "parallels", "size": 10 * MiB, "cluster-size": 0},
        {"driver": "parallels", "size": -512, "cluster-size": 1000},
        {"driver": "parallels", "size": 4096 << 32, "cluster-size": 4096},
        {"driver": "parallels", "size": MiB, "cluster-size": 1 << 31},
        {"driver": "parallels", "size": 3 << 40},
        {"driver": "parallels", "size": -512},
    ]
    seen = {kind: _create(kind, tmp_path, creates) for kind in ("qemu", "trio")}
    for n, opts in enumerate(creates):
        assert seen["trio"][0][n] == seen["qemu"][0][n], opts
        assert seen["trio"][1][n] == seen["qemu"][1][n], opts
