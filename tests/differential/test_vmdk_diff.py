"""driver=vmdk on both daemons: the same images (every subformat qemu-img
converts to, zeroed grains, a descriptor mixing flat and sparse extents,
a backing chain, and the seSparse, VMware stream and COWD images of
tests/nodes/vmdk_images.py) opened by qemu-storage-daemon and qsd-trio give
the same query-named-block-nodes (format-specific info with the extents),
the same data, ``qemu-img map`` and allocation depth over NBD; the same
writes over NBD give the same replies, the same stderr lines and the same
image files, clean in ``qemu-img check``; corrupt images fail to open with
the same message; blockdev-create with driver=vmdk gives the same images
and the same errors.

Normalised: the images' directory; the actual size of images just
written (the file system's delayed allocation counts blocks at its own
pace); the numbers of implicit node names
(QEMU's are a counter and two random digits); the CID a first write or a
creation draws at random (g_random_int), which also changes the length of
the descriptor text by a digit now and then, so the descriptor is compared
as text up to its end, not the bytes a shorter one leaves after it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.differential.create_job import run_create
from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, qemu_io, run_cli
from tests.nodes import vmdk_images

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
GRAIN = 64 << 10
CONVERTED = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
             "twoGbMaxExtentFlat", "streamOptimized"]


def _pattern(seed: int, n: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("vmdk-src")
    raw = src / "data.raw"
    data = bytearray(6 * MiB)
    data[4096:300000] = _pattern(1, 300000 - 4096)
    data[4 * MiB + 5:4 * MiB + 9000] = b"\x5a" * 8995
    data[-100:] = b"\x77" * 100
    raw.write_bytes(data)
    for sub in CONVERTED:
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                 str(src / f"{sub}.vmdk"))
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", str(src / "zeroed.vmdk"),
             str(6 * MiB))
    qemu_io("-f", "vmdk", "-c", "write -P 0x33 0 300000", "-c", f"write -z {MiB} {2 * MiB}",
            str(src / "zeroed.vmdk"))
    # flat + sparse + flat, each file from qemu-img
    lines = []
    for i, size in enumerate((MiB, 2 * MiB, MiB + 512 * 1024)):
        sub = "monolithicSparse" if i % 2 else "monolithicFlat"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}",
                 str(src / f"mixed{i}.vmdk"), str(size))
        if sub == "monolithicFlat":
            (src / f"mixed{i}.vmdk").unlink()
            lines.append(f'{size // 512} FLAT "mixed{i}-flat.vmdk" 0')
        else:
            lines.append(f'{size // 512} SPARSE "mixed{i}.vmdk"')
        qemu_io("-f", "vmdk" if i % 2 else "raw", "-c", f"write -P {0x40 + i} 0 70000",
                str(src / (f"mixed{i}.vmdk" if i % 2 else f"mixed{i}-flat.vmdk")))
    (src / "mixed.vmdk").write_bytes(vmdk_images.descriptor("twoGbMaxExtentSparse", lines))
    # a backing chain
    qemu_img("create", "-q", "-f", "vmdk", str(src / "base.vmdk"), str(4 * MiB))
    qemu_io("-f", "vmdk", "-c", "write -P 0x61 0 3M", str(src / "base.vmdk"))
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
             str(src / "top.vmdk"), str(5 * MiB))
    qemu_io("-f", "vmdk", "-c", "write -P 0x62 100000 70000", str(src / "top.vmdk"))
    # images qemu-img cannot make
    grains: dict[int, bytes | str] = {0: _pattern(2, 4096), 5: _pattern(3, 4096),
                                      4096: _pattern(4, 4096), 6: "zero", 7: "unmapped"}
    vmdk_images.sesparse(src / "se", 40 * MiB // 512, grains)
    vmw = bytearray(3 * MiB + 1536)
    vmw[100:70000] = _pattern(5, 69900)
    vmw[2 * MiB:2 * MiB + 9000] = _pattern(6, 9000)
    vmdk_images.vmware_stream(src / "vmware.vmdk", bytes(vmw))
    vmdk_images.cowd(src / "cowd.vmdk", 8192, {0: _pattern(7, 8192), 9: _pattern(8, 8192)})
    return src


def _norm(obj, img_dir: Path, *, written: bool = False):
    s = json.dumps(obj)
    s = s.replace(str(img_dir), "DIR")
    s = re.sub(r'"#block\d+"', '"#block"', s)
    if written:
        # blocks the file system has allocated so far (ext4's delayed
        # allocation counts them at its own pace after writes)
        s = re.sub(r'"actual-size": \d+', '"actual-size": 0', s)
    return json.loads(s)


def _export(kind: str, tmp_path: Path, img: Path, *, writes: list[str], read_only: bool,
            allow: str | None = None) -> dict:
    sock = tmp_path / f"{kind}.sock"
    ro = ",read-only=on" if read_only else ""
    args = ["--blockdev", f"driver=vmdk,node-name=v{ro},file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=e,node-name=v,allocation-depth=on,"
                        f"writable={'off' if read_only else 'on'}"]
    url = f"nbd+unix:///v?socket={sock}"
    with Daemon(kind, tmp_path, args, allow_stderr=allow) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        replies = []
        for cmd in writes:
            r = qemu_io("-f", "raw", "-c", cmd, url, check=False)
            replies.append((r.returncode, r.stdout.splitlines()[:1], r.stderr))
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        depth = subprocess.run(["nbdinfo", "--map=qemu:allocation-depth", url],
                               capture_output=True, text=True, check=True).stdout
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
    stderr = [normalise_prog(ln) for ln in d.stderr().splitlines() if ln.strip()]
    # the copies written here are fresh files: their block counts settle
    # at the file system's pace too
    return {"info": _norm(info, img.parent, written=not read_only),
            "after": _norm(after, img.parent, written=not read_only),
            "replies": replies, "data": out.read_bytes(), "map": mapping, "depth": depth,
            "stderr": stderr}


READS = {name: name for name in [f"{s}.vmdk" for s in CONVERTED]
         + ["zeroed.vmdk", "mixed.vmdk", "top.vmdk", "se.vmdk", "vmware.vmdk", "cowd.vmdk"]}


@pytest.mark.parametrize("name", list(READS))
def test_open_read_as_qemu(images, tmp_path, name):
    """The same image read-only on both daemons: the same nodes and info,
    data, map and allocation depth."""
    img = images / name
    seen = {kind: _export(kind, tmp_path, img, writes=[], read_only=True)
            for kind in ("qemu", "trio")}
    for key in ("info", "data", "map", "depth", "stderr"):
        assert seen["trio"][key] == seen["qemu"][key], key
    top = next(n for n in seen["trio"]["info"] if n["node-name"] == "v")
    assert top["image"]["format-specific"]["type"] == "vmdk"


def _copy(images: Path, dest: Path, stem: str) -> None:
    dest.mkdir()
    for p in images.iterdir():
        if p.name.startswith(stem):
            shutil.copyfile(p, dest / p.name)


def _norm_file(b: bytes, descriptor_file: bool) -> bytes:
    """The file with its descriptor's CID masked (see the module's docstring)."""
    def text(t: bytes) -> bytes:
        t = re.sub(rb"(^|\n)CID=[0-9a-f]+\n", rb"\1CID=X\n", t.split(b"\0", 1)[0])
        # a parent's CID is its own random one (checked in test_blockdev_create)
        return re.sub(rb"\nparentCID=(?!ffffffff\n)[0-9a-f]+\n", b"\nparentCID=P\n", t)
    if b[:4] == b"KDMV":
        return b[:512] + text(b[512:512 + 10240]).ljust(10240, b"\0") + b[512 + 10240:]
    return text(b) if descriptor_file else b


WRITES = ["write -P 0x11 0 512", "write -P 0x22 2096000 3000", "write -P 0x33 4194304 65536",
          "write -z 2500000 10000", "write -z 1048576 131072", "write -P 0x44 1000 512",
          "write -z 0 4M", "write -P 0x55 4718592 200000"]
STREAM_WRITES = ["write -P 0x11 0 512", f"write -P 0x22 {2 * MiB} {GRAIN}",
                 f"write -P 0x23 {2 * MiB} {GRAIN}", f"write -P 0x24 {5 * MiB + 512} 512",
                 f"write -z {5 * MiB} {2 * GRAIN}", f"write -z {3 * MiB} 1000",
                 f"write -P 0x25 {6 * MiB - GRAIN} {GRAIN}"]


@pytest.mark.parametrize("name", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                  "twoGbMaxExtentFlat", "streamOptimized", "zeroed", "mixed",
                                  "top", "cowd"])
def test_writes_as_qemu(images, tmp_path, name):
    """The same writes over NBD to copies of the same image: the same
    replies (streamOptimized refuses most), the same stderr lines, the same
    nodes after, the same files (CID masked), clean in qemu-img check."""
    writes = STREAM_WRITES if name == "streamOptimized" else WRITES
    if name == "cowd":
        writes = [w for w in writes if "4718592" not in w]
    seen = {}
    files = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        _copy(images, d, "mixed" if name == "mixed" else "base" if name == "top" else name)
        if name == "top":
            shutil.copyfile(images / "top.vmdk", d / "top.vmdk")
        seen[kind] = _export(kind, d, d / f"{name}.vmdk", writes=writes, read_only=False,
                             allow=r"^qsd-trio: Could not write to allocated cluster for "
                                   r"streamOptimized$")
        check = qemu_img("check", "-f", "vmdk", str(d / f"{name}.vmdk"), check=False)
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
        files[kind] = {p.name: _norm_file(p.read_bytes(), p.name == f"{name}.vmdk")
                       for p in sorted(d.iterdir()) if p.suffix == ".vmdk"}
    for key in ("replies", "stderr", "info", "after", "data", "map", "depth"):
        assert seen["trio"][key] == seen["qemu"][key], key
    assert files["trio"].keys() == files["qemu"].keys()
    for fname in files["qemu"]:
        assert files["trio"][fname] == files["qemu"][fname], fname


@pytest.mark.parametrize("backing", ["null", "node", "qcow2"])
def test_backing_option(images, tmp_path, backing):
    """backing given at blockdev-add: null (the unallocated grains read as
    zeroes), another vmdk node (the parentCID check then compares its CID),
    a node of another format (every unallocated read fails): the same
    nodes (file names spelled out as json:) and the same reads."""
    base = images / "base.vmdk"
    qcow = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow), str(4 * MiB))
    # data there: a hole would be sent as a hole (NBD's sparse reads)
    # without reading the overlay
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 0 1M", str(qcow))
    seen = {}
    for kind in ("qemu", "trio"):
        args = []
        if backing == "node":
            args += ["--blockdev", f"driver=vmdk,node-name=b,read-only=on,"
                                   f"file.driver=file,file.filename={base}"]
        elif backing == "qcow2":
            args += ["--blockdev", f"driver=qcow2,node-name=b,read-only=on,"
                                   f"file.driver=file,file.filename={qcow}"]
        ref = "null" if backing == "null" else '"b"'
        sock = tmp_path / f"{kind}.sock"
        args += ["--blockdev", '{"driver": "vmdk", "node-name": "v", "read-only": true, '
                               f'"backing": {ref}, "file": {{"driver": "file", '
                               f'"filename": "{images / "top.vmdk"}"}}}}',
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "type=nbd,id=e,node-name=v"]
        url = f"nbd+unix:///v?socket={sock}"
        with Daemon(kind, tmp_path, args) as d:
            info = d.qmp().cmd_raw("query-named-block-nodes", {})["return"]
            reads = [qemu_io("-r", "-f", "raw", "-c", f"read -P 0x61 {off} 512", url,
                             check=False)
                     for off in (0, 100000, 3 * MiB)]
        seen[kind] = (_norm(info, images), [(r.returncode, r.stdout.splitlines()[:1])
                                            for r in reads])
    assert seen["trio"] == seen["qemu"]
    # offset 0 is the parent's: zeroes without one, refused for a qcow2 one
    # (EINVAL, which reaches the NBD client as EIO)
    first = seen["qemu"][1][0]
    assert first == {"null": (1, ["Pattern verification failed at offset 0, 512 bytes"]),
                     "node": (0, ["read 512/512 bytes at offset 0"]),
                     "qcow2": (1, ["read failed: Input/output error"])}[backing], first


def test_sesparse_auto_read_only(images, tmp_path):
    """seSparse opened read-write with auto-read-only: the node becomes
    read-only after its extent file opened read-write; the same nodes."""
    seen = {}
    for kind in ("qemu", "trio"):
        args = ["--blockdev", f"driver=vmdk,node-name=v,auto-read-only=on,"
                              f"file.driver=file,file.filename={images / 'se.vmdk'}"]
        with Daemon(kind, tmp_path, args) as d:
            seen[kind] = _norm(d.qmp().cmd_raw("query-named-block-nodes", {})["return"],
                               images)
    assert seen["trio"] == seen["qemu"]
    assert [n["ro"] for n in seen["qemu"]] == [False, True, False]


def test_resize_and_compress_filter(images, tmp_path):
    """block_resize is refused with the generic layer's message; a compress
    filter over the node writes through it (vmdk takes compressed writes:
    a streamOptimized image compresses them, the others write them as they
    are)."""
    seen = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        _copy(images, d, "monolithicSparse")
        img = d / "monolithicSparse.vmdk"
        sock = d / "s.sock"
        args = ["--blockdev", f"driver=vmdk,node-name=v,file.driver=file,file.filename={img}",
                "--blockdev", "driver=compress,node-name=c,file=v",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=c,writable=on"]
        with Daemon(kind, d, args) as dm:
            q = dm.qmp()
            resize = q.cmd_raw("block_resize", {"node-name": "v", "size": 8 * MiB})
            r = qemu_io("-f", "raw", "-c", f"write -P 0x66 {3 * MiB} {GRAIN}",
                        f"nbd+unix:///c?socket={sock}", check=False)
        seen[kind] = (resize, r.returncode, r.stdout.splitlines()[:1],
                      _norm_file(img.read_bytes(), False))
    assert seen["trio"] == seen["qemu"]


def _patched(images: Path, tmp_path: Path, base: str, offset: int, data: bytes) -> Path:
    d = tmp_path / "bad"
    _copy(images, d, base.split(".")[0])
    img = d / base
    b = bytearray(img.read_bytes())
    b[offset:offset + len(data)] = data
    img.write_bytes(b)
    return img


def _replace(images: Path, tmp_path: Path, base: str, old: bytes, new: bytes) -> Path:
    d = tmp_path / "bad"
    _copy(images, d, base.split(".")[0])
    img = d / base
    b = img.read_bytes()
    assert old in b
    img.write_bytes(b.replace(old, new, 1))
    return img


BAD = {
    "version": ("monolithicSparse.vmdk", 4, (4).to_bytes(4, "little")),
    "version3-rw": ("monolithicSparse.vmdk", 4, (3).to_bytes(4, "little")),
    "gtes": ("monolithicSparse.vmdk", 44, (513).to_bytes(4, "little")),
    "gtes-zero": ("monolithicSparse.vmdk", 44, bytes(4)),
    "granularity": ("monolithicSparse.vmdk", 20, (0x200001).to_bytes(8, "little")),
    "l1-size": ("monolithicSparse.vmdk", 12, (1 << 40).to_bytes(8, "little") + bytes(8)),
    "grain-offset": ("monolithicSparse.vmdk", 64, (1 << 20).to_bytes(8, "little")),
    "gd-outside": ("monolithicSparse.vmdk", 56, (1 << 54).to_bytes(8, "little")),
    "rgd-outside": ("monolithicSparse.vmdk", 48, (1 << 54).to_bytes(8, "little")),
    "footer": ("monolithicSparse.vmdk", 56, b"\xff" * 8),
    "magic": ("monolithicSparse.vmdk", 0, b"KDMX"),
    "no-cid": ("monolithicSparse.vmdk", 512, b"# Disk DescriptorFile\nversion=1\n" + bytes(64)),
    "stream-footer": ("vmware.vmdk", -1024, b"KDMX"),
    "se-magic": ("se-sesparse.vmdk", 0, b"\xbf"),
    "se-version": ("se-sesparse.vmdk", 8, b"\x02"),
    "se-grain": ("se-sesparse.vmdk", 24, b"\x10"),
    "se-flags": ("se-sesparse.vmdk", 40, b"\x01"),
    "se-reserved": ("se-sesparse.vmdk", 56, b"\x01"),
    "se-pad": ("se-sesparse.vmdk", 300, b"\x01"),
    "se-volatile": ("se-sesparse.vmdk", 512, b"\x00"),
    "se-dirty": ("se-sesparse.vmdk", 512 + 24, b"\x01"),
    "se-volatile-outside": ("se-sesparse.vmdk", 80, (1 << 60).to_bytes(8, "little")),
}
DESC_BAD = {
    "create-type": ("monolithicFlat.vmdk", b'createType="monolithicFlat"', b'createType="x"'),
    "no-create-type": ("monolithicFlat.vmdk", b"createType", b"kreateType"),
    "flat-line": ("monolithicFlat.vmdk", b'-flat.vmdk" 0', b'-flat.vmdk"'),
    "sparse-line": ("twoGbMaxExtentSparse.vmdk", b'-s001.vmdk"', b'-s001.vmdk" 7'),
    "missing": ("twoGbMaxExtentFlat.vmdk", b"-f001.vmdk", b"-f009.vmdk"),
    # the missing file is opened (and fails) before the bad line is scanned
    "missing-then-bad": ("twoGbMaxExtentSparse.vmdk", b'-s001.vmdk"\n',
                         b'-s009.vmdk"\nRW 1 FLAT "x"\n'),
    "parent-hint": ("monolithicFlat.vmdk", b"\n#DDB", b'\nparentFileNameHint="x'),
    "no-parent-cid": ("monolithicFlat.vmdk", b"parentCID", b"parentXID"),
    "too-large": ("monolithicFlat.vmdk", b"RW 12288", b"RW 18014398509481983"),
    # unchanged: seSparse opened read-write
    "se-rw": ("se.vmdk", b"version=1", b"version=1"),
    "sparse-not-vmdk": ("mixed.vmdk", b'"mixed1.vmdk"', b'"mixed0-flat.vmdk"'),
}


def _compare_open(img: Path, read_only: bool = False) -> None:
    ro = ",read-only=on" if read_only else ""
    args = ["--blockdev", f"driver=vmdk,node-name=v{ro},file.driver=file,file.filename={img}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1, theirs.stderr
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


@pytest.mark.parametrize("case", list(BAD))
def test_open_errors_match(images, tmp_path, case):
    base, off, data = BAD[case]
    if off < 0:
        off += (images / base).stat().st_size
    img = _patched(images, tmp_path, base, off, data)
    if base.startswith("se-"):
        img = img.with_name("se.vmdk")
    _compare_open(img, read_only=base.startswith("se"))


@pytest.mark.parametrize("case", list(DESC_BAD))
def test_descriptor_errors_match(images, tmp_path, case):
    base, old, new = DESC_BAD[case]
    img = _replace(images, tmp_path, base, old, new)
    _compare_open(img)


def _create(kind: str, tmp_path: Path, creates: list[dict]) -> tuple[list, list[dict]]:
    """Each blockdev-create on fresh file nodes f<n> (the image) and e<n>-<i>
    (extents); the outcome of each and the files it left (CID masked)."""
    d = tmp_path / kind
    d.mkdir()
    args = []
    for n in range(len(creates)):
        for name in (f"f{n}", *(f"e{n}-{i}" for i in range(3))):
            (d / f"{name}.vmdk").write_bytes(b"")
            args += ["--blockdev", f"driver=file,node-name={name},filename={d / name}.vmdk"]
    out = []
    with Daemon(kind, tmp_path, args) as dm:
        q = dm.qmp()
        for n, opts in enumerate(creates):
            o = {"driver": "vmdk", "file": f"f{n}", **opts}
            if "extents" in o:
                o["extents"] = [f"e{n}-{i}" for i in o["extents"]]
            how, err = run_create(q, f"j{n}", o)
            out.append((how, err.replace(str(d), "DIR") if isinstance(err, str) else err))
    files = []
    for n in range(len(creates)):
        fs = {}
        for p in sorted(d.glob(f"[fe]{n}*.vmdk")):
            b = p.read_bytes()
            fs[p.name] = _norm_file(b, p.name == f"f{n}.vmdk")
        files.append(fs)
    return out, files


def test_blockdev_create(images, tmp_path):
    creates = [
        {"size": 10 * MiB},
        {"size": 10 * MiB, "zeroed-grain": True, "adapter-type": "lsilogic"},
        {"size": 10 * MiB, "subformat": "streamOptimized", "hwversion": "6"},
        {"size": 3 * MiB, "subformat": "monolithicFlat", "extents": [0],
         "toolsversion": "1234"},
        {"size": (2 << 30) + 512, "subformat": "twoGbMaxExtentFlat", "extents": [0, 1]},
        {"size": (2 << 30) + MiB, "subformat": "twoGbMaxExtentSparse", "extents": [0, 1],
         "adapter-type": "legacyESX"},
        {"size": 1000},
        {"size": 0},
        {"size": MiB, "subformat": "monolithicFlat"},
        {"size": (4 << 30) + 512, "subformat": "twoGbMaxExtentSparse", "extents": [0, 1]},
        {"size": MiB, "subformat": "monolithicFlat", "extents": [0, 1]},
        {"size": MiB, "subformat": "monolithicFlat", "backing-file": "b.vmdk", "extents": [0]},
        {"size": MiB, "subformat": "twoGbMaxExtentFlat", "zeroed-grain": True,
         "extents": [0]},
        {"size": MiB, "backing-file": "missing.vmdk"},
        {"size": MiB, "backing-file": "f0.vmdk"},
        {"size": MiB, "backing-file": str(images / "data.raw")},
        {"size": 1 << 40},
    ]
    theirs, their_files = _create("qemu", tmp_path, creates)
    ours, our_files = _create("trio", tmp_path, creates)
    assert ours == theirs
    for n, (a, b) in enumerate(zip(our_files, their_files, strict=True)):
        assert a == b, (n, creates[n])
    assert theirs[0] == ("job", None) and theirs[14] == ("job", None)
    # the parentCID recorded is the parent's CID
    for kind in ("qemu", "trio"):
        parent = (tmp_path / kind / "f0.vmdk").read_bytes()[512:]
        child = (tmp_path / kind / "f14.vmdk").read_bytes()[512:]
        cid = re.search(rb"\nCID=([0-9a-f]+)\n", parent)
        pcid = re.search(rb"\nparentCID=([0-9a-f]+)\n", child)
        assert cid and pcid and cid.group(1) == pcid.group(1)
        assert b'parentFileNameHint="f0.vmdk"' in child
    for n in (0, 1, 2, 3, 4, 5, 14):
        r = qemu_img("check", "-f", "vmdk", str(tmp_path / "trio" / f"f{n}.vmdk"), check=False)
        assert r.returncode == 0, (n, r.stdout, r.stderr)
