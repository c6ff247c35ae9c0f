"""FUSE export: how a WRITE is served from the request loop.

A WRITE waiting on its device does not hold up other requests.
The image is a file on a device we can stop: nbdkit's memory plugin behind
its pause filter (held with a control socket), mounted as a file by
nbdfuse.  The export's node opens it with O_DIRECT, so a write through the
mount reaches nbdkit and waits there while it is paused.  Meanwhile a
STATFS on the mount (which the export answers without its node) must be
answered; once nbdkit resumes, the write completes and its bytes are in
the image.  nbdkit's log filter, in front of the pause filter, records each
request as it arrives, which is how the test knows the write is waiting in
nbdkit and not still on its way.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from qsd_trio.daemon import Daemon
from qsd_trio.exports.fuse import FuseExport
from qsd_trio.nodes import inline_io
from tests.engines import DIRECT_ENGINES, stop_clean
from tests.integration.fuse_helpers import (  # noqa: F401 - fuse_tmp is a fixture
    fuse_tmp,
    make_mountpoint,
    wait_for,
)
from tests.integration.test_fuse_inprocess import export_args

MiB = 1 << 20
SIZE = 16 * MiB

class PausableDisk:
    """A 16 MiB file whose I/O can be stopped: nbdkit (memory plugin, log
    and pause filters) on a unix socket, mounted by nbdfuse."""

    def __init__(self, where: Path) -> None:
        self.sock = where / "nbd.sock"
        self.ctl_path = where / "ctl.sock"
        self.log = where / "nbdkit.log"
        self.mnt = where / "fmnt"
        self.mnt.mkdir()
        self.file = self.mnt / "disk"
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(self.sock), "--filter=log", "--filter=pause",
             "memory", str(SIZE), f"logfile={self.log}", f"pause-control={self.ctl_path}"])
        wait_for(lambda: self.sock.exists() and self.ctl_path.exists(), what="nbdkit")
        self.nbdfuse = subprocess.Popen(["nbdfuse", str(self.file),
                                         f"nbd+unix:///?socket={self.sock}"])
        wait_for(lambda: self.file.exists() and self.file.stat().st_size == SIZE,
                 what="nbdfuse")
        self.ctl = socket.socket(socket.AF_UNIX)
        self.ctl.connect(str(self.ctl_path))

    def pause(self) -> None:
        self.ctl.sendall(b"p")
        assert self.ctl.recv(1) == b"P"

    def resume(self) -> None:
        self.ctl.sendall(b"r")
        assert self.ctl.recv(1) == b"R"

    def writes_arrived(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " Write " in line]

    def close(self) -> None:
        self.ctl.close()
        for p in (self.nbdfuse, self.nbdkit):  # nbdfuse unmounts as it ends
            p.terminate()
            p.wait(timeout=30)


@pytest.mark.parametrize("engine", DIRECT_ENGINES)
def test_statfs_answered_while_a_write_waits(daemon_factory, fuse_tmp, engine):  # noqa: F811
    disk = PausableDisk(fuse_tmp)
    try:
        mp = make_mountpoint(fuse_tmp)
        d = daemon_factory("trio", [
            "--blockdev", f"driver=file,node-name=f,filename={disk.file}" + engine.keyval(),
            "--export", f"type=fuse,id=e,node-name=f,mountpoint={mp},writable=on"])
        wait_for(lambda: os.path.getsize(mp) == SIZE, what="the export")
        data = random.Random(3).randbytes(MiB)
        buf = mmap.mmap(-1, MiB)  # page-aligned, for O_DIRECT
        buf.write(data)
        disk.pause()
        written: dict[str, int | BaseException] = {}

        def write() -> None:
            fd = os.open(mp, os.O_RDWR | os.O_DIRECT)
            try:
                written["n"] = os.pwritev(fd, [buf], 3 * MiB)
            except OSError as e:
                written["n"] = e
            finally:
                os.close(fd)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            wait_for(lambda: disk.writes_arrived(), what="the write to reach nbdkit")
            assert "n" not in written  # it waits in nbdkit
            answered: dict[str, os.statvfs_result] = {}
            statfs = threading.Thread(target=lambda: answered.update(st=os.statvfs(mp)),
                                      daemon=True)
            statfs.start()
            statfs.join(30)
            # the STATFS came back while the WRITE still waits on the device
            assert "st" in answered
            assert "n" not in written
        finally:
            disk.resume()
            writer.join(60)
        assert written["n"] == MiB
        stop_clean(d)
        with open(disk.file, "rb") as f:
            image = f.read()
        assert image[3 * MiB:4 * MiB] == data
        assert image[:3 * MiB] == bytes(3 * MiB) and image[4 * MiB:] == bytes(SIZE - 4 * MiB)
    finally:
        disk.close()


async def test_buffered_write_alone_runs_on_the_loop(fuse_tmp, monkeypatch):  # noqa: F811
    """A 1 MiB write through the mount, alone in flight, to a buffered
    image on aio=threads is written on trio's thread (the threads engine's
    RunHere: no hop to a worker and back), and lands."""
    # the machine's dirty memory is an input here, as in test_file_inline
    monkeypatch.setattr(inline_io, "dirty_memory_ok", lambda: True)
    img = fuse_tmp / "disk.raw"
    img.write_bytes(bytes(SIZE))
    daemon = Daemon()
    node = await daemon.graph.add({"driver": "file", "node-name": "f", "filename": str(img),
                                   "aio": "threads"})
    mp = make_mountpoint(fuse_tmp)
    exp = FuseExport(daemon, export_args(mp), node)
    data = random.Random(6).randbytes(MiB)

    def write() -> int:
        buf = mmap.mmap(-1, MiB)  # page-aligned, for O_DIRECT
        buf.write(data)
        fd = os.open(mp, os.O_RDWR | os.O_DIRECT)
        try:
            return os.pwritev(fd, [buf], 5 * MiB)
        finally:
            os.close(fd)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            try:
                assert await trio.to_thread.run_sync(write) == MiB
            finally:
                await exp.stop()
    assert daemon.graph.io.threads.run_here.done >= 1
    await daemon.graph.io.aclose()
    image = img.read_bytes()
    assert image[5 * MiB:6 * MiB] == data
    assert image[:5 * MiB] == bytes(5 * MiB) and image[6 * MiB:] == bytes(SIZE - 6 * MiB)
