"""The filters jobs insert, two daemons, one scenario: mirror_top (mirror,
active commit), commit_top (intermediate commit) and copy-on-read (stream).

A qcow2 chain base <- mid <- top (each node given on the command line) is
exported over NBD; a job runs at a tiny speed, so it is caught mid-way.
While it runs, when it is ready and after it ends (complete or cancel), the
client looks at x-debug-query-block-graph (nodes, jobs, BlockBackends and
every edge with its permissions), query-named-block-nodes (names, drivers,
read-only, backing depth, backing file present, bitmaps), query-block-jobs
and query-block-exports.  Normalised: ``#blockNNN`` names, progress
numbers and bitmap counts (timing), and the image file names qsd-trio
spells as paths where QEMU writes ``json:`` names for chains given by node
name.  The images are checked with ``qemu-img check`` and compared with
each other afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
SIZE = 16 * MiB
PROGRESS = ("offset", "len", "count")


def norm(value):
    if isinstance(value, dict):
        return {k: ("N" if k in PROGRESS else norm(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [norm(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#B", value)
    return value


def images(d):
    for name, backing, pattern in (("base", None, "write -P 1 0 8M"),
                                   ("mid", "base", "write -P 2 4M 8M"),
                                   ("top", "mid", "write -P 3 10M 4M"),
                                   ("dst", None, None)):
        opts = ["-b", f"{backing}.qcow2", "-F", "qcow2"] if backing else []
        qemu_img("create", "-q", "-f", "qcow2", *opts, str(d / f"{name}.qcow2"), str(SIZE))
        if pattern:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", pattern, str(d / f"{name}.qcow2")],
                           check=True, capture_output=True)
    args = []
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid"), ("dst", None)):
        args += ["--blockdev", f"driver=file,node-name={name}-f,filename={d}/{name}.qcow2",
                 "--blockdev", f"driver=qcow2,node-name={name},file={name}-f"
                 + (f",backing={backing}" if backing else "")]
    return args + ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
                   "--export", "type=nbd,id=exp0,node-name=top,writable=on"]


class Client:
    def __init__(self, qmp):
        self.qmp = qmp
        self.log: list = []

    def __call__(self, cmd, **args):
        r = self.qmp.cmd_raw(cmd, args)
        self.log.append((cmd, norm(r)))
        return r

    def look(self, tag):
        g = self.qmp.cmd_raw("x-debug-query-block-graph", {})["return"]
        nodes = self.qmp.cmd_raw("query-named-block-nodes", {})["return"]
        view = [(n["node-name"], n["drv"], n["ro"], n["backing_file_depth"],
                 "backing_file" in n, n["image"]["format"], n.get("dirty-bitmaps"))
                for n in nodes]
        jobs = self.qmp.cmd_raw("query-block-jobs", {})["return"]
        exports = self.qmp.cmd_raw("query-block-exports", {})["return"]
        self.log.append((tag, norm(g), norm(view), norm(jobs), norm(exports)))

    def wait_job(self, pred):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = self.qmp.cmd_raw("query-block-jobs", {})["return"]
            if jobs and pred(jobs[0]):
                return
            time.sleep(0.02)
        raise AssertionError(f"job state not reached: {jobs}")

    def wait_event(self, name, **match):
        while True:
            ev = self.qmp.pull_event(wait=20.0)
            assert ev is not None, name
            if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
                return


def sleeping(j):
    # caught between two chunks at its tiny speed (QEMU and we copy
    # different amounts per chunk, so only "some" progress is compared)
    return j["offset"] > 0 and not j["busy"]


def _diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return "".join(_diff(a.get(k), b.get(k), f"{path}.{k}") for k in sorted({*a, *b}))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return "".join(_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    return "" if a == b else f"  {path}: ours {a!r} theirs {b!r}\n"


def run_both(tmp_path, scenario, same=("base", "mid", "top", "dst")):
    out = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        daemon = Daemon(kind, d, images(d)).start()
        c = Client(daemon.qmp())
        c.look("before")
        scenario(c)
        c.look("after")
        daemon.stop()
        for name in ("base", "mid", "top", "dst"):
            qemu_img("check", "-q", str(d / f"{name}.qcow2"))
        out[kind] = c.log
    diffs = [f"{q[0]}:\n{_diff(t, q)}" for t, q in zip(out["trio"], out["qemu"], strict=True)
             if t != q]
    assert not diffs, "\n".join(diffs)
    for name in same:  # a cancelled job leaves its target partly copied
        qemu_img("compare", "-q", str(tmp_path / "qemu" / f"{name}.qcow2"),
                 str(tmp_path / "trio" / f"{name}.qcow2"))
    return out["qemu"]


def test_mirror_complete(tmp_path):
    def s(c):
        c("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "dst",
                                "sync": "full", "speed": 1})
        c.wait_job(sleeping)
        c.look("running")
        c("blockdev-mirror", **{"job-id": "k", "device": "top", "target": "mid",
                                "sync": "full"})
        c("block-job-set-speed", device="j", speed=0)
        c.wait_event("BLOCK_JOB_READY")
        c.look("ready")
        c("job-complete", id="j")
        c.wait_event("JOB_STATUS_CHANGE", status="null")

    log = run_both(tmp_path, s)
    assert log[-1][4][0]["node-name"] == "dst"  # the export follows the pivot


def test_mirror_named_filter_write_blocking_cancel(tmp_path):
    def s(c):
        c("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "dst",
                                "sync": "full", "speed": 1, "filter-node-name": "mt",
                                "copy-mode": "write-blocking"})
        c.wait_job(sleeping)
        c.look("running")
        c("blockdev-mirror", **{"job-id": "k", "device": "mt", "target": "mid",
                                "sync": "full"})
        c("blockdev-del", **{"node-name": "mt"})
        c("job-cancel", id="j")
        c.wait_event("JOB_STATUS_CHANGE", status="null")

    run_both(tmp_path, s, same=("base", "mid", "top"))


def test_active_commit(tmp_path):
    def s(c):
        c("block-commit", **{"job-id": "j", "device": "top", "speed": 1})
        c.wait_job(sleeping)
        c.look("running")
        c("block-job-set-speed", device="j", speed=0)
        c.wait_event("BLOCK_JOB_READY")
        c("job-complete", id="j")
        c.wait_event("JOB_STATUS_CHANGE", status="null")

    log = run_both(tmp_path, s)
    assert log[-1][4][0]["node-name"] == "base"


def test_intermediate_commit(tmp_path):
    def s(c):
        c("block-commit", **{"job-id": "j", "device": "top", "top-node": "mid",
                             "base-node": "base", "speed": 1, "filter-node-name": "ct"})
        c.wait_job(sleeping)
        c.look("running")
        c("block-job-set-speed", device="j", speed=0)
        c.wait_event("JOB_STATUS_CHANGE", status="null")

    run_both(tmp_path, s)


@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_stream(tmp_path, end):
    def s(c):
        c("block-stream", **{"job-id": "j", "device": "top", "speed": 1})
        c.wait_job(sleeping)
        c.look("running")
        if end == "cancel":
            c("job-cancel", id="j")
        else:
            c("block-job-set-speed", device="j", speed=0)
        c.wait_event("JOB_STATUS_CHANGE", status="null")

    run_both(tmp_path, s)


def test_copy_on_read_bottom(tmp_path):
    """The stream's filter on its own: reads through copy-on-read with
    ``bottom`` copy up what the layers down to bottom hold, nothing else."""
    maps = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        args = images(d)[:-4] + [
            "--blockdev", "driver=copy-on-read,node-name=cor,file=top,bottom=mid",
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=exp0,node-name=cor"]
        daemon = Daemon(kind, d, args).start()
        # base only, mid, top's own data, nowhere; then across all of them
        cmds = [f"read {o}M 1M" for o in (1, 8, 11, 15)] + ["read 3M 10M"]
        subprocess.run(["qemu-io", "-r", "-f", "raw", *sum((["-c", c] for c in cmds), []),
                        f"nbd+unix:///cor?socket={d}/nbd.sock"], check=True, capture_output=True)
        daemon.stop()
        qemu_img("check", "-q", str(d / "top.qcow2"))
        maps[kind] = qemu_img("map", "--output=json", str(d / "top.qcow2")).stdout
    strip = [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(maps["qemu"])]
    assert [{k: v for k, v in e.items() if k != "offset"}
            for e in json.loads(maps["trio"])] == strip
    qemu_img("compare", "-q", str(tmp_path / "qemu" / "top.qcow2"),
             str(tmp_path / "trio" / "top.qcow2"))


@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_mirror_full_zeroes_a_target_that_can_unmap(tmp_path, discard):
    """sync=full to a target holding old data: opened with discard=unmap,
    QEMU zeroes the target first and copies only what the chain allocates
    (a job length below the disk size), else it copies everything; the copy
    is right either way."""
    lens = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        args = images(d)[:-4]
        args[args.index("driver=qcow2,node-name=dst,file=dst-f")] = \
            f"driver=qcow2,node-name=dst,file=dst-f,discard={discard}"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 9 0 {SIZE}",
                        str(d / "dst.qcow2")], check=True, capture_output=True)
        daemon = Daemon(kind, d, args).start()
        c = Client(daemon.qmp())
        c("blockdev-mirror", **{"job-id": "j", "device": "top", "target": "dst",
                                "sync": "full"})
        c.wait_event("BLOCK_JOB_READY")
        lens[kind] = c.qmp.cmd_raw("query-block-jobs", {})["return"][0]["len"]
        c("job-complete", id="j")
        c.wait_event("JOB_STATUS_CHANGE", status="null")
        daemon.stop()
        qemu_img("check", "-q", str(d / "dst.qcow2"))
        qemu_img("compare", "-q", str(d / "top.qcow2"), str(d / "dst.qcow2"))
    assert lens["trio"] == lens["qemu"]
    assert (lens["qemu"] < SIZE) == (discard == "unmap")
