"""The file node's block status: the run of data lseek found is reused for
the questions that fall inside it, and forgotten when this node punches,
zeroes or truncates, so holes made through the node are seen at once."""

import os
import tempfile

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import Status

MiB = 1 << 20
PLACES = ["disk"] + (["tmpfs"] if os.path.isdir("/dev/shm") else [])


@pytest.fixture(params=PLACES)
async def node(request, tmp_path):
    where = tempfile.mkdtemp(dir="/dev/shm") if request.param == "tmpfs" else str(tmp_path)
    path = os.path.join(where, "f.raw")
    await trio.Path(path).write_bytes(b"\x01" * (8 * MiB))
    graph = BlockGraph()
    n = await graph.add({"driver": "file", "node-name": "f", "filename": path,
                         "discard": "unmap"})
    yield n
    await graph.close_all()
    os.unlink(path)
    if request.param == "tmpfs":
        os.rmdir(where)


def counting_lseek(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        calls.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    return calls


async def extents(node) -> list[tuple[int, int, bool]]:
    out, pos = [], 0
    while pos < node.length:
        st = await node.block_status(pos, node.length - pos)
        out.append((pos, st.length, bool(st.flags & Status.ZERO)))
        pos += st.length
    return out


async def test_questions_inside_a_known_run_of_data_ask_no_lseek(node, monkeypatch):
    calls = counting_lseek(monkeypatch)
    st = await node.block_status(0, MiB)
    assert st.flags & Status.DATA and st.length == MiB
    asked = len(calls)
    assert asked  # the first question goes to the file
    for off in range(MiB, 8 * MiB, MiB):
        st = await node.block_status(off, MiB)
        assert st.flags & Status.DATA and not st.flags & Status.ZERO and st.length == MiB
    assert len(calls) == asked


@pytest.mark.parametrize("how", ["discard", "zeroes", "truncate"])
async def test_holes_made_through_the_node_are_seen(node, how):
    assert await extents(node) == [(0, 8 * MiB, False)]
    if how == "discard":
        await node.discard(2 * MiB, MiB)
        want = [(0, 2 * MiB, False), (2 * MiB, MiB, True), (3 * MiB, 5 * MiB, False)]
    elif how == "zeroes":
        await node.write_zeroes(2 * MiB, MiB, may_unmap=True)
        want = [(0, 2 * MiB, False), (2 * MiB, MiB, True), (3 * MiB, 5 * MiB, False)]
    else:
        await node.truncate(4 * MiB, exact=True, prealloc="off")
        await node.truncate(8 * MiB, exact=True, prealloc="off")
        want = [(0, 4 * MiB, False), (4 * MiB, 4 * MiB, True)]
    assert await extents(node) == want
    # the data is what the extents say
    data = await trio.Path(node.path).read_bytes()
    for off, n, zero in want:
        assert data[off:off + n] == (bytes(n) if zero else b"\x01" * n)
