"""Startup time (to the pidfile) and idle memory, qsd-trio beside
qemu-storage-daemon.  Ratios: for time, qemu/qsd-trio (higher is better)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import HEADER, Started, alternate, machine, row  # noqa: E402


def main() -> None:
    def args(d: str) -> list[str]:
        return ["--chardev", f"socket,id=m,path={d}/qmp.sock,server=on,wait=off",
                "--monitor", "chardev=m", "--blockdev", "null-co,node-name=n0"]

    rss: dict[str, list[float]] = {"qemu": [], "trio": []}

    def startup(kind: str) -> float:
        import tempfile
        d = tempfile.mkdtemp(prefix="bench-start-")
        s = Started(kind, args(d), d)
        time.sleep(0.5)  # idle: let lazy initialisation settle
        rss[kind].append(s.rss_kib() / 1024)
        s.stop()
        return s.startup * 1000

    times = alternate(startup, rounds=3)
    print(f"Machine: {machine()}\n")
    print(HEADER)
    print(row("startup to pidfile", "ms", times, higher_is_better=False))
    print(row("idle RSS", "MiB", rss, higher_is_better=False))


if __name__ == "__main__":
    main()
