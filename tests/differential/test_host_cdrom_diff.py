"""host_cdrom, both daemons, on the devices this machine has: a loop block
device (not a CD drive: CDROM_DRIVE_STATUS fails, so QEMU sees a drive
without a disc) and /dev/null, plus paths that are not devices.

What a client sees: the node in query-named-block-nodes and
query-blockstats (no dirty-flag, no driver-specific statistics, unlike
host_device), the open refusals (a regular file, a directory read-write and
read-only, a missing path), "No medium inserted" for block_resize, and an
NBD export of a node without a medium (or over one) refused with "Failed to
determine the NBD export's length: No medium found".

Normalised: the temporary directory and the loop device's name.
"""

from __future__ import annotations

import json

import pytest

from tests import helpers
from tests.helpers import HAVE_QEMU

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


@pytest.mark.parametrize("raw", [False, True], ids=["cdrom", "raw-over-cdrom"])
def test_export_without_a_medium(daemon_factory, loop_device, tmp_path, raw):
    dev, img = loop_device
    sock = tmp_path / "nbd.sock"
    nodes = ["--blockdev", f"host_cdrom,node-name=cd,filename={dev}"]
    if raw:  # bdrv_is_inserted asks every child
        nodes += ["--blockdev", "raw,node-name=r,file=cd"]
    seen = {}
    for kind in ("qemu", "trio"):
        d = daemon_factory(kind, [*nodes, "--nbd-server", f"addr.type=unix,addr.path={sock}"])
        q = d.qmp()
        seen[kind] = [q.cmd_raw("block-export-add", {"type": "nbd", "id": "e",
                                                     "node-name": "r" if raw else "cd",
                                                     "writable": True}),
                      q.cmd_raw("query-block-exports", {})]
        d.stop()
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"] == [{"error": {"class": "GenericError",
                                       "desc": "Failed to determine the NBD export's length: "
                                               "No medium found"}},
                            {"return": []}]
    assert img.read_bytes() == b"\x77" * 4 * MiB  # nothing reached the device
