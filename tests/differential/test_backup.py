"""Backup and its copy-before-write filter, two daemons, one scenario: what
query-named-block-nodes, x-debug-query-block-graph and query-block-exports
show during a backup, the events, and the errors.

Normalised, besides timestamps and progress numbers: the digits of
automatic node names (QEMU appends two random digits), the key order of
json: filenames, and the dirty counts that depend on how far the copy got
(the block-copy bitmap on the source, a bitmap-mode=always bitmap after a
cancel).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU

from .test_jobs import MiB, Transcript, blkdebug_src

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

SIZE = 64 * MiB


def nulls(*names, size=SIZE):
    out = []
    for n in names:
        out += ["--blockdev", f"null-co,node-name={n},size={size}"]
    return out


def norm(obj):
    if isinstance(obj, dict):
        out = {k: norm(v) for k, v in obj.items()}
        # the block-copy bitmap, and a bitmap-mode=always bitmap after a
        # cancel: how much is left depends on timing
        if "granularity" in out and out.get("count") not in (0, SIZE):
            out["count"] = "N"
        return out
    if isinstance(obj, (list, tuple)):
        return [norm(x) for x in obj]
    if isinstance(obj, str):
        if obj.startswith("json:{"):
            # QEMU orders these keys by its QDict hash
            return {"json": norm(json.loads(obj[5:]))}
        return re.sub(r"#block\d+", "#blockN", obj)
    return obj


def run_both(daemon_factory, args, scenario):
    out = {}
    for kind in ("qemu", "trio"):
        d = daemon_factory(kind, args, allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
        t = Transcript(d.qmp())
        scenario(t)
        t.events()
        out[kind] = norm(t.lines)
        d.stop()
        # the block-size warning for targets without a cluster size, once a filter
        out[kind].append(("stderr", d.stderr().replace("qemu-storage-daemon: ", "")))
    for a, b in zip(out["qemu"], out["trio"], strict=False):
        assert b == a
    assert len(out["trio"]) == len(out["qemu"])
    return out["qemu"]


def queries(t):
    t.cmd("query-named-block-nodes", {"flat": True})
    t.cmd("x-debug-query-block-graph")
    t.cmd("query-block-exports")


def test_backup_filter_in_the_graph(daemon_factory, tmp_path):
    sock = tmp_path / "nbd.sock"
    args = nulls("src", "dst", "d2") + nulls("small", size=SIZE // 2) + [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,writable=on"]

    def s(t):
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "speed": MiB, "filter-node-name": "bf"})
        t.until("JOB_STATUS_CHANGE", status="running")
        queries(t)
        # paused jobs see the transaction's drains without events, whatever
        # the timing of their rate-limit sleeps
        t.cmd("job-pause", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="paused", id="b")
        # a second backup of the same source stacks a second filter
        t.cmd("blockdev-backup", {"job-id": "c", "device": "src", "target": "d2",
                                  "sync": "full", "speed": MiB})
        t.until("JOB_STATUS_CHANGE", status="running", id="c")
        t.cmd("job-pause", {"id": "c"})
        t.until("JOB_STATUS_CHANGE", status="paused", id="c")
        queries(t)
        t.cmd("blockdev-del", {"node-name": "dst"})
        t.cmd("blockdev-del", {"node-name": "bf"})
        t.cmd("blockdev-backup", {"job-id": "x", "device": "bf", "target": "d2",
                                  "sync": "full"})
        t.cmd("block-job-cancel", {"device": "c", "force": True})
        t.until("JOB_STATUS_CHANGE", status="null", id="c")
        queries(t)
        t.cmd("block-job-cancel", {"device": "b", "force": True})
        t.until("JOB_STATUS_CHANGE", status="null", id="b")
        queries(t)
        # refusals, and nothing left behind by them
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "filter-node-name": "dst"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "filter-node-name": "9x"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "small",
                                  "sync": "full"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "x-perf": {"max-workers": 0}})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "x-perf": {"max-chunk": 4096}})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "speed": -1})
        t.until("JOB_STATUS_CHANGE", status="null", id="b")
        t.cmd("blockdev-del", {"node-name": "dst"})
        queries(t)

    run_both(daemon_factory, args, s)


def test_backup_bitmaps_and_pending_filter(daemon_factory):
    def s(t):
        t.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "incremental", "bitmap": "bm",
                                  "auto-finalize": False})
        t.until("BLOCK_JOB_PENDING")
        # pending: the filter is still there until the job is finalised
        queries(t)
        t.cmd("job-finalize", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="null")
        queries(t)
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "bitmap": "bm", "bitmap-mode": "always",
                                  "speed": MiB})
        t.until("JOB_STATUS_CHANGE", status="running")
        t.cmd("query-named-block-nodes", {"flat": True})
        t.cmd("job-cancel", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("query-named-block-nodes", {"flat": True})

    run_both(daemon_factory, nulls("src", "dst"), s)


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_backup_source_error_policies(daemon_factory, tmp_path, policy):
    """A read error at 4 MiB (once): the job reports it, retries it, or
    pauses until resumed; the events and query-block-jobs say so."""
    def s(t):
        t.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "on-source-error": policy,
                                  "x-perf": {"max-workers": 1}})
        if policy == "stop":
            t.until("BLOCK_JOB_ERROR")
            t.until("JOB_STATUS_CHANGE", status="paused")
            t.cmd("query-block-jobs")
            t.cmd("block-job-resume", {"device": "j"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("query-jobs")

    run_both(daemon_factory, blkdebug_src(tmp_path), s)


def test_fleecing_nodes_graph_and_errors(daemon_factory, tmp_path):
    """blockdev-add of copy-before-write and snapshot-access: the graph they
    make (a temporary overlay over the source as target) and the refusals."""
    args = nulls("src", "other") + ["--blockdev", "null-co,node-name=tmp,size=67108864"]

    def s(t):
        t.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm"})
        t.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c0",
                               "file": "src", "target": "nope"})
        t.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c0",
                               "file": "src", "target": "tmp",
                               "bitmap": {"node": "nope", "name": "bm"}})
        t.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c0",
                               "file": "src", "target": "tmp",
                               "bitmap": {"node": "src", "name": "nope"}})
        t.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c0",
                               "file": "src", "target": "tmp", "on-cbw-error": "bad"})
        t.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                               "file": "src", "target": "tmp",
                               "bitmap": {"node": "src", "name": "bm"},
                               "on-cbw-error": "break-snapshot", "cbw-timeout": 5})
        t.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access",
                               "file": "fl-cbw"})
        queries(t)
        t.cmd("blockdev-del", {"node-name": "fl-cbw"})
        t.cmd("blockdev-del", {"node-name": "tmp"})
        t.cmd("blockdev-del", {"node-name": "fl-access"})
        t.cmd("blockdev-del", {"node-name": "fl-cbw"})
        t.cmd("blockdev-del", {"node-name": "tmp"})
        queries(t)

    run_both(daemon_factory, args, s)
