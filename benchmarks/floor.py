"""What a 4 KiB request costs below any daemon, on this machine: the floors
the per-request CPU figures of nbd.py and fuse.py stand on.

* the kernel's own CPU for one 4 KiB read, measured by fio with no daemon
  at all: O_DIRECT on the disk (psync and io_uring, queue depth 1), and a
  page-cache copy (tmpfs);
* the CPU of trio's scheduler per request at queue depth 1, with no I/O:
  a server task that waits for a 28-byte request on a socket and sends a
  4 KiB reply, once with one scheduler wakeup per request (the socket) and
  once with two (the socket, then an eventfd standing for the I/O
  engine's completion), against a client in another process; and the
  same with qsd-trio's inline_wait (nodes/engine/inline_wait.py), which
  waits for the socket and the completion itself while nothing else can
  run.

    .venv/bin/python benchmarks/floor.py [--rounds 3]

No ratio: these are lower bounds, printed as a table of medians.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402

REQUESTS = 20000
IMAGE = 256 << 20


def fio_cpu(path: str, engine: str, direct: bool) -> tuple[float, float]:
    """IOPS and fio's own CPU µs (user + system) per 4 KiB random read."""
    out = subprocess.run(
        ["fio", "--name=floor", f"--filename={path}", f"--ioengine={engine}", "--rw=randread",
         "--bs=4k", "--iodepth=1", f"--direct={int(direct)}", "--runtime=3", "--time_based",
         f"--size={IMAGE}", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    ios = job["read"]["total_ios"]
    runtime = job["job_runtime"] / 1000
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime
    return ios / runtime, cpu / ios * 1e6


def _client(fd: int) -> None:
    # the other process: send a request, wait for the whole reply, again
    s = socket.socket(fileno=fd)
    req = b"r" * 28
    for _ in range(REQUESTS):
        s.sendall(req)
        got = 0
        while got < 4112:
            got += len(s.recv(65536))


class _Completion:
    """An eventfd standing for an engine with one request in flight, as
    inline_wait.py sees an engine; reaping it sends the reply, as the NBD
    export's completion callback does."""

    def __init__(self, reply) -> None:
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.in_flight = 0
        self.reply = reply

    def reap_now(self) -> None:
        os.eventfd_read(self.wake_fd)
        self.in_flight = 0
        self.reply()


def trio_cpu(hops: int, inline: bool = False) -> float:
    """CPU µs per request of a trio server that wakes ``hops`` times per
    request (1: the socket; 2: the socket, then an eventfd); ``inline``:
    it waits through qsd-trio's inline_wait instead of parking in trio
    whenever nothing else can run."""
    import trio

    from qsd_trio.nodes.engine import inline_wait

    a, c = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _client(c.detach())
        finally:
            os._exit(0)
    c.close()
    a.setblocking(False)

    async def reaper(io: _Completion) -> None:
        # the engine's reaper task: wakes on the completion, sends the reply
        while True:
            await trio.lowlevel.wait_readable(io.wake_fd)
            if io.in_flight:
                io.reap_now()

    async def serve() -> None:
        parts = [b"h" * 16, bytes(4096)]
        io = _Completion(lambda: a.sendmsg(parts))
        wait = inline_wait.make_waiter(lambda: [io]) if inline else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper, io)
            for _ in range(REQUESTS):
                while True:
                    try:
                        a.recv(4096)
                        break
                    except BlockingIOError:
                        if wait is None or not wait(a.fileno()):
                            await trio.lowlevel.wait_readable(a)
                if hops == 1:
                    a.sendmsg(parts)
                else:
                    io.in_flight = 1
                    os.eventfd_write(io.wake_fd, 1)  # the engine's completion
            if io.in_flight:
                io.reap_now()  # the last reply
            nursery.cancel_scope.cancel()
        os.close(io.wake_fd)

    t0 = time.thread_time()
    trio.run(serve)
    spent = time.thread_time() - t0
    os.waitpid(pid, 0)
    a.close()
    return spent / REQUESTS * 1e6


def main() -> None:
    ap = b.arguments(__doc__, runtime=False)
    ap.set_defaults(rounds=3)
    opts = ap.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {}
    disk = tempfile.mkdtemp(prefix="floor-", dir=b.disk_dir())
    shm = tempfile.mkdtemp(prefix="floor-", dir="/dev/shm")
    try:
        for d in (disk, shm):
            with open(os.path.join(d, "img"), "wb") as f:
                f.write(os.urandom(IMAGE))
        b.warm(os.path.join(shm, "img"))
        cases = {
            "kernel: O_DIRECT 4k read on disk, psync (fio)":
                lambda: fio_cpu(os.path.join(disk, "img"), "psync", True),
            "kernel: O_DIRECT 4k read on disk, io_uring (fio)":
                lambda: fio_cpu(os.path.join(disk, "img"), "io_uring", True),
            "kernel: 4k read from tmpfs, psync (fio)":
                lambda: fio_cpu(os.path.join(shm, "img"), "psync", False),
            "trio: one wakeup per request (socket), no I/O":
                lambda: (0.0, trio_cpu(1)),
            "trio: two wakeups per request (socket, eventfd), no I/O":
                lambda: (0.0, trio_cpu(2)),
            "trio + inline_wait: socket, no I/O":
                lambda: (0.0, trio_cpu(1, inline=True)),
            "trio + inline_wait: socket, eventfd, no I/O":
                lambda: (0.0, trio_cpu(2, inline=True)),
        }
        for _ in range(opts.rounds):
            for name, fn in cases.items():
                rows.setdefault(name, []).append(fn())
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    print(f"Machine: {b.machine()}; load average {os.getloadavg()[0]:.1f}; "
          f"medians of {opts.rounds} rounds\n")
    print("| floor | IOPS (QD1) | CPU µs/request |\n|---|---:|---:|")
    for name, got in rows.items():
        iops = statistics.median(x for x, _ in got)
        cpu = statistics.median(y for _, y in got)
        print(f"| {name} | {f'{iops / 1000:.1f}k' if iops else ''} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
