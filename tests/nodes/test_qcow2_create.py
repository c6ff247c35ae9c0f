"""create_qcow2 makes the same bytes as ``qemu-img create -f qcow2``."""

from __future__ import annotations

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.qcow2.create import create_qcow2
from qsd_trio.qapi.errors import GenericError

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_io

CASES = [
    ("1G", {}, ()),
    ("1M", {"version": 2}, ("compat=0.10",)),
    ("100G", {"cluster_size": 4096}, ("cluster_size=4096",)),
    ("64M", {"cluster_size": 512, "refcount_bits": 1}, ("cluster_size=512", "refcount_bits=1")),
    ("1M", {"extended_l2": True, "compression_type": "zstd", "lazy_refcounts": True,
            "refcount_bits": 64},
     ("extended_l2=on", "compression_type=zstd", "lazy_refcounts=on", "refcount_bits=64")),
    ("10M", {"cluster_size": 2 << 20}, ("cluster_size=2M",)),
]


def _size(s: str) -> int:
    return int(s[:-1]) << {"M": 20, "G": 30}[s[-1]]


async def _ours(path, size, **kw):
    path.write_bytes(b"")
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    try:
        await create_qcow2(f, size, **kw)
    finally:
        await graph.close_all()


@pytest.mark.parametrize("size,kw,opts", CASES)
async def test_same_bytes_as_qemu_img(tmp_path, size, kw, opts):
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    create(ref, _size(size), *opts)
    await _ours(ours, _size(size), **kw)
    assert ours.read_bytes() == ref.read_bytes()
    check_clean(ours)


async def test_backing_file_header(tmp_path):
    base, ref, ours = tmp_path / "base.qcow2", tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    create(base, 1 << 20)
    qemu_io(base, "write -P 0x5a 0 8k")
    create(ref, 1 << 20, backing="base.qcow2", backing_fmt="qcow2")
    await _ours(ours, 1 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    assert ours.read_bytes() == ref.read_bytes()
    async with open_qcow2(ours) as node:
        assert bytes(await node.read(0, 8192)) == b"\x5a" * 8192


async def test_preallocation_metadata(tmp_path):
    ref, ours = tmp_path / "ref.qcow2", tmp_path / "ours.qcow2"
    create(ref, 4 << 20, "preallocation=metadata")
    await _ours(ours, 4 << 20, preallocation="metadata")
    check_clean(ours)
    qemu_io(ours, "read -P 0 0 4M", "write -P 1 0 4M", "read -P 1 0 4M")
    check_clean(ours)


@pytest.mark.parametrize("kw,msg", [
    ({"cluster_size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"extended_l2": True, "cluster_size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16 KB"),
])
async def test_bad_options(tmp_path, kw, msg):
    with pytest.raises(GenericError) as ei:
        await _ours(tmp_path / "x.qcow2", 1 << 20, **kw)
    assert ei.value.desc == msg
