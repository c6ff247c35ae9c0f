"""driver=nbd against nbdkit: its memory plugin, and its error and delay
filters to inject failures and latency.

A qsd-trio client opens nbdkit's export with driver=nbd and re-exports it
over NBD to qemu-io and qemu-img.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import qemu_img, qemu_io
from tests.nbd_servers import start_nbdkit

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed")

MiB = 1 << 20


@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit(*args) -> the unix socket of a started nbdkit; killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> Path:
        sock = tmp_path / f"nbdkit{len(procs)}.sock"
        procs.append(start_nbdkit(sock, *args))
        return sock

    yield start
    for p in procs:
        p.kill()
        p.wait()


def client(daemon_factory, tmp_path, srv: Path):
    sock = tmp_path / "client.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=nbd,node-name=n,server.type=unix,server.path={srv}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
    ])
    return d, f"nbd+unix:///re?socket={sock}"


def test_memory_plugin_through_a_reexport(daemon_factory, tmp_path, nbdkit):
    srv = nbdkit("memory", "16M")
    d, uri = client(daemon_factory, tmp_path, srv)
    qemu_io("-f", "raw", "-c", "write -P 0x42 1M 2M", "-c", "write -z 2M 64k",
            "-c", "discard 8M 1M", uri)
    out = qemu_io("-f", "raw", "-c", "read -P 0x42 1M 1M", "-c", "read -P 0 2M 64k",
                  "-c", "read -P 0x42 2162688 983040", uri).stdout
    assert "Pattern verification failed" not in out
    # what nbdkit itself says, read directly
    direct = f"nbd+unix:///?socket={srv}"
    out = qemu_io("-f", "raw", "-c", "read -P 0x42 1M 1M", direct).stdout
    assert "Pattern verification failed" not in out
    # block status through the chain is nbdkit's base:allocation
    assert qemu_img("map", "--output=json", "-f", "raw", uri).stdout == \
        qemu_img("map", "--output=json", "-f", "raw", direct).stdout
    d.stop()


@pytest.mark.parametrize("op", ["pread", "pwrite", "trim", "zero", "extents"])
def test_error_filter_errors_as_qemu_storage_daemon(daemon_factory, tmp_path, nbdkit, op):
    """nbdkit fails every request of one kind with ENOSPC; through a re-export
    of the nbd node qemu-io sees what it sees through qemu-storage-daemon
    doing the same (a failed data read of a sparse read drops the client:
    EIO), and the other requests go on."""
    srv = nbdkit("--filter=error", "memory", "16M", f"error-{op}=ENOSPC",
                 f"error-{op}-rate=100%")
    cmds = ["write -P 7 0 64k", "read -P 7 0 4k", "write -z 64k 64k", "discard 128k 64k",
            "flush", "read -P 7 4k 4k"]
    outs = []
    for kind in ("qemu", "trio"):
        sock = tmp_path / f"client-{kind}.sock"
        d = daemon_factory(kind, [
            "--blockdev", f"driver=nbd,node-name=n,server.type=unix,server.path={srv},"
                          "discard=unmap",
            "--blockdev", "driver=raw,node-name=r,file=n,discard=unmap",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=re,node-name=r,name=re,writable=on",
        ])
        uri = f"nbd+unix:///re?socket={sock}"
        got = []
        for c in cmds:
            p = qemu_io("-f", "raw", "-c", c, uri, check=False)
            got.append([ln for ln in (p.stdout + p.stderr).splitlines()
                        if "failed" in ln or "verification" in ln])
        outs.append(got)
        d.stop()
    assert any(outs[0]), "the filter failed nothing"
    assert outs[1] == outs[0]


def test_delay_filter_many_requests_in_flight(daemon_factory, tmp_path, nbdkit):
    srv = nbdkit("--filter=delay", "memory", "16M", "rdelay=50ms", "wdelay=50ms")
    d, uri = client(daemon_factory, tmp_path, srv)
    cmds = []
    for i in range(32):
        cmds += ["-c", f"aio_write -P {i + 1} {i * 64 * 1024} 64k"]
    cmds += ["-c", "aio_flush"]
    for i in range(32):
        cmds += ["-c", f"aio_read -P {i + 1} {i * 64 * 1024} 64k"]
    cmds += ["-c", "aio_flush"]
    out = qemu_io("-f", "raw", *cmds, uri).stdout
    assert "Pattern verification failed" not in out
    assert "failed" not in out
    d.stop()
