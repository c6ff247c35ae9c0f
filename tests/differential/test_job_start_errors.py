"""The first error of a job-starting command with several mistakes at once.

QEMU checks a command's arguments in the order its code happens to run
(blockdev.c, then mirror_start_job / backup_job_create / stream_start /
commit_start, then job_create); a client sees the first failure only.  Each
case below combines mistakes so that the order shows: the job id ``j`` is in
use, a node is busy with a job, source and target are the same node, a
filter name is taken, ...  Both daemons get the same graph and the same
commands; the answers (class and text) must be equal, in order, and every
command must fail without side effects.

The graph: a qcow2 chain base <- mid <- top, null-co nodes n1, n2 (1 MiB)
and n3 (2 MiB), and b1 -> b2 being mirrored by job ``m`` (so both are
busy); job ``j`` is a concluded blockdev-create job, kept until dismissed.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def _cases(tmp: str) -> list[tuple[str, dict]]:
    J = {"job-id": "j"}
    full = {**J, "sync": "full"}
    return [
        # blockdev-mirror: qmp_blockdev_mirror, blockdev_mirror_common,
        # mirror_start, mirror_start_job, then job_create
        ("blockdev-mirror", {**full, "device": "n1", "target": "n1"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n1", "granularity": 1000}),
        ("blockdev-mirror", {**full, "device": "b1", "target": "n2", "granularity": 3}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "b2"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "b1"}),
        ("blockdev-mirror", {**full, "device": "b1", "target": "b1"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "buf-size": -1}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "speed": -1}),
        ("blockdev-mirror", {**full, "job-id": "bad id", "device": "n1", "target": "n1"}),
        ("blockdev-mirror", {**full, "job-id": "bad id", "device": "n1", "target": "n2",
                             "speed": -1}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "filter-node-name": "n3"}),
        ("blockdev-mirror", {**full, "device": "nope", "target": "nope2"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "nope2"}),
        ("blockdev-mirror", {**full, "device": "base-f", "target": "n2"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "replaces": "nope"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "replaces": "n3"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n2", "replaces": "b2"}),
        ("blockdev-mirror", {**full, "device": "top", "target": "n2", "replaces": "top-f"}),
        ("blockdev-mirror", {**full, "device": "n1", "target": "n1", "replaces": "n1"}),
        ("blockdev-mirror", {**J, "sync": "bitmap", "device": "n1", "target": "n2"}),
        ("blockdev-mirror", {**J, "sync": "incremental", "device": "n1", "target": "n1"}),
        # drive-mirror: the early busy check, target creation, then as above
        ("drive-mirror", {**full, "device": "b1", "target": f"{tmp}/dm1.img", "format": "raw"}),
        ("drive-mirror", {**full, "device": "n1", "target": f"{tmp}/dm2.img", "format": "raw",
                          "granularity": 3}),
        ("drive-mirror", {**full, "device": "n1", "target": f"{tmp}/dm3.img", "format": "raw"}),
        ("drive-mirror", {**full, "device": "n1", "target": f"{tmp}/dm4.img", "format": "raw",
                          "replaces": "n2"}),
        ("drive-mirror", {**full, "device": "n1", "target": "/nonexistent/dm5.img",
                          "format": "raw"}),
        ("drive-mirror", {**full, "device": "n1", "target": f"{tmp}/dm6.img", "format": "raw",
                          "mode": "existing"}),
        ("drive-mirror", {**full, "device": "n1", "target": f"{tmp}/dm7.img", "format": "raw",
                          "speed": -1}),
        ("drive-mirror", {**full, "device": "base-f", "target": f"{tmp}/dm8.img",
                          "format": "raw"}),
        ("drive-mirror", {**full, "device": "nope", "target": f"{tmp}/dm9.img",
                          "format": "raw"}),
        # blockdev-backup: blockdev_backup_prepare, do_backup_common,
        # backup_job_create, the copy-before-write filter, then job_create
        ("blockdev-backup", {**full, "device": "n1", "target": "n1"}),
        ("blockdev-backup", {**full, "device": "b1", "target": "b1"}),
        ("blockdev-backup", {**full, "device": "b1", "target": "n3"}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n3"}),
        ("blockdev-backup", {**full, "device": "n1", "target": "b2"}),
        ("blockdev-backup", {**J, "sync": "incremental", "device": "n1", "target": "n1"}),
        ("blockdev-backup", {**J, "sync": "incremental", "device": "b1", "target": "n2",
                             "bitmap": "nope"}),
        ("blockdev-backup", {**J, "sync": "bitmap", "device": "n1", "target": "n1",
                             "bitmap": "nope", "bitmap-mode": "never"}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n1", "bitmap-mode": "never"}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n2", "speed": -1}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n2",
                             "x-perf": {"max-workers": 0}}),
        ("blockdev-backup", {**full, "device": "b1", "target": "n2",
                             "x-perf": {"max-workers": 0}}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n2", "filter-node-name": "n3"}),
        ("blockdev-backup", {**full, "device": "n1", "target": "n2",
                             "filter-node-name": "bad name"}),
        ("blockdev-backup", {**full, "device": "b1", "target": "n2", "compress": True}),
        ("blockdev-backup", {**full, "device": "nope", "target": "nope2"}),
        ("blockdev-backup", {**J, "sync": "bitmap", "device": "n1", "target": "nope2"}),
        # drive-backup: drive_backup_prepare, target creation, do_backup_common
        ("drive-backup", {**full, "device": "b1", "target": f"{tmp}/db1.img", "format": "raw"}),
        ("drive-backup", {**full, "device": "n1", "target": f"{tmp}/db2.img", "format": "raw"}),
        ("drive-backup", {**J, "sync": "incremental", "device": "n1",
                          "target": f"{tmp}/db3.img", "format": "raw"}),
        ("drive-backup", {**full, "device": "n1", "target": "/nonexistent/db4.img",
                          "format": "raw"}),
        ("drive-backup", {**full, "device": "n1", "target": f"{tmp}/db5.img", "format": "raw",
                          "mode": "existing"}),
        ("drive-backup", {**full, "device": "nope", "target": f"{tmp}/db6.img",
                          "format": "raw"}),
        ("drive-backup", {**full, "device": "n1", "target": f"{tmp}/db7.img", "format": "raw",
                          "speed": -1}),
        # block-stream: qmp_block_stream, stream_start, then job_create
        ("block-stream", {**J, "device": "top", "base": "nope", "base-node": "base"}),
        ("block-stream", {**J, "device": "top", "bottom": "mid", "base-node": "base"}),
        ("block-stream", {**J, "device": "top", "base-node": "n1"}),
        ("block-stream", {**J, "device": "top", "base-node": "top"}),
        ("block-stream", {**J, "device": "top", "bottom": "n1"}),
        ("block-stream", {**J, "device": "top"}),
        ("block-stream", {**J, "device": "top", "backing-file": "x"}),
        ("block-stream", {**J, "device": "top", "filter-node-name": "n1"}),
        ("block-stream", {**J, "device": "b1", "backing-file": "x"}),
        ("block-stream", {**J, "device": "nope"}),
        ("block-stream", {**J, "device": "nope", "base": "x", "base-node": "base"}),
        ("block-stream", {**J, "device": "top", "speed": -1}),
        ("block-stream", {"job-id": "k", "device": "top", "speed": -1}),
        # block-commit: qmp_block_commit, commit_start / commit_active_start
        ("block-commit", {**J, "device": "nope"}),
        ("block-commit", {**J, "device": "mid"}),
        ("block-commit", {**J, "device": "top", "top-node": "mid", "top": "x"}),
        ("block-commit", {**J, "device": "top", "base-node": "base", "base": "x"}),
        ("block-commit", {**J, "device": "top", "top-node": "top", "base-node": "top"}),
        ("block-commit", {**J, "device": "top", "base-node": "n1"}),
        ("block-commit", {**J, "device": "top", "top-node": "n1"}),
        ("block-commit", {**J, "device": "top", "top-node": "mid"}),
        ("block-commit", {**J, "device": "top"}),
        ("block-commit", {**J, "device": "top", "speed": -1}),
        ("block-commit", {**J, "device": "top", "backing-file": "x"}),
        ("block-commit", {**J, "device": "top", "top-node": "mid", "filter-node-name": "n1"}),
        ("block-commit", {**J, "device": "top", "filter-node-name": "n1"}),
        ("block-commit", {**J, "device": "b1"}),
        ("block-commit", {**J, "device": "n1"}),
        ("block-commit", {"job-id": "k", "device": "top", "top-node": "mid", "speed": -1}),
        ("block-commit", {"job-id": "k", "device": "top", "speed": -1}),
        ("blockdev-mirror", {"job-id": "k", "sync": "full", "device": "n1", "target": "n2",
                             "speed": -1}),
        ("blockdev-backup", {"job-id": "k", "sync": "full", "device": "n1", "target": "n2",
                             "speed": -1}),
    ]


def _setup(tmp) -> list[str]:
    args = []
    prev = None
    for name in ("base", "mid", "top"):
        img = tmp / f"{name}.qcow2"
        if not img.exists():
            extra = ["-b", str(tmp / f"{prev}.qcow2"), "-F", "qcow2"] if prev else []
            qemu_img("create", "-q", "-f", "qcow2", *extra, str(img), "1M")
        args += ["--blockdev", f"driver=file,node-name={name}-f,filename={img}",
                 "--blockdev", f"driver=qcow2,node-name={name},file={name}-f"
                 + (f",backing={prev}" if prev else "")]
        prev = name
    for name, size in (("n1", MiB), ("n2", MiB), ("n3", 2 * MiB), ("b1", MiB), ("b2", MiB)):
        args += ["--blockdev", f"driver=null-co,node-name={name},size={size},read-zeroes=on"]
    return args


def _answers(daemon_factory, kind, tmp) -> list:
    d = daemon_factory(kind, _setup(tmp), allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
    q = d.qmp()
    q.cmd("blockdev-create", **{"job-id": "j", "options": {
        "driver": "file", "filename": str(tmp / f"j-{kind}.img"), "size": 0}})
    q.cmd("blockdev-mirror", **{"job-id": "m", "device": "b1", "target": "b2", "sync": "full"})
    seen = set()
    while seen != {"j", "m"}:
        ev = q.pull_event(wait=30)
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "concluded":
            seen.add(ev["data"]["id"])
        elif ev["event"] == "BLOCK_JOB_READY":  # after its JOB_STATUS_CHANGE
            seen.add(ev["data"]["device"])
    q.clear_events()
    out = []
    for i, (name, args) in enumerate(_cases(str(tmp / kind))):
        r = q.cmd_raw(name, args)
        # events come before the reply: QEMU drains all nodes for a
        # transaction (jobs pause and resume), and a job that fails after
        # job_create shows as created, then null
        events = [(e["event"], e["data"]) for e in q.get_events()]
        # the only difference: each daemon's own directory for new images
        answer = json.loads(json.dumps(r.get("error", r)).replace(str(tmp / kind), "T"))
        out.append((i, name, answer, events))
        if "error" not in r:  # a case that started a job spoils the rest
            break
    jobs = sorted((j["id"], j["status"]) for j in q.cmd("query-jobs"))
    nodes = sorted(n["node-name"] for n in q.cmd("query-named-block-nodes")
                   if not n["node-name"].startswith("#"))
    d.stop()  # the images are shared with the next daemon
    return out + [("jobs", jobs), ("nodes", nodes)]


def test_first_error_of_job_commands(daemon_factory, tmp_path):
    (tmp_path / "qemu").mkdir()
    (tmp_path / "trio").mkdir()
    theirs = _answers(daemon_factory, "qemu", tmp_path)
    ours = _answers(daemon_factory, "trio", tmp_path)
    cases = _cases("T")
    diffs = [(t, o) for t, o in zip(theirs, ours, strict=False) if t != o]
    assert not diffs, "\n".join(
        f"{cases[t[0]] if isinstance(t[0], int) else ''}\n  qemu: {t[1:]}\n  ours: {o[1:]}"
        for t, o in diffs)
    assert len(ours) == len(theirs) == len(_cases("")) + 2
