"""blklogwrites, both daemons: the log each writes for the same qemu-io
workload over NBD, log-append continuing a log qemu-storage-daemon wrote,
the refusals of bad options and damaged logs, and the node as the queries
show it.

The logs are compared byte for byte (same entries, same flush marks, same
superblock updates), replayed with tests/dm_log_writes.py (a reader of the
format written for these tests: QEMU has none) and checked against the data
file and against a model of the workload computed here.  The workload
avoids what QEMU 7.2 cannot survive: a discard that is not whole log
sectors fails an assertion in blklogwrites and aborts qemu-storage-daemon
(qsd-trio narrows it to the whole sectors instead; tests/nodes covers that).

Normalised: the temporary directory, automatic node names, qemu-io's
timing lines.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from tests import dm_log_writes as dmlog
from tests.helpers import HAVE_QEMU, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
SIZE = MiB

# qemu-io's default cache mode is writethrough: every write is FUA
WORKLOAD_FUA = ["write -P 1 0 4k", "write -P 2 8k 4k", "write -z 16k 8k", "discard 32k 4k",
                "write -P 3 100 200", "flush", "flush", "write -z 5000 3000",
                "write -P 4 64k 512", "discard 64k 64k", "read -P 4 64k 512"]
# with -t writeback, FUA only where asked (-f)
WORKLOAD_WB = ["write -P 5 128k 64k", "write -f -P 6 256k 4k", "write -z -f 512k 4k",
               "write -P 7 600k 1k", "flush", "write -z 700k 64k"]
WORKLOAD_B = ["write -P 8 0 1k", "discard 8k 8k", "write -f -P 9 1000k 24k"]


def _bytes(text: str) -> int:
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def model_of(commands: list[str], image: bytearray) -> bytearray:
    """What the qemu-io commands leave in the image (discards read as
    zeroes: the file driver punches holes)."""
    for c in commands:
        words = c.split()
        if words[0] not in ("write", "discard"):
            continue
        off, n = _bytes(words[-2]), _bytes(words[-1])
        if words[0] == "discard" or "-z" in words:
            image[off:off + n] = bytes(n)
        else:
            image[off:off + n] = bytes([int(words[words.index("-P") + 1], 0)]) * n
    return image


def norm(value, tmp):
    return json.loads(re.sub(r"#block\d+", "#B", json.dumps(value)).replace(str(tmp), "T"))


def io(url: str, commands: list[str], *opts: str) -> list[str]:
    p = qemu_io("-f", "raw", *opts, *[a for c in commands for a in ("-c", c)], url,
                check=False)
    return [ln for ln in (p.stdout + p.stderr).splitlines() if "/sec" not in ln]


def run_workloads(daemon_factory, kind, work, workloads, **opts):
    sock = work / "nbd.sock"
    node = {"driver": "blklogwrites", "node-name": "b", "discard": "unmap", **opts,
            "file": {"driver": "file", "filename": str(work / "data.raw")},
            "log": {"driver": "file", "filename": str(work / "log")}}
    d = daemon_factory(kind, ["--blockdev", json.dumps(node),
                              "--nbd-server", f"addr.type=unix,addr.path={sock}",
                              "--export", "nbd,id=e,node-name=b,writable=on"])
    url = f"nbd+unix:///b?socket={sock}"
    out = [io(url, commands, *io_opts) for commands, io_opts in workloads]
    d.stop()  # SIGTERM: both close the node, which flushes
    return out


def test_same_log_as_qemu(daemon_factory, tmp_path):
    out = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        work.mkdir()
        (work / "data.raw").write_bytes(bytes(SIZE))
        (work / "log").write_bytes(b"")
        out[kind] = run_workloads(daemon_factory, kind, work,
                                  [(WORKLOAD_FUA, ()), (WORKLOAD_WB, ("-t", "writeback"))])
    assert out["trio"] == out["qemu"]
    assert "read 512/512 bytes at offset 65536" in out["trio"][0]
    logs = {k: (tmp_path / k / "log").read_bytes() for k in out}
    assert logs["trio"] == logs["qemu"]
    data = (tmp_path / "trio" / "data.raw").read_bytes()
    assert data == (tmp_path / "qemu" / "data.raw").read_bytes()
    model = model_of(WORKLOAD_FUA + WORKLOAD_WB, bytearray(SIZE))
    assert data == bytes(model)
    parsed = dmlog.parse(logs["trio"])
    assert dmlog.replay(parsed, bytearray(SIZE)) == model
    marks = dmlog.marks(parsed)
    # FUA writes: each flushes what was written before it, so a flush is
    # logged after each but the first; a discard has no FUA
    assert marks[:9] == [("write", 0, 8), ("write", 16, 8), ("flush", 0, 0),
                         ("write", 32, 16), ("flush", 0, 0), ("discard", 64, 8),
                         # the FUA write's flush, qemu-io's first flush; its
                         # second has nothing new to flush
                         ("write", 0, 1), ("flush", 0, 0), ("flush", 0, 0)]
    assert marks[9] != ("flush", 0, 0)
    assert marks[-1] == ("flush", 0, 0)


def test_append_to_a_log_qemu_wrote(daemon_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.raw").write_bytes(bytes(SIZE))
    (src / "log").write_bytes(b"")
    run_workloads(daemon_factory, "qemu", src, [(WORKLOAD_FUA, ())])
    first = (src / "log").read_bytes()
    out = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("*.sock"))
        out[kind] = run_workloads(daemon_factory, kind, work, [(WORKLOAD_B, ())],
                                  **{"log-append": True})
    assert out["trio"] == out["qemu"]
    logs = {k: (tmp_path / k / "log").read_bytes() for k in out}
    assert logs["trio"] == logs["qemu"]
    assert logs["trio"][512:len(first)] == first[512:]  # the old entries stay
    model = model_of(WORKLOAD_FUA + WORKLOAD_B, bytearray(SIZE))
    assert (tmp_path / "trio" / "data.raw").read_bytes() == bytes(model)
    parsed = dmlog.parse(logs["trio"])
    assert len(parsed.entries) > len(dmlog.parse(first).entries)
    assert dmlog.replay(parsed, bytearray(SIZE)) == model


def _super(magic=dmlog.MAGIC, version=1, count=0, size=512) -> bytes:
    return struct.pack("<QQQI", magic, version, count, size)


# (options, log file content)
REFUSALS = [
    ({"log-sector-size": 100}, b""),
    ({"log-sector-size": 3000}, b""),
    ({"log-sector-size": 16}, b""),
    ({"log-sector-size": 1 << 24}, b""),
    ({"log-sector-size": 0}, b""),
    ({"log-sector-size": 32}, b""),  # the smallest that holds an entry
    ({"log-super-update-interval": 0}, b""),
    ({"log-append": True, "log-sector-size": 512}, b""),
    ({"log-append": True}, b""),  # an empty log: a superblock is assumed
    ({"log-append": True}, b"x" * 512),
    ({"log-append": True}, _super(version=2) + bytes(484)),
    ({"log-append": True}, _super(size=100) + bytes(484)),
    ({"log-append": True}, _super(size=4096, count=1) + bytes(4068)
     + struct.pack("<QQQQ", 0, 0, 16, 0)),
    # more entries counted than the log holds: the rest read as zeroes
    ({"log-append": True}, _super(count=5) + bytes(484)),
    ({"log-append": False, "log-super-update-interval": 2**64 - 1}, b""),
]


def graph_edges(q, tmp):
    """x-debug-query-block-graph's edges by node name (the numbering of
    nodes other than ``file`` follows a different creation order)."""
    g = q.cmd("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in g["nodes"]}
    return norm(sorted((names[e["parent"]], e["name"], names[e["child"]], e["perm"],
                        e["shared-perm"]) for e in g["edges"]), tmp)


def test_refusals_like_qemu(daemon_factory, tmp_path):
    seen = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        work.mkdir()
        (work / "data.raw").write_bytes(bytes(SIZE))
        q = daemon_factory(kind).qmp()
        replies = []
        for i, (opts, content) in enumerate(REFUSALS):
            log = work / f"log{i}"
            log.write_bytes(content)
            r = q.cmd_raw("blockdev-add", {
                "driver": "blklogwrites", "node-name": "b", **opts,
                "file": {"driver": "file", "filename": str(work / "data.raw")},
                "log": {"driver": "file", "filename": str(log)}})
            replies.append(r)
            if "return" in r:
                node = [n for n in q.cmd("query-named-block-nodes") if n["node-name"] == "b"]
                replies.append(norm(node, work))
                replies.append(graph_edges(q, work))
                replies.append(q.cmd_raw("block_resize", {"node-name": "b", "size": 2 * SIZE}))
                replies.append(q.cmd_raw("blockdev-del", {"node-name": "b"}))
        seen[kind] = replies
    assert seen["trio"] == seen["qemu"]
    errors = [r["error"]["desc"] for r in seen["trio"] if "error" in r]
    assert "Invalid flags 0x10 in log entry 0" in errors
    assert len(errors) == len(REFUSALS) - 4
