"""The node conformance suite and the hypothesis models once per I/O engine
(issue 11): ``aio=threads|native|io_uring``, with and without
``cache.direct``, on raw file nodes, raw over file, and qcow2 over file.

Each run ends with the real qemu-img comparing the image with the model
(and ``qemu-img check`` for qcow2).  Fewer hypothesis examples per engine
than the driver's own tests: five engines share the budget.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.graph import BlockGraph
from tests.engines import ENGINES, drop_page_cache

from . import test_random_workload as raw_model
from .conformance import check_block_node, check_equal
from .test_drivers import _make_factory
from .test_qcow2_node import OPS as QCOW2_OPS
from .test_qcow2_node import qcow2_factory, run_random_workload


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layered", [False, True], ids=["file", "raw"])
async def test_conformance_raw(tmp_path, engine, layered):
    layers = [lambda o, s: {**o, **engine.options()}]
    if layered:
        layers.append(lambda o, s: {"driver": "raw", "file": o})
    factory, after_close = _make_factory(tmp_path, layers)
    await check_block_node(factory, after_close=after_close,
                           verify=reread(tmp_path / "img.raw"))


@pytest.mark.parametrize("engine", ENGINES)
async def test_conformance_qcow2(tmp_path, engine):
    factory, after_close = qcow2_factory(tmp_path, ("cluster_size=4096",), engine.options())

    async def verify(node, model):
        for img in tmp_path.glob("img*.qcow2"):
            drop_page_cache(img)
        await check_equal(node, model)

    await check_block_node(factory, after_close=after_close, verify=verify)


def reread(path):
    """A conformance ``verify``: everything read again with the image out of
    the page cache, so that cached engines read through the engine too."""
    async def verify(node, model):
        drop_page_cache(path)
        await check_equal(node, model)
    return verify


@pytest.mark.parametrize("engine", ENGINES)
async def test_engine_is_what_was_asked(tmp_path, engine):
    """The node opens with the options given (not silently another engine's)
    and, with cache.direct, really bypasses the page cache."""
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(1 << 20))
    graph = BlockGraph()
    node = await graph.add({"driver": "file", "node-name": "f", "filename": str(img),
                            **engine.options()})
    try:
        assert (node.request_alignment > 1) is engine.direct
        flags = open_flags(img)
        assert flags, "no descriptor open on the image"
        assert all(bool(f & os.O_DIRECT) is engine.direct for f in flags), flags
    finally:
        await graph.close_all()


def open_flags(path) -> list[int]:
    """The open flags of every descriptor of this process on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                out.append(int(f.read().split("flags:")[1].split()[0], 8))
        except OSError:
            continue  # closed meanwhile
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=raw_model.ops, layered=st.booleans())
@pytest.mark.parametrize("engine", ENGINES)
def test_random_workload_raw(engine, workload, layered):
    raw_model.check_workload(workload, layered, engine.options())


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=QCOW2_OPS, opts=st.sampled_from([(), ("cluster_size=4096",)]))
@pytest.mark.parametrize("engine", ENGINES)
async def test_random_workload_qcow2(tmp_path, engine, ops, opts):
    await run_random_workload(tmp_path, ops, opts, engine.options())
