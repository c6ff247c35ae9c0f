"""Run every side-by-side benchmark and collect their tables.

``python benchmarks/run.py`` prints them; ``--readme`` also replaces the
README's benchmark section with this run's tables and the machine it ran on.
Each script alternates the two daemons (A, B, A, B) and prints ratios
qsd-trio/qemu-storage-daemon, so a busy machine slows both alike.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = ["startup.py", "nbd.py", "fuse.py", "jobs.py"]
BEGIN = "<!-- bench-table:begin -->"
END = "<!-- bench-table:end -->"


def main() -> int:
    parts = []
    only = [a for a in sys.argv[1:] if not a.startswith("--")]  # e.g. "nbd" runs nbd.py
    for script in SCRIPTS:
        if only and not any(name in script for name in only):
            continue
        print(f"== {script}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True,
                           cwd=ROOT)
        out = r.stdout.strip()
        if r.returncode != 0:
            out += f"\n\n(failed with status {r.returncode}: {r.stderr.strip()[-500:]})"
        parts.append(f"#### {script}\n\n{out}\n")
    text = (f"Run on {time.strftime('%Y-%m-%d')} with `make bench`.\n\n" + "\n".join(parts))
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.md").write_text(text)
    if "--readme" in sys.argv:
        readme = ROOT / "README.md"
        body = readme.read_text()
        block = f"{BEGIN}\n{text}{END}"
        if BEGIN in body:
            body = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, body,
                          flags=re.S)
        else:
            body = body.replace("BENCH_TABLE", block)
        readme.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
