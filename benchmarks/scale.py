"""What one daemon costs per client and per export, qsd-trio beside
qemu-storage-daemon (docs/scale-out.md): memory per idle NBD connection,
memory per NBD export, and the CPU time of an idle daemon with many
clients.

    .venv/bin/python benchmarks/scale.py [--clients 200] [--exports 100]

Each client does the fixed-newstyle handshake with NBD_OPT_EXPORT_NAME and
stays in the transmission phase, sending nothing; each export is a null-co
node exported by block-export-add over QMP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402

NBD_OPT_EXPORT_NAME = 1
IHAVEOPT = 0x49484156454F5054


def connect(path: str, name: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    greeting = s.recv(18, socket.MSG_WAITALL)
    assert len(greeting) == 18, greeting
    # FIXED_NEWSTYLE | NO_ZEROES, then the old way into transmission
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NBD_OPT_EXPORT_NAME, len(name))
              + name)
    reply = s.recv(10, socket.MSG_WAITALL)
    assert len(reply) == 10, reply
    return s


class Qmp:
    """A tiny QMP client (the benchmarks do not need qemu.qmp)."""

    def __init__(self, path: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict | None = None) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": args or {}}).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                return r

    def close(self) -> None:
        self.f.close()
        self.s.close()


def measure(kind: str, clients: int, exports: int) -> dict[str, float]:
    d = tempfile.mkdtemp(prefix=f"bench-scale-{kind}-")
    nbd, qmp = f"{d}/nbd.sock", f"{d}/qmp.sock"
    s = b.Started(kind, ["--chardev", f"socket,id=m,path={qmp},server=on,wait=off",
                         "--monitor", "chardev=m",
                         "--blockdev", "null-co,node-name=n0,size=1073741824",
                         "--nbd-server", f"addr.type=unix,addr.path={nbd},max-connections=0",
                         "--export", "nbd,id=e0,node-name=n0,name=n0"], d)
    socks: list[socket.socket] = []
    try:
        time.sleep(0.5)
        base = s.rss_kib()
        for _ in range(clients):
            socks.append(connect(nbd, b"n0"))
        time.sleep(0.5)
        with_clients = s.rss_kib()
        cpu0, t0 = b.cpu_seconds(s.pid), time.monotonic()
        time.sleep(3)
        idle_cpu = (b.cpu_seconds(s.pid) - cpu0) / (time.monotonic() - t0)
        for sock in socks:
            sock.close()
        socks.clear()
        time.sleep(0.5)
        q = Qmp(qmp)
        before_exports = s.rss_kib()
        for i in range(exports):
            r = q.cmd("blockdev-add", {"driver": "null-co", "node-name": f"x{i}",
                                       "size": 1 << 30})
            assert "return" in r, r
            r = q.cmd("block-export-add", {"type": "nbd", "id": f"x{i}", "node-name": f"x{i}"})
            assert "return" in r, r
        time.sleep(0.5)
        with_exports = s.rss_kib()
        q.close()
    finally:
        for sock in socks:
            sock.close()
        s.stop()
    return {"base_mib": base / 1024,
            "per_client_kib": (with_clients - base) / clients,
            "per_export_kib": (with_exports - before_exports) / exports,
            "idle_cpu_pct": 100 * idle_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--exports", type=int, default=100)
    opts = ap.parse_args()
    print(b.machine())
    print(f"\n{opts.clients} idle NBD clients, {opts.exports} null-co exports\n")
    print("| | qemu-storage-daemon | qsd-trio |\n|---|---:|---:|")
    got = {k: measure(k, opts.clients, opts.exports) for k in ("qemu", "trio")}
    rows = (("RSS at start (MiB)", "base_mib", "{:.1f}"),
            ("RSS per idle NBD client (KiB)", "per_client_kib", "{:.0f}"),
            ("RSS per NBD export of a null-co node (KiB)", "per_export_kib", "{:.0f}"),
            (f"CPU with {opts.clients} idle clients (% of a core)", "idle_cpu_pct", "{:.2f}"))
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(got['qemu'][key])} | {fmt.format(got['trio'][key])} |")


if __name__ == "__main__":
    main()
