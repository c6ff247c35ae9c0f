"""A file whose length is not a whole number of sectors, exported by both
daemons: the file node counts whole 512-byte sectors (QEMU's
bdrv_getlength), so a 1000-byte file is a 1024-byte disk.  The tail reads
as zeroes and shows as a hole in block status (without O_DIRECT); a write into it grows the
file to the sector's end."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

HEAD = bytes(range(256)) * 3 + bytes(232)  # 1000 bytes, the last 232 zero on disk too


def _probe(kind, tmp_path, direct):
    img = tmp_path / f"{kind}.img"
    img.write_bytes(HEAD[:990] + b"abc" + HEAD[993:])
    sock = tmp_path / f"{kind}.sock"
    cache = ",cache.direct=on" if direct else ""
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}{cache}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=f,writable=on"]
    url = f"nbd+unix:///f?socket={sock}"
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        image = q.cmd_raw("query-named-block-nodes", {})["return"][0]["image"]
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        before = qemu_io("-f", "raw", "-c", "read -v 992 32", url).stdout
        qemu_io("-f", "raw", "-c", "write -P 0x78 1020 4", url)
        after = qemu_io("-f", "raw", "-c", "read -v 992 32", url).stdout
        past = qemu_io("-f", "raw", "-c", "read 1024 512", url, check=False)
    image.pop("actual-size")  # the host's allocation, compared through the file instead
    image["filename"] = image["filename"].replace(str(img), "IMG")
    return {"image": image, "map": mapping, "before": before.split("\nread")[0],
            "after": after.split("\nread")[0], "past": past.returncode,
            "file": img.read_bytes()}


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_odd_length_file(tmp_path, direct):
    seen = {kind: _probe(kind, tmp_path, direct) for kind in ("qemu", "trio")}
    assert seen["trio"] == seen["qemu"]
    trio = seen["trio"]
    assert trio["image"]["virtual-size"] == 1024
    # with O_DIRECT block status is widened to the request alignment (4096
    # on this file system), so the tail is part of one data extent
    tail = ({"start": 0, "length": 1024, "zero": False, "data": True, "offset": 0} if direct
            else {"start": 1000, "length": 24, "zero": True, "data": False, "offset": 1000})
    assert trio["map"][-1] == {**tail, "depth": 0, "present": True}
    assert trio["past"] != 0  # beyond the disk's end
    expected = bytearray(HEAD[:990] + b"abc" + HEAD[993:]) + bytes(24)
    expected[1020:1024] = b"xxxx"
    assert trio["file"] == bytes(expected)
    assert os.path.getsize(tmp_path / "trio.img") == 1024
