"""The NBD client driver alone: CPU per MiB of 1 MiB requests, no job, no export.

QEMU's side is ``qemu-img bench`` (its block layer and NBD client, 16
requests in flight); qsd-trio's is this script's ``--driver`` mode, a trio
loop with 16 tasks reading or writing 1 MiB through an nbd node of
qsd-trio's block graph.  Both talk to one qemu-nbd (unix socket or TCP,
raw image of random data on tmpfs), alternately (A, B, A, B).  The figure
is the process's CPU time (user + system) per MiB, which a loaded machine
disturbs less than throughput; it includes the kernel's copy of the data.

    .venv/bin/python benchmarks/nbd_driver_cpu.py [--size 1024] [--rounds 3]
                                                  [--only unix,tcp,read,write]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402
from nbd_client import NbdServer  # noqa: E402

DEPTH = 16


def driver(server: dict, mode: str, total_mib: int) -> None:
    """--driver: the qsd-trio side, in this process; prints MiB/s and CPU µs/MiB."""
    sys.path.insert(0, str(b.ROOT))  # this checkout's qsd_trio
    import trio

    from qsd_trio.nodes.graph import BlockGraph

    async def main() -> None:
        node = await BlockGraph().add({"driver": "nbd", "node-name": "n", "server": server,
                                       "export": "disk"})
        data = os.urandom(b.MiB)
        todo = iter(range(total_mib))

        async def worker() -> None:
            for i in todo:
                off = i * b.MiB % node.size
                if mode == "read":
                    await node.read(off, b.MiB)
                else:
                    await node.write(off, data)

        c0, t0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as n:
            for _ in range(DEPTH):
                n.start_soon(worker)
        cpu, dt = time.process_time() - c0, time.perf_counter() - t0
        await node.close()
        print(f"{total_mib / dt} {cpu * 1e6 / total_mib}")

    trio.run(main)


def run_trio(server: NbdServer, mode: str, total: int) -> tuple[float, float]:
    srv = ({"type": "unix", "path": server.path} if server.transport == "unix" else
           {"type": "inet", "host": "127.0.0.1", "port": str(server.port)})
    out = subprocess.run([sys.executable, __file__, "--driver", repr(srv), mode, str(total)],
                         check=True, capture_output=True, text=True, cwd=b.ROOT).stdout
    mibs, cpu = out.split()
    return float(mibs), float(cpu)


def run_qemu(server: NbdServer, mode: str, total: int) -> tuple[float, float]:
    uri = (f"nbd+unix:///disk?socket={server.path}" if server.transport == "unix" else
           f"nbd://127.0.0.1:{server.port}/disk")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "bench", "-f", "raw", "-n", "-c", str(total), "-d", str(DEPTH),
                    "-s", "1M", *(["-w"] if mode == "write" else []), uri],
                   check=True, capture_output=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return total / dt, cpu * 1e6 / total


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        import ast
        driver(ast.literal_eval(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="unix, tcp, read, write")
    ap.add_argument("--rounds", type=int, default=3, help="A,B pairs (default 3)")
    ap.add_argument("--size", type=int, default=1024, help="MiB per run (default 1024)")
    ap.add_argument("--json", help="also write the rows to this file")
    opts = ap.parse_args()
    words = [w for w in (opts.only or "").split(",") if w]
    ws = b.Workspace("qsd-bench-nbd-driver-")
    d = tempfile.mkdtemp(prefix="qsd-bench-nbdd-")
    rows: list[b.Row] = []
    try:
        image = ws.image("shm", "raw", opts.size, "remote")
        for transport in ("unix", "tcp"):
            if words and transport not in words and ("unix" in words or "tcp" in words):
                continue
            server = NbdServer(image, transport, d)
            try:
                for mode in ("read", "write"):
                    if words and mode not in words and ("read" in words or "write" in words):
                        continue
                    row = b.Row("tmpfs", f"{transport} driver alone, 1M {mode} QD{DEPTH} "
                                f"(CPU µs/MiB)", "MiB/s")
                    rows.append(row)
                    for _ in range(opts.rounds):
                        for kind, fn in (("qemu", run_qemu), ("trio", run_trio)):
                            mibs, cpu = fn(server, mode, opts.size)
                            row.add(kind, mibs, cpu)
                            b.log(f"nbd-driver {transport} {mode:5} {kind:4} {mibs:8.1f} MiB/s "
                                  f"{cpu:7.1f} µs/MiB")
            finally:
                server.stop()
    finally:
        ws.cleanup()
        shutil.rmtree(d, ignore_errors=True)
    b.finish(rows, opts, f"driver=nbd alone against qemu-nbd (qemu-img bench for QEMU) on "
                         f"{b.machine()}; {opts.size} MiB per run; {opts.rounds} rounds "
                         f"(A,B,A,B), medians; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
