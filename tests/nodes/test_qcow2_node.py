"""qcow2 through the common conformance suite and random workloads.

After each run the real ``qemu-img check`` must find the image clean and
``qemu-img convert`` to raw must give exactly the bytearray model.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph

from .conformance import check_block_node
from .qcow2_helpers import check_clean, create, qemu_img, qemu_io

_counter = itertools.count()


def dump(path, tmp_path) -> bytes:
    out = tmp_path / f"dump{next(_counter)}.raw"
    qemu_img("convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qcow2_factory(tmp_path, opts=(), file_opts=None):
    """(factory, after_close) for check_block_node: a fresh qcow2 image made by
    qemu-img with ``opts`` (-o), over a file node with ``file_opts``."""
    paths = []

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        if not read_only or not paths:
            path = tmp_path / f"img{len(paths)}.qcow2"
            create(path, size, *opts)
            paths.append(path)
        graph = BlockGraph()
        node = await graph.add({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                                "discard": "unmap",
                                "file": {"driver": "file", "filename": str(paths[-1]),
                                         **(file_opts or {})}})
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        check_clean(paths[-1])
        assert dump(paths[-1], tmp_path) == model

    return factory, after_close


@pytest.mark.parametrize("opts", [(), ("cluster_size=4096", "refcount_bits=8"),
                                  ("extended_l2=on",), ("compat=0.10",)],
                         ids=["default", "c4k", "extl2", "v2"])
async def test_conformance(tmp_path, opts):
    factory, after_close = qcow2_factory(tmp_path, opts)
    await check_block_node(factory, after_close=after_close)


async def test_conformance_over_backing(tmp_path):
    """The same suite on an overlay whose (zero-filled but allocated) backing file is read."""
    paths = []

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        base = tmp_path / f"base{len(paths)}.qcow2"
        top = tmp_path / f"top{len(paths)}.qcow2"
        create(base, size)
        # allocated zeroes in the backing file, so copy-on-write really reads it
        qemu_io(base, f"write -P 0 0 {size}")
        create(top, size, "cluster_size=4096", backing=str(base))
        paths.append(top)
        graph = BlockGraph()
        node = await graph.add({"driver": "qcow2", "node-name": "q", "read-only": read_only,
                                "discard": "unmap",
                                "file": {"driver": "file", "filename": str(top)}})
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        check_clean(paths[-1])
        assert dump(paths[-1], tmp_path) == model

    await check_block_node(factory, after_close=after_close)


OPS = st.lists(
    st.tuples(st.sampled_from(["write", "zero", "zero_unmap", "discard", "resize", "flush"]),
              st.integers(0, (1 << 20) - 1), st.integers(1, 300_000), st.integers(0, 255)),
    min_size=1, max_size=25)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, opts=st.sampled_from([(), ("cluster_size=4096",), ("extended_l2=on",),
                                      ("cluster_size=512", "refcount_bits=1")]))
async def test_random_workload(tmp_path, ops, opts):
    await run_random_workload(tmp_path, ops, opts)


async def run_random_workload(tmp_path, ops, opts, file_opts=None):
    """``ops`` on a fresh 1 MiB image (made with ``opts``) against a
    bytearray model; qemu-img check and convert then agree with it."""
    path = tmp_path / f"r{next(_counter)}.qcow2"
    size = 1 << 20
    create(path, size, *opts)
    model = bytearray(size)
    cs = 512 if "cluster_size=512" in opts else 4096 if "cluster_size=4096" in opts else 65536
    graph = BlockGraph()
    node = await graph.add({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                            "file": {"driver": "file", "filename": str(path),
                                     **(file_opts or {})}})
    try:
        for op, off, n, p in ops:
            size = len(model)
            off %= size
            n = min(n, size - off)
            if op == "write":
                data = bytes([p]) * n
                await node.write(off, data)
                model[off:off + n] = data
            elif op in ("zero", "zero_unmap"):
                await node.write_zeroes(off, n, may_unmap=op == "zero_unmap")
                model[off:off + n] = bytes(n)
            elif op == "discard":
                await node.discard(off, n)
                a, b = -(-off // cs) * cs, (off + n) // cs * cs
                if off + n == size:
                    b = off + n
                if a < b:
                    model[a:b] = bytes(b - a)
            elif op == "resize":
                new = max(512, (n * 8) // 512 * 512)
                await node.truncate(new)
                if new < size:
                    del model[new:]
                else:
                    model += bytes(new - size)
            else:
                await node.flush()
        assert bytes(await node.read(0, len(model))) == model
    finally:
        await graph.close_all()
    check_clean(path)
    assert dump(path, tmp_path) == model
    path.unlink()
