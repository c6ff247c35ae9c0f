"""vhost-user-blk side by side, measured by a real guest.

    .venv/bin/python benchmarks/vhost_user.py [--runtime S] [--rounds N] [--json FILE]
        [--format raw|qcow2] [--place cached|tmpfs|direct] [--layout huge,scattered,any]
        [--only WORD,...] [--strace DIR]

One QEMU guest of tests/guest (TCG, 2 vCPUs, the host's / as its root, so
it runs the host's fio) hot-plugs a vhost-user-blk-pci device on the
export of qemu-storage-daemon or qsd-trio, both serving the same raw image
of random data, and runs fio on the disk with O_DIRECT and libaio: 4 KiB random reads and
writes at queue depth 16, 1 MiB sequential reads and writes at queue depth
4. The daemons alternate (A, B, A, B) for each workload; ratios are
qsd-trio/qemu-storage-daemon of the medians. CPU µs/req is the daemon's
utime+stime (/proc/PID/stat) over the fio run divided by the requests fio
completed. Under TCG the guest's own CPU is a large part of every request,
so the ratios understate a difference that a KVM guest would show.

``--place`` is where the image lives and how both daemons open it, one of
common.PLACES: ``cached`` (the default: a disk file in the page cache,
``aio=threads``), ``tmpfs`` (/dev/shm) or ``direct`` (a disk file with
``cache.direct=on,aio=io_uring``: every request waits for the device).
``--layout`` is where fio's 1 MiB buffers lie in guest memory, which
decides how many pieces each request arrives in, and so what both the
guest and the daemon spend per request (one row per layout; 4 KiB buffers
are one page whatever the layout):

* ``huge``: in 2 MiB huge pages (hugetlbfs, ``--iomem=mmaphuge``): each
  request is one run of guest memory, 16 descriptors of 64 KiB (the guest
  block layer's max_segment_size);
* ``scattered``: in a tmpfs file whose pages were allocated alternately
  with another file's, created once per boot and kept between runs
  (``--iomem=mmapshared``): no two pages of a buffer are neighbours, so
  the guest's block layer cuts each 1 MiB request into three, two of
  them of 126 descriptors (seg_max), one page each;
* ``any``: as fio allocates them (malloc).  That is what the benchmark
  measured until 2026-12-08, and it is why its 1 MiB rows were so
  unsteady: a run's four buffers came in anything from 1 to 126 pieces
  (perf trace of the preadv calls), changing from one fio run to the
  next as the guest's memory fragments, and each daemon's run got its
  own; the guest's CPU per request moved with it (193 to 556 µs under
  TCG), and with 126 pieces qsd-trio's Python per request does too.

``--format qcow2`` serves the same data as a qcow2 image (converted by
qemu-img: every cluster allocated).  ``--only`` keeps the workloads whose
label holds every word.  ``--strace DIR`` attaches ``strace -c -f`` to every
thread of the daemon for each fio run and writes its summary to DIR (the
syscalls per request of each daemon; strace slows the daemon down, so the
throughput and CPU figures of such a run are not comparable to others).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import common as b  # noqa: E402

from tests.guest.machine import Guest  # noqa: E402
from tests.guest.workload import find_disk  # noqa: E402

SIZE = 256 * b.MiB
# label, fio rw, block size, queue depth, target ratio
WORKLOADS = [
    ("4k randread QD16", "randread", "4k", 16, 0.7),
    ("4k randwrite QD16", "randwrite", "4k", 16, 0.7),
    ("1m read QD4", "read", "1m", 4, 0.9),
    ("1m write QD4", "write", "1m", 4, 0.9),
]
LAYOUTS = ("huge", "scattered", "any")
# Set up once per boot (see --layout in the module's docstring).  The
# scattered buffer file has a second name that fio does not unlink, so
# its pages, and where they lie, stay the same for every run.
LAYOUT_SETUP = """
echo 16 > /proc/sys/vm/nr_hugepages
mkdir -p /run/qsd-huge
mountpoint -q /run/qsd-huge || mount -t hugetlbfs none /run/qsd-huge || exit 92
python3 -c '
import os
keep = os.open("/dev/shm/qsd-scattered", os.O_CREAT | os.O_WRONLY, 0o600)
other = os.open("/dev/shm/qsd-other", os.O_CREAT | os.O_WRONLY, 0o600)
page = b"x" * 4096
for _ in range(2048):  # 8 MiB each, every other page allocated to the other file
    os.write(keep, page)
    os.write(other, page)
' || exit 93
"""


def iomem(layout: str) -> tuple[str, str]:
    """Bash to run before fio, and fio's option, for a buffer ``layout``."""
    if layout == "huge":
        return "", "--iomem=mmaphuge:/run/qsd-huge/fio "
    if layout == "scattered":
        return ("ln -f /dev/shm/qsd-scattered /dev/shm/qsd-fio || exit 94\n",
                "--iomem=mmapshared:/dev/shm/qsd-fio ")
    return "", ""


def attach_strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """``strace -c -f`` on every thread of ``pid`` (threads started later
    are followed), its summary to ``out`` once it is interrupted."""
    tids = sorted(os.listdir(f"/proc/{pid}/task"))
    args = ["strace", "-c", "-f", "-q", "-o", str(out)]
    for t in tids:
        args += ["-p", t]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    return proc


def run_fio(guest: Guest, daemon: b.Started, sock: Path, work: Path, rw: str, bs: str,
            depth: int, runtime: float, strace: Path | None = None,
            layout: str = "any") -> b.FioResult:
    """One fio run in the guest on a freshly plugged disk, its buffers laid
    out as ``layout`` says; the daemon's CPU time is read around the guest
    script only."""
    disk = guest.attach_vhost_user_blk(sock, num_queues=1)
    tracer = None
    try:
        out = work / f"fio-{rw}-{bs}.json"
        before, option = iomem(layout)
        script = find_disk(disk.sysfs) + before + (
            f"fio --name=bench --filename=$DEV --ioengine=libaio --direct=1 --rw={rw} "
            f"--bs={bs} --iodepth={depth} --runtime={runtime:g} --time_based {option}"
            f"--size={SIZE} --output-format=json --output={out} || exit 90\n")
        if strace is not None:
            tracer = attach_strace(daemon.pid, strace)
        c0 = b.cpu_seconds(daemon.pid)
        guest.run(script, timeout=runtime + 180).check()
        c1 = b.cpu_seconds(daemon.pid)
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
        guest.detach(disk)
    text = out.read_text()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    figure = side["iops"] if bs == "4k" else side["bw"] / 1024
    return b.FioResult(figure, (c1 - c0) * 1e6 / ios if ios else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=float, default=5, help="seconds per fio run")
    ap.add_argument("--rounds", type=int, default=2, help="A,B pairs")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--format", choices=["raw", "qcow2"], default="raw",
                    help="the image's format")
    ap.add_argument("--place", choices=["cached", "tmpfs", "direct"], default="cached",
                    help="where the image lives and how it is opened (common.PLACES)")
    ap.add_argument("--layout", default="huge,scattered",
                    help="comma-separated layouts of fio's 1 MiB buffers in guest memory, "
                    "a row each: " + ", ".join(LAYOUTS))
    ap.add_argument("--only", default="", help="comma-separated words a workload's label "
                    "must hold (e.g. 1m,write)")
    ap.add_argument("--strace", help="a directory for strace -c summaries of each run")
    opts = ap.parse_args()
    only = [w for w in opts.only.split(",") if w]
    layouts = [x for x in opts.layout.split(",") if x]
    if not layouts or any(x not in LAYOUTS for x in layouts):
        ap.error(f"--layout: a comma-separated list of {', '.join(LAYOUTS)}")
    # (label, rw, bs, depth, target, layout): a 1 MiB row per layout
    workloads = [(f"{label} {x}" if bs != "4k" else label, rw, bs, depth, target,
                  x if bs != "4k" else "any")
                 for label, rw, bs, depth, target in WORKLOADS
                 for x in (layouts if bs != "4k" else ["any"])]
    workloads = [w for w in workloads if all(x in w[0] for x in only)]
    fmt = opts.format
    place = b.PLACE_BY_KEY[opts.place]
    file_opts = "".join(f",{k}={v}" for k, v in place.file_options().items())
    rows = [b.Row(None, f"{opts.place} {fmt} vhost-user-blk {label}", "IOPS" if bs == "4k" else "MiB/s",
                  target) for label, _, bs, _, target, _ in workloads]
    t0 = time.monotonic()
    guest = Guest()
    where = "/dev/shm" if place.root == "shm" else b.disk_dir()
    with tempfile.TemporaryDirectory(prefix="qsd-bench-vu-", dir=where) as tmp:
        img = Path(tmp) / f"disk.{fmt}"
        with open(img, "wb") as f:
            for _ in range(SIZE // b.MiB):
                f.write(os.urandom(b.MiB))
        if fmt != "raw":
            subprocess.run(["qemu-img", "convert", "-O", fmt, str(img), f"{img}.tmp"],
                           check=True)
            os.replace(f"{img}.tmp", img)
        try:
            guest.boot()
            guest.run(LAYOUT_SETUP, timeout=120).check()
            with guest.scratch() as work:
                for row, (_, rw, bs, depth, _, layout) in zip(rows, workloads, strict=True):
                    b.log(f"== {row.label}")
                    for rnd in range(opts.rounds):
                        for kind in b.KINDS:
                            sock = Path(tmp) / f"{kind}.sock"
                            d = b.Started(kind, [
                                "--blockdev", f"driver=file,node-name=file0,filename={img}"
                                              f"{file_opts}",
                                "--blockdev", f"driver={fmt},node-name=disk0,file=file0",
                                "--export", f"type=vhost-user-blk,id=vu0,node-name=disk0,"
                                            f"addr.type=unix,addr.path={sock},writable=on"],
                                workdir=tmp)
                            try:
                                trace = (Path(opts.strace) / f"{kind}-{rw}-{bs}-{layout}-{rnd}.txt"
                                         if opts.strace else None)
                                r = run_fio(guest, d, sock, work, rw, bs, depth, opts.runtime,
                                            trace, layout)
                                row.add(kind, r.figure, r.cpu_us)
                                b.log(f"  {kind}: {r.figure:.1f} {row.unit}, "
                                      f"{r.cpu_us:.1f} µs CPU/req")
                            except Exception as e:  # noqa: BLE001 - the row says it failed
                                row.fail(kind, e)
                                b.log(f"  {kind} failed: {e}\n  its stderr: {d.errors()}")
                            finally:
                                d.stop()
        finally:
            guest.close()
    print(f"vhost-user-blk in a TCG guest ({(time.monotonic() - t0) / 60:.0f} minutes, "
          f"{b.machine()}; fio {opts.runtime:g} s per run, medians of {opts.rounds} rounds)\n")
    print(b.TABLE_HEAD)
    for row in rows:
        print(b.render_row(row)[0])
    if opts.json:
        Path(opts.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
