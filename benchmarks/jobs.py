"""Block job throughput, qsd-trio beside qemu-storage-daemon in the same run.

    .venv/bin/python benchmarks/jobs.py [--size 1024] [--rounds 2]
                                        [--only tmpfs,raw,mirror,...]

mirror (sync=full to READY, then complete), backup (sync=full), stream and
commit of a fully allocated image of ``--size`` MiB (default 1 GiB, random
data; qcow2 made with qemu-img convert), for a raw and a qcow2 image, on each
place of common.PLACES that has job rows (tmpfs, a disk file in the page
cache, the same file cold, the same file with cache.direct=on and
aio=io_uring).  The job's source and target live on that place and every file
node, source and target, gets the place's cache.direct and aio.

- mirror, backup: source ``src.FMT`` (data) to a new empty ``tgt.FMT``;
- stream: a new empty qcow2 top over ``src.FMT`` as its backing node;
- commit: active commit of a qcow2 top holding the data (``src.qcow2``) into a
  new empty base ``base.FMT`` (READY, then complete).

Each figure is MiB/s from the QMP command to BLOCK_JOB_COMPLETED, with a
daemon started for each job run; the daemons alternate (A B A B).  The CPU
columns are the daemon's CPU (utime + stime) over the same span, in µs per
MiB copied.  On the
cached place the sources are read into the page cache before each run, on the
cold place they are evicted from it.  Timing belongs here, never in a test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

JOBS = ("mirror", "backup", "stream", "commit")
TARGET = 1.0


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def empty_image(path: str, fmt: str, size: int) -> None:
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))


def wait(qmp: QEMUMonitorProtocol, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {name} within {timeout:.0f} s")
        ev = qmp.pull_event(wait=left)
        if ev and ev["event"] == name:
            return ev


def run_job(kind: str, place: b.Place, fmt: str, job: str, ws: b.Workspace, size_mib: int,
            timeout: float) -> tuple[float, float]:
    """MiB/s of one job run in a fresh daemon, and its CPU µs per MiB."""
    size = size_mib * b.MiB
    src = ws.image(place.root, fmt, size_mib, "src")
    d = os.path.join(ws.dir(place.root), f"{kind}-{job}")
    shutil.rmtree(d, ignore_errors=True)
    os.mkdir(d)
    sock = os.path.join(d, "qmp.sock")
    args = ["--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    if job in ("mirror", "backup"):
        tgt = os.path.join(d, f"tgt.{fmt}")
        empty_image(tgt, fmt, size)
        sources = [src]
        args += ["--blockdev", b.node(fmt, src, place, "src"),
                 "--blockdev", b.node(fmt, tgt, place, "tgt")]
    elif job == "stream":
        top = os.path.join(d, "top.qcow2")
        empty_image(top, "qcow2", size)
        sources = [src]
        args += ["--blockdev", b.node(fmt, src, place, "base", "read-only=on"),
                 "--blockdev", b.node("qcow2", top, place, "top", "backing=base")]
    else:
        top = ws.image(place.root, "qcow2", size_mib, "src")
        base = os.path.join(d, f"base.{fmt}")
        empty_image(base, fmt, size)
        sources = [top]
        args += ["--blockdev", b.node(fmt, base, place, "base"),
                 "--blockdev", b.node("qcow2", top, place, "top", "backing=base")]
    if place.warm:
        b.warm(*sources)
    b.prepare(place, sources, True)
    daemon = b.Started(kind, args, d)
    try:
        qmp = QEMUMonitorProtocol(sock)
        qmp.connect()
        qmp.settimeout(timeout)

        def cmd(name: str, arguments: dict) -> None:
            r = qmp.cmd_raw(name, arguments)
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error'].get('desc')}")

        t0, cpu0 = time.perf_counter(), b.cpu_seconds(daemon.pid)
        if job == "mirror":
            cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                    "sync": "full"})
            wait(qmp, "BLOCK_JOB_READY", timeout)
            cmd("job-complete", {"id": "j"})
        elif job == "backup":
            cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                    "sync": "full"})
        elif job == "stream":
            cmd("block-stream", {"job-id": "j", "device": "top"})
        else:
            # the top is the active layer: an active commit, READY then complete
            cmd("block-commit", {"job-id": "j", "device": "top", "base-node": "base"})
            wait(qmp, "BLOCK_JOB_READY", timeout)
            cmd("job-complete", {"id": "j"})
        ev = wait(qmp, "BLOCK_JOB_COMPLETED", timeout)
        dt = time.perf_counter() - t0
        cpu = b.cpu_seconds(daemon.pid) - cpu0
        if "error" in ev.get("data", {}):
            raise RuntimeError(f"{job}: {ev['data']['error']}")
        qmp.close()
    finally:
        daemon.stop()
        shutil.rmtree(d, ignore_errors=True)  # unlinked before write-back: no disk time later
    return size_mib / dt, cpu * 1e6 / size_mib


def main() -> None:
    ap = b.arguments(__doc__, runtime=False)
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per job run")
    opts = ap.parse_args()
    sel = b.Selection.parse(opts.only)
    ws = b.Workspace("qsd-bench-jobs-")
    rows: list[b.Row] = []
    try:
        for place in b.PLACES:
            if not sel.place(place, "jobs"):
                continue
            for fmt in b.FORMATS:
                for job in JOBS:
                    if not (sel.fmt(fmt) and sel.workload(job)):
                        continue
                    r = b.Row(place.key, f"{fmt} {job} ({opts.size} MiB)", "MiB/s", TARGET)
                    rows.append(r)

                    def one(kind: str, place=place, fmt=fmt, job=job, r=r) -> float:
                        try:
                            mibs, cpu = run_job(kind, place, fmt, job, ws, opts.size,
                                                opts.timeout)
                        except Exception as e:  # the row shows it; the run goes on
                            r.fail(kind, e)
                            return 0.0
                        r.add(kind, mibs, cpu)
                        b.log(f"jobs {place.key} {fmt} {kind:4} {job:7} {mibs:8.1f} MiB/s "
                              f"{cpu:8.0f} µs CPU/MiB")
                        return mibs

                    b.alternate(one, opts.rounds)
    finally:
        ws.cleanup()
    b.finish(rows, opts, f"Block jobs on {b.machine()}; {opts.size} MiB fully allocated "
                         f"images; {opts.rounds} rounds (A,B,A,B), medians; MiB/s from the "
                         f"command to BLOCK_JOB_COMPLETED; CPU columns in µs per MiB")


if __name__ == "__main__":
    main()
