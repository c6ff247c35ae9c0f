"""host_device: a loop block device as the image, both daemons.

The same scenario against qemu-storage-daemon and qsd-trio: the node as
query-named-block-nodes shows it, resize and open refusals, then I/O through
an NBD export with qemu-io, whose bytes are checked in the device's backing
file against a model, and the map qemu-img reports.
"""

from __future__ import annotations

import json

import pytest

from tests import helpers
from tests.helpers import HAVE_QEMU, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path):
    img = tmp_path / "backing.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    with helpers.loop_device(img) as dev:
        yield dev, img


def scenario(daemon_factory, kind, dev, img, tmp_path) -> list:
    sock = tmp_path / f"{kind}.sock"
    d = daemon_factory(kind, ["--blockdev", f"host_device,filename={dev},node-name=h",
                              "--nbd-server", f"addr.type=unix,addr.path={sock}"])
    q = d.qmp()
    seen = [q.cmd_raw("query-named-block-nodes")]
    seen.append(q.cmd_raw("block_resize", {"node-name": "h", "size": 64 * MiB}))
    seen.append(q.cmd_raw("block_resize", {"node-name": "h", "size": MiB}))
    seen.append(q.cmd_raw("query-named-block-nodes")["return"][0]["image"]["virtual-size"])
    seen.append(q.cmd_raw("blockdev-add", {"driver": "host_device", "node-name": "x",
                                           "filename": str(img)}))
    seen.append(q.cmd_raw("blockdev-add", {"driver": "host_device", "node-name": "x",
                                           "filename": str(tmp_path / "missing")}))
    seen.append(q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "h",
                                               "writable": True}))
    url = f"nbd+unix:///h?socket={sock}"
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4k 8k", "-c", "write -z 1M 1M",
              "-c", "discard 2M 64k", "-c", "write -P 0x33 3M 64k", "-c", "read -P 0x5a 4k 8k",
              url).stdout
    seen.append([line for line in out.splitlines() if "/sec" not in line])
    seen.append(json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", url).stdout))
    d.stop()
    return [json.loads(json.dumps(s).replace(str(tmp_path), "T")) for s in seen]


def test_host_device_like_qemu(daemon_factory, loop_device, tmp_path):
    dev, img = loop_device
    theirs = scenario(daemon_factory, "qemu", dev, img, tmp_path)
    with open(img, "r+b") as f:  # the same starting content for both
        f.write(bytes(16 * MiB))
    ours = scenario(daemon_factory, "trio", dev, img, tmp_path)
    assert ours[0]["return"][0]["drv"] == "host_device"
    assert ours == theirs
    # the bytes reached the device: an independent model of what was written
    model = bytearray(16 * MiB)
    model[4096:4096 + 8192] = b"\x5a" * 8192
    model[3 * MiB:3 * MiB + 65536] = b"\x33" * 65536
    assert img.read_bytes() == bytes(model)
