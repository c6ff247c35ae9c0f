"""Run every side-by-side benchmark and print their rows grouped by place.

    .venv/bin/python benchmarks/run.py [SCRIPT ...] [--only SELECTORS]
                                       [--runtime S] [--rounds N] [--readme]

SCRIPT is startup, nbd, fuse or jobs (default: all).  ``--only`` takes the
selectors of common.Selection (places tmpfs cached cold direct native,
formats raw qcow2, workload ids such as randread-qd32, fuse-read-1m, mirror
or a prefix of one), e.g. ``--only direct,raw,randread`` reruns the raw
4 KiB random-read rows with O_DIRECT; ``--runtime`` (fio seconds per run) and
``--rounds`` are passed on to the scripts.  The tables also go to
benchmarks/results/ (latest.md, and a dated copy with the rows as JSON).
``--readme`` also replaces the README's benchmark section (between the
bench-table markers) with this run's tables.  Each script alternates the two
daemons (A, B, A, B) and prints ratios qsd-trio/qemu-storage-daemon, so a
busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import common as b  # noqa: E402

BEGIN = "<!-- bench-table:begin -->"
END = "<!-- bench-table:end -->"
TAKES_RUNTIME = {"nbd", "fuse"}

ABOUT = """\
Ratios are qsd-trio/qemu-storage-daemon (higher is better), medians of {rounds} rounds with the
daemons alternating A,B,A,B, both opening the image with the same `cache.direct` and `aio=`.
NBD rows: fio --ioengine=nbd over a unix socket; FUSE rows: fio psync with O_DIRECT on the
mount; images of 512 MiB (raw, and qcow2 made with qemu-img convert of random data, fully
allocated); jobs on 1 GiB images; fio {runtime} s per run. CPU µs/req: the daemon's utime+stime
(/proc/PID/stat) over the fio run divided by the requests fio completed. tmpfs and the page
cache show what copying from memory costs us; the cold and O_DIRECT places show what waiting
for the device costs. Figures on a shared 2-core machine are noisy (±10-20% between runs)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scripts", nargs="*", help="startup, nbd, fuse, jobs (default: all)")
    ap.add_argument("--only", help=b.Selection.__doc__)
    ap.add_argument("--runtime", type=float, help="seconds per fio run (scripts' default 3)")
    ap.add_argument("--rounds", type=int, help="A,B pairs (scripts' default)")
    ap.add_argument("--readme", action="store_true", help="rewrite README's benchmark section")
    ap.add_argument("--render", metavar="JSON",
                    help="print (and with --readme, write) the tables of a saved run, "
                         "results/bench-*.json, instead of running anything")
    opts = ap.parse_args()
    if opts.render:
        saved = json.loads(Path(opts.render).read_text())
        if isinstance(saved, list):  # rows only, as the first version wrote them
            saved = {"rows": saved, "meta": {
                "date": time.strftime("%Y-%m-%d", time.localtime(Path(opts.render).stat().st_mtime)),
                "minutes": 0, "machine": b.machine(), "rounds": opts.rounds or 2,
                "runtime": opts.runtime or 3, "notes": []}}
        text = report([b.Row(**d) for d in saved["rows"]], **saved["meta"])
        print(text)
        if opts.readme:
            write_readme(text)
        return 0
    names = [s.removesuffix(".py") for s in opts.scripts]
    sel = b.Selection.parse(",".join(names + ([opts.only] if opts.only else [])))
    passed = (["--only", opts.only] if opts.only else []) + (
        ["--rounds", str(opts.rounds)] if opts.rounds else [])
    rows: list[b.Row] = []
    notes = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qsd-bench-") as tmp:
        for name in b.SCRIPTS:
            if not sel.script(name):
                continue
            b.log(f"== {name}.py")
            out = Path(tmp) / f"{name}.json"
            argv = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out), *passed]
            if name in TAKES_RUNTIME and opts.runtime:
                argv += ["--runtime", str(opts.runtime)]
            t = time.monotonic()
            r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            b.log(f"== {name}.py: {time.monotonic() - t:.0f} s")
            if r.returncode != 0 or not out.exists():
                notes.append(f"{name}.py failed with status {r.returncode}: "
                             f"{r.stdout.strip()[-500:]}")
                continue
            rows += b.load_rows(str(out))
    meta = {"date": time.strftime("%Y-%m-%d"), "minutes": (time.monotonic() - t0) / 60,
            "machine": b.machine(), "rounds": opts.rounds or 2, "runtime": opts.runtime or 3,
            "notes": notes}
    text = report(rows, **meta)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.md").write_text(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"bench-{stamp}.md").write_text(text)
    (results / f"bench-{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": [r.__dict__ for r in rows]}, indent=1))
    if opts.readme:
        write_readme(text)
    return 1 if notes else 0


def report(rows: list[b.Row], date: str, minutes: float, machine: str, rounds: int,
           runtime: float, notes: list[str]) -> str:
    about = ABOUT.format(rounds=rounds, runtime=f"{runtime:g}")
    text = (f"Run on {date} with `make bench` ({minutes:.0f} minutes) on {machine}.\n\n"
            f"{about}\n\n{b.render(rows)}\n")
    if notes:
        text += "\n" + "\n\n".join(notes) + "\n"
    return text


def write_readme(text: str) -> None:
    """Replace the README's section between the bench-table markers."""
    readme = ROOT / "README.md"
    body = readme.read_text()
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in body:
        body = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, body,
                      flags=re.S)
    else:
        body = body.replace("BENCH_TABLE", block)
    readme.write_text(body)


if __name__ == "__main__":
    sys.exit(main())
