"""x-query-tasks and SIGUSR1: the task tree of a busy daemon.

A daemon with two NBD clients connected (qemu-io processes that stay
connected), a FUSE export mounted and a mirror job held running by a tiny
speed; the tree read through QMP must show each of them under the nursery
that runs it, with the ids it serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.fuse_helpers import fuse_tmp  # noqa: F401 - fixture

MiB = 1 << 20
# what SIGUSR1 prints: one line per node, indented by depth
TREE_LINE = r"^ *(task|nursery|monitor-session|export|client-connection|job) '.*' .*up [0-9.]+s$"


def _walk(node, path=()):
    yield node, path
    for child in node["children"]:
        yield from _walk(child, (*path, node))


def _by_kind(tree, kind):
    return [(n, p) for n, p in _walk(tree) if n["kind"] == kind]


def _wait(predicate, what):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def busy_daemon(daemon_factory, fuse_tmp):  # noqa: F811 - fixture
    src, dst, fz = fuse_tmp / "src.raw", fuse_tmp / "dst.raw", fuse_tmp / "fz.raw"
    mp, sock = fuse_tmp / "mp", fuse_tmp / "nbd.sock"
    for p in (src, dst, fz):
        p.write_bytes(b"")
        os.truncate(p, 4 * MiB)
    mp.write_bytes(b"")
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=src,filename={src}",
        "--blockdev", f"driver=file,node-name=dst,filename={dst}",
        "--blockdev", f"driver=file,node-name=fz,filename={fz}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=nbd0,node-name=src,name=src",
        "--export", f"type=fuse,id=fuse0,node-name=fz,mountpoint={mp}"],
        allow_stderr=TREE_LINE)
    q = d.qmp()
    r = q.cmd_raw("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "dst",
                                      "sync": "full", "speed": 1})
    assert r == {"return": {}}, r
    # qemu-io stays connected while it waits for commands on stdin
    clients = [subprocess.Popen(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///src?socket={sock}"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for _ in range(2)]
    # one of them reads 64 KiB: its connection shows the bytes moved
    clients[0].stdin.write(b"read 0 64k\n")
    clients[0].stdin.flush()
    try:
        yield d, q
    finally:
        for c in clients:
            c.stdin.close()
            c.wait(timeout=30)
        q.cmd_raw("block-job-cancel", {"device": "m1", "force": True})


def test_tree_shows_clients_exports_job_and_session(busy_daemon):
    d, q = busy_daemon

    def tree():
        r = q.cmd_raw("x-query-tasks")
        assert "return" in r, r
        return r["return"]

    _wait(lambda: sorted(c["bytes"] for c, _ in _by_kind(tree(), "client-connection"))
          == [0, 65536], "two NBD clients, one having read 64 KiB")
    t = tree()
    assert t["kind"] == "task" and t["state"] == "running"
    # every task's children are nurseries, every nursery's children tasks
    for node, path in _walk(t):
        if path:
            parent = path[-1]
            assert (parent["kind"] == "nursery") != (node["kind"] == "nursery"), (parent, node)
        assert node["started"] <= time.time()

    exports = {n["export-id"]: n for n, _ in _by_kind(t, "export")}
    assert set(exports) == {"nbd0", "fuse0"}
    # the mirror's filter is inserted above src, and the export follows it
    assert exports["nbd0"]["node-names"] != ["fz"]
    assert exports["fuse0"]["node-names"] == ["fz"]

    conns = _by_kind(t, "client-connection")
    assert len(conns) == 2
    for conn, path in conns:
        assert conn["export-id"] == "nbd0"
        assert conn["node-names"] == exports["nbd0"]["node-names"]
        assert conn["state"] == "running" and conn["in-flight"] == 0
        assert "client" in conn
        # a connection runs under its export's task
        assert any(p is exports["nbd0"] for p in path)

    [(job, _)] = _by_kind(t, "job")
    assert job["job-id"] == "m1" and job["state"] == "running"
    assert job["bytes"] > 0  # the first chunk, before the speed limit held it

    sessions = _by_kind(t, "monitor-session")
    assert len(sessions) == 1 and sessions[0][0]["name"] == "QMP on qmp0"

    # the schema lists it like any command
    schema = q.cmd_raw("query-qmp-schema")["return"]
    [cmd] = [e for e in schema if e["name"] == "x-query-tasks"]
    ret = {e["name"]: e for e in schema}[cmd["ret-type"]]
    assert {m["name"] for m in ret["members"]} >= {"kind", "name", "state", "children"}


def test_sigusr1_prints_the_tree(busy_daemon):
    d, q = busy_daemon
    _wait(lambda: sum(1 for n, _ in _walk(q.cmd_raw("x-query-tasks")["return"])
                      if n["kind"] == "client-connection") == 2, "two NBD clients")
    assert "client-connection" not in d.stderr()
    d.proc.send_signal(signal.SIGUSR1)
    _wait(lambda: "job 'mirror job m1'" in d.stderr(), "the tree on stderr")
    text = d.stderr()
    assert text.count("client-connection 'nbd client of nbd0' export-id=nbd0") == 2
    assert "export 'fuse export fuse0' export-id=fuse0 node-names=fz running" in text
    assert "monitor-session 'QMP on qmp0'" in text
    # the daemon keeps running
    assert q.cmd_raw("query-version")["return"]
