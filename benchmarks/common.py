"""Shared pieces of the side-by-side benchmarks: start either daemon, A/B
alternation, and the markdown table with ratios qsd-trio/qemu."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QSD_TRIO = [sys.executable, "-m", "qsd_trio"]
QSD_QEMU = ["qemu-storage-daemon"]

# Byte-compile the package first, as `make venv` does: a module edited since
# then would otherwise be compiled again at every start when the environment
# sets PYTHONDONTWRITEBYTECODE, and the startup figure would time the compiler.
subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qsd_trio")],
               check=True, stdout=subprocess.DEVNULL)


def command(kind: str) -> list[str]:
    return list(QSD_TRIO if kind == "trio" else QSD_QEMU)


class Started:
    """A daemon started with ``args``; startup ends when the pidfile exists."""

    def __init__(self, kind: str, args: list[str], workdir: str | None = None):
        self.kind = kind
        self.dir = workdir or tempfile.mkdtemp(prefix=f"bench-{kind}-")
        self.pidfile = os.path.join(self.dir, f"{kind}.pid")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(command(kind) + args + ["--pidfile", self.pidfile],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=ROOT)
        while not (os.path.exists(self.pidfile) and os.path.getsize(self.pidfile)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} failed: {self.proc.stderr.read().decode()}")
            time.sleep(0.001)
        self.startup = time.perf_counter() - t0

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def alternate(run, rounds: int = 2) -> dict[str, list[float]]:
    """run(kind) -> figure; called A, B, A, B ... so drift hits both."""
    out: dict[str, list[float]] = {"qemu": [], "trio": []}
    for _ in range(rounds):
        for kind in ("qemu", "trio"):
            out[kind].append(run(kind))
    return out


def row(name: str, unit: str, results: dict[str, list[float]], higher_is_better: bool = True,
        target: float | None = None) -> str:
    q = statistics.median(results["qemu"])
    t = statistics.median(results["trio"])
    ratio = (t / q if higher_is_better else q / t) if q and t else 0.0
    tgt = f">= {target}" if target is not None else ""
    return f"| {name} | {q:.1f} {unit} | {t:.1f} {unit} | {ratio:.2f} | {tgt} |"


HEADER = ("| workload | qemu-storage-daemon | qsd-trio | ratio (qsd-trio/qemu) | target |\n"
          "|---|---|---|---|---|")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
