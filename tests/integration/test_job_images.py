"""Block jobs against real images: qsd-trio as a subprocess, real clients.

Each test writes a known pattern into the images, runs the job over QMP
while a client writes through an NBD export, then checks the result with
qemu-img (check, compare) and against an independent byte model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20
SIZE = 32 * MiB


def wait_event(qmp, name: str, timeout: float = 30.0, **match) -> dict:
    """Pull events until ``name`` (with data matching ``match``) arrives."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(name)
        ev = qmp.pull_event(wait=left)
        if ev and ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                             for k, v in match.items()):
            return ev


class Model:
    """What a guest should read: a bytearray the test writes alongside the image."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.data[offset:offset + length] = bytes([pattern]) * length


def qemu_io_write(target: str, fmt: str | None, writes, model: Model | None = None) -> None:
    cmds = []
    for off, n, pat in writes:
        cmds += ["-c", f"write -P {pat} {off} {n}"]
        if model is not None:
            model.write(off, n, pat)
    args = (["-f", fmt] if fmt else []) + cmds + [target]
    qemu_io(*args)


def raw_bytes(path: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{path.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def nbd_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    model = Model(SIZE)
    qemu_io_write(str(src), "qcow2", [(0, 4 * MiB, 0x11), (8 * MiB, 2 * MiB, 0x22),
                                      (30 * MiB, MiB, 0x33)], model)
    return src, model


def test_mirror_with_nbd_writes_then_pivot(daemon_factory, tmp_path, images):
    src, model = images
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=tgtf,filename={tgt}",
        "--blockdev", "driver=qcow2,node-name=tgt,file=tgtf",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on",
    ])
    qmp = d.qmp()
    # slow enough that the NBD writes land while the copy is under way
    qmp.cmd_raw("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                "sync": "full", "speed": 8 * MiB})
    writes = [(MiB, 64 * 1024, 0x55), (20 * MiB, 3 * MiB, 0x66), (31 * MiB, 4096, 0x77),
              (3 * MiB + 512, 1000, 0x88)]
    qemu_io_write(nbd_uri(sock, "disk"), "raw", writes, model)
    status = qmp.cmd_raw("query-jobs")["return"][0]["status"]
    assert status == "running"  # the writes came during the copy, not after
    qmp.cmd_raw("block-job-set-speed", {"device": "m", "speed": 0})
    wait_event(qmp, "BLOCK_JOB_READY")
    # more writes while READY: still mirrored
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(12 * MiB, MiB, 0x99)], model)
    r = qmp.cmd_raw("job-complete", {"id": "m"})
    assert r == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"]
    # after the pivot the export writes to the target
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(5 * MiB, MiB, 0xAA)], model)
    d.stop()
    for img in (src, tgt):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(tgt, "qcow2", tmp_path) == bytes(model.data)
    # the source has everything but the post-pivot write
    src_data = raw_bytes(src, "qcow2", tmp_path)
    assert src_data[5 * MiB:6 * MiB] != b"\xaa" * MiB
    assert src_data[:5 * MiB] == bytes(model.data[:5 * MiB])


def test_mirror_soft_cancel_keeps_consistent_copy(daemon_factory, tmp_path, images):
    src, model = images
    tgt = tmp_path / "tgt.raw"
    qemu_img("create", "-q", "-f", "raw", str(tgt), str(SIZE))
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=tgt,filename={tgt}",
    ])
    qmp = d.qmp()
    qmp.cmd_raw("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                "sync": "full"})
    wait_event(qmp, "BLOCK_JOB_READY")
    qmp.cmd_raw("block-job-cancel", {"device": "m"})
    wait_event(qmp, "BLOCK_JOB_COMPLETED")
    d.stop()
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(src), str(tgt))
    assert Path(tgt).read_bytes() == bytes(model.data)


def test_backup_full_sees_start_state_despite_writes(daemon_factory, tmp_path, images):
    src, model = images
    start_state = bytes(model.data)
    tgt = tmp_path / "backup.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=tgtf,filename={tgt}",
        "--blockdev", "driver=qcow2,node-name=tgt,file=tgtf",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on",
    ])
    qmp = d.qmp()
    qmp.cmd_raw("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                "sync": "full", "speed": 4 * MiB})
    # overwrite data the backup has not copied yet: copy-before-write must save it
    qemu_io_write(nbd_uri(sock, "disk"), "raw",
                  [(2 * MiB, MiB, 0xC1), (9 * MiB, 64 * 1024, 0xC2), (25 * MiB, MiB, 0xC3),
                   (30 * MiB + 100, 5000, 0xC4)], model)
    assert qmp.cmd_raw("query-jobs")["return"][0]["status"] == "running"
    qmp.cmd_raw("block-job-set-speed", {"device": "b", "speed": 0})
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert ev["data"]["offset"] == ev["data"]["len"] == SIZE
    d.stop()
    for img in (src, tgt):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(tgt, "qcow2", tmp_path) == start_state
    assert raw_bytes(src, "qcow2", tmp_path) == bytes(model.data)


def test_incremental_backup_over_full_equals_source(daemon_factory, tmp_path, images):
    src, model = images
    full = tmp_path / "full.qcow2"
    inc = tmp_path / "inc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(full), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=fullf,filename={full}",
        "--blockdev", "driver=qcow2,node-name=full,file=fullf",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on",
    ])
    qmp = d.qmp()
    r = qmp.cmd_raw("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}},
        {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src",
                                             "target": "full", "sync": "full"}}]})
    assert r == {"return": {}}, r
    wait_event(qmp, "BLOCK_JOB_COMPLETED", device="full")
    qemu_io_write(nbd_uri(sock, "disk"), "raw",
                  [(MiB, 128 * 1024, 0xD1), (17 * MiB + 4096, 8192, 0xD2)], model)
    # the incremental image sits on top of the full one
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc))
    qmp.cmd_raw("blockdev-add", {"driver": "qcow2", "node-name": "inc",
                             "file": {"driver": "file", "filename": str(inc)},
                             "backing": None})
    qmp.cmd_raw("blockdev-backup", {"job-id": "inc", "device": "src", "target": "inc",
                                "sync": "incremental", "bitmap": "bm0"})
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", device="inc")
    assert ev["data"]["len"] == 3 * 64 * 1024  # the dirty clusters only
    d.stop()
    for img in (src, full, inc):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(inc, "qcow2", tmp_path) == bytes(model.data)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src), str(inc))


@pytest.mark.parametrize("job", ["mirror", "backup"])
def test_sigterm_cancels_running_job(daemon_factory, tmp_path, images, job):
    import signal

    src, model = images
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(SIZE))
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=tgtf,filename={tgt}",
        "--blockdev", "driver=qcow2,node-name=tgt,file=tgtf",
    ])
    qmp = d.qmp()
    r = qmp.cmd_raw(f"blockdev-{job}", {"job-id": "j", "device": "src", "target": "tgt",
                                        "sync": "full", "speed": MiB})
    assert r == {"return": {}}
    wait_event(qmp, "JOB_STATUS_CHANGE", status="running")
    d.proc.send_signal(signal.SIGTERM)
    ev = wait_event(qmp, "BLOCK_JOB_CANCELLED")
    assert ev["data"]["type"] == job and ev["data"]["offset"] < SIZE
    wait_event(qmp, "JOB_STATUS_CHANGE", status="null")
    assert d.wait(30) == 0
    for img in (src, tgt):
        qemu_img("check", "-q", str(img))
    # the source is untouched by the cancelled job
    assert raw_bytes(src, "qcow2", tmp_path) == bytes(model.data)


def test_drive_mirror_and_drive_backup_create_targets(daemon_factory, tmp_path, images):
    src, model = images
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
    ])
    qmp = d.qmp()
    bk = tmp_path / "backup.qcow2"
    r = qmp.cmd_raw("drive-backup", {"job-id": "b", "device": "src", "target": str(bk),
                                     "format": "qcow2", "sync": "full"})
    assert r == {"return": {}}, r
    wait_event(qmp, "BLOCK_JOB_COMPLETED", device="b")
    mi = tmp_path / "mirror.raw"
    r = qmp.cmd_raw("drive-mirror", {"job-id": "m", "device": "src", "target": str(mi),
                                     "format": "raw", "sync": "full"})
    assert r == {"return": {}}, r
    wait_event(qmp, "BLOCK_JOB_READY")
    qmp.cmd_raw("block-job-cancel", {"device": "m"})
    wait_event(qmp, "BLOCK_JOB_COMPLETED", device="m")
    d.stop()
    qemu_img("check", "-q", str(bk))
    assert raw_bytes(bk, "qcow2", tmp_path) == bytes(model.data)
    assert mi.read_bytes() == bytes(model.data)
