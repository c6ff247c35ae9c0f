"""Image formats over NBD, qsd-trio beside qemu-storage-daemon (issue 17).

For each format in :data:`FORMATS` an image of random data (``--size`` MiB,
1 GiB by default) is made once with ``qemu-img convert`` from a raw file,
then each daemon in turn (A, B, A, B) exports it over NBD on a unix socket
and fio --ioengine=nbd runs 1 MiB sequential reads at QD8 and 4 KiB random
reads at QD1 and QD32.  Rows give the medians, the ratio qsd-trio/qemu and
each daemon's CPU time per request (utime + stime from /proc/PID/stat around
the measured fio run).  The issue's targets: >= 0.9 for 1 MiB, >= 0.7 for
4 KiB.  The load average is printed with the tables: the machine is shared.

What is measured is each daemon in its steady state, the same way for both:

- before each measured run, the daemon serves the same fio job for
  ``--warmup`` seconds (default 1), unmeasured: its first requests (a
  buffer pool growing, worker threads starting, qsd-trio's export learning
  where the image holds data, which later reads do not ask again) fall
  there, not into a run of a second or less;
- every run then lasts ``--runtime`` seconds (default 3), the 1 MiB reads
  too: they read the image sequentially from its start, again from the
  start when they reach its end (fio --time_based);
- except on the cold place, where each run reads every block at most once
  (a second read would find it in the page cache), from an image evicted
  from the page cache just before it: the 1 MiB run is one whole
  sequential pass, the 4 KiB ones stop after ``--runtime`` seconds.

A format is one :class:`Format` row: how qemu-img makes the image and which
``--blockdev`` opens it; add a row to measure another one.

    .venv/bin/python benchmarks/formats.py [--runtime 3] [--warmup 1] [--rounds 2]
                                           [--size 1024] [--place tmpfs]
                                           [--formats vmdk,vpc-fixed]
                                           [--only read-1m,randread-qd1]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    PLACE_BY_KEY,
    Place,
    Row,
    Selection,
    Started,
    Workspace,
    alternate,
    arguments,
    file_node,
    finish,
    fio,
    log,
    machine,
    prepare,
    warm,
)


@dataclass(frozen=True)
class Format:
    """One image format as both daemons open it."""

    key: str                      # the --formats selector and the row label
    driver: str                   # the format node's driver
    convert: tuple[str, ...]      # qemu-img convert's target options
    ext: str = "img"
    parts: tuple[str, ...] = ()   # the other files' names: the image's stem + each

    def path(self, raw: str) -> str:
        return f"{raw.rsplit('.', 1)[0]}-{self.key}.{self.ext}"

    def files(self, raw: str) -> list[str]:
        """The image's files (warmed or evicted together)."""
        stem, ext = self.path(raw).rsplit(".", 1)
        return [f"{stem}.{ext}"] + [f"{stem}{p}.{ext}" for p in self.parts]

    def make(self, raw: str) -> str:
        """The image converted from ``raw`` beside it (made once)."""
        path = self.path(raw)
        if not os.path.exists(path):
            subprocess.run(["qemu-img", "convert", "-f", "raw", *self.convert, raw, path],
                           check=True)
        return path

    def blockdev(self, path: str, place: Place) -> str:
        return f"driver={self.driver},node-name=disk,{file_node(path, place, 'file.')}"


FORMATS = [
    # the reference: the daemon and NBD without a format's mapping
    Format("raw", "raw", ("-O", "raw"), "img"),
    Format("vmdk", "vmdk", ("-O", "vmdk", "-o", "subformat=monolithicSparse"), "vmdk"),
    Format("vmdk-flat", "vmdk", ("-O", "vmdk", "-o", "subformat=monolithicFlat"), "vmdk",
           ("-flat",)),
    Format("vmdk-stream", "vmdk", ("-O", "vmdk", "-o", "subformat=streamOptimized"), "vmdk"),
    Format("vhdx", "vhdx", ("-O", "vhdx"), "vhdx"),
    Format("vhdx-fixed", "vhdx", ("-O", "vhdx", "-o", "subformat=fixed,block_state_zero=off"),
           "vhdx"),
    Format("vpc", "vpc", ("-O", "vpc", "-o", "subformat=dynamic"), "vhd"),
    Format("vpc-fixed", "vpc", ("-O", "vpc", "-o", "subformat=fixed"), "vhd"),
]
FORMAT_BY_KEY = {f.key: f for f in FORMATS}

# id, label, fio rw, block size, iodepth
WORKLOADS = [
    ("read-1m", "1M seq read QD8", "read", "1M", 8),
    ("randread-qd1", "4k randread QD1", "randread", "4k", 1),
    ("randread-qd32", "4k randread QD32", "randread", "4k", 32),
]
TARGET = {"1M": 0.9, "4k": 0.7}


def daemon_args(fmt: Format, image: str, place: Place, sock: str) -> list[str]:
    return ["--blockdev", fmt.blockdev(image, place),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=disk,name=disk"]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--warmup", type=float, default=1,
                    help="unmeasured seconds of each workload before its run (default 1)")
    ap.add_argument("--place", default="tmpfs", choices=sorted(PLACE_BY_KEY),
                    help="where the images live (common.PLACES; default tmpfs)")
    ap.add_argument("--formats", help="comma-separated keys of FORMATS (default: all): "
                                      + ", ".join(FORMAT_BY_KEY))
    opts = ap.parse_args()
    sel = Selection.parse(opts.only)
    place = PLACE_BY_KEY[opts.place]
    wanted = [FORMAT_BY_KEY[k] for k in opts.formats.split(",")] if opts.formats else FORMATS
    if shutil.which("fio") is None or shutil.which("qemu-storage-daemon") is None:
        sys.exit("needs fio and qemu-storage-daemon")
    ws = Workspace("qsd-bench-formats-")
    socks = tempfile.mkdtemp(prefix="qsd-bench-formats-sock-")
    rows: list[Row] = []
    loads = [load()]
    try:
        raw = ws.image(place.root, "raw", opts.size)
        for fmt in wanted:
            work = [w for w in WORKLOADS if sel.workload(w[0])]
            if not work:
                continue
            image = fmt.make(raw)
            files = fmt.files(raw)
            mine = {w[0]: Row(place.key, f"{fmt.key} NBD {w[1]}",
                              "IOPS" if w[3] == "4k" else "MiB/s", TARGET[w[3]]) for w in work}
            rows.extend(mine.values())

            def one_round(kind: str, fmt=fmt, image=image, files=files, work=work,
                          mine=mine) -> float:
                sock = os.path.join(socks, f"{kind}.sock")
                if place.warm:
                    warm(*files)
                try:
                    s = Started(kind, daemon_args(fmt, image, place, sock), socks)
                except Exception as e:  # the rows show it; the run goes on
                    for r in mine.values():
                        r.fail(kind, e)
                    return 0.0
                try:
                    for wid, _label, rw, bs, depth in work:
                        uri = ["--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}"]
                        try:
                            if opts.warmup > 0:
                                fio(uri, s.pid, rw, bs, depth, opts.warmup)
                            prepare(place, files, True)
                            # cold: one whole pass, each block read once
                            res = fio(uri, s.pid, rw, bs, depth,
                                      600 if place.cold and bs == "1M" else opts.runtime,
                                      time_based=not place.cold)
                        except Exception as e:  # the row shows it; the run goes on
                            mine[wid].fail(kind, e)
                            continue
                        mine[wid].add(kind, res.figure, res.cpu_us)
                        log(f"{fmt.key} {kind:4} {wid:14} {res.figure:10.1f} "
                            f"{mine[wid].unit:5} {res.cpu_us:6.1f} µs/req")
                finally:
                    s.stop()
                return 0.0

            alternate(one_round, opts.rounds)
            loads.append(load())
    finally:
        ws.cleanup()
        shutil.rmtree(socks, ignore_errors=True)
    finish(rows, opts, f"Image formats over NBD (fio --ioengine=nbd, unix socket) on "
                       f"{machine()}; {opts.size} MiB images of random data; "
                       f"{opts.warmup:g} s unmeasured, then {opts.runtime:g} s per run"
                       f"{' (cold: 1 MiB one pass)' if place.cold else ''}; "
                       f"{opts.rounds} rounds (A,B,A,B), medians; load average "
                       f"{' -> '.join(loads)}")


if __name__ == "__main__":
    main()
