"""vhost-user-blk exports seen by a real guest: QEMU is the front-end.

The daemon runs on the host with ``--export type=vhost-user-blk``; a QEMU
guest (tests/guest: TCG, Debian's 6.12 kernel, the host's / as its root)
hot-plugs a ``vhost-user-blk-pci`` device on the export's socket and runs
the I/O with the host's tools on the disk it sees: O_DIRECT and buffered
writes and reads, discard, write-zeroes with and without unmap, flushes.
What it reads back, the image's bytes afterwards and ``qemu-img check``
are compared with a model. Each test prints the disk's configuration as the
guest's driver saw it (sysfs: size, block sizes, queues, discard and
write-zeroes limits, features), the data for comparing the two daemons.

One guest serves the whole session. ``test_guest_io`` runs in ``make test``;
the others are marked ``guest`` (``make guest``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.daemons import KINDS, daemon_params, require_export
from tests.guest.machine import Guest, VhostUserDisk, shared_guest
from tests.guest.workload import (
    MiB,
    Workload,
    assert_same,
    config_script,
    find_disk,
    image_bytes,
    qemu_img_check,
    read_config,
)
from tests.helpers import Daemon, qemu_img

pytestmark = pytest.mark.timeout(300)

SIZE = 16 * MiB


def start_export(daemon: str, tmp_path: Path, fmt: str = "qcow2", size: int = SIZE,
                 export_opts: str = "writable=on",
                 file_opts: str = "") -> tuple[Daemon, Path, Path]:
    """A fresh image exported over vhost-user-blk; (daemon, image, socket).
    ``file_opts``: more options of the file node (",cache.direct=on")."""
    require_export(daemon, "vhost-user-blk")
    img = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(img), str(size))
    sock = tmp_path / "vu.sock"
    d = Daemon(KINDS[daemon], tmp_path, [
        "--blockdev", f"driver=file,node-name=file0,filename={img},discard=unmap{file_opts}",
        "--blockdev", f"driver={fmt},node-name=disk0,file=file0,discard=unmap",
        "--export", f"type=vhost-user-blk,id=vu0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},{export_opts}",
    ])
    try:
        d.start()
    except BaseException:
        d.stop(check=False)
        raise
    return d, img, sock


@contextlib.contextmanager
def plugged(guest: Guest, sock: Path, **kw: object) -> Iterator[VhostUserDisk]:
    disk = guest.attach_vhost_user_blk(sock, **kw)  # type: ignore[arg-type]
    try:
        yield disk
    finally:
        if guest.alive:  # else the test's error says why
            guest.detach(disk)


def run_workload(guest: Guest, sock: Path, w: Workload, **kw: object) -> dict[str, str]:
    with plugged(guest, sock, **kw) as disk:
        guest.run(find_disk(disk.sysfs) + w.script()).check()
    return w.check()


def report(config: dict[str, str], record_property, daemon: str) -> None:
    """Print the configuration the guest saw and keep it in the test report."""
    print(f"{daemon} vhost-user-blk as the guest sees it:", json.dumps(config, indent=1))
    record_property("guest_config", json.dumps(config))


@pytest.mark.parametrize("daemon", daemon_params("vhost-user-blk"))
def test_guest_io(daemon, tmp_path, pytestconfig, record_property):
    """A qcow2 image: the guest's I/O, read back, and the image afterwards,
    all equal the model; qemu-img check finds nothing."""
    d, img, sock = start_export(daemon, tmp_path)
    try:
        guest = shared_guest(pytestconfig)
        with guest.scratch() as work:
            w = Workload(work, SIZE).standard()
            config = run_workload(guest, sock, w)
    finally:
        d.stop()
    report(config, record_property, daemon)
    assert config["size"] == str(SIZE // 512)
    assert config["queue/logical_block_size"] == "512"
    assert config["ro"] == "0"
    assert config["cache_type after the toggle"] == "write back"
    assert int(config["queue/discard_max_hw_bytes"]) > 0
    assert int(config["queue/write_zeroes_max_bytes"]) > 0
    qemu_img_check(img, "qcow2")
    assert_same(image_bytes(img, "qcow2"), w.model, "the image")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vhost-user-blk"))
@pytest.mark.parametrize("fmt,aio", [("raw", "io_uring"), ("qcow2", "native")])
def test_guest_io_host_direct(daemon, fmt, aio, tmp_path, pytestconfig, record_property):
    """The image opened with cache.direct=on by the daemon (libvirt's
    cache='none'), so that the guest's requests reach the I/O engine as
    they are, into and from guest memory: the usual mix, then fio's
    random reads 16 in flight (any error fails them), all equal to the
    model, and qemu-img check finds nothing in a qcow2 image."""
    d, img, sock = start_export(daemon, tmp_path, fmt,
                                file_opts=f",cache.direct=on,aio={aio}")
    try:
        guest = shared_guest(pytestconfig)
        with guest.scratch() as work:
            w = Workload(work, SIZE, seed=7).standard()
            w.random_reads(depth=16, seconds=3)
            config = run_workload(guest, sock, w)
    finally:
        d.stop()
    report(config, record_property, daemon)
    if fmt == "qcow2":
        qemu_img_check(img, fmt)
    assert_same(image_bytes(img, fmt), w.model, "the image")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vhost-user-blk"))
@pytest.mark.parametrize("fmt,lbs,queues", [("raw", 4096, 2), ("qcow2", 4096, 1),
                                            ("raw", 512, 2)])
def test_guest_io_options(daemon, fmt, lbs, queues, tmp_path, pytestconfig, record_property):
    """logical-block-size and num-queues reach the guest, on raw and qcow2;
    the I/O, spread over both queues when there are two, equals the model."""
    size = 13 * MiB
    d, img, sock = start_export(daemon, tmp_path, fmt, size,
                                f"writable=on,logical-block-size={lbs},num-queues={queues}")
    try:
        guest = shared_guest(pytestconfig)
        with guest.scratch() as work:
            w = Workload(work, size, lbs=lbs, seed=lbs + queues, cpus=queues).standard()
            config = run_workload(guest, sock, w, num_queues=queues)
    finally:
        d.stop()
    report(config, record_property, daemon)
    assert config["size"] == str(size // 512)
    assert config["queue/logical_block_size"] == str(lbs)
    assert config["queue/physical_block_size"] == str(lbs)
    assert config["queues"] == str(queues)
    if fmt == "qcow2":
        qemu_img_check(img, fmt)
    assert_same(image_bytes(img, fmt), w.model, "the image")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vhost-user-blk"))
def test_readonly_export(daemon, tmp_path, pytestconfig):
    """writable=off: the guest sees a read-only disk (VIRTIO_BLK_F_RO), a
    write fails, and the image keeps its bytes."""
    img = tmp_path / "disk.raw"
    data = bytes(range(256)) * (SIZE // 256)
    img.write_bytes(data)
    require_export(daemon, "vhost-user-blk")
    sock = tmp_path / "vu.sock"
    d = Daemon(KINDS[daemon], tmp_path, [
        "--blockdev", f"driver=file,node-name=file0,filename={img},read-only=on",
        "--blockdev", "driver=raw,node-name=disk0,file=file0,read-only=on",
        "--export", f"type=vhost-user-blk,id=vu0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=off",
    ]).start()
    try:
        guest = shared_guest(pytestconfig)
        with guest.scratch() as work, plugged(guest, sock) as disk:
            r = guest.run(find_disk(disk.sysfs) + config_script(work / "config") + f"""
dd if=$DEV of={work}/back bs=1M iflag=direct status=none || exit 94
dd if=/dev/zero of=$DEV bs=4k count=1 oflag=direct status=none && exit 95
exit 0
""")
            r.check()
            config = read_config(work / "config")
            assert_same((work / "back").read_bytes(), data, "the guest's read")
    finally:
        d.stop()
    assert config["ro"] == "1"
    assert img.read_bytes() == data


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vhost-user-blk"))
def test_reattach(daemon, tmp_path, pytestconfig):
    """A front-end that unplugs and a new one that plugs in see the same
    disk: what the first wrote, the second reads."""
    d, img, sock = start_export(daemon, tmp_path)
    try:
        guest = shared_guest(pytestconfig)
        with guest.scratch() as work:
            w = Workload(work, SIZE, seed=7).standard()
            run_workload(guest, sock, w)
            with plugged(guest, sock) as disk:
                guest.run(find_disk(disk.sysfs) +
                          f"dd if=$DEV of={work}/again bs=1M iflag=direct status=none").check()
            assert_same((work / "again").read_bytes(), w.model, "the second front-end's read")
    finally:
        d.stop()
    qemu_img_check(img, "qcow2")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", [p for p in daemon_params("vhost-user-blk")
                                    if p.values[0] == "qsd-trio"])
def test_config_same_as_qemu(daemon, tmp_path, pytestconfig):
    """The differential: the disk qsd-trio exports looks the same to the
    guest's driver as qemu-storage-daemon's (config space and features),
    with and without export options."""
    for i, opts in enumerate(["writable=on", "writable=on,logical-block-size=4096,num-queues=2",
                              "writable=off"]):
        seen = {}
        for kind in ("qemu-storage-daemon", daemon):
            sub = tmp_path / f"{i}-{kind}"
            sub.mkdir()
            d, _, sock = start_export(kind, sub, export_opts=opts)
            try:
                guest = shared_guest(pytestconfig)
                queues = 2 if "num-queues=2" in opts else 1
                with guest.scratch() as work, plugged(guest, sock, num_queues=queues) as disk:
                    guest.run(find_disk(disk.sysfs) + config_script(work / "config")).check()
                    seen[kind] = read_config(work / "config")
            finally:
                d.stop()
        # the one difference: the config space's writeback byte says the
        # write cache is on (the export's writethrough=off), so the guest
        # flushes; qemu-storage-daemon 7.2 says write-through whatever the
        # cache mode, and its guest never flushes
        for key in ("queue/write_cache", "cache_type"):
            assert seen[daemon].pop(key) == "write back", opts
            assert seen["qemu-storage-daemon"].pop(key) == "write through", opts
        assert seen[daemon] == seen["qemu-storage-daemon"], opts
