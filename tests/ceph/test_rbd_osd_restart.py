"""The OSD killed in the middle of writes: requests wait (librbd has no
operation timeout by default), complete once the OSD is back, and the data
read back is what was written, in qsd-trio as in qemu-storage-daemon.
Its own cluster on bluestore, whose data survives the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.ceph import HAVE_CEPH, start
from tests.helpers import HAVE_QEMU, qemu_io

pytestmark = pytest.mark.skipif(not (HAVE_QEMU and HAVE_CEPH),
                                reason="qemu-storage-daemon or Ceph not installed")


@pytest.fixture(scope="module")
def bluestore_cluster():
    yield from start("bluestore")


def wait_gone(pid):
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] in "ZX":
                    return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, "OSD did not die"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["qemu", "trio"])
def test_osd_killed_mid_write(daemon_factory, bluestore_cluster, tmp_path, kind):
    cl = bluestore_cluster
    image = f"osd-{kind}"
    cl.rbd("create", f"rbd/{image}", "--size", "32M")
    q = daemon_factory(kind).qmp()
    q.cmd("blockdev-add", driver="rbd", pool="rbd", image=image, conf=str(cl.conf),
          **{"node-name": "r"})
    sock = tmp_path / f"{kind}.sock"
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.cmd("nbd-server-add", device="r", writable=True)
    url = f"nbd+unix:///r?socket={sock}"
    qemu_io("-f", "raw", "-c", "write -P 0x61 0 8M", "-c", "flush", url)
    pid = cl.osd_pid()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x62 8M 8M",
                               "-c", "flush", url], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    time.sleep(1)  # the writes are waiting for the OSD, not failed
    assert writer.poll() is None
    cl.restart_osd()
    out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0, out
    qemu_io("-f", "raw", "-c", "read -P 0x61 0 8M", "-c", "read -P 0x62 8M 8M",
            "-c", "read -P 0 16M 16M", url)
