"""FUSE export throughput: qsd-trio beside qemu-storage-daemon 7.2.

Reads and writes SIZE (default 1 GiB) through the mounted export with dd,
1 MiB and 4 KiB requests, alternating the daemons (A/B/A/B...) so that
machine noise hits both alike, and prints a markdown table of the median
MB/s and the ratio qsd-trio / qemu-storage-daemon (targets: >= 0.8 for
1 MiB, >= 0.5 for 4 KiB).

The image is a raw file in --dir (default /dev/shm, so the disk is not what
is measured) behind a ``file`` node, or ``--driver null-co``.  Each dd opens
the mount anew, which drops the kernel's page cache for it (neither daemon
asks to keep it), and writes end with fsync so they reach the daemon's node.

    .venv/bin/python benchmarks/fuse.py [--size-mib 1024] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    ("read 1 MiB", "read", "1M"),
    ("read 4 KiB", "read", "4k"),
    ("write 1 MiB", "write", "1M"),
    ("write 4 KiB", "write", "4k"),
]
TARGET = {"1M": 0.8, "4k": 0.5}
DAEMONS = {"qemu": ["qemu-storage-daemon"], "trio": [sys.executable, "-m", "qsd_trio"]}


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def start(kind: str, workdir: str, driver: str, size: int) -> tuple[subprocess.Popen, str]:
    mp = os.path.join(workdir, f"mp-{kind}")
    open(mp, "wb").close()
    if driver == "file":
        image = os.path.join(workdir, f"img-{kind}")
        with open(image, "wb") as f:
            f.truncate(size)
        node = f"driver=file,node-name=n,filename={image}"
    else:
        node = f"driver=null-co,node-name=n,size={size}"
    proc = subprocess.Popen(
        DAEMONS[kind] + ["--blockdev", node, "--export",
                         f"type=fuse,id=e,node-name=n,mountpoint={mp},writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (is_mounted(mp) and os.path.getsize(mp) == size):
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{kind} did not mount")
        time.sleep(0.05)
    return proc, mp


def stop(proc: subprocess.Popen, mp: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if is_mounted(mp):
        subprocess.run(["umount", "-l", mp], check=False)


def dd(op: str, mp: str, bs: str, size: int) -> float:
    """MB/s of one dd run."""
    count = size // (1 << 20 if bs == "1M" else 4096)
    if op == "read":
        argv = ["dd", f"if={mp}", "of=/dev/null", f"bs={bs}", f"count={count}"]
    else:
        argv = ["dd", "if=/dev/zero", f"of={mp}", f"bs={bs}", f"count={count}",
                "conv=notrunc,fsync"]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t
    m = re.search(r"^(\d+) bytes", r.stderr, re.M)
    assert m and int(m.group(1)) == size, r.stderr
    return size / elapsed / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--driver", choices=["file", "null-co"], default="file")
    opts = ap.parse_args()
    size = opts.size_mib << 20
    results: dict[tuple[str, str], list[float]] = {}
    workdir = tempfile.mkdtemp(prefix="qsd-fuse-bench-", dir=opts.dir)
    try:
        for rnd in range(opts.rounds):
            for kind in ("qemu", "trio"):
                proc, mp = start(kind, workdir, opts.driver, size)
                try:
                    for name, op, bs in CASES:
                        mbs = dd(op, mp, bs, size)
                        results.setdefault((kind, name), []).append(mbs)
                        print(f"round {rnd + 1} {kind:5} {name:12} {mbs:8.1f} MB/s",
                              file=sys.stderr)
                finally:
                    stop(proc, mp)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nFUSE export, {opts.size_mib} MiB per run, {opts.driver} node, "
          f"median of {opts.rounds} (A/B alternating), dd through the mount\n")
    print("| case | qemu-storage-daemon MB/s | qsd-trio MB/s | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, _op, bs in CASES:
        q = statistics.median(results[("qemu", name)])
        t = statistics.median(results[("trio", name)])
        print(f"| {name} | {q:.0f} | {t:.0f} | {t / q:.2f} | {TARGET[bs]} |")


if __name__ == "__main__":
    main()
