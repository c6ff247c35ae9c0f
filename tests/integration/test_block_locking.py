"""Image locking across processes, differential: while a daemon exports an
image, the real qemu-img/qemu-io get the same answers from qsd-trio's locks
as from qemu-storage-daemon's."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import HAVE_QEMU, Daemon, unused_path

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def outside_tools(img: str) -> list[tuple[int, str]]:
    cmds = [
        ["qemu-img", "resize", "-f", "raw", img, "2M"],
        ["qemu-io", "-f", "raw", "-c", "write -P 7 0 4096", img],
        ["qemu-img", "info", "-f", "raw", img],
        ["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", img],
    ]
    out = []
    for c in cmds:
        r = subprocess.run(c, capture_output=True, text=True, timeout=60)
        out.append((r.returncode, r.stderr.replace(img, "<img>")))
    return out


@pytest.mark.parametrize("extra", [
    # a raw filter passes the export's needs through; the NBD export
    # unshares resize ("Don't allow resize while the NBD server is running")
    [],
    ["offset=0,size=1048576"],  # a raw window unshares resize
])
def test_locks_seen_by_qemu_tools(tmp_path, extra):
    results = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}.raw"
        img.write_bytes(bytes(MiB))
        sock = unused_path(tmp_path, "nbd")
        raw = "driver=raw,node-name=r0,file=f0" + "".join("," + e for e in extra)
        args = ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", raw,
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e0,node-name=r0,writable=on"]
        with Daemon(kind, tmp_path, args):
            results[kind] = outside_tools(str(img))
    assert results["trio"] == results["qemu"]
