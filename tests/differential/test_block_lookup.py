"""How block commands find their node, and how deep query-named-block-nodes
says a chain is: the same replies from both daemons.

qemu-storage-daemon has no BlockBackends, so a ``device`` argument that
bdrv_lookup_bs treats as a BlockBackend name never matches, while commands
that pass one name as both device and node name find nodes.  Dirty bitmap
commands other than add have their own "Node '...' not found".
"""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")


def _run(kind, tmp_path, cmds):
    with Daemon(kind, tmp_path) as d:
        q = d.qmp()
        return [q.cmd_obj(c) for c in cmds], [
            q.cmd_obj({"execute": "query-named-block-nodes", "arguments": {"flat": flat}})
            for flat in (False, True)]


def _norm(reply: dict) -> dict:
    """Snapshot times are the moment each daemon took them."""
    r = reply.get("return")
    if isinstance(r, dict):
        return {"return": {k: (None if k.startswith(("date-", "vm-clock-")) else v)
                           for k, v in r.items()}}
    return reply


def _x(execute, /, **arguments):
    return {"execute": execute, "arguments": arguments}


def test_device_and_node_lookup(tmp_path):
    img = tmp_path / "img.qcow2"
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img), "1M")
    cmds = [
        _x("blockdev-add", driver="qcow2", node_name="q",
           file={"driver": "file", "filename": str(img)}),
        _x("block_resize", device="q", size=1 << 20),
        _x("block_resize", device="nope", size=1 << 20),
        _x("block_resize", node_name="nope", size=1 << 20),
        _x("block_resize", device="nope", node_name="q", size=2 << 20),
        _x("block_resize", size=1 << 20),
        _x("block-set-write-threshold", node_name="nope", write_threshold=1),
        _x("block-set-write-threshold", node_name="q", write_threshold=4096),
        _x("block-dirty-bitmap-add", node="nope", name="b"),
        _x("block-dirty-bitmap-add", node="q", name="b"),
        _x("block-dirty-bitmap-add", node="q", name="c"),
        _x("block-dirty-bitmap-clear", node="nope", name="b"),
        _x("block-dirty-bitmap-clear", node="q", name="nope"),
        _x("block-dirty-bitmap-disable", node="nope", name="b"),
        _x("block-dirty-bitmap-enable", node="nope", name="b"),
        _x("block-dirty-bitmap-merge", node="nope", target="b", bitmaps=["c"]),
        _x("block-dirty-bitmap-merge", node="q", target="b",
           bitmaps=[{"node": "nope", "name": "c"}]),
        _x("block-dirty-bitmap-merge", node="q", target="b", bitmaps=["nope"]),
        _x("x-debug-block-dirty-bitmap-sha256", node="nope", name="b"),
        _x("block-dirty-bitmap-remove", node="nope", name="b"),
        _x("block-dirty-bitmap-remove", node="q", name="c"),
        _x("blockdev-snapshot-internal-sync", device="nope", name="s"),
        _x("blockdev-snapshot-internal-sync", device="q", name="s"),
        _x("blockdev-snapshot-delete-internal-sync", device="nope", name="s"),
        _x("blockdev-snapshot-delete-internal-sync", device="q", name="s"),
        _x("change-backing-file", device="nope", image_node_name="q", backing_file="x"),
        _x("change-backing-file", device="q", image_node_name="nope", backing_file="x"),
        _x("change-backing-file", device="q", image_node_name="q", backing_file=str(base)),
    ]
    cmds = [{"execute": c["execute"],
             "arguments": {k.replace("_", "-"): v for k, v in c["arguments"].items()}}
            for c in cmds]
    ours, _ = _run("trio", tmp_path, cmds)
    theirs, _ = _run("qemu", tmp_path, cmds)
    for c, a, b in zip(cmds, ours, theirs, strict=True):
        assert _norm(a) == _norm(b), c
    qemu_img("check", str(img))


def _depths(reply) -> dict:
    return {n["node-name"]: (n["backing_file_depth"], n.get("backing_file"))
            for n in reply["return"] if not n["node-name"].startswith("#")}


def test_backing_file_depth_counts_filters(tmp_path):
    """A qcow2 chain under blkdebug, copy-on-read and throttle, and an overlay
    on top: QEMU counts every filter and backing level it nests as
    backing-image, and nothing with flat=true."""
    b0, b1, b2, ov = (str(tmp_path / f"{n}.qcow2") for n in ("b0", "b1", "b2", "ov"))
    qemu_img("create", "-f", "qcow2", b0, "1M")
    qemu_img("create", "-f", "qcow2", "-b", b0, "-F", "qcow2", b1, "1M")
    qemu_img("create", "-f", "qcow2", "-b", b1, "-F", "qcow2", b2, "1M")
    qemu_img("create", "-f", "qcow2", ov, "1M")
    cmds = [
        _x("object-add", **{"qom-type": "throttle-group", "id": "tg",
                            "limits": {"iops-total": 1000}}),
        _x("blockdev-add", driver="qcow2", **{"node-name": "q"},
           file={"driver": "file", "filename": b2}),
        _x("blockdev-add", driver="blkdebug", image="q", **{"node-name": "dbg"}),
        _x("blockdev-add", driver="copy-on-read", file="dbg", **{"node-name": "cor"}),
        _x("blockdev-add", driver="throttle", file="cor",
           **{"node-name": "thr", "throttle-group": "tg"}),
        _x("blockdev-add", driver="raw", file="thr", **{"node-name": "rawtop"}),
        _x("blockdev-add", driver="qcow2", backing="thr", **{"node-name": "ov"},
           file={"driver": "file", "filename": ov}),
    ]
    ours, (deep, flat) = _run("trio", tmp_path, cmds)
    theirs, (qdeep, qflat) = _run("qemu", tmp_path, cmds)
    assert ours == theirs
    assert _depths(deep) == _depths(qdeep)
    assert _depths(flat) == _depths(qflat)
    assert _depths(deep)["ov"][0] == 6
