"""FUSE export throughput, qsd-trio beside qemu-storage-daemon 7.2.

fio through the mounted export (``type=fuse``, writable) of a raw image and
a fully allocated qcow2, on each place of common.PLACES that has FUSE rows
(tmpfs, a disk file in the page cache, the same file cold, the same file
with cache.direct=on and aio=io_uring), both daemons opening it with the same
options: 4 KiB random read (psync, one request at a time) and 1 MiB
sequential read and write (reads only on the cold place).  fio opens the
mount with O_DIRECT, so every request reaches the daemon instead of the
kernel's page cache for the mount (both daemons accept it).

Per place and format, each daemon is started once per round and runs every
workload (A, B, A, B).  The CPU columns are the daemon's utime + stime per
fio request (the kernel may split a 1 MiB request into several FUSE
requests).

    .venv/bin/python benchmarks/fuse.py [--runtime 3] [--rounds 2] [--size 512]
                                        [--only tmpfs,qcow2,fuse-randread,...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402

# id, label, fio rw, block size
WORKLOADS = [
    ("fuse-randread", "4k randread (psync)", "randread", "4k"),
    ("fuse-read-1m", "1M seq read (psync)", "read", "1M"),
    ("fuse-write-1m", "1M seq write (psync)", "write", "1M"),
]


def target(place: b.Place, bs: str) -> float | None:
    if bs == "1M" or place.direct:
        return 1.0
    if place.key == "tmpfs":
        return 0.8
    return None


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def start(kind: str, fmt: str, image: str, place: b.Place, mp: str, workdir: str) -> b.Started:
    size = os.path.getsize(image) if fmt == "raw" else None
    s = b.Started(kind, ["--blockdev", b.node(fmt, image, place, "disk"), "--export",
                         f"type=fuse,id=e,node-name=disk,mountpoint={mp},writable=on"], workdir)
    deadline = time.monotonic() + 30
    while not (is_mounted(mp) and os.path.getsize(mp) and (size is None
                                                          or os.path.getsize(mp) == size)):
        if s.proc.poll() is not None or time.monotonic() > deadline:
            stop(s, mp)
            raise RuntimeError(f"{kind} did not mount {mp}")
        time.sleep(0.01)
    return s


def stop(s: b.Started, mp: str) -> None:
    s.stop()
    if is_mounted(mp):
        subprocess.run(["umount", "-l", mp], check=False)


def main() -> None:
    ap = b.arguments(__doc__)
    ap.add_argument("--size", type=int, default=512, help="image size in MiB (default 512)")
    opts = ap.parse_args()
    sel = b.Selection.parse(opts.only)
    if shutil.which("fio") is None or shutil.which("qemu-storage-daemon") is None:
        sys.exit("needs fio and qemu-storage-daemon")
    ws = b.Workspace("qsd-bench-fuse-")
    mnt = tempfile.mkdtemp(prefix="qsd-bench-fuse-mnt-")
    rows: list[b.Row] = []
    try:
        for place in b.PLACES:
            if not sel.place(place, "fuse"):
                continue
            for fmt in b.FORMATS:
                work = [w for w in WORKLOADS if sel.workload(w[0]) and sel.fmt(fmt)
                        and not (place.cold and "write" in w[2])]
                if not work:
                    continue
                image = ws.image(place.root, fmt, opts.size)
                mine = {w[0]: b.Row(place.key, f"{fmt} FUSE {w[1]}",
                                    "IOPS" if w[3] == "4k" else "MiB/s", target(place, w[3]))
                        for w in work}
                rows.extend(mine.values())

                def one_round(kind: str, place=place, fmt=fmt, image=image, work=work,
                              mine=mine) -> float:
                    mp = os.path.join(mnt, f"mp-{kind}")
                    open(mp, "wb").close()
                    if place.warm:
                        b.warm(image)
                    try:
                        s = start(kind, fmt, image, place, mp, mnt)
                    except Exception as e:  # the rows show it; the run goes on
                        for r in mine.values():
                            r.fail(kind, e)
                        return 0.0
                    try:
                        for wid, _label, rw, bs in work:
                            b.prepare(place, [image], "read" in rw)
                            try:
                                res = b.fio([f"--filename={mp}", "--ioengine=psync",
                                             "--direct=1"], s.pid, rw, bs, 1, opts.runtime,
                                            time_based=not place.cold)
                            except Exception as e:  # the row shows it; the run goes on
                                mine[wid].fail(kind, e)
                                continue
                            mine[wid].add(kind, res.figure, res.cpu_us)
                            b.log(f"fuse {place.key} {fmt} {kind:4} {wid:15} "
                                  f"{res.figure:10.1f} {mine[wid].unit:5} "
                                  f"{res.cpu_us:6.1f} µs/req")
                    finally:
                        stop(s, mp)
                    return 0.0

                b.alternate(one_round, opts.rounds)
    finally:
        ws.cleanup()
        shutil.rmtree(mnt, ignore_errors=True)
    b.finish(rows, opts, f"FUSE export (fio psync, O_DIRECT on the mount) on {b.machine()}; "
                         f"{opts.size} MiB images; fio {opts.runtime:g} s per run, "
                         f"{opts.rounds} rounds (A,B,A,B), medians")


if __name__ == "__main__":
    main()
