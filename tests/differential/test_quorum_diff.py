"""quorum and x-blockdev-change, both daemons, as a client sees them.

The same scenarios against qemu-storage-daemon and qsd-trio: the refusals of
bad options, the nodes and the graph as query-named-block-nodes and
x-debug-query-block-graph show them while x-blockdev-change adds and removes
children, reads voted over qcow2 children one of which was written
differently beforehand (reported, repaired with rewrite-corrupted, no
majority), children failing through blkdebug (reads, writes, flushes, fifo
failover), and blkverify=on's fatal mismatch.  Data goes through an NBD
export with qemu-io; the events are compared as a set (children answer
concurrently, so their order may differ) after waiting long enough for the
rate limit to let the held-back ones go; the images are checked with
qemu-img check and compared with a model.

Normalised: automatic node names (#blockNNN: QEMU's carry other digits),
the temporary directory, qemu-io's timing lines, event timestamps.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from tests.helpers import HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

KiB, MiB = 1 << 10, 1 << 20
# the rate limit lets a held-back event go a second after the one before,
# and closes its window a second later: after this, every event is out
SETTLE = 2.5


def norm(value, tmp):
    text = re.sub(r"#block\d+", "#B", json.dumps(value)).replace(str(tmp), "T")
    return json.loads(text)


def io_lines(url, *cmds):
    p = qemu_io("-f", "raw", *[a for c in cmds for a in ("-c", c)], url, check=False)
    return [ln for ln in (p.stdout + p.stderr).splitlines() if "/sec" not in ln]


def settled_events(q, tmp):
    """Every event the daemon sent, once the held-back ones are out: the
    timestamps dropped, sorted."""
    time.sleep(SETTLE)
    q.cmd("query-version")  # the client reads what arrived meanwhile
    evs = [{"event": e["event"], "data": e.get("data")} for e in q.get_events()]
    q.clear_events()
    return sorted((norm(e, tmp) for e in evs), key=json.dumps)


# -- refusals -----------------------------------------------------------------------

NULL = {"driver": "null-co", "size": MiB}
BAD_OPTIONS = [
    {"vote-threshold": 3, "children": [NULL, NULL]},
    {"vote-threshold": 0, "children": [NULL, NULL]},
    {"vote-threshold": -1, "children": [NULL, NULL]},
    # QemuOpts reads a uint64 and quorum keeps an int: 2**63-1 is -1, 2**32+2 is 2
    {"vote-threshold": 2**63 - 1, "children": [NULL, NULL]},
    {"vote-threshold": 2**32 + 2, "children": [NULL, NULL, NULL]},
    {"vote-threshold": 1, "children": []},
    {"vote-threshold": 1, "blkverify": True, "children": [NULL, NULL]},
    {"vote-threshold": 2, "blkverify": True, "children": [NULL, NULL, NULL]},
    {"vote-threshold": 2, "blkverify": True, "rewrite-corrupted": True,
     "children": [NULL, NULL]},
    # fifo reads neither blkverify nor rewrite-corrupted: both accepted
    {"vote-threshold": 1, "read-pattern": "fifo", "rewrite-corrupted": True,
     "children": [NULL, NULL]},
    {"vote-threshold": 1, "read-pattern": "fifo", "blkverify": True,
     "children": [NULL, NULL, NULL]},
    {"vote-threshold": 1, "children": [NULL, {"driver": "null-co", "size": 2 * MiB}]},
    {"vote-threshold": 1, "read-only": True, "rewrite-corrupted": True,
     "children": [NULL]},
    {"vote-threshold": 1, "children": [NULL, "nosuchnode"]},
    {"vote-threshold": 1, "children": [NULL, {"driver": "nosuchdriver"}]},
    {"vote-threshold": 1, "read-pattern": "random", "children": [NULL]},
]


def test_refusals_like_qemu(daemon_factory, tmp_path):
    seen = {}
    for kind in ("qemu", "trio"):
        q = daemon_factory(kind).qmp()
        replies = []
        for opts in BAD_OPTIONS:
            r = q.cmd_raw("blockdev-add", {"driver": "quorum", "node-name": "q", **opts})
            replies.append(r)
            if "return" in r:
                replies.append(q.cmd_raw("blockdev-del", {"node-name": "q"}))
        seen[kind] = replies
    assert seen["trio"] == seen["qemu"]
    errors = [r["error"]["desc"] for r in seen["trio"] if "error" in r]
    assert "threshold may not exceed children count" in errors
    assert len(errors) == len(BAD_OPTIONS) - 3  # three are accepted


# -- the graph and x-blockdev-change ------------------------------------------------


def _raw_files(d, n, size=MiB):
    paths = []
    for i in range(n):
        p = d / f"c{i}.raw"
        p.write_bytes(bytes(size))
        paths.append(p)
    return paths


def graph_scenario(d, tmp):
    q = d.qmp()

    def nodes():
        return sorted(norm(q.cmd("query-named-block-nodes"), tmp), key=json.dumps)

    def graph():
        g = q.cmd("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in g["nodes"]}
        return norm(sorted((names[e["parent"]], e["name"], names[e["child"]], e["perm"],
                            e["shared-perm"]) for e in g["edges"]), tmp)

    seen: list = [nodes(), graph()]
    calls = [
        ("x-blockdev-change", {"parent": "q", "node": "n3"}),
        ("x-blockdev-change", {"parent": "q", "node": "n3"}),  # has a parent now
        ("x-blockdev-change", {"parent": "q", "child": "children.7"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.2", "node": "n4"}),
        ("x-blockdev-change", {"parent": "q"}),
        ("x-blockdev-change", {"parent": "nope", "node": "n4"}),
        ("x-blockdev-change", {"parent": "q", "node": "nope"}),
        ("x-blockdev-change", {"parent": "r", "child": "file"}),  # not a quorum
        ("x-blockdev-change", {"parent": "r", "node": "n4"}),
        ("x-blockdev-change", {"parent": "n4", "child": "x"}),
        ("x-blockdev-change", {"parent": "q", "node": "q"}),  # itself
        ("x-blockdev-change", {"parent": "q", "child": "children.0"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.1"}),
        ("x-blockdev-change", {"parent": "q", "child": "children.3"}),  # the newest
        ("x-blockdev-change", {"parent": "q", "child": "children.2"}),  # threshold
        ("x-blockdev-change", {"parent": "q", "node": "n4"}),  # children.3 again
        ("x-blockdev-change", {"parent": "qv", "node": "n5"}),  # blkverify mode
        ("x-blockdev-change", {"parent": "qv", "child": "children.0"}),
    ]
    for cmd, args in calls:
        seen.append((cmd, args, q.cmd_raw(cmd, args)))
    seen += [nodes(), graph()]
    # a child removed goes if nothing else holds it; monitor-owned ones stay
    seen.append(q.cmd_raw("blockdev-del", {"node-name": "r"}))
    seen.append(q.cmd_raw("blockdev-del", {"node-name": "q"}))
    seen.append(sorted(n["node-name"] for n in q.cmd("query-named-block-nodes")
                       if not n["node-name"].startswith("#")))
    return seen


def test_graph_and_child_changes_like_qemu(daemon_factory, tmp_path):
    seen = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        work.mkdir()
        c = _raw_files(work, 6)
        raw = [{"driver": "raw", "file": {"driver": "file", "filename": str(p)}} for p in c]
        args = ["--blockdev", json.dumps({"driver": "quorum", "node-name": "q",
                                          "vote-threshold": 2, "children": raw[:3]}),
                "--blockdev", json.dumps({"driver": "raw", "node-name": "r", "file": "q"}),
                "--blockdev", json.dumps({"driver": "raw", "node-name": "n3",
                                          "file": {"driver": "file",
                                                   "filename": str(c[3])}}),
                "--blockdev", json.dumps({"driver": "file", "node-name": "n4",
                                          "filename": str(c[4])}),
                "--blockdev", json.dumps({"driver": "null-co", "node-name": "n5",
                                          "size": MiB}),
                "--blockdev", json.dumps({"driver": "quorum", "node-name": "qv",
                                          "vote-threshold": 2, "blkverify": True,
                                          "children": [{"driver": "null-co", "size": MiB},
                                                       {"driver": "null-co", "size": MiB}]})]
        d = daemon_factory(kind, args)
        seen[kind] = norm(graph_scenario(d, work), work)
    assert seen["trio"] == seen["qemu"]
    replies = {json.dumps(s[1]): s[2] for s in seen["trio"] if isinstance(s, list | tuple)
               and len(s) == 3 and s[0] == "x-blockdev-change"}
    assert replies[json.dumps({"parent": "q", "node": "n4"})] == {"return": {}}


# -- votes over qcow2 children -------------------------------------------------------


def _qcow2_children(d, prefix, n, corrupt):
    """``n`` qcow2 images of 1 MiB reading 0x11, then ``corrupt`` (child,
    qemu-io command) written into single children, as a disk gone bad."""
    paths = []
    for i in range(n):
        p = d / f"{prefix}{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
        qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", str(p))
        paths.append(p)
    for i, cmd in corrupt:
        qemu_io("-f", "qcow2", "-c", cmd, str(paths[i]))
    return paths


def _qcow2(p, name):
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(p)}}


def votes_scenario(d, work):
    q = d.qmp()
    sock = work / "nbd.sock"
    q.cmd("nbd-server-start", **{"addr": {"type": "unix", "data": {"path": str(sock)}}})
    for name in ("qa", "qb"):
        q.cmd("block-export-add", **{"type": "nbd", "id": name, "node-name": name,
                                   "writable": True})
    url = f"nbd+unix:///{{}}?socket={sock}"
    seen: list = []
    # qa: child 2 differs at 64k, children 1 and 2 at 128k (no majority there)
    seen.append(io_lines(url.format("qa"), "read -P 0x11 60k 8k"))
    # (a qemu-io whose read failed fails what it does after: a client of its own)
    seen.append(io_lines(url.format("qa"), "read 128k 512"))
    seen.append(io_lines(url.format("qa"), "write -P 0x55 0 4k", "read -P 0x55 0 4k"))
    # qb: rewrite-corrupted repairs child 2 on the first read
    seen.append(io_lines(url.format("qb"), "read -P 0x11 64k 4k", "read -P 0x11 64k 4k"))
    seen.append(settled_events(q, work))
    # the bad child out, a new one in: it lacks the write at 0, so it is
    # outvoted there; the write after reaches it
    seen.append(q.cmd_raw("x-blockdev-change", {"parent": "qa", "child": "children.2"}))
    seen.append(q.cmd_raw("x-blockdev-change", {"parent": "qa", "node": "qanew"}))
    seen.append(io_lines(url.format("qa"), "read -P 0x55 0 4k", "write -P 0x66 8k 4k",
                         "read -P 0x66 8k 4k", "read -P 0x11 64k 4k"))
    seen.append(settled_events(q, work))
    return seen


def test_votes_like_qemu(daemon_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _qcow2_children(src, "a", 3, [(2, "write -P 0x22 64k 4k"), (1, "write -P 0x33 128k 512"),
                                  (2, "write -P 0x44 128k 512")])
    _qcow2_children(src, "b", 3, [(2, "write -P 0x22 64k 4k")])
    _qcow2_children(src, "n", 1, [])
    seen = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        shutil.copytree(src, work)
        a = [_qcow2(work / f"a{i}.qcow2", f"qa{i}") for i in range(3)]
        b = [_qcow2(work / f"b{i}.qcow2", f"qb{i}") for i in range(3)]
        args = ["--blockdev", json.dumps({"driver": "quorum", "node-name": "qa",
                                          "vote-threshold": 2, "children": a}),
                "--blockdev", json.dumps({"driver": "quorum", "node-name": "qb",
                                          "vote-threshold": 2, "rewrite-corrupted": True,
                                          "children": b}),
                "--blockdev", json.dumps(_qcow2(work / "n0.qcow2", "qanew"))]
        d = daemon_factory(kind, args)
        seen[kind] = norm(votes_scenario(d, work), work)
        d.stop()
    assert seen["trio"] == seen["qemu"]
    # the reports and the failure are there, not an empty scenario
    assert {"event": "QUORUM_FAILURE", "data": {"reference": "qa", "sector-num": 256,
                                                "sectors-count": 1}} in seen["trio"][4]
    assert seen["trio"][1] == ["read failed: Input/output error"]

    # the images: clean, and holding what a model of the scenario says
    def model(*writes):
        m = bytearray(b"\x11" * MiB)
        for off, byte, n in writes:
            m[off:off + n] = byte * n
        return bytes(m)

    good_a = model((0, b"\x55", 4096), (8192, b"\x66", 4096))
    expect = {
        "a0.qcow2": model((0, b"\x55", 4096), (8192, b"\x66", 4096)),
        "a1.qcow2": model((0, b"\x55", 4096), (8192, b"\x66", 4096),
                          (128 * KiB, b"\x33", 512)),
        # removed before the second write
        "a2.qcow2": model((0, b"\x55", 4096), (64 * KiB, b"\x22", 4096),
                          (128 * KiB, b"\x44", 512)),
        "n0.qcow2": model((8192, b"\x66", 4096)),
        "b0.qcow2": model(), "b1.qcow2": model(), "b2.qcow2": model(),  # repaired
    }
    assert expect["a0.qcow2"] == good_a
    for kind in ("qemu", "trio"):
        for name, data in expect.items():
            img = tmp_path / kind / name
            assert "No errors were found" in qemu_img("check", str(img)).stdout
            raw = tmp_path / kind / (name + ".raw")
            qemu_img("convert", "-O", "raw", str(img), str(raw))
            assert raw.read_bytes() == data, (kind, name)


# -- failing children ---------------------------------------------------------------

READ_EIO = {"event": "read_aio", "iotype": "read", "errno": 5}
WRITE_ENOSPC = {"event": "write_aio", "iotype": "write", "errno": 28}
FLUSH_EIO = {"event": "write_aio", "iotype": "flush", "errno": 5}


def _debugged(path, name, rules):
    image = {"driver": "file", "filename": str(path)}
    inner = {"driver": "blkdebug", "image": image}
    if rules:
        inner["inject-error"] = rules
    return {"driver": "raw", "node-name": name, "file": inner}


def faults_scenario(d, work):
    q = d.qmp()
    sock = work / "nbd.sock"
    q.cmd("nbd-server-start", **{"addr": {"type": "unix", "data": {"path": str(sock)}}})
    for name in ("qf", "qg", "q3"):
        q.cmd("block-export-add", **{"type": "nbd", "id": name, "node-name": name,
                                   "writable": True})
    url = f"nbd+unix:///{{}}?socket={sock}"
    seen: list = [io_lines(url.format("qf"), "read -P 0x11 0 4k")]  # fails over to f1
    seen.append(io_lines(url.format("qg"), "read 0 4k"))  # every child fails
    seen.append(settled_events(q, work))
    seen.append(io_lines(url.format("q3"), "read -P 0x11 0 4k"))  # one child fails
    seen.append(settled_events(q, work))
    seen.append(io_lines(url.format("q3"), "write -P 0x22 512 512"))  # two fail
    seen.append(settled_events(q, work))
    seen.append(io_lines(url.format("q3"), "flush"))  # two fail: their rules are armed
    seen.append(settled_events(q, work))
    return seen


def test_failing_children_like_qemu(daemon_factory, tmp_path):
    seen = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        work.mkdir()
        paths = []
        for i in range(7):
            p = work / f"c{i}.raw"
            p.write_bytes(b"\x11" * MiB)
            paths.append(p)
        args = [
            "--blockdev", json.dumps({
                "driver": "quorum", "node-name": "qf", "vote-threshold": 1,
                "read-pattern": "fifo",
                "children": [_debugged(paths[0], "f0", [READ_EIO]),
                             _debugged(paths[1], "f1", [])]}),
            "--blockdev", json.dumps({
                "driver": "quorum", "node-name": "qg", "vote-threshold": 1,
                "read-pattern": "fifo",
                "children": [_debugged(paths[2], "g0", [READ_EIO]),
                             _debugged(paths[3], "g1", [READ_EIO])]}),
            "--blockdev", json.dumps({
                "driver": "quorum", "node-name": "q3", "vote-threshold": 2,
                "children": [_debugged(paths[4], "a", [READ_EIO, WRITE_ENOSPC]),
                             _debugged(paths[5], "b", [WRITE_ENOSPC, FLUSH_EIO]),
                             _debugged(paths[6], "c", [FLUSH_EIO])]})]
        d = daemon_factory(kind, args)
        seen[kind] = norm(faults_scenario(d, work), work)
        d.stop()
        # the write reached the one child that took it, and only it
        assert paths[6].read_bytes()[512:1024] == b"\x22" * 512
        assert paths[4].read_bytes() == paths[5].read_bytes() == b"\x11" * MiB
    assert seen["trio"] == seen["qemu"]
    failures = [e for evs in seen["trio"][2::2] for e in evs
                if e["event"] == "QUORUM_FAILURE"]
    assert failures == [{"event": "QUORUM_FAILURE",
                         "data": {"reference": "q3", "sector-num": 1, "sectors-count": 1}}]
    assert seen["trio"][1] == ["read failed: Input/output error"]


# -- blkverify=on ------------------------------------------------------------------


def test_blkverify_mismatch_exits_like_qemu(daemon_factory, tmp_path):
    seen = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        work.mkdir()
        a, b = work / "a.raw", work / "b.raw"
        a.write_bytes(bytes(MiB))
        data = bytearray(MiB)
        data[4096 + 300] = 1
        b.write_bytes(bytes(data))
        sock = work / "nbd.sock"
        children = [{"driver": "raw", "file": {"driver": "file", "filename": str(p)}}
                    for p in (a, b)]
        d = daemon_factory(kind, [
            "--blockdev", json.dumps({"driver": "quorum", "node-name": "qv",
                                      "vote-threshold": 2, "blkverify": True,
                                      "children": children}),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e,node-name=qv,writable=on"], allow_stderr=r"^quorum: offset=")
        url = f"nbd+unix:///qv?socket={sock}"
        ok = io_lines(url, "read -P 0 0 4k")  # agrees there
        qemu_io("-f", "raw", "-c", "read 0 8k", url, check=False)
        seen[kind] = (ok, d.wait(), d.stderr().strip().splitlines()[-1],
                      d.pidfile.exists())
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"] == (["read 4096/4096 bytes at offset 0"], 1,
                            "quorum: offset=0 bytes=8192 contents mismatch at offset 4396",
                            False)
