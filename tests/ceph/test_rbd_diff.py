"""driver=rbd: qsd-trio against qemu-storage-daemon 7.2's rbd driver on the
same Ceph cluster.

Both daemons open images of the same cluster with the same options, so the
replies to blockdev-add, query-named-block-nodes, the data and the block
status must be equal as they are.  Where each daemon writes its own image,
only the image's name differs, and it is replaced before comparing.
"""

from __future__ import annotations

import threading

import pytest

from tests.helpers import HAVE_QEMU, qemu_img, qemu_io, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def rbd(cluster, image, **extra):
    return {"driver": "rbd", "pool": "rbd", "image": image, "conf": str(cluster.conf), **extra}


def new_image(cluster, name, size="64M"):
    cluster.rbd("create", f"rbd/{name}", "--size", size)
    return name


def test_blockdev_add_and_query_match(daemon_factory, ceph_cluster, rbd_image):
    qemu_io("-f", "raw", "-c", "write -P 7 0 1M", f"rbd:rbd/{rbd_image}:conf={ceph_cluster.conf}")
    ceph_cluster.rbd("snap", "create", f"rbd/{rbd_image}@s")
    cases = [
        {},
        {"snapshot": "s"},
        {"snapshot": "s", "read-only": True},
        {"snapshot": "s", "auto-read-only": True},
        {"snapshot": "nosnap", "read-only": True},
        {"cache": {"direct": True}, "discard": "unmap"},
        {"read-only": True, "user": "admin"},
        {"image": "nope"},
        {"pool": "nopool"},
        {"namespace": "ns"},
        # a NUL in a QMP string reaches librbd as QEMU's bytes C0 80
        {"image": "no\u0000pe"},
        {"pool": "no\u0000pool"},
        {"namespace": "n\u0000s"},
        {"snapshot": "s\u0000", "read-only": True},
        {"conf": "/nonexistent.conf"},
        {"user": "nobody"},
        {"key-secret": "nope"},
        {"auth-client-required": ["none"]},
        {"encrypt": {"format": "luks", "key-secret": "nope"}},
        {"bogus": 1},
    ]
    out = {}
    clients = {}  # kept open until the end, as the daemons are
    for kind in ("qemu", "trio"):
        q = clients[kind] = daemon_factory(kind).qmp()
        replies = []
        for i, extra in enumerate(cases):
            args = rbd(ceph_cluster, rbd_image, **{"node-name": f"n{i}"}) | extra
            replies.append(q.cmd_raw("blockdev-add", args))
        replies.append(q.cmd_raw("query-named-block-nodes", {}))
        out[kind] = replies
    assert out["trio"] == out["qemu"]
    assert sum("return" in r for r in out["qemu"][:-1]) == 5


def nbd_script(url):
    qemu_io("-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "write -P 0x11 5M 3M",
            "-c", "write -z 6M 1M", "-c", "write -P 0x22 9M 7M", "-c", "discard 12M 4M",
            "-c", "write -P 0x33 40M 4096", "-c", "flush", url)


def test_data_map_and_info_match(daemon_factory, ceph_cluster, tmp_path):
    """The same writes through each daemon's NBD export of its own image:
    the bytes, qemu-img map through the export and qemu-img info of the
    image agree."""
    out = {}
    clients = {}
    for kind in ("qemu", "trio"):
        image = new_image(ceph_cluster, f"diff-{kind}")
        q = clients[kind] = daemon_factory(kind).qmp()
        q.cmd("blockdev-add", **rbd(ceph_cluster, image, **{"node-name": "r", "discard": "unmap"}))
        sock = tmp_path / f"{kind}.sock"
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        q.cmd("nbd-server-add", device="r", writable=True)
        url = f"nbd+unix:///r?socket={sock}"
        nbd_script(url)
        got = {"map": qemu_img("map", "--output=json", "-f", "raw", url).stdout}
        copy = tmp_path / f"{kind}.nbdcopy"
        run("nbdcopy", url, str(copy))
        raw = tmp_path / f"{kind}.raw"
        ceph_cluster.rbd("export", f"rbd/{image}", str(raw))
        assert copy.read_bytes() == raw.read_bytes()
        got["data"] = raw.read_bytes()
        q.cmd("nbd-server-stop")
        q.cmd("blockdev-del", **{"node-name": "r"})
        info = qemu_img("info", "--output=json", f"rbd:rbd/{image}:conf={ceph_cluster.conf}").stdout
        got["info"] = info.replace(image, "IMAGE")
        out[kind] = got
    assert out["trio"]["map"] == out["qemu"]["map"]
    assert out["trio"]["info"] == out["qemu"]["info"]
    assert out["trio"]["data"] == out["qemu"]["data"]
    assert out["qemu"]["data"][9 * MiB:12 * MiB] == b"\x22" * (3 * MiB)


def test_mirror_qcow2_to_rbd_with_writes(daemon_factory, ceph_cluster, tmp_path):
    """blockdev-mirror from a local qcow2 to an RBD image while qemu-io
    writes through an NBD export of the source; after completion the RBD
    image holds what the qcow2 holds, and back the other way."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "32M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 8M", "-c", "write -P 2 20M 4M", str(src))
    image = new_image(ceph_cluster, "mirror-dst", "32M")
    d = daemon_factory("trio", ["--blockdev", f"file,node-name=f,filename={src}",
                                "--blockdev", "qcow2,node-name=src,file=f"])
    q = d.qmp()
    q.cmd("blockdev-add", **rbd(ceph_cluster, image, **{"node-name": "dst"}))
    sock = tmp_path / "nbd.sock"
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.cmd("nbd-server-add", device="src", writable=True)
    url = f"nbd+unix:///src?socket={sock}"
    writes = [f"write -P {0x40 + i} {i * 1536}K 512K" for i in range(20)]
    writer = threading.Thread(target=qemu_io, args=("-f", "raw", *sum((["-c", w] for w in writes), []),
                                                    url))
    q.cmd("blockdev-mirror", **{"job-id": "m", "device": "src", "target": "dst", "sync": "full"})
    writer.start()
    writer.join(60)
    assert not writer.is_alive()
    ev = q.pull_event(wait=30)
    while ev["event"] != "BLOCK_JOB_READY":
        ev = q.pull_event(wait=30)
    q.cmd("job-complete", id="m")
    while ev["event"] != "BLOCK_JOB_COMPLETED":
        ev = q.pull_event(wait=30)
    assert "error" not in ev["data"]
    q.cmd("nbd-server-stop")
    q.cmd("blockdev-del", **{"node-name": "dst"})
    q.cmd("blockdev-del", **{"node-name": "src"})
    q.cmd("blockdev-del", **{"node-name": "f"})
    rbd_url = f"rbd:rbd/{image}:conf={ceph_cluster.conf}"
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(src), rbd_url, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    # and back: the RBD image mirrored to a new local qcow2
    back = tmp_path / "back.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(back), "32M")
    q.cmd("blockdev-add", **rbd(ceph_cluster, image, **{"node-name": "r", "read-only": True}))
    q.cmd("blockdev-add", driver="file", **{"node-name": "bf"}, filename=str(back))
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "b"}, file="bf")
    q.cmd("blockdev-mirror", **{"job-id": "m2", "device": "r", "target": "b", "sync": "full"})
    while ev["event"] != "BLOCK_JOB_READY" or ev["data"]["device"] != "m2":
        ev = q.pull_event(wait=30)
    q.cmd("job-complete", id="m2")
    while ev["event"] != "BLOCK_JOB_COMPLETED":
        ev = q.pull_event(wait=30)
    q.cmd("blockdev-del", **{"node-name": "b"})
    q.cmd("blockdev-del", **{"node-name": "bf"})
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src), str(back), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
