"""Fleecing as QEMU documents it: a copy-before-write filter whose target is
a temporary overlay over the disk, a snapshot-access node on the filter,
exported over NBD.  The guest writes through the filter (an NBD export of
it here); readers of the snapshot-access export see the disk as it was when
the filter was added, before, during and after those writes.

The bitmap and cbw-timeout tests run against both daemons (same commands,
clients and model).  The main test runs against qsd-trio only: qemu-storage-daemon 7.2
reads the right data there, but its snapshot-access block status reports
clusters that copy-before-write saved from a guest zero write as holes
(nbdinfo --map shows them as "hole,zero"), so nbdcopy and qemu-img compare,
which trust block status, read zeroes from it.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU, qemu_img, run

from .test_job_images import SIZE, MiB, Model, nbd_uri, qemu_io_write, raw_bytes

KINDS = ["trio", "qemu"] if HAVE_QEMU else ["trio"]


@pytest.fixture
def disk(tmp_path):
    src = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    model = Model(SIZE)
    qemu_io_write(str(src), "qcow2", [(0, 4 * MiB, 0x11), (8 * MiB, 2 * MiB, 0x22),
                                      (30 * MiB, MiB, 0x33)], model)
    return src, model


def fleecing_args(src, tmp, sock, *, bitmap: str = "") -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", f"driver=file,node-name=tmpf,filename={tmp}",
        "--blockdev", "driver=qcow2,node-name=tmp,file=tmpf,backing=src",
        "--blockdev", f"driver=copy-before-write,node-name=fl-cbw,file=src,target=tmp{bitmap}",
        "--blockdev", "driver=snapshot-access,node-name=fl-access,file=fl-cbw",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=guest,node-name=fl-cbw,name=guest,writable=on",
        "--export", "type=nbd,id=fleece,node-name=fl-access,name=fleece",
    ]


def test_fleecing_reads_point_in_time_while_guest_writes(daemon_factory, tmp_path, disk):
    kind = "trio"
    src, model = disk
    start = bytes(model.data)
    (tmp_path / "start.raw").write_bytes(start)
    tmp = tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory(kind, fleecing_args(src, tmp, sock), allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
    guest, fleece = nbd_uri(sock, "guest"), nbd_uri(sock, "fleece")

    # writes before any read: whole clusters, partial ones, zeroes, unallocated space
    qemu_io_write(guest, "raw", [(MiB, 64 * 1024, 0xA1), (2 * MiB + 1000, 5000, 0xA2),
                                 (12 * MiB, 3 * MiB, 0xA3), (31 * MiB - 512, 1024, 0xA4)],
                  model)
    run("qemu-io", "-f", "raw", "-c", f"write -z {9 * MiB} {MiB}", guest)
    model.data[9 * MiB:10 * MiB] = bytes(MiB)
    # a reader copies the snapshot while the guest goes on writing
    out = tmp_path / "during.raw"
    reader = subprocess.Popen(["nbdcopy", "--requests=4", "--request-size=65536",
                               fleece, str(out)])
    qemu_io_write(guest, "raw", [(o * MiB + 4096, 128 * 1024, 0xB0 + o) for o in range(32)],
                  model)
    assert reader.wait(60) == 0
    assert out.read_bytes() == start
    # afterwards: qemu-img through block status, nbdcopy again
    qemu_img("compare", "-f", "raw", "-F", "raw", fleece, str(tmp_path / "start.raw"))
    after = tmp_path / "after.raw"
    run("nbdcopy", fleece, str(after))
    assert after.read_bytes() == start
    # the guest sees its own writes
    cur = tmp_path / "guest.raw"
    run("nbdcopy", guest, str(cur))
    assert cur.read_bytes() == bytes(model.data)

    qmp = d.qmp()
    for exp in ("guest", "fleece"):
        assert qmp.cmd_raw("block-export-del", {"id": exp}) == {"return": {}}
    for node in ("fl-access", "fl-cbw", "tmp", "tmpf"):
        r = qmp.cmd_raw("blockdev-del", {"node-name": node})
        while r.get("error", {}).get("desc", "").endswith("is in use"):
            r = qmp.cmd_raw("blockdev-del", {"node-name": node})  # export still closing
        assert r == {"return": {}}, (node, r)
    d.stop()
    for img in (src, tmp):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(src, "qcow2", tmp_path) == bytes(model.data)
    # the overlay holds the old contents of what the guest overwrote
    tmp_raw = raw_bytes(tmp, "qcow2", tmp_path)
    for off in (MiB, 2 * MiB, 12 * MiB, 20 * MiB + 4096):
        assert tmp_raw[off:off + 4096] == start[off:off + 4096]


@pytest.mark.parametrize("kind", KINDS)
def test_fleecing_bitmap_limits_what_may_be_read(daemon_factory, tmp_path, disk, kind):
    src, model = disk
    start = bytes(model.data)
    # a persistent bitmap in the image: only clusters dirty in it are the snapshot
    qemu_img("bitmap", "--add", "--granularity", "65536", str(src), "bm0")
    tmp = tmp_path / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(SIZE))
    sock = tmp_path / "nbd.sock"
    # mark 4 MiB..6 MiB dirty through a first daemon that records the bitmap
    with_bm = daemon_factory(kind, [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=src,name=guest,writable=on"])
    qemu_io_write(nbd_uri(sock, "guest"), "raw", [(4 * MiB, 2 * MiB, 0x44)], model)
    start = bytes(model.data)
    with_bm.stop()
    d = daemon_factory(kind, fleecing_args(src, tmp, sock,
                                           bitmap=",bitmap.node=src,bitmap.name=bm0"),
                       allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
    guest, fleece = nbd_uri(sock, "guest"), nbd_uri(sock, "fleece")
    qemu_io_write(guest, "raw", [(4 * MiB, MiB, 0x55), (20 * MiB, MiB, 0x66)], model)
    ok = run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x44 {4 * MiB} {2 * MiB}", fleece)
    assert "read" in ok.stdout and "Pattern verification failed" not in ok.stdout
    # outside the bitmap: EACCES, which NBD carries as EINVAL
    bad = run("qemu-io", "-f", "raw", "-r", "-c", f"read {20 * MiB} 65536", fleece,
              check=False)
    assert bad.stdout == "read failed: Invalid argument\n", bad
    d.stop()
    qemu_img("check", "-q", str(src))
    assert raw_bytes(src, "qcow2", tmp_path) == bytes(model.data)
    assert start[4 * MiB:6 * MiB] == bytes([0x44]) * 2 * MiB


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout_breaks_the_write_or_the_snapshot(daemon_factory, tmp_path, kind, mode):
    """A target throttled to 16 KiB/s cannot take a 64 KiB cluster within
    cbw-timeout=1: the guest write fails (break-guest-write), or goes through
    and the snapshot can no longer be read (break-snapshot)."""
    img = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(SIZE))
    qemu_io_write(str(img), "raw", [(0, 2 * MiB, 0x11)])
    sock = tmp_path / "nbd.sock"
    d = daemon_factory(kind, [
        "--object", "throttle-group,id=tg0,x-bps-write=16384",
        "--blockdev", f"driver=file,node-name=src,filename={img}",
        "--blockdev", f"null-co,node-name=tmpn,size={SIZE}",
        "--blockdev", "driver=throttle,node-name=tmp,throttle-group=tg0,file=tmpn",
        "--blockdev", f"driver=copy-before-write,node-name=fl-cbw,file=src,target=tmp,"
                      f"on-cbw-error={mode},cbw-timeout=1",
        "--blockdev", "driver=snapshot-access,node-name=fl-access,file=fl-cbw",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=guest,node-name=fl-cbw,name=guest,writable=on",
        "--export", "type=nbd,id=fleece,node-name=fl-access,name=fleece",
    ], allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
    guest, fleece = nbd_uri(sock, "guest"), nbd_uri(sock, "fleece")
    # the throttle lets a first request through at once; the next waits ~4 s
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 65536", guest)
    w = run("qemu-io", "-f", "raw", "-c", f"write -P 0x33 {MiB} 65536", guest, check=False)
    r = run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x11 {MiB} 65536", fleece,
            check=False)
    if mode == "break-guest-write":
        assert w.stdout == "write failed: Invalid argument\n", w  # ETIMEDOUT over NBD
        assert r.returncode == 0 and "verification failed" not in r.stdout, r
    else:
        assert w.returncode == 0 and "wrote 65536/65536" in w.stdout, w
        assert r.stdout == "read failed: Invalid argument\n", r  # EACCES over NBD
    d.stop()
    model = bytearray([0x11]) * (2 * MiB)
    model[:65536] = bytes([0x22]) * 65536
    if mode == "break-snapshot":
        model[MiB:MiB + 65536] = bytes([0x33]) * 65536
    assert img.read_bytes()[:2 * MiB] == model
