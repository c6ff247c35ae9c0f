"""FUSE export: one scenario against qemu-storage-daemon 7.2 and qsd-trio.

Each scenario runs the same client operations on a mount served by either
daemon and records what the client saw (stat fields, data, return values,
errnos, seek results); the two records must be equal, and so must the image
files afterwards.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import subprocess

import pytest

from tests.helpers import HAVE_QEMU, normalise_prog, run_cli
from tests.integration.fuse_helpers import (
    errno_of,
    fuse_daemon,
    fuse_tmp,  # noqa: F401 - fixture
    is_mounted,
    make_mountpoint,
    mode_bits,
    seek_map,
    stat_fields,
    wait_for,
)

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-storage-daemon")

MiB = 1 << 20


def make_image(path, seed: int = 1) -> None:
    """1 MiB raw, data at [0, 64K) and [512K, 576K), holes elsewhere."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(MiB)
        f.write(rnd.randbytes(65536))
        f.seek(512 * 1024)
        f.write(rnd.randbytes(65536))


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pwrite(path, data: bytes, offset: int):
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def run(argv) -> int:
    return subprocess.run(argv, capture_output=True, check=False).returncode


def client_scenario(mp: str, image_size: int) -> dict:
    """Everything a client can observe; the mount must be writable."""
    obs: dict = {"stat": stat_fields(mp), "sha": sha(mp), "seek": seek_map(mp)}
    # writes at and past the end of the export
    obs["write_straddling_end"] = errno_of(pwrite, mp, b"x" * 10, image_size - 5)
    try:
        obs["straddle_count"] = pwrite(mp, b"y" * 10, image_size - 5)
    except OSError as e:
        obs["straddle_count"] = e.errno
    obs["write_past_end"] = errno_of(pwrite, mp, b"z" * 4096, image_size + 8192)
    obs["size_after_writes"] = os.stat(mp).st_size
    obs["fsync"] = errno_of(lambda: _with_fd(mp, os.fsync))
    obs["fdatasync"] = errno_of(lambda: _with_fd(mp, os.fdatasync))
    size = os.stat(mp).st_size
    obs["fallocate_inside"] = run(["fallocate", "-o", "0", "-l", "4096", mp])
    obs["punch_hole"] = run(["fallocate", "-p", "-o", "4096", "-l", "8192", mp])
    obs["zero_range"] = run(["fallocate", "-z", "-o", "16384", "-l", "4096", mp])
    obs["punch_no_keep"] = errno_of(lambda: _with_fd(mp, lambda fd: os.posix_fallocate(fd, 0, 1)))
    obs["sha_after_fallocate"] = sha(mp)
    obs["touch"] = errno_of(os.utime, mp, (1, 1))
    obs["chmod_600"] = errno_of(os.chmod, mp, 0o600)
    obs["chmod_640"] = errno_of(os.chmod, mp, 0o640)
    obs["mode_after_640"] = mode_bits(mp)
    obs["chmod_400"] = errno_of(os.chmod, mp, 0o400)
    obs["chmod_600_again"] = errno_of(os.chmod, mp, 0o600)
    obs["chown"] = errno_of(os.chown, mp, 1000, 1000)
    st = os.stat(mp)
    obs["owner_after_chown"] = (st.st_uid, st.st_gid)
    errno_of(os.chown, mp, 0, 0)
    obs["truncate_same"] = errno_of(os.truncate, mp, size)
    obs["truncate_grow"] = errno_of(os.truncate, mp, size + 65536)
    obs["size_after_grow"] = os.stat(mp).st_size
    obs["truncate_shrink"] = errno_of(os.truncate, mp, size)
    obs["size_after_shrink"] = os.stat(mp).st_size
    obs["fallocate_at_end"] = run(["fallocate", "-o", str(size), "-l", "4096", mp])
    obs["size_after_fallocate_end"] = os.stat(mp).st_size
    obs["seek_after"] = seek_map(mp)
    obs["sha_final"] = sha(mp)
    return obs


def _with_fd(path, fn):
    fd = os.open(path, os.O_RDWR)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def readonly_scenario(mp: str) -> dict:
    return {
        "stat": stat_fields(mp),
        "sha": sha(mp),
        # root passes default_permissions, so the export itself must refuse
        "write": errno_of(pwrite, mp, b"x", 0),
        "truncate": errno_of(os.truncate, mp, 4096),
        "chmod_600": errno_of(os.chmod, mp, 0o600),
        "chmod_444": errno_of(os.chmod, mp, 0o444),
        "mode": mode_bits(mp),
        "punch": run(["fallocate", "-p", "-o", "0", "-l", "4096", mp]),
    }


def both(daemon_factory, tmp, scenario, export_opts: str, fmt: str | None = None,
         file_opts: str = ""):
    """Run ``scenario(mp)`` under each daemon; returns ({kind: obs}, {kind: image})."""
    seen, images = {}, {}
    for kind in ("qemu", "trio"):
        image = str(tmp / f"img-{kind}")
        make_image(image)
        mp = make_mountpoint(tmp, f"mp-{kind}")
        d = fuse_daemon(daemon_factory, kind, image, mp, fmt=fmt, export_opts=export_opts,
                        file_opts=file_opts)
        try:
            seen[kind] = scenario(mp)
        finally:
            d.stop()
        assert not is_mounted(mp)
        images[kind] = image
    return seen, images


@pytest.mark.parametrize("export_opts,file_opts", [
    ("writable=on", ""),
    ("writable=on", ",discard=unmap"),
    ("writable=on,growable=on", ""),
    ("writable=on,allow-other=off", ""),
    ("writable=on,writethrough=on,allow-other=on", ""),
])
def test_client_view_matches(daemon_factory, fuse_tmp, export_opts, file_opts):  # noqa: F811
    seen, images = both(daemon_factory, fuse_tmp,
                        lambda mp: client_scenario(mp, MiB), export_opts, file_opts=file_opts)
    for key in seen["qemu"]:
        assert seen["trio"][key] == seen["qemu"][key], key
    assert sha(images["trio"]) == sha(images["qemu"])


@pytest.mark.parametrize("export_opts", ["writable=off", "allow-other=off"])
def test_readonly_view_matches(daemon_factory, fuse_tmp, export_opts):  # noqa: F811
    seen, images = both(daemon_factory, fuse_tmp, readonly_scenario, export_opts)
    assert seen["trio"] == seen["qemu"]
    assert sha(images["trio"]) == sha(images["qemu"])


def test_qcow2_guest_view_matches(daemon_factory, fuse_tmp):  # noqa: F811
    seen = {}
    for kind in ("qemu", "trio"):
        image = str(fuse_tmp / f"img-{kind}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "4M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k",
                        "-c", "write -z 1M 64k", image], check=True, capture_output=True)
        mp = make_mountpoint(fuse_tmp, f"mp-{kind}")
        d = fuse_daemon(daemon_factory, kind, image, mp, fmt="qcow2", export_opts="writable=off")
        try:
            st = stat_fields(mp)
            del st["blocks"]  # the qcow2 file's allocation, not part of the guest view
            seen[kind] = {"stat": st, "sha": sha(mp), "seek": seek_map(mp)}
        finally:
            d.stop()
    assert seen["trio"] == seen["qemu"]


@pytest.mark.parametrize("case", ["missing", "directory", "twice", "read-only-node",
                                  "bad-allow-other", "no-mountpoint"])
def test_mountpoint_errors_match(fuse_tmp, case):  # noqa: F811
    image = str(fuse_tmp / "img")
    make_image(image)
    (fuse_tmp / "dir").mkdir()
    make_mountpoint(fuse_tmp, "file")
    out = {}
    for kind in ("qemu", "trio"):
        mp = {"missing": "nonexistent", "directory": "dir"}.get(case, "file")
        extra = {"read-only-node": ",writable=on", "bad-allow-other": ",allow-other=maybe"}
        ro = ",read-only=on" if case == "read-only-node" else ""
        export = f"type=fuse,id=e,node-name=f,mountpoint={fuse_tmp / mp}{extra.get(case, '')}"
        if case == "no-mountpoint":
            export = "type=fuse,id=e,node-name=f"
        args = ["--blockdev", f"driver=file,node-name=f,filename={image}{ro}",
                "--export", export]
        if case == "twice":
            args += ["--export", f"type=fuse,id=e2,node-name=f,mountpoint={fuse_tmp / mp}"]
        r = run_cli(kind, args)
        out[kind] = (r.returncode, normalise_prog(r.stderr))
        # qemu-storage-daemon exits without unmounting the first export
        subprocess.run(["umount", "-l", str(fuse_tmp / "file")], capture_output=True, check=False)
    assert out["trio"] == out["qemu"]
    assert out["trio"][0] == 1


def test_qmp_errors_and_query_match(daemon_factory, fuse_tmp):  # noqa: F811
    image = str(fuse_tmp / "img")
    make_image(image)
    (fuse_tmp / "dir").mkdir()
    results = {}
    for kind in ("qemu", "trio"):
        # the same mountpoint string for both daemons: it appears in an error text
        mp = make_mountpoint(fuse_tmp, "mp")
        d = daemon_factory(kind, ["--blockdev", f"driver=file,node-name=f,filename={image}"])
        qmp = d.qmp()
        r = []
        for target in (str(fuse_tmp / "nope"), str(fuse_tmp / "dir"), mp, mp):
            r.append(qmp.cmd_raw("block-export-add", {
                "type": "fuse", "id": f"e{len(r)}", "node-name": "f", "mountpoint": target}))
        r.append(qmp.cmd_raw("query-block-exports")["return"])
        r.append(qmp.cmd_raw("block-export-del", {"id": "e2"}))
        ev = qmp.pull_event(wait=10)
        r.append((ev["event"], ev["data"]))
        r.append(qmp.cmd_raw("query-block-exports")["return"])
        results[kind] = r
        d.stop()
        assert not is_mounted(mp)
    assert results["trio"] == results["qemu"]


def _direct_read(path: str, offset: int) -> bytes:
    """One 4 KiB O_DIRECT read on the mount, so that the request reaches
    the daemon, not the kernel's cache of the mount."""
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == 4096
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def _qmp_ok(reply):
    assert "return" in reply, reply
    return reply["return"]


def _wait_event(q, name, **match):
    while True:
        ev = q.pull_event(wait=20.0)
        assert ev is not None, f"no {name} event"
        if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
            return ev


def mirror_pivot_scenario(daemon_factory, tmp, kind: str) -> dict:
    """A read-only export of ``src``; blockdev-mirror (sync=none) to
    ``dst``, completed: the export's node is now ``dst``, which kept its own
    bytes (zeroes), so each read says which node served it.  (Read-only:
    qemu-storage-daemon's writable export holds RESIZE, which the mirror
    job does not share.)"""
    src, dst = tmp / "src.raw", tmp / "dst.raw"
    src.write_bytes(b"\x11" * (4 * MiB))
    dst.write_bytes(bytes(4 * MiB))
    mp = make_mountpoint(tmp)
    d = daemon_factory(kind, [
        "--blockdev", f"driver=file,node-name=src,filename={src}",
        "--blockdev", f"driver=file,node-name=dst,filename={dst}",
        "--export", f"type=fuse,id=e,node-name=src,mountpoint={mp}"])
    wait_for(lambda: os.path.getsize(mp) == 4 * MiB, what="the mount")
    offsets = (0, 8192, 4 * MiB - 4096)
    seen: dict = {"before": [_direct_read(mp, o)[:1] for o in offsets]}
    q = d.qmp()
    _qmp_ok(q.cmd_raw("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                          "sync": "none"}))
    _wait_event(q, "BLOCK_JOB_READY")
    _qmp_ok(q.cmd_raw("job-complete", {"id": "j"}))
    _wait_event(q, "JOB_STATUS_CHANGE", id="j", status="null")
    seen["after"] = [_direct_read(mp, o)[:1] for o in offsets]
    _qmp_ok(q.cmd_raw("quit", {}))
    seen["exit"] = d.wait()
    seen["files"] = (sha(src), sha(dst))
    return seen


def test_reads_after_a_mirror_pivot_match(daemon_factory, fuse_tmp):  # noqa: F811
    """READs the request loop serves itself (read_now, read_submit) go to
    the node the export's edge points at now, as QEMU's BlockBackend
    follows the pivot (they went to the old source before)."""
    seen = {}
    for kind in ("qemu", "trio"):
        tmp = fuse_tmp / kind
        tmp.mkdir()
        seen[kind] = mirror_pivot_scenario(daemon_factory, tmp, kind)
    assert seen["qemu"]["before"] == [b"\x11"] * 3
    assert seen["qemu"]["after"] == [b"\x00"] * 3
    assert seen["trio"] == seen["qemu"]


@pytest.mark.parametrize("export_opts", ["writable=on", "writable=on,growable=on",
                                         "writable=off"])
def test_mirror_beside_an_export_is_refused_alike(daemon_factory, fuse_tmp, export_opts):  # noqa: F811
    """A writable FUSE export holds RESIZE, growable or not, which a mirror
    job does not share: blockdev-mirror of its node is refused with the
    same permission conflict (qsd-trio took RESIZE only when growable and
    let the mirror start); a read-only export lets it run."""
    results = {}
    for kind in ("qemu", "trio"):
        tmp = fuse_tmp / kind
        tmp.mkdir()
        for name in ("src", "dst"):
            with open(tmp / f"{name}.raw", "wb") as f:
                f.truncate(4 * MiB)
        mp = make_mountpoint(tmp)
        d = daemon_factory(kind, [
            "--blockdev", f"driver=file,node-name=src,filename={tmp / 'src.raw'}",
            "--blockdev", f"driver=file,node-name=dst,filename={tmp / 'dst.raw'}",
            "--export", f"type=fuse,id=e,node-name=src,mountpoint={mp},{export_opts}"])
        wait_for(lambda mp=mp: os.path.getsize(mp) == 4 * MiB, what="the mount")
        q = d.qmp()
        r = q.cmd_raw("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                          "sync": "none"})
        if "return" in r:
            _wait_event(q, "BLOCK_JOB_READY")
            _qmp_ok(q.cmd_raw("block-job-cancel", {"device": "j", "force": True}))
            _wait_event(q, "JOB_STATUS_CHANGE", id="j", status="null")
        results[kind] = json.loads(re.sub(r"#block\d+", "#B", json.dumps(r)))
        d.stop()
        assert not is_mounted(mp)
    assert results["trio"] == results["qemu"]
    if export_opts == "writable=off":
        assert results["trio"] == {"return": {}}
    else:
        assert "'resize'" in results["trio"]["error"]["desc"]
