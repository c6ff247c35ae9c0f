"""A command line imports only what it uses: a monitor and a node do not
load the export, job and snapshot command groups (and through them NBD
serving, FUSE, vhost-user, TLS, crypto, the jobs) before the pidfile is
written.  Read from ``sys.modules`` at exit (shutdown imports nothing
these tests look for)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

LAZY = ("qsd_trio.monitor.exports", "qsd_trio.monitor.jobs", "qsd_trio.monitor.snapshot",
        "qsd_trio.jobs.mirror", "qsd_trio.jobs.backup", "qsd_trio.exports.fuse",
        "qsd_trio.exports.vhost_user_blk", "qsd_trio.exports.vduse_blk",
        # drivers load when a node of theirs opens
        "qsd_trio.nodes.qcow2.driver", "qsd_trio.nodes.luks", "qsd_trio.nodes.nbd",
        "qsd_trio.nodes.rbd", "qsd_trio.nodes.vdi", "qsd_trio.nodes.vpc", "qsd_trio.nodes.file",
        "qsd_trio.crypto.luks", "zstandard", "prometheus_client", "h11")


# the daemon's own main(), which writes the modules it imported to a file
# when it exits (atexit): -X importtime does not see importlib.import_module
RUN = """
import atexit, sys
from qsd_trio.cli import main
report = sys.argv[1]
def write():
    with open(report, "w") as f:
        f.write("\\n".join(sys.modules))
atexit.register(write)
sys.exit(main(sys.argv[2:]))
"""


def imported_by(tmp_path, args: list[str]) -> set[str]:
    """The modules a daemon with ``args`` imported from start to SIGTERM
    (no client connects, so no monitor command loads anything)."""
    pidfile = tmp_path / "d.pid"
    report = tmp_path / "modules.txt"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(report), *args,
                             "--pidfile", str(pidfile)], stdin=subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if pidfile.exists() and pidfile.stat().st_size:
                break
            assert proc.poll() is None
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    return set(report.read_text().split())


def test_monitor_and_node_import_no_export_or_job_code(tmp_path):
    mods = imported_by(tmp_path, [
        "--chardev", f"socket,id=m,path={tmp_path}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=m", "--blockdev", "null-co,node-name=n0"])
    assert "qsd_trio.monitor.block" in mods  # blockdev-add's group did load
    assert "qsd_trio.nodes.null" in mods
    assert sorted(m for m in LAZY if m in mods) == []


def test_a_qcow2_node_loads_its_driver(tmp_path):
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    mods = imported_by(tmp_path, ["--blockdev", f"driver=qcow2,node-name=d,file.driver=file,"
                                                f"file.filename={img}"])
    assert {"qsd_trio.nodes.qcow2.driver", "qsd_trio.nodes.file"} <= mods
    assert "qsd_trio.nodes.vpc" not in mods


def test_an_export_loads_its_group(tmp_path):
    mods = imported_by(tmp_path, [
        "--blockdev", "null-co,node-name=n0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
        "--export", "nbd,id=e0,node-name=n0"])
    assert "qsd_trio.monitor.exports" in mods
    assert "qsd_trio.monitor.jobs" not in mods
