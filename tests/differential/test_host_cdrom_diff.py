"""host_cdrom, both daemons, on the devices this machine has: a loop block
device (not a CD drive: CDROM_DRIVE_STATUS fails, so QEMU sees a drive
without a disc) and /dev/null, plus paths that are not devices.

What a client sees: the node in query-named-block-nodes and
query-blockstats (no dirty-flag, no driver-specific statistics, unlike
host_device), the open refusals (a regular file, a directory read-write and
read-only, a missing path), and "No medium inserted" for block_resize.

One difference is kept on purpose and checked on its own: qemu-storage-daemon
refuses an export of a node without a medium ("Failed to determine the NBD
export's length: No medium found", from the export's BlockBackend), while
qsd-trio's exports do not ask the node for a medium: the export is made, and
every read and write through it fails with ENOMEDIUM (a write's reply says
EINVAL, as QEMU's NBD server maps it; a failed structured read drops the
client, as QEMU 7.2's does).

Normalised: the temporary directory and the loop device's name.
"""

from __future__ import annotations

import json

import pytest

from tests import helpers
from tests.helpers import HAVE_QEMU, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path):
    img = tmp_path / "disc.img"
    img.write_bytes(b"\x77" * 4 * MiB)
    with helpers.loop_device(img) as dev:
        yield dev, img


def scenario(d, dev, tmp) -> list:
    q = d.qmp()
    seen: list = []
    for opts in ({"filename": dev},
                 {"filename": "/dev/null", "read-only": True, "node-name": "null"},
                 {"filename": str(tmp / "disc.img")},
                 {"filename": str(tmp / "disc.img"), "read-only": True},
                 {"filename": str(tmp)},
                 {"filename": str(tmp), "read-only": True},
                 {"filename": str(tmp / "missing")}):
        seen.append(q.cmd_raw("blockdev-add", {"driver": "host_cdrom", "node-name": "cd",
                                               **opts}))
    seen.append(q.cmd_raw("blockdev-add", {"driver": "host_device", "node-name": "hd",
                                           "filename": "/dev/null", "read-only": True}))
    seen.append(q.cmd_raw("query-named-block-nodes"))
    seen.append(q.cmd_raw("query-blockstats", {"query-nodes": True}))
    seen.append(q.cmd_raw("query-block"))
    seen.append(q.cmd_raw("block_resize", {"node-name": "cd", "size": 8 * MiB}))
    seen.append(q.cmd_raw("block_resize", {"node-name": "cd", "size": 4 * MiB}))
    seen.append(q.cmd_raw("blockdev-del", {"node-name": "cd"}))
    text = json.dumps(seen).replace(dev, "DEV").replace(str(tmp), "T")
    return json.loads(text)


def test_host_cdrom_like_qemu(daemon_factory, loop_device, tmp_path):
    dev, img = loop_device
    theirs = scenario(daemon_factory("qemu"), dev, tmp_path)
    ours = scenario(daemon_factory("trio"), dev, tmp_path)
    assert ours == theirs
    nodes = {n["node-name"]: n for n in ours[8]["return"]}
    assert nodes["cd"]["drv"] == "host_cdrom" and "dirty-flag" not in nodes["cd"]["image"]
    assert nodes["cd"]["image"]["virtual-size"] == 4 * MiB
    assert ours[11] == {"error": {"class": "GenericError", "desc": "No medium inserted"}}
    assert img.read_bytes() == b"\x77" * 4 * MiB


def test_export_without_a_medium(daemon_factory, loop_device, tmp_path):
    dev, img = loop_device
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("qemu", ["--blockdev", f"host_cdrom,node-name=cd,filename={dev}",
                                "--nbd-server", f"addr.type=unix,addr.path={sock}"])
    refused = d.qmp().cmd_raw("block-export-add", {"type": "nbd", "id": "e",
                                                   "node-name": "cd", "writable": True})
    assert refused["error"]["desc"] == ("Failed to determine the NBD export's length: "
                                        "No medium found")
    d.stop()
    d = daemon_factory("trio", ["--blockdev", f"host_cdrom,node-name=cd,filename={dev}",
                                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                "--export", "nbd,id=e,node-name=cd,writable=on"])
    url = f"nbd+unix:///cd?socket={sock}"
    out = [qemu_io("-f", "raw", "-c", cmd, url, check=False).stdout.strip()
           for cmd in ("write -P 1 0 4k", "read 0 4k")]
    # ENOMEDIUM on a write is sent as EINVAL; a structured read that fails
    # drops the client (as QEMU 7.2's sparse read does), which qemu-io sees as EIO
    assert out == ["write failed: Invalid argument", "read failed: Input/output error"]
    d.stop()
    assert img.read_bytes() == b"\x77" * 4 * MiB  # nothing reached the device
