"""A guest write onto qcow2 metadata, through NBD, with both daemons.

The crafted image (tests/nodes/test_qcow2_overlap.py) has guest cluster 0
mapped onto a metadata cluster.  What a client sees must be the same:
qemu-io's results (EIO for the write, then errors for a node whose driver
is gone), the BLOCK_IMAGE_CORRUPTED event, the "Marking image as corrupt"
line on stderr, query-named-block-nodes refusing the ejected node, and the
image left with its corrupt bit set and otherwise as it was.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io
from tests.nodes.test_qcow2_overlap import _point, _snapshot_layout, craft

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")


def _scenario(kind, tmp_path, crafted, overlap_opt):
    sub = tmp_path / kind
    sub.mkdir()
    img = sub / "c.qcow2"
    shutil.copy(crafted, img)
    sock = sub / "nbd.sock"
    with Daemon(kind, sub, [
            "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,"
                          f"file.filename={img}{overlap_opt}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=q,name=d,writable=on"],
            allow_stderr=r"^qcow2: Marking image as corrupt") as d:
        q = d.qmp()
        io = qemu_io("-f", "raw", "-c", "write -P 0x33 4096 4096",
                     "-c", "read -P 0x22 65536 512", f"nbd+unix:///d?socket={sock}",
                     check=False)
        lines = [ln for ln in (io.stdout + io.stderr).splitlines()
                 if "bytes at" in ln or "failed" in ln]
        # the event went out before the write's reply; the query's reply follows it
        query = q.cmd_raw("query-named-block-nodes", {"flat": True})
        evs = [(e["event"], e.get("data")) for e in q.get_events(wait=False)]
        query = query.get("error") or [n["image"].get("format-specific") for n in query["return"]]
    stderr = [ln for ln in d.stderr().splitlines() if ln.startswith("qcow2:")]
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    return lines, evs, query, stderr, info["format-specific"], img.read_bytes()


@pytest.mark.parametrize(("target", "opt"), [
    ("l1", ""), ("refblock", ""), ("l2", ",overlap-check=constant"),
    ("l1", ",overlap-check.template=none,overlap-check.active-l1=on"),
    ("snapshot table", ""), ("inactive L1 table", ",overlap-check=constant"),
    ("inactive L2 table", ""), ("inactive L2 table", ",overlap-check=all"),
])
def test_write_onto_metadata_same_as_qemu(tmp_path, target, opt):
    crafted = tmp_path / "crafted.qcow2"
    if " " in target:  # a snapshot structure
        _point(crafted, 0, _snapshot_layout(crafted)[target])
    else:
        craft(crafted, target)
    ours = _scenario("trio", tmp_path, crafted, opt)
    theirs = _scenario("qemu", tmp_path, crafted, opt)
    assert ours[:5] == theirs[:5]
    assert ours[5] == theirs[5]  # byte for byte the same image afterwards
    if (target, opt) in (("l2", ",overlap-check=constant"),
                         ("inactive L2 table", ""),
                         ("inactive L1 table", ",overlap-check=constant")):
        assert ours[1] == []  # not among the structures that template checks
    else:
        assert ours[1][0][0] == "BLOCK_IMAGE_CORRUPTED"
