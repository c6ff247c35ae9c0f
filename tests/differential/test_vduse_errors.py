"""vduse-blk option errors, and the export on a host without /dev/vduse:
the same stderr and exit status as qemu-storage-daemon.

This machine has no VDUSE (the vduse module is not loaded), so creating
the device fails as libvduse makes it fail: "Failed to open
/dev/vduse/control: ..." (or "Invalid parameter for vduse" for a bad name)
and then QEMU's "failed to create vduse device". The device itself is
tested inside a guest whose kernel has it (tests/integration/test_vduse_guest.py).
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, run_cli

pytestmark = [
    pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed"),
    pytest.mark.skipif(os.path.exists("/dev/vduse/control"),
                       reason="this host has VDUSE: the device would be created"),
]

NODE = ["--blockdev", "driver=null-co,node-name=n"]
CASES = [
    "name=x",
    "name=x,num-queues=4,queue-size=128,logical-block-size=4096,serial=s1,writable=on",
    "name=a..b",
    "name=" + "x" * 256,
    "name=x,num-queues=0",
    "name=x,queue-size=3",
    "name=x,queue-size=2048",
    "name=x,logical-block-size=256",
    "name=x,logical-block-size=1000",
    "name=x,bogus=1",
    "num-queues=1",
]


@pytest.mark.parametrize("opts", CASES, ids=[c[:60] for c in CASES])
def test_vduse_export_errors_match(opts):
    args = NODE + ["--export", f"type=vduse-blk,id=v,node-name=n,{opts}"]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert theirs.returncode == 1, theirs.stderr
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


def test_vduse_name_with_nul_over_qmp(tmp_path):
    """A NUL in the name (QMP only; kept as C0 80) is no internal error:
    the same refusal as any name on this host."""
    seen = {}
    for kind in ("qemu", "trio"):
        # libvduse's line on stderr, which qsd-trio writes as well
        with Daemon(kind, tmp_path, NODE, allow_stderr=r"^Failed to open /dev/vduse") as d:
            q = d.qmp()
            seen[kind] = q.cmd_raw("block-export-add", {"type": "vduse-blk", "id": "v",
                                                        "node-name": "n", "name": "x\u0000y"})
    assert seen["trio"] == seen["qemu"]
    assert seen["qemu"]["error"]["desc"] == "failed to create vduse device"
