"""Graph behaviour in-process: permissions, failed opens, locks, bitmaps."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import BlockParent, Perm
from qsd_trio.qapi.errors import GenericError


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "img.raw"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.fixture
async def graph():
    g = BlockGraph()
    try:
        yield g
    finally:
        await g.close_all()


class User(BlockParent):
    """A non-node parent, shown as an export's BlockBackend is."""


async def test_window_conflicts_with_resize_user(graph, img):
    f0 = await graph.add({"driver": "file", "node-name": "f0", "filename": str(img)})
    f0.attach("root", User(), Perm.CONSISTENT_READ | Perm.RESIZE)
    with pytest.raises(GenericError) as e:
        await graph.add({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 512,
                         "size": 1024})
    assert e.value.desc == (
        "Permission conflict on node 'f0': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'r1' "
        "(uses node 'f0' as 'file' child).")
    # the failed add left nothing behind
    assert list(graph.nodes) == ["f0"] and len(f0.parents) == 1


async def test_failed_nested_open_leaves_nothing(graph, img, tmp_path):
    with pytest.raises(GenericError) as e:
        await graph.add({"driver": "raw", "node-name": "r", "offset": 1 << 30,
                         "file": {"driver": "file", "filename": str(img)}})
    assert e.value.desc == (f"Offset ({1 << 30}) cannot be greater than size of the "
                            f"containing file ({1 << 20})")
    assert graph.nodes == {}
    with pytest.raises(GenericError) as e:
        await graph.add({"driver": "raw", "node-name": "r",
                         "file": {"driver": "file", "filename": str(tmp_path / "nope")}})
    assert e.value.desc == f"Could not open '{tmp_path / 'nope'}': No such file or directory"
    assert graph.nodes == {}


async def test_delete_rules(graph, img):
    await graph.add({"driver": "file", "node-name": "f0", "filename": str(img)})
    r = await graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    with pytest.raises(GenericError, match="^Block device f0 is in use$"):
        await graph.delete("f0")
    edge = r.attach("root", User(), Perm.CONSISTENT_READ)
    with pytest.raises(GenericError, match="^Node r0 is in use$"):
        await graph.delete("r0")
    edge.detach()
    await graph.delete("r0")
    await graph.delete("f0")
    assert graph.nodes == {}
    # an implicit child goes with its parent
    await graph.add({"driver": "raw", "node-name": "r1",
                     "file": {"driver": "file", "filename": str(img)}})
    auto = [n for n in graph.nodes if n.startswith("#block")]
    assert len(auto) == 1
    with pytest.raises(GenericError, match="is not owned by the monitor"):
        await graph.delete(auto[0])
    await graph.delete("r1")
    assert graph.nodes == {}


def _qemu_io(*args):
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, timeout=60)


async def test_locks_refuse_qemu_io_write(graph, img):
    await graph.add({"driver": "raw", "node-name": "r0",
                     "file": {"driver": "file", "filename": str(img)}})
    r = graph.nodes["r0"]
    # no user yet: QEMU takes no locks either, so qemu-io may write
    assert _qemu_io("-f", "raw", "-c", "write -P 1 0 512", str(img)).returncode == 0
    # a writer that unshares write, as a format driver or a mirror target would
    edge = r.attach("root", User(), Perm.CONSISTENT_READ | Perm.WRITE,
                    Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
    res = await trio.to_thread.run_sync(_qemu_io, "-f", "raw", "-c", "write 0 512", str(img))
    assert res.returncode != 0
    assert 'Failed to get "write" lock' in res.stderr
    assert f"Is another process using the image [{img}]?" in res.stderr
    edge.detach()
    res = await trio.to_thread.run_sync(_qemu_io, "-f", "raw", "-c", "write 0 512", str(img))
    assert res.returncode == 0, res.stderr


async def test_qemu_io_lock_refuses_us(graph, img):
    await graph.add({"driver": "file", "node-name": "f0", "filename": str(img)})
    f0 = graph.nodes["f0"]
    # a long-lived qemu-io holding the image; Popen returns at once
    proc = subprocess.Popen(["qemu-io", "-f", "raw", str(img)],  # noqa: ASYNC220
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until qemu-io has opened the image and prints its prompt
        proc.stdin.write("help help\n")
        proc.stdin.flush()
        await trio.to_thread.run_sync(proc.stdout.readline)
        with pytest.raises(GenericError) as e:
            f0.attach("root", User(), Perm.CONSISTENT_READ,
                      Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        assert e.value.desc == 'Failed to get shared "write" lock'
        assert f0.parents == [] and f0.cum_perm == 0
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    # qemu-io is gone: the same user is accepted
    f0.attach("root", User(), Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)


async def test_bitmap_marking_and_sha256(graph, img):
    r = await graph.add({"driver": "raw", "node-name": "r0", "discard": "unmap",
                         "file": {"driver": "file", "filename": str(img)}})
    bm = r.add_bitmap("b", 65536)
    assert bm.sha256() == hashlib.sha256(bytes(8)).hexdigest()
    await r.write(65536 * 3 + 5, b"x")
    await r.discard(0, 512)
    expect = (1 | 8).to_bytes(8, "little")
    assert bm.sha256() == hashlib.sha256(expect).hexdigest()
    bm.enabled = False
    await r.write(65536 * 5, b"x")
    assert bm.count() == 2 * 65536


async def test_write_threshold_event(graph, img):
    from qsd_trio import events
    seen = []
    unsub = events.subscribe(seen.append)
    try:
        r = await graph.add({"driver": "raw", "node-name": "r0",
                             "file": {"driver": "file", "filename": str(img)}})
        r.write_threshold = 4096
        await r.write(0, b"a" * 4096)
        assert seen == []
        await r.write(4000, b"a" * 200)
        assert [(e.name, e.data) for e in seen] == [("BLOCK_WRITE_THRESHOLD", {
            "node-name": "r0", "amount-exceeded": 104, "write-threshold": 4096})]
        assert r.write_threshold == 0
    finally:
        unsub()


async def test_detect_zeroes_unmaps(graph, img):
    img.write_bytes(b"\1" * (1 << 20))
    r = await graph.add({"driver": "raw", "node-name": "r0", "discard": "unmap",
                         "detect-zeroes": "unmap",
                         "file": {"driver": "file", "filename": str(img)}})
    await r.write(0, bytes(65536))
    st = await r.block_status(0, 65536)
    assert st.flags & 2 and st.length == 65536  # a hole now
    assert bytes(await r.read(0, 65536)) == bytes(65536)


async def test_blkdebug_injects_errors(graph, img):
    r = await graph.add({"driver": "raw", "node-name": "r0", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(img)},
        "inject-error": [{"event": "read_aio", "errno": 28, "sector": 8, "once": True}],
    }})
    await r.read(0, 512)  # sector 0 is fine
    with pytest.raises(OSError) as e:
        await r.read(4096, 512)
    assert e.value.errno == 28
    await r.read(4096, 512)  # once: gone


async def test_drain_holds_new_requests(graph, img):
    r = await graph.add({"driver": "raw", "node-name": "r0",
                         "file": {"driver": "file", "filename": str(img)}})
    order = []
    go = trio.Event()

    async def outsider():
        await go.wait()
        await r.write(0, b"o")
        order.append("outsider")

    async with trio.open_nursery() as n:
        # spawned outside the section: tasks spawned inside inherit its pass
        n.start_soon(outsider)
        async with r.drained():
            go.set()
            await trio.sleep(0.05)
            order.append("section")
    assert order == ["section", "outsider"]


class Export(User):
    """A user that holds its node as ``.node``, as exports do."""

    def __init__(self, node):
        self.node = node

    def child_attached(self, edge):
        self.node = edge.node


class Job(User):
    stay_at_node = True


async def test_insert_and_drop_filter(graph, img):
    f0 = await graph.add({"driver": "file", "node-name": "f0", "filename": str(img)})
    exp = Export(f0)
    e_exp = f0.attach("export", exp, Perm.CONSISTENT_READ | Perm.WRITE)
    job = Job()
    e_job = f0.attach("job", job, Perm(0), Perm.ALL)
    filt = await graph.insert_filter(f0, {"driver": "copy-on-read", "file": "f0"})
    # the export moved up with its edge; the job stays at its node
    assert filt.node_name.startswith("#block") and not filt.monitor_owned
    assert exp.node is filt and e_exp.node is filt and filt.parents == [e_exp]
    assert f0.parents == [filt.children["file"], e_job]
    assert filt.children["file"].perm == Perm.CONSISTENT_READ | Perm.WRITE | \
        Perm.WRITE_UNCHANGED
    await exp.node.write(0, b"through the filter")
    graph.drop_filter(filt)
    await filt.close()
    assert filt.node_name not in graph.nodes and filt.children == {}
    assert exp.node is f0 and f0.parents == [e_exp, e_job]
    assert f0.cum_perm == Perm.CONSISTENT_READ | Perm.WRITE
    assert bytes(await f0.read(0, 18)) == b"through the filter"
    # a conflict with a user that stays below: nothing changes
    e_job.detach()
    e_exp.set_perm(Perm.CONSISTENT_READ, Perm.ALL)
    e_job = f0.attach("job", job, Perm(0), Perm.ALL & ~Perm.WRITE_UNCHANGED & ~Perm.WRITE)
    with pytest.raises(GenericError, match="Permission conflict on node 'f0': "
                                           "permissions 'write unchanged' are both required"):
        await graph.insert_filter(f0, {"driver": "copy-on-read", "node-name": "cor",
                                       "file": "f0"})
    assert list(graph.nodes) == ["f0"] and exp.node is f0 and f0.parents == [e_job, e_exp]
