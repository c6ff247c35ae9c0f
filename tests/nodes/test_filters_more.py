"""The preallocate, compress and blkverify filters in process.

preallocate and blkverify pass the conformance suite (blkverify's two
children must then stay equal: qemu-img compare after each check);
compress cannot (a compressed cluster is never overwritten, as in QEMU), so
its checks are its own: clusters compressed as qemu-io's ``write -c``
makes them, padding, zero writes, the refusals.  blkverify's fatal
mismatch exits the process, so it runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.qapi.errors import GenericError
from tests.helpers import qemu_img, qemu_io

from .conformance import check_block_node

MiB = 1 << 20


def _raw(path, size):
    path.write_bytes(b"")
    os.truncate(path, size)
    return str(path)


# -- preallocate ------------------------------------------------------------------


async def test_preallocate_conformance(tmp_path):
    img = tmp_path / "p.raw"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        graph = BlockGraph()
        node = await graph.add({"driver": "preallocate", "node-name": "p",
                                "read-only": read_only, "discard": "unmap",
                                "file": {"driver": "file", "filename": _raw(img, size)}})
        try:
            yield node
        finally:
            await graph.close_all()

    await check_block_node(factory)


async def _qcow2_over_preallocate(tmp_path, **opts):
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    graph = BlockGraph()
    await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
    p = await graph.add({"driver": "preallocate", "node-name": "p", "file": "f", **opts})
    q = await graph.add({"driver": "qcow2", "node-name": "q", "file": "p"})
    return img, graph, p, q


async def test_preallocate_extends_and_cuts_back(tmp_path):
    img, graph, p, q = await _qcow2_over_preallocate(tmp_path, **{"prealloc-size": 1000,
                                                                    "prealloc-align": 4096})
    try:
        await q.write(0, b"\x11" * 65536)
        # qcow2 wrote up to 393216; +1000 bytes, aligned up to 4 KiB
        assert (p.length, os.stat(img).st_size) == (393216, 397312)
        await q.write(3 * MiB, b"\x22" * 100000)
        assert (p.length, os.stat(img).st_size) == (524288, 528384)
        assert graph.nodes["f"].length == 528384
    finally:
        await graph.close_all()
    assert os.stat(img).st_size == 524288  # cut back to the data at close
    assert "No errors were found" in qemu_img("check", str(img)).stdout


async def test_preallocate_default_size(tmp_path):
    img, graph, p, q = await _qcow2_over_preallocate(tmp_path)
    try:
        await q.write(0, b"\x11" * 65536)
        assert os.stat(img).st_size == 129 * MiB  # 393216 + 128 MiB, aligned to 1 MiB
        # the format above allocates from the data's end, not the file's
        await q.write(MiB, b"\x22" * 65536)
        assert p.length == 458752
        # a blockdev-del of the format drops the permissions; the
        # preallocation is cut when the filter closes
        await graph.delete("q")
        assert p.length == 129 * MiB
    finally:
        await graph.close_all()
    assert os.stat(img).st_size == 458752


async def test_preallocate_truncate(tmp_path):
    img, graph, p, q = await _qcow2_over_preallocate(tmp_path, **{"prealloc-size": 65536})
    try:
        await q.write(0, b"\x11" * 65536)
        assert os.stat(img).st_size == MiB
        # falloc within what the filter preallocated: only the data end moves
        await p.truncate(600000, prealloc="falloc")
        assert (p.length, os.stat(img).st_size) == (600000, MiB)
        # off: the preallocation is dropped first, then the new size set
        await p.truncate(2 * MiB)
        assert (p.length, os.stat(img).st_size) == (2 * MiB, 2 * MiB)
    finally:
        await graph.close_all()


@pytest.mark.parametrize(("opts", "message"), [
    ({"prealloc-align": 1000},
     "prealloc-align parameter of preallocate filter is not aligned to 512"),
    ({"prealloc-align": -512},
     "Parameter 'prealloc-align' expects a non-negative number below 2^64"),
    ({"prealloc-size": -1},
     "Parameter 'prealloc-size' expects a non-negative number below 2^64"),
])
async def test_preallocate_option_errors(tmp_path, opts, message):
    graph = BlockGraph()
    try:
        with pytest.raises(GenericError) as e:
            await graph.add({"driver": "preallocate", "node-name": "p", **opts,
                             "file": {"driver": "file",
                                      "filename": _raw(tmp_path / "x", 4096)}})
        assert e.value.desc == message
        assert not graph.nodes
    finally:
        await graph.close_all()


# -- compress ----------------------------------------------------------------------


async def _compress_over_qcow2(tmp_path, name="c.qcow2", size="4M"):
    img = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", str(img), size)
    graph = BlockGraph()
    node = await graph.add({"driver": "compress", "node-name": "c",
                            "file": {"driver": "qcow2",
                                     "file": {"driver": "file", "filename": str(img)}}})
    return img, graph, node


def _map(img) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", str(img)).stdout)


async def test_compress_matches_qemu_io_write_c(tmp_path):
    """The same cluster writes as ``qemu-io -c "write -c"``: byte-identical images."""
    img, graph, node = await _compress_over_qcow2(tmp_path)
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(ref), "4M")
    rnd = os.urandom(65536)
    try:
        await node.write(0, b"\x11" * 65536)
        await node.write(3 * 65536, b"\x22" * 131072)
        await node.write(10 * 65536, rnd)  # does not compress: stored as it is
        assert node.request_alignment == 65536
        assert node.info_extra() == {"cluster-size": 65536}
    finally:
        await graph.close_all()
    (tmp_path / "rnd").write_bytes(rnd)
    qemu_io("-f", "qcow2", "-c", "write -c -P 0x11 0 64k", "-c", "write -c -P 0x22 192k 64k",
            "-c", "write -c -P 0x22 256k 64k",
            "-c", f"write -c -s {tmp_path / 'rnd'} 640k 64k", str(ref))
    assert img.read_bytes() == ref.read_bytes()
    assert "compressed clusters" in qemu_img("check", str(img)).stdout


async def test_compress_padding_zeroes_and_refusals(tmp_path):
    img, graph, node = await _compress_over_qcow2(tmp_path)
    try:
        await node.write(65536 + 100, b"\x33" * 1000)  # padded to the cluster
        assert bytes(await node.read(65536, 1200)) == bytes(100) + b"\x33" * 1000 + bytes(100)
        with pytest.raises(OSError) as e:  # compression can't overwrite anything
            await node.write(65536, b"\x44" * 512)
        assert e.value.errno == 5
        await node.write_zeroes(2 * 65536, 65536)  # a zero cluster
        await node.write_zeroes(4 * 65536 + 7, 1000)  # a compressed cluster of zeroes
    finally:
        await graph.close_all()
    m = {e["start"]: e for e in _map(img)}
    assert m[65536]["data"] and "offset" not in m[65536]  # compressed
    assert m[131072]["zero"] and m[131072]["present"]
    assert m[262144]["data"] and "offset" not in m[262144]
    assert "No errors were found" in qemu_img("check", str(img)).stdout


@pytest.mark.parametrize(("child", "fmt"), [({"driver": "null-co"}, "null-co"),
                                            ("raw", "raw")])
async def test_compress_needs_compressing_child(tmp_path, child, fmt):
    graph = BlockGraph()
    try:
        if child == "raw":
            child = {"driver": "raw", "file": {"driver": "file",
                                               "filename": _raw(tmp_path / "r", 4096)}}
        with pytest.raises(GenericError) as e:
            await graph.add({"driver": "compress", "node-name": "c", "file": child})
        assert e.value.desc == f"Compression is not supported for underlying format: {fmt}"
    finally:
        await graph.close_all()


# -- blkverify ---------------------------------------------------------------------


async def test_blkverify_conformance(tmp_path):
    test_img, raw_img = tmp_path / "test.raw", tmp_path / "raw.raw"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        graph = BlockGraph()
        node = await graph.add({"driver": "blkverify", "node-name": "v",
                                "read-only": read_only, "discard": "unmap",
                                "test": {"driver": "file", "filename": _raw(test_img, size)},
                                "raw": {"driver": "file", "filename": _raw(raw_img, size)}})
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        # blkverify discards nothing: both children hold the data written
        assert test_img.read_bytes() == raw_img.read_bytes()

    await check_block_node(factory, can_resize=False, after_close=after_close)


async def test_blkverify_info(tmp_path):
    graph = BlockGraph()
    try:
        node = await graph.add({
            "driver": "blkverify", "node-name": "v",
            "test": {"driver": "file", "filename": _raw(tmp_path / "t", 65536)},
            "raw": {"driver": "file", "filename": _raw(tmp_path / "r", 65536)}})
        assert node.filename == f"blkverify:{tmp_path / 'r'}:{tmp_path / 't'}"
        assert node.primary_child() is node.children["raw"]
        assert node.actual_size() is None
    finally:
        await graph.close_all()


_MISMATCH = """
import sys, trio
from qsd_trio.nodes.graph import BlockGraph
async def main():
    g = BlockGraph()
    v = await g.add({"driver": "blkverify", "node-name": "v",
                     "test": {"driver": "file", "filename": sys.argv[1]},
                     "raw": {"driver": "file", "filename": sys.argv[2]}})
    await v.read(0, 4096)
    await v.read(4096, 8192)
    print("not reached")
trio.run(main)
"""


def test_blkverify_mismatch_exits(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(MiB))
    data = bytearray(MiB)
    data[5000:5010] = b"x" * 10
    b.write_bytes(data)
    p = subprocess.run([sys.executable, "-c", _MISMATCH, str(a), str(b)], capture_output=True,
                       text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__)))))
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr == "blkverify: read offset=4096 bytes=8192 contents mismatch at offset 5000\n"
