"""driver=rbd, qsd-trio beside qemu-storage-daemon, through an NBD export.

A throwaway one-node Ceph cluster (tests/ceph/start.sh: one mon, one OSD on
memstore, pool ``rbd`` of size 1), or the one ``--conf`` names.  For each
daemon in turn (A, B, A, B) a fresh image of ``--size`` MiB is created, the
daemon opens it with driver=rbd and exports it over NBD on a unix socket,
and fio (--ioengine=nbd) runs 1 MiB sequential writes and reads at QD8 and
4 KiB random writes and reads at QD16, the issue's workloads.  Each row
gives MiB/s or IOPS, the ratio qsd-trio/qemu and the daemon's CPU time per
request (utime + stime); the cluster's own CPU is not counted.  A second
table splits that CPU: the daemon's main thread (qsd-trio's event loop,
QEMU's main loop, where each daemon's own code runs and calls librbd) and
the rest (librbd's threads, the same library in both).

    .venv/bin/python benchmarks/rbd.py [--size 256] [--rounds 2] [--runtime 5]
                                       [--conf CEPH_CONF] [--only write,read,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402

# id, label, fio rw, block size, iodepth
WORKLOADS = [
    ("write-1m", "1M seq write QD8", "write", "1M", 8),
    ("read-1m", "1M seq read QD8", "read", "1M", 8),
    ("randwrite-4k", "4k randwrite QD16", "randwrite", "4k", 16),
    ("randread-4k", "4k randread QD16", "randread", "4k", 16),
]
START = b.ROOT / "tests" / "ceph" / "start.sh"
STOP = b.ROOT / "tests" / "ceph" / "stop.sh"


def rbd(conf: str, *args: str) -> None:
    subprocess.run(["rbd", "-c", conf, *args], check=True, capture_output=True)


def main_thread_seconds(pid: int) -> float:
    """utime + stime of the process's main thread (its tid is the pid)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def fio_rows(kind: str, pid: int, target: list[str], work: list, rows: dict[str, b.Row],
             main_cpu: dict[tuple[str, str], list[float]], runtime: float) -> None:
    """fio for each workload against ``target``: the row's figure and CPU
    per request, and the main thread's CPU per request in ``main_cpu``."""
    for wid, _label, rw, bs, depth in work:
        m0, c0 = main_thread_seconds(pid), b.cpu_seconds(pid)
        try:
            res = b.fio(target, pid, rw, bs, depth, runtime)
        except Exception as e:  # the row shows it; the run goes on
            rows[wid].fail(kind, e)
            continue
        m1, c1 = main_thread_seconds(pid), b.cpu_seconds(pid)
        # requests fio completed, from the CPU per request fio() worked out
        ios = (c1 - c0) * 1e6 / res.cpu_us if res.cpu_us else 0.0
        main = (m1 - m0) * 1e6 / ios if ios else 0.0
        rows[wid].add(kind, res.figure, res.cpu_us)
        main_cpu.setdefault((wid, kind), []).append(main)
        b.log(f"rbd {kind:4} {wid:22} {res.figure:10.1f} {rows[wid].unit:5} "
              f"{res.cpu_us:7.1f} µs/req (main thread {main:6.1f})")


def run(kind: str, conf: str, size: int, work: list, rows: dict[str, b.Row],
        main_cpu: dict[tuple[str, str], list[float]], runtime: float, d: str, n: int) -> None:
    image = f"bench-{kind}-{n}"
    rbd(conf, "create", f"rbd/{image}", "--size", f"{size}M")
    sock = os.path.join(d, f"{kind}-{n}.sock")
    daemon = b.Started(kind, [
        "--blockdev", f"driver=rbd,node-name=r,pool=rbd,image={image},conf={conf}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=r,name=disk,writable=on"], d)
    try:
        # writes first (WORKLOADS' order), so that the reads read written objects
        target = ["--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}", f"--size={size}M"]
        fio_rows(kind, daemon.pid, target, work, rows, main_cpu, runtime)
    finally:
        daemon.stop()
        rbd(conf, "rm", f"rbd/{image}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="workloads: write-1m, read-1m, randwrite-4k, randread-4k "
                                   "(or a prefix)")
    ap.add_argument("--rounds", type=int, default=2, help="A,B pairs (default 2)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio run (default 5)")
    ap.add_argument("--size", type=int, default=256, help="image size in MiB (default 256)")
    ap.add_argument("--conf", help="an existing cluster's ceph.conf (default: start one)")
    ap.add_argument("--json", help="also write the rows to this file")
    opts = ap.parse_args()
    for tool in ("fio", "rbd", "qemu-storage-daemon", "ceph-mon", "ceph-osd"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    words = [w for w in (opts.only or "").split(",") if w]
    work = [w for w in WORKLOADS if not words or any(w[0].startswith(x) for x in words)]
    d = tempfile.mkdtemp(prefix="qsd-bench-rbd-")
    cluster = None
    if opts.conf:
        conf = opts.conf
    else:
        cluster = os.path.join(d, "ceph")
        subprocess.run([str(START), cluster], check=True, stdout=subprocess.DEVNULL)
        conf = os.path.join(cluster, "ceph.conf")
    rows = {wid: b.Row("rbd", f"rbd {label} (CPU µs/req)",
                       "IOPS" if bs == "4k" else "MiB/s", 0.9)
            for wid, label, _rw, bs, _depth in work}
    main_cpu: dict[tuple[str, str], list[float]] = {}
    try:
        count = iter(range(1 << 30))

        def one(kind: str) -> float:
            run(kind, conf, opts.size, work, rows, main_cpu, opts.runtime, d, next(count))
            return 0.0

        b.alternate(one, opts.rounds)
    finally:
        if cluster is not None:
            subprocess.run([str(STOP), cluster], check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)
    print(f"driver=rbd through an NBD export (fio --ioengine=nbd, unix socket) on "
          f"{b.machine()}; one-node memstore cluster; {opts.size} MiB images, fresh per "
          f"daemon run; fio {opts.runtime:g} s per run; {opts.rounds} rounds (A,B,A,B), "
          f"medians; load average {os.getloadavg()[0]:.1f} at the end\n")
    # the rows' place is not one of common.PLACES, so render() would skip them
    print(b.TABLE_HEAD)
    for row in rows.values():
        print(b.render_row(row)[0])
    print("\n| workload | CPU µs/req qemu: main thread | rest | "
          "qsd-trio: main thread | rest |\n|---|---:|---:|---:|---:|")
    for wid, row in rows.items():
        cells = []
        for kind in b.KINDS:
            main = main_cpu.get((wid, kind))
            total = getattr(row, f"cpu_{kind}")
            if main and total:
                m = statistics.median(main)
                cells += [f"{m:.1f}", f"{statistics.median(total) - m:.1f}"]
            else:
                cells += ["", ""]
        print(f"| {row.label} | " + " | ".join(cells) + " |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([r.__dict__ for r in rows.values()], f, indent=1)


if __name__ == "__main__":
    main()
