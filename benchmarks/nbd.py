"""NBD export throughput, qsd-trio beside qemu-storage-daemon.

fio --ioengine=nbd over a unix socket, on a raw file in the page cache and a
fully allocated qcow2: 4 KiB random read/write at iodepth 32, 1 MiB
sequential read/write at iodepth 8; plus startup time with an NBD export
and idle RSS.  Daemons alternate A, B, A, B; the table shows medians and
the ratio qsd-trio/qemu (for startup: qemu/qsd-trio, so higher is better).

    .venv/bin/python benchmarks/nbd.py [--runtime SECONDS] [--rounds N] [--size MiB]
                                       [--only qcow2-randwrite,raw-randread,...]

``--only`` takes comma-separated selectors FORMAT-RW, FORMAT or RW (FORMAT:
raw, qcow2; RW: randread, randwrite, read, write) and runs just those rows;
startup and RSS rows are measured only when a raw workload runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import HEADER, Started, alternate, machine, row  # noqa: E402

WORKLOADS = [
    # name, fio rw, block size, iodepth, target ratio
    ("4k randread qd32", "randread", "4k", 32, 0.6),
    ("4k randwrite qd32", "randwrite", "4k", 32, 0.6),
    ("1M seq read qd8", "read", "1M", 8, 0.9),
    ("1M seq write qd8", "write", "1M", 8, 0.9),
]


def have_qcow2_driver() -> bool:
    try:
        import qsd_trio.nodes.qcow2  # noqa: F401
    except ImportError:
        return False
    return True


def make_images(d: str, size_mib: int) -> dict[str, str]:
    raw = os.path.join(d, "disk.raw")
    # real data everywhere, so reads hit data and writes overwrite allocated blocks
    with open(raw, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
    out = {"raw": raw}
    if have_qcow2_driver():
        q = os.path.join(d, "disk.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q], check=True)
        out["qcow2"] = q
    # warm the page cache
    for p in out.values():
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass
    return out


def daemon_args(fmt: str, image: str, sock: str) -> list[str]:
    if fmt == "raw":
        bd = f"driver=file,node-name=disk,filename={image}"
    else:
        bd = f"driver=qcow2,node-name=disk,file.driver=file,file.filename={image}"
    return ["--blockdev", bd, "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"]


def fio(sock: str, rw: str, bs: str, depth: int, runtime: float) -> float:
    """IOPS (4k) or MiB/s (1M) for one run."""
    r = subprocess.run(["fio", "--name=bench", "--ioengine=nbd",
                        f"--uri=nbd+unix:///disk?socket={sock}", f"--rw={rw}", f"--bs={bs}",
                        f"--iodepth={depth}", f"--runtime={runtime}", "--time_based",
                        "--ramp_time=1", "--output-format=json"],
                       capture_output=True, text=True, timeout=runtime + 60)
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"] if bs == "4k" else side["bw"] / 1024


FORMATS = ("raw", "qcow2")


def selected(only: str | None, fmt: str, rw: str) -> bool:
    """Whether ``--only`` (None: everything) selects workload ``rw`` on ``fmt``."""
    if only is None:
        return True
    for sel in only.split(","):
        sel = sel.strip()
        if sel in (fmt, rw, f"{fmt}-{rw}"):
            return True
    return False


def check_only(only: str | None) -> None:
    if only is None:
        return
    rws = {w[1] for w in WORKLOADS}
    known = set(FORMATS) | rws | {f"{f}-{rw}" for f in FORMATS for rw in rws}
    bad = [sel for sel in only.split(",") if sel.strip() not in known]
    if bad:
        sys.exit(f"--only: unknown selector(s) {', '.join(bad)}; "
                 f"use FORMAT-RW, FORMAT or RW from {', '.join(sorted(known))}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="image size in MiB")
    ap.add_argument("--only", help="comma-separated FORMAT-RW / FORMAT / RW selectors, "
                                   "e.g. qcow2-randwrite,raw-randread")
    opts = ap.parse_args()
    check_only(opts.only)
    if shutil.which("fio") is None or shutil.which("qemu-storage-daemon") is None:
        sys.exit("needs fio and qemu-storage-daemon")
    work = tempfile.mkdtemp(prefix="bench-nbd-")
    try:
        images = make_images(work, opts.size)
        lines = []
        startup: dict[str, list[float]] = {"qemu": [], "trio": []}
        rss: dict[str, list[float]] = {"qemu": [], "trio": []}
        for fmt, image in images.items():
            workloads = [w for w in WORKLOADS if selected(opts.only, fmt, w[1])]
            if not workloads:
                continue
            results: dict[str, dict[str, list[float]]] = {w[0]: {"qemu": [], "trio": []}
                                                          for w in workloads}

            def one_round(kind: str, fmt=fmt, image=image, results=results,
                          workloads=workloads) -> float:
                d = tempfile.mkdtemp(dir=work)
                sock = os.path.join(d, "nbd.sock")
                s = Started(kind, daemon_args(fmt, image, sock), d)
                try:
                    if fmt == "raw":
                        time.sleep(0.3)  # idle
                        rss[kind].append(s.rss_kib() / 1024)
                        startup[kind].append(s.startup * 1000)
                    for name, rw, bs, depth, _t in workloads:
                        results[name][kind].append(fio(sock, rw, bs, depth, opts.runtime))
                finally:
                    s.stop()
                return 0.0

            alternate(one_round, opts.rounds)
            for name, _rw, bs, _d, target in workloads:
                unit = "IOPS" if bs == "4k" else "MiB/s"
                lines.append(row(f"{fmt}: {name}", unit, results[name], True, target))
        if startup["qemu"]:
            lines.append(row("startup to pidfile (raw + NBD export)", "ms", startup, False))
            lines.append(row("idle RSS", "MiB", rss, False))
        print(f"NBD benchmark on {machine()}; fio {opts.runtime}s per run, "
              f"{opts.rounds} rounds (A,B,A,B), medians\n")
        print(HEADER)
        print("\n".join(lines))
        if "qcow2" not in images:
            print("\n(qcow2 rows skipped: no qcow2 driver in qsd-trio yet)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
