"""Random workloads (hypothesis) against a bytearray model, on file and raw
nodes; the image is then compared with the model by the real qemu-img."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph

SIZE = 256 * 1024

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 70000), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE), st.integers(1, 140000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE), st.integers(1, 140000), st.just(0)),
    st.tuples(st.just("resize"), st.integers(0, 2 * SIZE), st.just(0), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=25)


async def run_workload(path: Path, layered: bool, workload, file_opts=None) -> bytearray:
    model = bytearray(SIZE)
    graph = BlockGraph()
    file_opts = file_opts or {}
    opts = {"driver": "file", "filename": str(path), "node-name": "f", "discard": "unmap",
            **file_opts}
    if layered:
        opts = {"driver": "raw", "node-name": "r", "discard": "unmap",
                "file": {"driver": "file", "filename": str(path), **file_opts}}
    node = await graph.add(opts)
    try:
        for op, off, n, arg in workload:
            size = node.length
            off = min(off, size)
            n = min(n, size - off)
            if op == "write" and n:
                await node.write(off, bytes([arg]) * n)
                model[off:off + n] = bytes([arg]) * n
            elif op == "zero" and n:
                await node.write_zeroes(off, n, may_unmap=arg)
                model[off:off + n] = bytes(n)
            elif op == "discard" and n:
                await node.discard(off, n)
                got = bytes(await node.read(off, n))
                # discard may leave data or zeroes; the file driver punches holes
                assert got == bytes(n)
                model[off:off + n] = got
            elif op == "resize":
                await node.truncate(off)
                # the file shrinks or grows to exactly ``off``; the node
                # counts whole sectors (QEMU's bdrv_getlength), the tail zeroes
                del model[off:]
                model.extend(bytes(-(-off // 512) * 512 - len(model)))
            elif op == "flush":
                await node.flush()
            assert node.length == len(model)
        assert bytes(await node.read(0, len(model))) == bytes(model)
    finally:
        await graph.close_all()
    return model


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=ops, layered=st.booleans())
def test_random_workload(workload, layered):
    check_workload(workload, layered)


def check_workload(workload, layered: bool, file_opts=None) -> None:
    """Run ``workload`` on a fresh image; the real qemu-img finds the model in it."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "img.raw"
        path.write_bytes(bytes(SIZE))
        model = trio.run(run_workload, path, layered, workload, file_opts)
        ref = Path(d) / "model.raw"
        ref.write_bytes(bytes(model))
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), str(ref)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
