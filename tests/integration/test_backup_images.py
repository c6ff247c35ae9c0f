"""Backup modes against real images: sync=top copies what the top layer
allocates (zero clusters as zeroes), compress=on writes compressed clusters;
checked with qemu-img (check, compare, map) and a byte model."""

from __future__ import annotations

import json

from tests.helpers import qemu_img, qemu_io

from .test_job_images import SIZE, MiB, Model, qemu_io_write, raw_bytes, wait_event


def test_backup_sync_top_and_compressed_full(daemon_factory, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    full = Model(SIZE)
    qemu_io_write(str(base), "qcow2", [(0, 4 * MiB, 0x11), (8 * MiB, 2 * MiB, 0x22)], full)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    only_top = Model(SIZE)
    for m in (full, only_top):
        qemu_io_write(str(top), "qcow2", [(2 * MiB, MiB, 0x33), (20 * MiB + 4096, 8192, 0x44)],
                      m)
    # a zero cluster in the top layer hides base data: copied as zeroes
    qemu_io("-f", "qcow2", "-c", f"write -z {8 * MiB + 65536} 65536", str(top))
    full.data[8 * MiB + 65536:8 * MiB + 131072] = bytes(65536)
    t_top, t_comp = tmp_path / "t-top.qcow2", tmp_path / "t-comp.qcow2"
    for t in (t_top, t_comp):
        qemu_img("create", "-q", "-f", "qcow2", str(t), str(SIZE))
    d = daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
        "--blockdev", f"driver=qcow2,node-name=ttop,file.driver=file,file.filename={t_top}",
        "--blockdev", f"driver=qcow2,node-name=tcomp,file.driver=file,file.filename={t_comp}",
    ])
    qmp = d.qmp()
    assert qmp.cmd_raw("blockdev-backup", {"job-id": "t", "device": "top", "target": "ttop",
                                           "sync": "top"}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", device="t")
    assert "error" not in ev["data"]
    # the top layer allocates 2 MiB..3 MiB, one cluster at 20 MiB, one zero cluster
    assert ev["data"]["len"] == ev["data"]["offset"] == MiB + 2 * 65536
    assert qmp.cmd_raw("blockdev-backup", {"job-id": "c", "device": "top", "target": "tcomp",
                                           "sync": "full", "compress": True}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", device="c")
    assert "error" not in ev["data"] and ev["data"]["offset"] == SIZE
    d.stop()
    for img in (top, t_top, t_comp):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(t_top, "qcow2", tmp_path) == bytes(only_top.data)
    assert raw_bytes(t_comp, "qcow2", tmp_path) == bytes(full.data)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(top), str(t_comp))
    # what sync=top left out is unallocated in its target, not written as
    # zeroes; the zero cluster is an allocated zero cluster
    extents = json.loads(qemu_img("map", "--output=json", str(t_top)).stdout)
    present = [(e["start"], e["length"], e["data"]) for e in extents if e["present"]]
    assert present == [(2 * MiB, MiB, True), (8 * MiB + 65536, 65536, False),
                       (20 * MiB, 65536, True)]
