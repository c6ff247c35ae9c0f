"""Persistent dirty bitmaps survive their node becoming read-only (issue 12).

QEMU stores a qcow2 node's persistent bitmaps when the node is reopened
read-only (qcow2_reopen_prepare), since nothing stores them at close once the
node is read-only.  Each scenario runs against qemu-storage-daemon and
qsd-trio on identical images; afterwards qemu-storage-daemon itself reads the
resulting images (qemu-img info for the bitmap list and flags, and
x-debug-block-dirty-bitmap-sha256 for the bits), so the check does not depend
on our own bitmap loader.  A bitmap recorded by a daemon must equal the one
qemu-storage-daemon recorded for the same writes.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
KINDS = ("qemu", "trio")


def bitmaps_on_disk(path) -> list:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def bitmap_sha256(tmp_path, path, name: str = "b0") -> str:
    """The bits of ``name`` in the image at ``path``, as qemu-storage-daemon loads them."""
    opts = {"driver": "qcow2", "node-name": "n", "read-only": True, "backing": None,
            "file": {"driver": "file", "filename": str(path)}}
    d = Daemon("qemu", tmp_path, ["--blockdev", json.dumps(opts)]).start()
    try:
        return d.qmp().cmd_raw("x-debug-block-dirty-bitmap-sha256",
                               {"node": "n", "name": name})["return"]["sha256"]
    finally:
        d.stop()


def write_through_nbd(sock, *cmds: str) -> None:
    args = []
    for c in cmds:
        args += ["-c", c]
    qemu_io("-f", "raw", *args, f"nbd+unix:///n?socket={sock}")


def start(kind, d, blockdev: str) -> Daemon:
    return Daemon(kind, d, [
        "--blockdev", blockdev,
        "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
        "--export", "type=nbd,id=e,node-name=n,name=n,writable=on"]).start()


def test_snapshot_sync_stores_the_old_tops_bitmaps(tmp_path):
    """blockdev-snapshot-sync makes the old top read-only: its persistent
    bitmap, with what the client wrote, is on disk after quit."""
    seen = {}
    for kind in KINDS:
        d = tmp_path / kind
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(d / "top.qcow2"), str(64 * MiB))
        daemon = start(kind, d, f"driver=qcow2,node-name=n,file.driver=file,"
                                f"file.filename={d}/top.qcow2")
        q = daemon.qmp()
        assert q.cmd_raw("block-dirty-bitmap-add",
                         {"node": "n", "name": "b0", "persistent": True}) == {"return": {}}
        write_through_nbd(d / "nbd.sock", "write -P 1 0 64k", "write -P 2 5M 100k")
        assert q.cmd_raw("blockdev-snapshot-sync", {
            "node-name": "n", "snapshot-file": f"{d}/snap.qcow2", "format": "qcow2",
            "snapshot-node-name": "snap"}) == {"return": {}}
        ro = {n["node-name"]: n["ro"]
              for n in q.cmd_raw("query-named-block-nodes", {"flat": True})["return"]}
        q.cmd_raw("quit")
        daemon.wait()
        daemon.stop()
        assert qemu_img("check", str(d / "top.qcow2")).returncode == 0
        seen[kind] = (ro["n"], bitmaps_on_disk(d / "top.qcow2"),
                      bitmap_sha256(tmp_path, d / "top.qcow2"))
    assert seen["qemu"][1], "qemu-storage-daemon stored the bitmap"
    assert seen["trio"] == seen["qemu"]


def test_reopen_read_only_stores_bitmaps_and_read_write_marks_them_in_use(tmp_path):
    """blockdev-reopen read-only=on stores the bitmaps; read-only=off again
    marks them in use on disk (a crash then leaves them inconsistent, not
    stale); quit stores them with everything written in between."""
    seen = {}
    for kind in KINDS:
        d = tmp_path / kind
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(d / "img.qcow2"), str(64 * MiB))
        opts = {"driver": "qcow2", "node-name": "n",
                "file": {"driver": "file", "filename": f"{d}/img.qcow2"}}
        daemon = start(kind, d, json.dumps(opts))
        q = daemon.qmp()
        q.cmd_raw("block-dirty-bitmap-add", {"node": "n", "name": "b0", "persistent": True})
        write_through_nbd(d / "nbd.sock", "write -P 3 1M 64k")
        assert q.cmd_raw("block-export-del", {"id": "e"}) == {"return": {}}
        steps = [q.cmd_raw("blockdev-reopen", {"options": [{**opts, "read-only": True}]})]
        steps.append(bitmaps_on_disk(d / "img.qcow2"))
        steps.append(q.cmd_raw("blockdev-reopen", {"options": [{**opts, "read-only": False}]}))
        steps.append(bitmaps_on_disk(d / "img.qcow2"))
        q.cmd_raw("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n",
                                       "name": "n", "writable": True})
        write_through_nbd(d / "nbd.sock", "write -P 4 9M 4k")
        q.cmd_raw("quit")
        daemon.wait()
        daemon.stop()
        steps.append(bitmaps_on_disk(d / "img.qcow2"))
        steps.append(bitmap_sha256(tmp_path, d / "img.qcow2"))
        seen[kind] = steps
    flags = [b["flags"] for b in seen["qemu"][1]]
    assert flags == [["auto"]], "stored and consistent while read-only"
    assert [b["flags"] for b in seen["qemu"][3]] == [["in-use", "auto"]]
    assert seen["trio"] == seen["qemu"]


def test_intermediate_commit_stores_the_bases_bitmap(tmp_path):
    """An intermediate commit reopens the base read-write and back: the
    base's persistent bitmap records the committed clusters and is stored
    when the base becomes read-only again."""
    seen = {}
    for kind in KINDS:
        d = tmp_path / kind
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(64 * MiB))
        qemu_img("bitmap", "--add", str(d / "base.qcow2"), "b0")
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2",
                 str(d / "mid.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "mid.qcow2"), "-F", "qcow2",
                 str(d / "top.qcow2"))
        qemu_io("-f", "qcow2", "-c", "write -P 5 2M 128k", "-c", "write -P 6 40M 64k",
                str(d / "mid.qcow2"))
        daemon = start(kind, d, f"driver=qcow2,node-name=n,file.driver=file,"
                                f"file.filename={d}/top.qcow2")
        q = daemon.qmp()
        assert q.cmd_raw("block-commit", {"job-id": "c", "device": "n",
                                          "top": f"{d}/mid.qcow2",
                                          "base": f"{d}/base.qcow2"}) == {"return": {}}
        while True:
            ev = q.pull_event(wait=30)
            if ev and ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"):
                assert ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"]
                break
        q.cmd_raw("quit")
        daemon.wait()
        daemon.stop()
        assert qemu_img("check", str(d / "base.qcow2")).returncode == 0
        seen[kind] = (bitmaps_on_disk(d / "base.qcow2"),
                      bitmap_sha256(tmp_path, d / "base.qcow2"))
    fresh = tmp_path / "fresh.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(fresh), str(64 * MiB))
    qemu_img("bitmap", "--add", str(fresh), "b0")
    assert seen["qemu"][1] != bitmap_sha256(tmp_path, fresh), "the commit's writes are recorded"
    assert seen["trio"] == seen["qemu"]
