"""driver=rbd on a real one-node Ceph cluster: I/O through an NBD export read
and written by qemu-io, block status, resize, snapshots, open errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20
OBJ = 4 * MiB  # rbd's default object size


def rbd_node(cluster, image, **extra):
    return {"driver": "rbd", "node-name": "r", "pool": "rbd", "image": image,
            "conf": str(cluster.conf), **extra}


def export(q, tmp_path, node="r", writable=True):
    sock = tmp_path / "nbd.sock"
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.cmd("nbd-server-add", device=node, writable=writable)
    return f"nbd+unix:///{node}?socket={sock}"


def rbd_bytes(cluster, image, tmp_path):
    """The image's bytes as librbd (the rbd tool) reads them."""
    out = tmp_path / f"{image}.raw"
    cluster.rbd("export", f"rbd/{image}", str(out))
    return out.read_bytes()


def test_io_through_nbd_export(qsd, ceph_cluster, rbd_image, tmp_path):
    # a discard of a whole object reads back as zeroes (librbd skips partial
    # objects by default: rbd_skip_partial_discard)
    q = qsd.qmp()
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image, discard="unmap"))
    url = export(q, tmp_path)
    qemu_io("-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "write -P 0x11 5M 3M",
            "-c", "write -z 6M 1M", "-c", "write -P 0x22 8M 4M", "-c", "discard 8M 4M",
            "-c", "flush", url)
    qemu_io("-f", "raw", "-c", "read -P 0x5a 4096 65536", "-c", "read -P 0x11 5M 1M",
            "-c", "read -P 0 6M 1M", "-c", "read -P 0x11 7M 1M", "-c", "read -P 0 8M 4M", url)
    want = bytearray(64 * MiB)
    want[4096:4096 + 65536] = b"\x5a" * 65536
    want[5 * MiB:8 * MiB] = b"\x11" * (3 * MiB)
    want[6 * MiB:7 * MiB] = bytes(MiB)
    assert rbd_bytes(ceph_cluster, rbd_image, tmp_path) == bytes(want)


def test_block_status_is_rbd_diff(qsd, ceph_cluster, rbd_image, tmp_path):
    """Allocation comes from the fast-diff object map, one object at a time."""
    q = qsd.qmp()
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image))
    url = export(q, tmp_path)
    qemu_io("-f", "raw", "-c", f"write -P 1 {2 * OBJ + 4096} 4096", url)
    runs = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
    got = [(r["start"], r["length"], r["data"]) for r in runs]
    assert got == [(0, 2 * OBJ, False), (2 * OBJ, OBJ, True), (3 * OBJ, 64 * MiB - 3 * OBJ, False)]


def test_resize(qsd, ceph_cluster, rbd_image):
    q = qsd.qmp()
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image))
    q.cmd("block_resize", **{"node-name": "r", "size": 80 * MiB})
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{rbd_image}"))
    assert info["size"] == 80 * MiB
    (node,) = q.cmd("query-named-block-nodes")
    assert node["image"]["virtual-size"] == 80 * MiB


def test_snapshot_is_read_only(qsd, ceph_cluster, rbd_image, tmp_path):
    q = qsd.qmp()
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image))
    url = export(q, tmp_path)
    qemu_io("-f", "raw", "-c", "write -P 0x33 0 1M", url)
    ceph_cluster.rbd("snap", "create", f"rbd/{rbd_image}@s")
    qemu_io("-f", "raw", "-c", "write -P 0x44 0 1M", url)
    r = q.cmd_raw("blockdev-add", rbd_node(ceph_cluster, rbd_image, snapshot="s") | {"node-name": "s"})
    assert r["error"]["desc"] == "rbd snapshots are read-only"
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image, snapshot="s", **{"node-name": "s",
                                                                              "read-only": True}))
    q.cmd("nbd-server-add", device="s")
    snap_url = url.replace("/r?", "/s?")
    qemu_io("-f", "raw", "-r", "-c", "read -P 0x33 0 1M", snap_url)
    p = qemu_io("-f", "raw", "-c", "write 0 4096", snap_url, check=False)
    assert "Permission denied" in p.stdout + p.stderr or "read-only" in p.stdout + p.stderr


@pytest.mark.parametrize("extra, err", [
    ({"image": "nope"}, "error reading header from nope: No such file or directory"),
    ({"pool": "nopool"}, "error opening pool nopool: No such file or directory"),
    ({"namespace": "ns"}, "namespace 'ns' does not exist"),
    ({"conf": "/nonexistent.conf"}, "error reading conf file /nonexistent.conf: No such file or directory"),
    ({"user": "nobody"}, "error connecting: Permission denied"),
    ({"key-secret": "nope"}, "No secret with id 'nope'"),
])
def test_open_errors(qsd, ceph_cluster, rbd_image, extra, err):
    q = qsd.qmp()
    r = q.cmd_raw("blockdev-add", rbd_node(ceph_cluster, rbd_image) | extra)
    assert r["error"] == {"class": "GenericError", "desc": err}
    assert q.cmd("query-named-block-nodes") == []


def test_fio_verifies_through_export(qsd, ceph_cluster, rbd_image, tmp_path):
    """fio writes random 4 KiB blocks with checksums through the export, then
    reads every one back and checks it."""
    q = qsd.qmp()
    q.cmd("blockdev-add", **rbd_node(ceph_cluster, rbd_image))
    url = export(q, tmp_path)
    p = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={url}", "--rw=randwrite",
                        "--bs=4k", "--iodepth=16", "--size=8M", "--verify=crc32c",
                        "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verify" not in p.stderr
