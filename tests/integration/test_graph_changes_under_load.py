"""Graph changes while a client reads through the export (issue 12).

A ``null-co,read-zeroes=on`` node exported writable over NBD, and
``qemu-img bench`` reading 4 KiB at queue depth 64 through the export the
whole time, while the monitor changes the graph under it in a loop: adding
and removing an overlay; a snapshot, an active commit and its cancellation;
two snapshots committed one after the other.  The bench must end with every
request served: drains and permission updates may hold requests back, never
fail them.  qemu-storage-daemon 7.2 aborts on this workload (QEMU fixed that
later), so this runs against qsd-trio alone.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import qemu_img

SIZE = 64 << 20
REQUESTS = 60000


def start(daemon_factory, tmp_path):
    d = daemon_factory("trio", [
        "--blockdev", f"driver=null-co,node-name=node0,size={SIZE},read-zeroes=on",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
        "--export", "type=nbd,id=e,node-name=node0,name=n,writable=on"])
    return d


def bench(sock) -> subprocess.Popen:
    return subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-c", str(REQUESTS), "-d", "64",
                             "-s", "4k", f"nbd+unix:///n?socket={sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(reply) -> dict:
    assert "error" not in reply, reply
    return reply["return"]


def wait_job(qmp, job: str, until: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ev = qmp.pull_event(wait=10.0)
        if ev and ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": job,
                                                                         "status": until}:
            return
    raise AssertionError(f"job {job} never reached {until}")


def overlay(qmp, tmp_path, name: str, backing) -> None:
    path = tmp_path / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(SIZE))
    ok(qmp.cmd_raw("blockdev-add", {"driver": "qcow2", "node-name": name, "backing": backing,
                                    "file": {"driver": "file", "filename": str(path)}}))


def add_remove(qmp, tmp_path, i: int) -> None:
    overlay(qmp, tmp_path, f"o{i}", "node0")
    ok(qmp.cmd_raw("blockdev-del", {"node-name": f"o{i}"}))


def snapshot_commit_cancel(qmp, tmp_path, i: int, top: list) -> None:
    name = f"s{i}"
    overlay(qmp, tmp_path, name, None)
    ok(qmp.cmd_raw("blockdev-snapshot", {"node": top[0], "overlay": name}))
    top[0] = name
    ok(qmp.cmd_raw("block-commit", {"job-id": f"c{i}", "device": name}))
    wait_job(qmp, f"c{i}", "ready")
    ok(qmp.cmd_raw("block-job-cancel", {"device": f"c{i}"}))
    wait_job(qmp, f"c{i}", "null")


def two_snapshots_commit_both(qmp, tmp_path, i: int) -> None:
    mid, top = f"m{i}", f"t{i}"
    overlay(qmp, tmp_path, mid, None)
    ok(qmp.cmd_raw("blockdev-snapshot", {"node": "node0", "overlay": mid}))
    overlay(qmp, tmp_path, top, None)
    ok(qmp.cmd_raw("blockdev-snapshot", {"node": mid, "overlay": top}))
    ok(qmp.cmd_raw("block-commit", {"job-id": f"cm{i}", "device": top, "top-node": mid,
                                    "base-node": "node0", "auto-dismiss": False}))
    wait_job(qmp, f"cm{i}", "concluded")
    ok(qmp.cmd_raw("job-dismiss", {"id": f"cm{i}"}))
    ok(qmp.cmd_raw("block-commit", {"job-id": f"ct{i}", "device": top, "base-node": "node0",
                                    "auto-dismiss": False}))
    wait_job(qmp, f"ct{i}", "ready")
    ok(qmp.cmd_raw("job-complete", {"id": f"ct{i}"}))
    wait_job(qmp, f"ct{i}", "concluded")
    ok(qmp.cmd_raw("job-dismiss", {"id": f"ct{i}"}))
    ok(qmp.cmd_raw("blockdev-del", {"node-name": top}))
    ok(qmp.cmd_raw("blockdev-del", {"node-name": mid}))


@pytest.mark.parametrize("scenario", ["add-remove", "snapshot-commit-cancel",
                                      "two-snapshots-commit-both"])
def test_graph_changes_while_reading(daemon_factory, tmp_path, scenario):
    d = start(daemon_factory, tmp_path)
    qmp = d.qmp()
    b = bench(tmp_path / "nbd.sock")
    rounds = 0
    top = ["node0"]
    try:
        while b.poll() is None:
            if scenario == "add-remove":
                add_remove(qmp, tmp_path, rounds)
            elif scenario == "snapshot-commit-cancel":
                snapshot_commit_cancel(qmp, tmp_path, rounds, top)
            else:
                two_snapshots_commit_both(qmp, tmp_path, rounds)
            rounds += 1
        out, err = b.communicate(timeout=60)
    finally:
        if b.poll() is None:
            b.kill()
    assert b.returncode == 0, out + err
    assert "failed" not in (out + err).lower(), out + err
    assert rounds >= 1, "the bench ended before one round of graph changes"
    # the export still serves, on whatever node is its top now
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0 0 64k",
                        f"nbd+unix:///n?socket={tmp_path}/nbd.sock"], capture_output=True, text=True)
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr
