"""Incremental backup to a remote target over driver=nbd.

A source daemon (qsd-trio, and qemu-storage-daemon 7.2 as the reference)
holds a qcow2 disk that a client writes to over NBD, and a dirty bitmap
created atomically with a full backup.  The backup targets are NBD exports
of other qsd-trio daemons, opened on the source with driver=nbd.  After more
writes, an incremental backup (sync=incremental, the bitmap) copies only
what changed, into a fresh overlay on the remote side whose backing file
is the full backup.  The overlay then reads as the source did at the
incremental backup, and holds no cluster the bitmap did not mark.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import HAVE_QEMU, qemu_img
from tests.integration.test_job_images import Model, qemu_io_write, raw_bytes, wait_event
from tests.integration.test_nbd_driver import SIZE, MiB, Server, nbd_node, nbd_uri

KINDS = ["trio", pytest.param("qemu", marks=pytest.mark.skipif(
    not HAVE_QEMU, reason="qemu-storage-daemon not installed"))]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_backup_to_a_remote_target(daemon_factory, tmp_path, kind):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    model = Model(SIZE)
    qemu_io_write(str(src), "qcow2", [(0, 2 * MiB, 0x11), (9 * MiB, 3 * MiB, 0x22)], model)
    full = tmp_path / "full.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(full), str(SIZE))
    inc = tmp_path / "inc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc))

    # the remote side: a qsd-trio serving the full backup's image
    full_srv = Server("trio", daemon_factory, tmp_path, full, fmt="qcow2", name="full").start()
    sock = tmp_path / "client.sock"
    c = daemon_factory(kind, allow_stderr=r"The target block device doesn.t provide information", args=[
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", nbd_node(full_srv.sock, "full"),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on",
    ])
    qmp = c.qmp()
    # the bitmap starts exactly at the full backup's point in time
    r = qmp.cmd_raw("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0",
                                                    "granularity": 65536}},
        {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src",
                                             "target": "full", "sync": "full"}}]})
    assert r == {"return": {}}, r
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", device="full")
    assert "error" not in ev["data"], ev
    at_full = bytes(model.data)
    assert qmp.cmd_raw("blockdev-del", {"node-name": "full"}) == {"return": {}}
    full_srv.stop()

    # the guest goes on writing; the bitmap marks what changed
    changed = [(MiB, 64 * 1024, 0x33), (10 * MiB, 128 * 1024, 0x44), (SIZE - 4096, 4096, 0x55)]
    qemu_io_write(nbd_uri(sock, "disk"), "raw", changed, model)
    assert [b["count"] for b in _bitmaps(qmp)] == [64 * 1024 + 128 * 1024 + 65536]

    # the incremental goes to an overlay of the full backup, served remotely
    inc_srv = Server("trio", daemon_factory, tmp_path, inc, fmt="qcow2", name="inc").start()
    r = qmp.cmd_raw("blockdev-add", {"driver": "nbd", "node-name": "inc", "export": "disk",
                                     "server": {"type": "unix", "path": str(inc_srv.sock)}})
    assert r == {"return": {}}, r
    r = qmp.cmd_raw("blockdev-backup", {"job-id": "inc", "device": "src", "target": "inc",
                                        "sync": "incremental", "bitmap": "b0"})
    assert r == {"return": {}}, r
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", device="inc")
    assert "error" not in ev["data"], ev
    # a successful incremental backup clears the bitmap, and the job's own
    # copy bitmap is gone by the time of its BLOCK_JOB_COMPLETED
    assert _bitmaps(qmp) == [{"name": "b0", "recording": True, "persistent": False,
                              "busy": False, "granularity": 65536, "count": 0}]
    qmp.close()
    c.stop()
    inc_srv.stop()

    for img in (full, inc):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(full, "qcow2", tmp_path) == at_full
    assert raw_bytes(inc, "qcow2", tmp_path) == bytes(model.data)
    # the overlay holds only the clusters the bitmap marked: the rest
    # comes from the full backup below it
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(inc)).stdout)
    own = sorted((e["start"], e["length"]) for e in mapped if e["depth"] == 0 and e["data"])
    assert own == [(MiB, 65536), (10 * MiB, 131072), (SIZE - 65536, 65536)]


def _bitmaps(qmp) -> list[dict]:
    node = next(n for n in qmp.cmd_raw("query-named-block-nodes")["return"]
                if n["node-name"] == "src")
    return node["dirty-bitmaps"]
