"""Jobs, two daemons, one scenario: the same replies, errors and event sequence.

Normalised: timestamps (dropped) and progress numbers (offset/len/current-
progress, which depend on timing).  The warning qemu-storage-daemon prints
on stderr for backups to null-co targets is not compared.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU, qemu_img, qemu_io

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
PROGRESS = ("offset", "len", "current-progress", "total-progress")


def nulls(*names, size=64 * MiB):
    out = []
    for n in names:
        out += ["--blockdev", f"null-co,node-name={n},size={size},latency-ns=1000000"]
    return out


def norm(msg):
    if isinstance(msg, dict):
        return {k: ("N" if k in PROGRESS else norm(v)) for k, v in msg.items()
                if k != "timestamp"}
    if isinstance(msg, list):
        return [norm(x) for x in msg]
    return msg


class Transcript:
    def __init__(self, qmp):
        self.qmp = qmp
        self.lines: list = []

    def events(self):
        while (ev := self.qmp.pull_event(wait=False)) is not None:
            self.lines.append(("event", ev["event"], norm(ev.get("data"))))

    def cmd(self, name, args=None, keep=True):
        r = self.qmp.cmd_raw(name, args or {})
        if keep:
            self.lines.append(("cmd", name, norm(r)))
        return r

    def until(self, name, timeout=20.0, **match):
        """Record events until ``name`` (matching) has been seen."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.qmp.pull_event(wait=max(deadline - time.monotonic(), 0.01))
            if ev is None:
                continue
            self.lines.append(("event", ev["event"], norm(ev.get("data"))))
            if ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                           for k, v in match.items()):
                return


def run_both(daemon_factory, args, scenario):
    out = {}
    for kind in ("qemu", "trio"):
        d = daemon_factory(kind, args, allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
        t = Transcript(d.qmp())
        scenario(t)
        time.sleep(0.1)
        t.events()
        out[kind] = t.lines
        d.stop()
    assert out["trio"] == out["qemu"]
    return out["qemu"]


def test_mirror_ready_complete(daemon_factory):
    def s(t):
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full"})
        t.until("BLOCK_JOB_READY")
        t.cmd("query-jobs")
        t.cmd("query-block-jobs")
        t.cmd("job-dismiss", {"id": "j"})
        t.cmd("job-complete", {"id": "j"})
        t.until("JOB_STATUS_CHANGE", status="null")

    lines = run_both(daemon_factory, nulls("src", "dst"), s)
    assert ("event", "BLOCK_JOB_COMPLETED", {"device": "j", "len": "N", "offset": "N",
                                             "speed": 0, "type": "mirror"}) in lines


def test_mirror_manual_finalize_soft_cancel(daemon_factory):
    def s(t):
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "auto-finalize": False,
                                  "auto-dismiss": False})
        t.until("BLOCK_JOB_READY")
        t.cmd("block-job-cancel", {"device": "j"})
        t.until("BLOCK_JOB_PENDING")
        t.cmd("query-jobs")
        t.cmd("job-finalize", {"id": "j"})
        t.until("JOB_STATUS_CHANGE", status="concluded")
        t.cmd("query-block-jobs")
        t.cmd("job-dismiss", {"id": "j"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("query-jobs")

    run_both(daemon_factory, nulls("src", "dst"), s)


def test_job_verbs_and_errors(daemon_factory, tmp_path):
    # a raw file source gives the mirror real data to copy at a limited speed
    img = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(64 * MiB))
    qemu_io("-f", "raw", "-c", f"write -P 1 0 {64 * MiB}", str(img))
    args = ["--blockdev", f"driver=file,node-name=src,filename={img}"] + nulls("dst", "d2")

    def s(t):
        t.cmd("blockdev-mirror", {"device": "src", "target": "dst", "sync": "full"})
        t.cmd("blockdev-mirror", {"job-id": "#j", "device": "src", "target": "dst",
                                  "sync": "full"})
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "speed": -5})
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "nope",
                                  "sync": "full"})
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "speed": 1})
        t.until("JOB_STATUS_CHANGE", status="running")
        t.cmd("job-resume", {"id": "j"})
        t.cmd("job-complete", {"id": "j"})
        t.cmd("block-job-complete", {"device": "j"})
        t.cmd("job-finalize", {"id": "j"})
        t.cmd("job-dismiss", {"id": "j"})
        t.cmd("job-cancel", {"id": "x"})
        t.cmd("block-job-cancel", {"device": "x"})
        t.cmd("block-job-set-speed", {"device": "j", "speed": -1})
        t.cmd("job-pause", {"id": "j"})
        t.until("JOB_STATUS_CHANGE", status="paused")
        t.cmd("job-pause", {"id": "j"})
        t.cmd("job-complete", {"id": "j"})
        t.cmd("block-job-cancel", {"device": "j"})
        t.cmd("block-job-resume", {"device": "j"})
        t.until("JOB_STATUS_CHANGE", status="running")
        t.cmd("block-job-pause", {"device": "j"})
        t.until("JOB_STATUS_CHANGE", status="paused")
        t.cmd("block-job-cancel", {"device": "j", "force": True})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("query-jobs")

    run_both(daemon_factory, args, s)


def test_backup_and_transactions(daemon_factory):
    def s(t):
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "auto-finalize": False})
        t.until("BLOCK_JOB_PENDING")
        t.cmd("query-block-jobs")
        t.cmd("block-job-finalize", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "none"})
        t.until("JOB_STATUS_CHANGE", status="running")
        t.until("JOB_STATUS_CHANGE", status="running")
        t.cmd("job-cancel", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "b1", "device": "src",
                                                 "target": "dst", "sync": "full"}},
            {"type": "abort", "data": {}}]})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "b1", "device": "src",
                                                 "target": "dst", "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "b2", "device": "d2",
                                                 "target": "dst", "sync": "full"}}],
            "properties": {"completion-mode": "grouped"}})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "incremental", "bitmap": "bm",
                                  "bitmap-mode": "never"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "incremental", "bitmap": "bm",
                                  "auto-finalize": False})
        t.until("BLOCK_JOB_PENDING")
        t.cmd("blockdev-backup", {"job-id": "c", "device": "src", "target": "d2",
                                  "sync": "full", "bitmap": "bm"})
        t.cmd("job-cancel", {"id": "b"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "incremental"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "bitmap-mode": "always"})
        t.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "dst",
                                  "sync": "full", "bitmap": "nope"})

    run_both(daemon_factory, nulls("src", "dst", "d2"), s)


def test_quit_cancels_running_job(daemon_factory):
    def s(t):
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full"})
        t.until("BLOCK_JOB_READY")
        t.cmd("quit")
        t.until("JOB_STATUS_CHANGE", status="null")

    run_both(daemon_factory, nulls("src", "dst"), s)


def blkdebug_src(tmp_path, once="on"):
    img = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(8 * MiB))
    qemu_io("-f", "raw", "-c", f"write -P 7 0 {8 * MiB}", str(img))
    return ["--blockdev", f"driver=raw,node-name=src,file.driver=blkdebug,"
                          f"file.image.driver=file,file.image.filename={img},"
                          f"file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,"
                          f"file.inject-error.0.iotype=read,"
                          f"file.inject-error.0.sector=8192,file.inject-error.0.once={once}"] \
        + nulls("dst", size=8 * MiB)


@pytest.mark.parametrize("policy", ["report", "ignore", "stop", "enospc"])
def test_mirror_source_error_policies(daemon_factory, tmp_path, policy):
    def s(t):
        t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "on-source-error": policy})
        if policy == "stop":
            t.until("JOB_STATUS_CHANGE", status="paused")
            t.cmd("query-block-jobs")
            t.cmd("block-job-resume", {"device": "j"})
            t.until("BLOCK_JOB_READY")
            t.cmd("query-block-jobs")
            t.cmd("job-cancel", {"id": "j"})
        elif policy == "ignore":
            t.until("BLOCK_JOB_READY")
            t.cmd("job-cancel", {"id": "j"})
        t.until("JOB_STATUS_CHANGE", status="null")
        t.cmd("query-jobs")

    run_both(daemon_factory, blkdebug_src(tmp_path), s)


def test_blockdev_create_and_amend(daemon_factory, tmp_path):
    """Same events, query-jobs and errors; the images made are byte-identical."""
    out, images = {}, {}
    for kind in ("qemu", "trio"):
        d_ = tmp_path / kind
        d_.mkdir()
        (d_ / "q.qcow2").touch()
        d = daemon_factory(kind, ["--blockdev", f"driver=file,node-name=f,filename={d_}/q.qcow2"])
        t = Transcript(d.qmp())
        for job_id, options in [
                ("c1", {"driver": "file", "filename": f"{d_}/r.raw", "size": MiB}),
                ("c2", {"driver": "qcow2", "file": "f", "size": 4 * MiB,
                        "cluster-size": 65536, "lazy-refcounts": True}),
                ("c3", {"driver": "qcow2", "file": "f", "size": 4 * MiB,
                        "cluster-size": 1000}),
                ("c4", {"driver": "qcow2", "file": "nope", "size": 4 * MiB}),
                ("c5", {"driver": "file", "filename": "/nonexistent/x", "size": 1})]:
            t.cmd("blockdev-create", {"job-id": job_id, "options": options})
            t.until("JOB_STATUS_CHANGE", id=job_id, status="concluded")
        t.cmd("query-jobs")
        for job_id in ("c1", "c2", "c3", "c4", "c5"):
            t.cmd("job-dismiss", {"id": job_id})
        t.until("JOB_STATUS_CHANGE", id="c5", status="null")
        t.cmd("blockdev-create", {"job-id": "c1", "options": {"driver": "raw", "file": "f",
                                                              "size": 1}})
        t.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        t.cmd("x-blockdev-amend", {"job-id": "a1", "node-name": "f",
                                   "options": {"driver": "qcow2"}})
        t.cmd("x-blockdev-amend", {"job-id": "a1", "node-name": "q",
                                   "options": {"driver": "qcow2"}})
        t.until("JOB_STATUS_CHANGE", id="a1", status="concluded")
        t.cmd("query-jobs")
        t.cmd("job-dismiss", {"id": "a1"})
        t.until("JOB_STATUS_CHANGE", id="a1", status="null")
        out[kind] = t.lines
        d.stop()
        qemu_img("check", "-q", str(d_ / "q.qcow2"))
        images[kind] = ((d_ / "q.qcow2").read_bytes(), (d_ / "r.raw").stat().st_size)
    assert out["trio"] == out["qemu"]
    assert images["trio"] == images["qemu"]
