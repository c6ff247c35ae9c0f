"""Snapshot commands, two daemons, one scenario: the same replies and errors.

Each scenario runs against qemu-storage-daemon and qsd-trio on identical
fresh images.  Normalised: the temporary directory, ``#blockNNN`` names and
snapshot dates/clocks (values differ, the members must not).  The resulting
graph is compared through what a client sees of it (node names, read-only
flags, backing files, export nodes) and the images through ``qemu-img info``.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
TIMES = ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")


def _norm(value, root: str):
    if isinstance(value, dict):
        return {k: ("N" if k in TIMES else _norm(v, root)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_norm(v, root) for v in value]
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#B", value.replace(root, "T"))
    return value


class Run:
    def __init__(self, kind, tmp_path, images, args=()):
        self.dir = tmp_path / kind
        self.dir.mkdir()
        for name, size in images:
            if name.endswith(".qcow2"):
                qemu_img("create", "-f", "qcow2", str(self.dir / name), str(size))
            else:
                (self.dir / name).write_bytes(bytes(MiB))
        self.daemon = Daemon(kind, self.dir, list(args)).start()
        self.qmp = self.daemon.qmp()
        self.log: list = []

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def __call__(self, cmd: str, **args):
        reply = self.qmp.cmd_raw(cmd, args)
        self.log.append((cmd, _norm(args, str(self.dir)), _norm(reply, str(self.dir))))
        return reply

    def graph(self):
        nodes = self.qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
        exports = self.qmp.cmd_raw("query-block-exports")["return"]
        self.log.append(("graph", _norm(sorted(
            (n["node-name"], n["drv"], n["ro"], n.get("backing_file"),
             n["image"].get("backing-filename"), n["image"].get("backing-filename-format"),
             [(s["id"], s["name"]) for s in n["image"].get("snapshots", [])])
            for n in nodes if not n["node-name"].startswith("#")), str(self.dir)),
            sorted(e["node-name"] for e in exports)))

    def files(self, *names: str):
        self.log.append(("files", [(n, (self.dir / n).exists()) for n in names]))

    def finish(self, *images: str):
        self.daemon.stop()
        for name in images:
            p = self.dir / name
            if not p.exists():
                self.log.append(("missing", name))
                continue
            info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)
            self.log.append(("info", name, _norm({k: info.get(k) for k in (
                "virtual-size", "backing-filename", "backing-filename-format")}, str(self.dir)),
                [(s["id"], s["name"]) for s in info.get("snapshots", [])]))
            r = qemu_img("check", str(p), check=False)
            self.log.append(("check", name, r.returncode))
        return self.log


def _both(tmp_path, scenario, images):
    qemu_log = scenario("qemu", tmp_path, images)
    trio_log = scenario("trio", tmp_path, images)
    for a, b in zip(qemu_log, trio_log, strict=True):
        assert b == a


def _external(kind, tmp_path, images):
    r = Run(kind, tmp_path, images)
    q = r
    q("blockdev-add", driver="qcow2", **{"node-name": "base", "file": {
        "driver": "file", "filename": r.path("base.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "ov", "backing": None, "file": {
        "driver": "file", "filename": r.path("ov.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "other", "file": {
        "driver": "file", "filename": r.path("other.qcow2")}})
    q("blockdev-add", driver="raw", **{"node-name": "raw", "file": {
        "driver": "file", "filename": r.path("raw.img")}})
    q("nbd-server-start", addr={"type": "unix", "data": {"path": r.path("nbd.sock")}})
    q("block-export-add", type="nbd", id="e0", **{"node-name": "base", "writable": True})
    # errors before anything changes
    q("blockdev-snapshot", node="nope", overlay="ov")
    q("blockdev-snapshot", node="base", overlay="nope")
    q("blockdev-snapshot", node="base", overlay="base")
    q("blockdev-snapshot", node="base", overlay="raw")
    q("blockdev-snapshot-sync", **{"snapshot-file": r.path("x.qcow2")})
    q("blockdev-snapshot-sync", device="base", **{"snapshot-file": r.path("x.qcow2")})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("x.qcow2")})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("x.qcow2"),
                                   "snapshot-node-name": "ov"})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("x.qcow2"),
                                   "snapshot-node-name": "sn", "format": "raw"})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("x.qcow2"),
                                   "snapshot-node-name": "sn", "format": "bogus"})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("none.qcow2"),
                                   "snapshot-node-name": "sn", "mode": "existing"})
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("no/x.qcow2"),
                                   "snapshot-node-name": "sn"})
    r.graph()
    # the export's node gets an overlay; then a second, pre-made one
    q("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": r.path("sn.qcow2"),
                                   "snapshot-node-name": "sn"})
    r.graph()
    q("blockdev-snapshot", node="base", overlay="ov")       # base is now a backing file
    q("blockdev-snapshot", node="sn", overlay="sn")
    q("blockdev-snapshot", node="sn", overlay="ov")
    r.graph()
    q("blockdev-snapshot", node="ov", overlay="sn")         # sn already has a backing
    # an unused root: the new overlay has no user and is dropped again
    q("blockdev-snapshot-sync", **{"node-name": "other", "snapshot-file": r.path("o2.qcow2"),
                                   "snapshot-node-name": "o2"})
    r.graph()
    # change-backing-file
    q("change-backing-file", device="sn", **{"image-node-name": "base", "backing-file": "x"})
    q("change-backing-file", device="nope", **{"image-node-name": "ov", "backing-file": "x"})
    q("change-backing-file", device="ov", **{"image-node-name": "nope", "backing-file": "x"})
    q("change-backing-file", device="ov", **{"image-node-name": "base", "backing-file": "x"})
    q("change-backing-file", device="ov", **{"image-node-name": "raw", "backing-file": "x"})
    q("change-backing-file", device="ov", **{"image-node-name": "other", "backing-file": "x"})
    # absolute names: a name that differs from the backing node's file name
    # turns QEMU's node file names into json: ones, which qsd-trio does not
    # reproduce
    q("change-backing-file", device="ov", **{"image-node-name": "ov",
                                             "backing-file": r.path("sn.qcow2")})
    q("change-backing-file", device="ov", **{"image-node-name": "sn",
                                             "backing-file": r.path("base.qcow2")})
    r.graph()
    return r.finish("base.qcow2", "sn.qcow2", "ov.qcow2", "o2.qcow2", "x.qcow2")


def test_external_snapshots(tmp_path):
    images = [("base.qcow2", MiB), ("ov.qcow2", MiB), ("other.qcow2", MiB), ("raw.img", 0)]
    _both(tmp_path, _external, images)


def _internal(kind, tmp_path, images):
    r = Run(kind, tmp_path, images)
    q = r
    q("blockdev-add", driver="qcow2", **{"node-name": "img", "file": {
        "driver": "file", "filename": r.path("img.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "ro", "read-only": True, "file": {
        "driver": "file", "filename": r.path("ro.qcow2"), "read-only": True}})
    q("blockdev-add", driver="raw", **{"node-name": "raw", "file": {
        "driver": "file", "filename": r.path("ro.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "top", "backing": "ro", "file": {
        "driver": "file", "filename": r.path("top.qcow2")}})
    q("blockdev-snapshot-internal-sync", device="nope", name="a")
    q("blockdev-snapshot-internal-sync", device="ro", name="a")
    q("blockdev-snapshot-internal-sync", device="img", name="")
    q("blockdev-snapshot-internal-sync", device="raw", name="a")
    q("blockdev-snapshot-internal-sync", device="img", name="a")
    q("blockdev-snapshot-internal-sync", device="img", name="a")
    q("blockdev-snapshot-internal-sync", device="img", name="b")
    q("blockdev-snapshot-internal-sync", device="top", name="t")
    r.graph()
    q("blockdev-snapshot-delete-internal-sync", device="img")
    q("blockdev-snapshot-delete-internal-sync", device="nope", name="a")
    q("blockdev-snapshot-delete-internal-sync", device="raw", name="a")
    q("blockdev-snapshot-delete-internal-sync", device="ro", name="a")
    q("blockdev-snapshot-delete-internal-sync", device="img", name="zz")
    q("blockdev-snapshot-delete-internal-sync", device="img", id="2", name="a")
    q("blockdev-snapshot-delete-internal-sync", device="img", name="a")
    q("blockdev-snapshot-delete-internal-sync", device="img", name="a")
    q("blockdev-snapshot-internal-sync", device="img", name="c")
    q("blockdev-snapshot-delete-internal-sync", device="img", id="2")
    r.graph()
    return r.finish("img.qcow2", "top.qcow2")


def test_internal_snapshots(tmp_path):
    images = [("img.qcow2", MiB), ("ro.qcow2", MiB), ("top.qcow2", MiB)]
    _both(tmp_path, _internal, images)


def _txn(q, *actions):
    return q("transaction", actions=[{"type": t, "data": d} for t, d in actions])


def _transactions(kind, tmp_path, images):
    """Snapshot actions followed by a failing one: every snapshot is undone
    (the overlay leaves the chain, the internal snapshot is deleted; the file
    blockdev-snapshot-sync created stays on disk); then the same succeeding."""
    r = Run(kind, tmp_path, images)
    q = r
    q("blockdev-add", driver="qcow2", **{"node-name": "base", "file": {
        "driver": "file", "filename": r.path("base.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "ov", "backing": None, "file": {
        "driver": "file", "filename": r.path("ov.qcow2")}})
    q("blockdev-add", driver="qcow2", **{"node-name": "img", "file": {
        "driver": "file", "filename": r.path("img.qcow2")}})
    q("nbd-server-start", addr={"type": "unix", "data": {"path": r.path("nbd.sock")}})
    q("block-export-add", type="nbd", id="e0", **{"node-name": "base", "writable": True})
    sync = ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": r.path("sn.qcow2"),
                                       "snapshot-node-name": "sn"})
    ext = ("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    internal = ("blockdev-snapshot-internal-sync", {"device": "img", "name": "snap"})
    abort = ("abort", {})
    _txn(q, sync, abort)
    r.graph()
    r.files("sn.qcow2")
    _txn(q, ext, abort)
    r.graph()
    _txn(q, internal, abort)
    r.graph()
    # all three, then an action that fails in its prepare
    _txn(q, internal, ext, ("blockdev-snapshot-sync", {
        "node-name": "img", "snapshot-file": r.path("s2.qcow2"), "snapshot-node-name": "s2"}),
        ("blockdev-snapshot-internal-sync", {"device": "img", "name": "snap"}))
    r.graph()
    r.files("s2.qcow2")
    _txn(q, internal, ext, ("blockdev-snapshot-sync", {
        "node-name": "img", "snapshot-file": r.path("s2.qcow2"), "snapshot-node-name": "s2",
        "mode": "existing"}))
    r.graph()
    return r.finish("base.qcow2", "ov.qcow2", "img.qcow2", "sn.qcow2", "s2.qcow2")


def test_snapshot_transactions_undo(tmp_path):
    images = [("base.qcow2", MiB), ("ov.qcow2", MiB), ("img.qcow2", MiB)]
    _both(tmp_path, _transactions, images)
