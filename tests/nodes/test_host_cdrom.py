"""host_cdrom in process, on a loop device: a device that does not answer
CDROM_DRIVE_STATUS with "disc present" has no medium, as QEMU sees it, so
every request that would touch the device fails with ENOMEDIUM, on every
path a request can take (the synchronous fast paths included), a flush does
nothing, resizing says "No medium inserted", and the device is left as it
was.  (With a disc in a real drive the node is host_device without zero
writes, discards or block status of its own; this machine has no CD drive.)
"""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status
from qsd_trio.qapi.errors import GenericError
from tests import helpers

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path):
    img = tmp_path / "disc.img"
    img.write_bytes(b"\x77" * MiB)
    with helpers.loop_device(img) as dev:
        yield dev, img


async def test_no_medium(loop_device):
    dev, img = loop_device
    graph = BlockGraph()
    try:
        cd = await graph.add({"driver": "host_cdrom", "node-name": "cd", "filename": dev,
                              "discard": "unmap"})
        assert cd.length == MiB and not cd.inserted()
        # opened as cdrom_open does, so that a drive without a disc opens
        assert fcntl.fcntl(cd.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        for request in (lambda: cd.read(0, 4096), lambda: cd.write(0, b"x" * 4096),
                        lambda: cd.write(0, b"x" * 4096, fua=True),
                        lambda: cd.write_zeroes(0, 4096), lambda: cd.discard(0, 4096),
                        lambda: cd.read_into(0, [memoryview(bytearray(512))]),
                        lambda: cd.writev(0, [memoryview(b"a" * 512), memoryview(b"b" * 512)])):
            with pytest.raises(OSError) as e:
                await request()
            assert e.value.errno == errno.ENOMEDIUM
        # the synchronous paths decline, so the request takes the one that fails
        assert cd.read_now(0, 4096) is None
        assert not cd.read_into_now(0, [memoryview(bytearray(4096))])
        assert not cd.write_now(0, memoryview(b"y" * 4096))
        # and so do the paths without a task (an export's, handed to the engine)
        def never(*_):
            raise AssertionError("started without a medium")
        page = memoryview(bytearray(b"z" * 4096))
        assert not cd.read_submit(0, 4096, never)
        assert not cd.readv_submit(0, 4096, [page], never)
        assert not cd.write_submit(0, page, never)
        assert not cd.writev_submit(0, [page[:2048], page[2048:]], never)
        await cd.flush()  # nothing to flush without a medium
        st = await cd.block_status(0, MiB)
        assert st.flags == Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
        assert st.length == MiB
        with pytest.raises(GenericError, match="No medium inserted"):
            await cd.truncate(2 * MiB)
    finally:
        await graph.close_all()
    assert img.read_bytes() == b"\x77" * MiB


async def test_refusals(tmp_path):
    graph = BlockGraph()
    f = tmp_path / "f"
    f.write_bytes(b"")
    cases = [
        ({"filename": str(f)}, f"'host_cdrom' driver requires '{f}' to be either a "
                               "character or block device"),
        ({"filename": str(tmp_path)}, f"Could not open '{tmp_path}': Is a directory"),
        ({"filename": str(tmp_path), "read-only": True},
         f"'host_cdrom' driver requires '{tmp_path}' to be either a character or block "
         "device"),
        ({"filename": str(tmp_path / "no")},
         f"Could not open '{tmp_path / 'no'}': No such file or directory")]
    try:
        for opts, message in cases:
            with pytest.raises(GenericError) as e:
                await graph.add({"driver": "host_cdrom", "node-name": "cd", **opts})
            assert e.value.desc == message
        assert not graph.nodes
    finally:
        await graph.close_all()
