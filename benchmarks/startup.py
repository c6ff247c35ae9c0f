"""Startup time (to the pidfile) and idle memory, qsd-trio beside
qemu-storage-daemon.  Ratios: qemu/qsd-trio (higher is better).

    .venv/bin/python benchmarks/startup.py [--rounds 3]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402


def main() -> None:
    ap = b.arguments(__doc__, runtime=False)
    ap.set_defaults(rounds=3)
    opts = ap.parse_args()

    def args(d: str) -> list[str]:
        return ["--chardev", f"socket,id=m,path={d}/qmp.sock,server=on,wait=off",
                "--monitor", "chardev=m", "--blockdev", "null-co,node-name=n0"]

    startup = b.Row(None, "startup to pidfile", "ms", higher_is_better=False)
    rss = b.Row(None, "idle RSS", "MiB", higher_is_better=False)

    def one(kind: str) -> float:
        d = tempfile.mkdtemp(prefix="bench-start-")
        try:
            s = b.Started(kind, args(d), d)
            time.sleep(0.5)  # idle: let lazy initialisation settle
            rss.add(kind, s.rss_kib() / 1024)
            s.stop()
        finally:
            shutil.rmtree(d, ignore_errors=True)
        startup.add(kind, s.startup * 1000)
        return s.startup

    b.alternate(one, opts.rounds)
    b.finish([startup, rss], opts, f"Machine: {b.machine()}; QMP monitor and a null-co node; "
                                   f"{opts.rounds} rounds (A,B,A,B), medians")


if __name__ == "__main__":
    main()
