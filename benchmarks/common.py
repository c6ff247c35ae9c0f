"""Shared pieces of the side-by-side benchmarks: start either daemon, A/B
alternation, the places an image lives in, fio with the daemon's CPU time,
``--only`` selectors, and the markdown tables with ratios qsd-trio/qemu.

Every script (nbd.py, fuse.py, jobs.py, startup.py) prints its own tables and,
with ``--json FILE``, writes its rows for run.py, which prints all of them
grouped by place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QSD_TRIO = [sys.executable, "-m", "qsd_trio"]
QSD_QEMU = ["qemu-storage-daemon"]
MiB = 1 << 20
KINDS = ("qemu", "trio")

# Byte-compile the package first, as `make venv` does: a module edited since
# then would otherwise be compiled again at every start when the environment
# sets PYTHONDONTWRITEBYTECODE, and the startup figure would time the compiler.
subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qsd_trio")],
               check=False, stdout=subprocess.DEVNULL)


def command(kind: str) -> list[str]:
    return list(QSD_TRIO if kind == "trio" else QSD_QEMU)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Started:
    """A daemon started with ``args``; startup ends when the pidfile exists."""

    def __init__(self, kind: str, args: list[str], workdir: str | None = None):
        self.kind = kind
        self.dir = workdir or tempfile.mkdtemp(prefix=f"bench-{kind}-")
        self.pidfile = os.path.join(self.dir, f"{kind}.pid")
        # stderr to a file: a pipe nobody reads would stall a daemon that logs a lot
        self.stderr = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(command(kind) + args + ["--pidfile", self.pidfile],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (os.path.exists(self.pidfile) and os.path.getsize(self.pidfile)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} failed: {self.errors()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} did not write its pidfile within 60 s")
            time.sleep(0.001)
        self.startup = time.perf_counter() - t0

    def errors(self) -> str:
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace").strip()[-1000:]

    @property
    def pid(self) -> int:
        return self.proc.pid

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
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def alternate(run, rounds: int = 2) -> dict[str, list[float]]:
    """run(kind) -> figure; called A, B, A, B ... so drift hits both."""
    out: dict[str, list[float]] = {"qemu": [], "trio": []}
    for _ in range(rounds):
        for kind in KINDS:
            out[kind].append(run(kind))
    return out


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


# --------------------------------------------------------------------------
# Places: where the image lives and how both daemons open it.

def fs_type(path: str) -> str:
    # the mount table's name: statfs's magic number calls ext4 "ext2/ext3"
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def disk_dir() -> str:
    """A directory on a disk-backed file system (never tmpfs)."""
    for d in (os.environ.get("QSD_BENCH_DISK"), "/var/tmp", "/work", "/tmp"):
        if d and os.path.isdir(d) and fs_type(d) not in ("tmpfs", "ramfs"):
            return d
    sys.exit("no disk-backed directory found (set QSD_BENCH_DISK)")


def disk_where() -> str:
    d = disk_dir()
    return f"file system {fs_type(d)} under {d}"


@dataclass(frozen=True)
class Place:
    key: str
    root: str            # "shm" or "disk"
    direct: bool         # cache.direct=on on every file node
    aio: str | None      # the file nodes' aio=, None: the default (threads)
    cold: bool           # evicted from the page cache before each read run
    warm: bool           # read into the page cache before each daemon start
    title: str
    families: tuple[str, ...] = ("nbd", "fuse", "jobs")

    def file_options(self) -> dict[str, str]:
        opts = {}
        if self.direct:
            opts["cache.direct"] = "on"
        if self.aio:
            opts["aio"] = self.aio
        return opts


PLACES = [
    Place("tmpfs", "shm", False, None, False, False,
          "tmpfs (/dev/shm)|buffered, default aio (threads); no device behind the file"),
    Place("cached", "disk", False, None, False, True,
          "disk file in the page cache|buffered, default aio (threads); the image is read "
          "into the page cache before each daemon start"),
    Place("cold", "disk", False, None, True, False,
          "disk file, cold|buffered, default aio (threads); evicted from the page cache "
          "(fsync + POSIX_FADV_DONTNEED) before each read run, so reads miss the cache: fio "
          "reads every block at most once per run (its random map; one sequential pass, not "
          "time-based), a job's sources are evicted before the job; no fio writes here"),
    Place("direct", "disk", True, "io_uring", False, False,
          "disk file with O_DIRECT, io_uring|cache.direct=on, aio=io_uring on both daemons"),
    Place("native", "disk", True, "native", False, False,
          "disk file with O_DIRECT, Linux AIO|cache.direct=on, aio=native on both daemons; "
          "NBD only", families=("nbd",)),
]
PLACE_BY_KEY = {p.key: p for p in PLACES}
FORMATS = ("raw", "qcow2")


def file_node(path: str, place: Place, prefix: str = "") -> str:
    """Options of a file node on ``path`` as ``place`` opens it, each key
    after ``prefix`` (``file.`` under a format node)."""
    opts = {"driver": "file", "filename": path, **place.file_options()}
    return ",".join(f"{prefix}{k}={v}" for k, v in opts.items())


def node(fmt: str, path: str, place: Place, name: str, extra: str = "") -> str:
    """--blockdev for an image: a file node for raw, qcow2 over a file node."""
    extra = f",{extra}" if extra else ""
    if fmt == "raw":
        return f"node-name={name}{extra},{file_node(path, place)}"
    return f"driver=qcow2,node-name={name}{extra},{file_node(path, place, 'file.')}"


def evict(*paths: str) -> None:
    """Drop the files' pages from the page cache (written back first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: str) -> int | None:
    """How much of ``path`` is in the page cache (util-linux fincore), None if unknown."""
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       capture_output=True, text=True)
    try:
        return int(r.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def check_evicted(path: str) -> None:
    res = resident_bytes(path)
    if res is not None and res > os.path.getsize(path) // 100:
        log(f"  warning: {res >> 20} MiB of {path} still in the page cache after eviction")


def warm(*paths: str) -> None:
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def prepare(place: Place, paths: list[str], reads: bool) -> None:
    """Before a run: evict cold images before a read run."""
    if place.cold and reads:
        evict(*paths)
        check_evicted(paths[0])


class Workspace:
    """One scratch directory per root (tmpfs, disk), removed at the end."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.dirs: dict[str, str] = {}
        self.images: dict[tuple, str] = {}

    def dir(self, root: str) -> str:
        if root not in self.dirs:
            base = "/dev/shm" if root == "shm" else disk_dir()
            self.dirs[root] = tempfile.mkdtemp(prefix=self.prefix, dir=base)
            log(f"{root}: {self.dirs[root]} ({fs_type(self.dirs[root])})")
        return self.dirs[root]

    def image(self, root: str, fmt: str, size_mib: int, name: str = "disk") -> str:
        """A fully allocated image of random data: raw written here, qcow2
        made from it with qemu-img convert."""
        key = (root, fmt, size_mib, name)
        if key in self.images:
            return self.images[key]
        d = self.dir(root)
        raw = os.path.join(d, f"{name}-{size_mib}.raw")
        if not os.path.exists(raw):
            block = os.urandom(16 * MiB)
            with open(raw, "wb") as f:
                for i in range(0, size_mib, 16):
                    f.write(block[:min(16, size_mib - i) * MiB])
                    block = block[MiB:] + block[:MiB]  # no two MiB in a row alike
                os.fsync(f.fileno())
        path = raw
        if fmt == "qcow2":
            path = os.path.join(d, f"{name}-{size_mib}.qcow2")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
                           check=True)
        self.images[key] = path
        return path

    def cleanup(self) -> None:
        for d in self.dirs.values():
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# fio, with the daemon's CPU time over the run.

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class FioResult:
    figure: float        # IOPS for 4 KiB, MiB/s otherwise
    cpu_us: float        # daemon CPU microseconds per request


def fio(target: list[str], pid: int, rw: str, bs: str, depth: int, runtime: float,
        time_based: bool = True) -> FioResult:
    """One fio run; ``target`` names engine and file (--ioengine=nbd --uri=...).
    Without ``time_based`` the run stops after one pass or ``runtime``,
    whichever comes first, and reads no block twice."""
    argv = (["fio", "--name=bench", *target, f"--rw={rw}", f"--bs={bs}",
             f"--iodepth={depth}", f"--runtime={runtime}", "--output-format=json"]
            + (["--time_based"] if time_based else []))
    c0 = cpu_seconds(pid)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio did not finish within {runtime + 120:g} s") from None
    c1 = cpu_seconds(pid)
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr.strip() or r.stdout.strip()}"[-800:])
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}")
    side = job["read"] if "read" in rw else job["write"]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    figure = side["iops"] if bs.lower() == "4k" else side["bw"] / 1024
    return FioResult(figure, (c1 - c0) * 1e6 / ios if ios else 0.0)


# --------------------------------------------------------------------------
# Selectors: --only tmpfs,raw,randread-qd32 ...

SCRIPTS = ("startup", "nbd", "fuse", "jobs")
WORKLOAD_IDS = {
    "nbd": ("randread-qd1", "randread-qd32", "randwrite-qd1", "randwrite-qd32",
            "read-1m", "write-1m"),
    "fuse": ("fuse-randread", "fuse-read-1m", "fuse-write-1m"),
    "jobs": ("mirror", "backup", "stream", "commit"),
}


@dataclass
class Selection:
    """Comma-separated selectors, ANDed across kinds and ORed within one:
    scripts (startup nbd fuse jobs), places (tmpfs cached cold direct
    native), formats (raw qcow2) and workloads (an id such as randread-qd32,
    fuse-read-1m, mirror, or its prefix: randread, fuse, write)."""
    scripts: set[str] = field(default_factory=set)
    places: set[str] = field(default_factory=set)
    formats: set[str] = field(default_factory=set)
    workloads: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, only: str | None) -> Selection:
        sel = cls()
        all_ids = [w for ids in WORKLOAD_IDS.values() for w in ids]
        for s in (only or "").split(","):
            s = s.strip().lower()
            if not s:
                continue
            if s in SCRIPTS:
                sel.scripts.add(s)
            elif s in PLACE_BY_KEY:
                sel.places.add(s)
            elif s in FORMATS:
                sel.formats.add(s)
            elif any(w == s or w.startswith(s + "-") for w in all_ids):
                sel.workloads.add(s)
            else:
                sys.exit(f"--only: unknown selector {s!r}; scripts {', '.join(SCRIPTS)}; "
                         f"places {', '.join(PLACE_BY_KEY)}; formats {', '.join(FORMATS)}; "
                         f"workloads {', '.join(all_ids)} (or a prefix of one)")
        return sel

    def place(self, p: Place, family: str) -> bool:
        return family in p.families and (not self.places or p.key in self.places)

    def fmt(self, f: str) -> bool:
        return not self.formats or f in self.formats

    def workload(self, w: str) -> bool:
        return not self.workloads or any(w == s or w.startswith(s + "-") for s in self.workloads)

    def script(self, name: str) -> bool:
        """Whether run.py runs ``name``: named, or (none named) one of its rows selected."""
        if self.scripts:
            return name in self.scripts
        if name == "startup":
            return not (self.places or self.formats or self.workloads)
        return (any(self.place(p, name) for p in PLACES)
                and any(self.workload(w) for w in WORKLOAD_IDS[name]))


def arguments(doc: str, runtime: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=Selection.__doc__.replace("%", "%%"))
    ap.add_argument("--rounds", type=int, default=2, help="A,B pairs (default 2)")
    if runtime:
        ap.add_argument("--runtime", type=float, default=3, help="seconds per fio run (default 3)")
    ap.add_argument("--json", help="also write the rows to this file (for run.py)")
    return ap


# --------------------------------------------------------------------------
# Rows and tables.

@dataclass
class Row:
    place: str | None             # None: not tied to a place (startup, RSS)
    label: str                    # "raw NBD 4k randread QD1"
    unit: str
    target: float | None = None   # minimum ratio
    cpu_target: float | None = None   # maximum qsd-trio CPU µs per request
    higher_is_better: bool = True
    qemu: list[float] = field(default_factory=list)
    trio: list[float] = field(default_factory=list)
    cpu_qemu: list[float] = field(default_factory=list)
    cpu_trio: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, kind: str, figure: float, cpu_us: float | None = None) -> None:
        getattr(self, kind).append(figure)
        if cpu_us is not None:
            getattr(self, f"cpu_{kind}").append(cpu_us)

    def fail(self, kind: str, err: Exception) -> None:
        text = " ".join(str(err).split()) or repr(err)
        msg = f"{type(err).__name__}: {text}"
        self.error = self.error or msg[-300:]
        log(f"  FAILED {self.label}: {msg}")


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "–"
    if unit == "IOPS":
        return f"{x / 1000:.1f}k IOPS"
    return f"{x:.1f} {unit}"


def render_row(r: Row) -> tuple[str, bool | None]:
    """A table line and whether its targets are met (None: no target)."""
    q, t = _med(r.qemu), _med(r.trio)
    cq, ct = _med(r.cpu_qemu), _med(r.cpu_trio)
    ratio = None
    if q and t:
        ratio = t / q if r.higher_is_better else q / t
    targets = []
    if r.target is not None:
        targets.append(f"≥ {r.target:g}")
    if r.cpu_target is not None:
        targets.append(f"CPU ≤ {r.cpu_target:g} µs")
    misses = []
    if r.target is not None and (ratio is None or ratio < r.target):
        misses.append("ratio")
    if r.cpu_target is not None and (ct is None or ct > r.cpu_target):
        misses.append("CPU")
    met = None if not targets else not misses
    verdict = "" if met is None else ("yes" if met else f"**no** ({', '.join(misses)})")
    if r.error:
        verdict = f"failed: {r.error.replace('|', '/')}"
    cpu = [f"{c:.1f}" if c is not None else "" for c in (cq, ct)]
    line = (f"| {r.label} | {_fmt(q, r.unit)} | {_fmt(t, r.unit)} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {cpu[0]} | {cpu[1]} | "
            f"{', '.join(targets)} | {verdict} |")
    return line, (False if r.error and targets else met)


TABLE_HEAD = ("| workload | qemu-storage-daemon | qsd-trio | ratio | CPU µs/req qemu | "
              "CPU µs/req qsd-trio | target | met |\n"
              "|---|---:|---:|---:|---:|---:|---|---|")


def render(rows: list[Row]) -> str:
    """Markdown tables, one per place (place-less rows first)."""
    out = []
    groups: list[tuple[str, str, list[Row]]] = []
    general = [r for r in rows if r.place is None]
    if general:
        groups.append(("startup", "Startup and memory (ratio qemu/qsd-trio: higher is better)",
                       general))
    for p in PLACES:
        mine = [r for r in rows if r.place == p.key]
        if mine:
            head, desc = p.title.split("|")
            where = f" ({disk_where()})" if p.root == "disk" else ""
            groups.append((p.key, f"{head} (`--only {p.key}`)\n\n{desc}{where}.", mine))
    summary = []
    for key, title, group in groups:
        lines, met, total = [], 0, 0
        for r in group:
            line, ok = render_row(r)
            lines.append(line)
            if ok is not None:
                total += 1
                met += ok
        tail = f"\n\nTargets met: {met} of {total}." if total else ""
        out.append(f"### {title}\n\n{TABLE_HEAD}\n" + "\n".join(lines) + tail)
        if total:
            summary.append(f"{key} {met}/{total}")
    if summary:
        out.append("Targets met per place: " + ", ".join(summary) + ".")
    return "\n\n".join(out)


def finish(rows: list[Row], opts: argparse.Namespace, intro: str) -> None:
    print(intro + "\n")
    print(render(rows))
    if opts.json:
        Path(opts.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))


def load_rows(path: str) -> list[Row]:
    return [Row(**d) for d in json.loads(Path(path).read_text())]
