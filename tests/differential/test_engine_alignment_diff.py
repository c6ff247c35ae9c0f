"""Unaligned requests on O_DIRECT nodes, qemu-storage-daemon beside
qsd-trio (issue 11): the same command line, the same block sizes told to
NBD clients, the same bytes read back after unaligned writes, zeroes and
discards, for each engine on 512- and 4096-byte sector devices.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.engines import DIRECT_ENGINES
from tests.helpers import HAVE_QEMU, qemu_io
from tests.integration import test_engine_alignment as alignment
from tests.integration.test_engine_alignment import SIZE, MiB, block_sizes, host_device_daemon

device = alignment.device  # the loop-device fixture

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")


@pytest.mark.parametrize("engine", DIRECT_ENGINES)
def test_unaligned_same_as_qemu(daemon_factory, tmp_path, device, engine):
    """Both daemons, one command line: the block sizes clients are told, and
    what qemu-io reads back after unaligned writes, zeroes and discards."""
    dev, backing, sector = device
    seen = {}
    for kind in ("qemu", "trio"):
        backing.write_bytes(random.Random(7).randbytes(SIZE))
        sock = tmp_path / f"{kind}.sock"
        d = host_device_daemon(daemon_factory, kind, dev, engine, sock)
        uri = f"nbd+unix:///h?socket={sock}"
        # a discard that fails is part of what is compared
        out = qemu_io("-f", "raw", "-c", "write -P 1 100 5000", "-c", "write -z 6000 10000",
                      "-c", "discard 4097 8191", "-c", "write -P 2 16383 2",
                      "-c", "read -v 0 20480", uri, check=False).stdout
        seen[kind] = (block_sizes(uri),
                      [line for line in out.splitlines() if "/sec" not in line])
        d.stop()
    assert seen["trio"] == seen["qemu"]


@pytest.mark.parametrize("contents", ["empty", "sparse", "data"])
def test_direct_alignment_probe_same(daemon_factory, tmp_path, contents):
    """The request alignment a cache.direct=on file is given (the block size
    NBD clients are told) is qemu-storage-daemon's, however the file starts:
    QEMU probes with reads of 1, 512, ... bytes at offset 0, and a read that
    succeeds at 1 byte (a hole, or an empty file) means 'unknown', which it
    rounds up to 4096."""
    img = tmp_path / "img.raw"
    img.write_bytes(b"\x01" * MiB if contents == "data" else b"")
    if contents == "sparse":
        os.truncate(img, MiB)
    seen = {}
    for kind in ("qemu", "trio"):
        sock = tmp_path / f"{kind}.sock"
        d = daemon_factory(kind, [
            "--blockdev", f"driver=file,node-name=h,filename={img},cache.direct=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=h,name=h"])
        seen[kind] = block_sizes(f"nbd+unix:///h?socket={sock}")
        d.stop()
    assert seen["trio"] == seen["qemu"]
