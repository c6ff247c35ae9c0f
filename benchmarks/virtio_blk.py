"""virtio-blk requests without a guest: CPU per request of the data plane.

    .venv/bin/python benchmarks/virtio_blk.py [--seconds S] [--only WORD,...] [--path P]

The device side of the vhost-user-blk and VDUSE exports (exports/virtio/)
serves requests that the unit tests' front-end (tests/unit/test_virtqueue.py:
a memfd as guest RAM, rings written with struct) puts on a split ring,
against a real ``raw`` over ``file`` node, in this process.  A request is a
header (type, sector), its chain published with indirect descriptors
(header, data segments, status byte, as Linux's virtio-blk driver sends
them).  Two paths (``--path``):

* ``ring`` (the default): the exports' own data plane, a QueueWorker
  (exports/virtio/dataplane.py) on the ring with a kick and a call
  eventfd.  A driver task keeps QD requests on the ring: it publishes,
  kicks, waits for the call, takes what was used and publishes the next
  ones.  What an export does per request but for the vhost-user socket
  (which carries no requests) and the guest.
* ``handler``: QD tasks each loop publish, pop, ``await
  handler.process(chain)``, push; no eventfds, no worker (the handler, the
  node layer, the driver and the I/O engine, plus the ring walk).

Workloads: 4 KiB random reads and writes at QD16 (one segment), 1 MiB
sequential reads and writes at QD4 (``--segments`` page-aligned data
buffers, 16 of 64 KiB by default: a Linux guest's 1 MiB O_DIRECT fio
request came as 18 or 19 descriptors, its data cut at the block layer's
64 KiB max_segment_size, mostly one after another in guest memory, so 2 to
4 segments once merged (benchmarks/vhost_user.py, 2026-12-07); scattered
pages can make up to seg_max = 126, apart in memory with ``--scatter``).  Places: ``null`` (null-co: the
fixed cost of the harness, the handler and the node layer), ``shm`` (a
file on tmpfs), ``disk`` (a file on $QSD_BENCH_DISK or /var/tmp, read into
the page cache first; ``disk-uring`` the same with ``aio=io_uring``), ``direct`` (the same file, cache.direct=on) with
``aio=threads`` and ``direct-uring`` with ``aio=io_uring``.  ``--format
qcow2`` puts a qcow2 node (the same random data, converted by qemu-img:
every cluster allocated, one after the other on the host) on the file
instead of ``raw`` (null-co rows are raw only).

CPU µs/req is this process's CPU time (every thread: the event loop and
the engine's workers; ``os.times``, user and system) over the run divided
by the requests completed.  Profile one row with
``py-spy record -o out.svg -- .venv/bin/python benchmarks/virtio_blk.py --only shm,1m-read``.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from qsd_trio.exports.virtio import blk as B  # noqa: E402
from qsd_trio.exports.virtio.dataplane import QueueWorker  # noqa: E402
from qsd_trio.nodes.graph import BlockGraph  # noqa: E402
from tests.unit.test_virtqueue import INDIRECT, NEXT, WRITE, Driver, GuestRam  # noqa: E402

MiB = 1 << 20
IMAGE = 128 * MiB
SEGMENTS = 16
RING = 64
DATA0 = 0x10000

# label, is write, request bytes, queue depth, sequential
WORKLOADS = [
    ("4k-randread", False, 4096, 16, False),
    ("4k-randwrite", True, 4096, 16, False),
    ("1m-read", False, MiB, 4, True),
    ("1m-write", True, MiB, 4, True),
]


def places(disk_dir: str) -> dict[str, dict[str, object]]:
    return {
        "null": {"driver": "null-co", "size": IMAGE},
        "shm": {"dir": "/dev/shm", "aio": "threads"},
        "disk": {"dir": disk_dir, "aio": "threads"},
        "disk-uring": {"dir": disk_dir, "aio": "io_uring"},
        "direct": {"dir": disk_dir, "aio": "threads", "direct": True},
        "direct-uring": {"dir": disk_dir, "aio": "io_uring", "direct": True},
    }


class Slots:
    """QD request slots in guest RAM, each a fixed indirect table: header,
    data segments, status byte."""

    def __init__(self, depth: int, size: int, segments: int, scatter: bool = False):
        nseg = 1 if size <= 4096 else segments
        seg = size // nseg // 4096 * 4096
        last = size - seg * (nseg - 1)
        # the data segments one after another (one buffer, as a guest's
        # huge page gives them), or a page apart (scattered pages)
        step = seg + (4096 if scatter else 0)
        # two tables, header and status, then data (the last segment takes
        # what the others leave: it may be longer than a step)
        per_slot = 8192 + step * (nseg - 1) + (last + 4095) // 4096 * 4096
        self.ram = GuestRam(size=DATA0 + depth * per_slot)
        self.mem = self.ram.memory()
        self.drv = Driver(self.ram, size=RING, data_start=DATA0)
        self.queue = self.drv.queue(self.mem)
        self.hdr: list[int] = []
        self.depth = depth
        self.write_table: list[int] = []
        self.read_table: list[int] = []
        for s in range(depth):
            base = DATA0 + s * per_slot
            hdr, status, data = base + 4096, base + 4608, base + 8192
            self.hdr.append(hdr)
            bufs = ([(self.ram.gpa(hdr), 16, 0)]
                    + [(self.ram.gpa(data + i * step), seg if i < nseg - 1 else last, -1)
                       for i in range(nseg)]
                    + [(self.ram.gpa(status), 1, WRITE)])
            for table, writable in ((base, WRITE), (base + 2048, 0)):
                # two tables per slot: data device-writable (reads) or not (writes)
                for i, (addr, n, flags) in enumerate(bufs):
                    fl = (writable if flags < 0 else flags) | (NEXT if i < len(bufs) - 1 else 0)
                    self.drv.write_desc(table, i, addr, n, fl, i + 1)
            self.read_table.append(base)
            self.write_table.append(base + 2048)
        self.nbufs = nseg + 2

    def publish(self, slot: int, write: bool, sector: int) -> None:
        ram, drv = self.ram, self.drv
        ram.put(self.hdr[slot], struct.pack("<IIQ", int(write), 0, sector))
        table = self.write_table[slot] if write else self.read_table[slot]
        drv.write_desc(drv.desc, slot, ram.gpa(table), 16 * self.nbufs, INDIRECT, 0)
        drv.publish(slot)

    def close(self) -> None:
        self.mem.close()
        self.ram.close()


async def serve_ring(queue: object, handler: B.BlkHandler, kick: int, call: int, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The export's data plane on ``queue`` until cancelled."""
    def fail(text: str) -> None:
        raise AssertionError(text)

    worker = QueueWorker(0, queue, handler, kick, lambda: os.eventfd_write(call, 1), fail)
    await worker.run(task_status=task_status)


async def run_one(node_opts: dict[str, object], write: bool, size: int, depth: int,
                  sequential: bool, seconds: float,
                  segments: int = SEGMENTS, path: str = "ring",
                  scatter: bool = False) -> tuple[float, float, float]:
    """(user and system CPU µs per request, requests per second)"""
    graph = BlockGraph()
    node = await graph.add(node_opts)
    slots = Slots(depth, size, segments, scatter)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        h = B.BlkHandler(node, writable=True)
        nblocks = node.length // size
        rng = random.Random(1)
        pos = 0
        count = 0
        stop = False

        def next_sector() -> int:
            nonlocal pos
            if sequential:
                pos = (pos + 1) % nblocks
                blk = pos
            else:
                blk = rng.randrange(nblocks)
            return blk * size >> 9

        async def driver() -> None:
            """Keep ``depth`` requests on the ring: publish, kick, wait for
            the call, take what was used, publish again."""
            nonlocal count
            for s in range(depth):
                slots.publish(s, write, next_sector())
            os.eventfd_write(kick, 1)
            seen = 0
            used_at = slots.drv.used + 2
            while not stop:
                await trio.lowlevel.wait_readable(call)
                os.eventfd_read(call)
                used = struct.unpack("<H", slots.ram.get(used_at, 2))[0]
                while seen != used:
                    slot = slots.drv.used_elem(seen)[0]  # the head is the slot
                    seen = (seen + 1) & 0xFFFF
                    count += 1
                    slots.publish(slot, write, next_sector())
                os.eventfd_write(kick, 1)

        async def worker(slot: int) -> None:
            nonlocal count
            q = slots.queue
            while not stop:
                slots.publish(slot, write, next_sector())
                chain = q.pop()
                assert chain is not None
                used = await h.process(chain)
                q.push(chain.head, used)
                count += 1
                # the export's request task checkpoints once to batch its
                # call notification (vhost_user_blk.py _request)
                await trio.lowlevel.cancel_shielded_checkpoint()

        async def timed() -> tuple[float, float, float]:
            nonlocal stop, count
            await trio.sleep(min(0.3, seconds / 4))  # warm up
            c0, t0, n0 = os.times(), time.perf_counter(), count
            await trio.sleep(seconds)
            c1, t1, n1 = os.times(), time.perf_counter(), count
            stop = True
            n = max(n1 - n0, 1)
            user = (c1.user - c0.user) * 1e6 / n
            system = (c1.system - c0.system) * 1e6 / n
            return user, system, n / (t1 - t0)

        result: list[tuple[float, float, float]] = []
        async with trio.open_nursery() as nursery:
            if path == "ring":
                await nursery.start(serve_ring, slots.queue, h, kick, call)
                nursery.start_soon(driver)
            else:
                for s in range(depth):
                    nursery.start_soon(worker, s)

            async def measure() -> None:
                result.append(await timed())
                if path == "ring":
                    await trio.sleep(0.2)  # the last requests out
                    nursery.cancel_scope.cancel()
            nursery.start_soon(measure)
        # every status byte says OK
        for s in range(depth):
            st = slots.ram.get(slots.hdr[s] + 512, 1)
            assert st == b"\0", f"slot {s}: status {st!r}"
        return result[0]
    finally:
        os.close(kick)
        os.close(call)
        slots.close()
        await graph.close_all()


def make_image(path: str, fmt: str = "raw") -> None:
    with open(path, "wb") as f:
        for _ in range(IMAGE // MiB):
            f.write(os.urandom(MiB))
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-O", fmt, path, path + "." + fmt],
                       check=True)
        os.replace(path + "." + fmt, path)
    with open(path, "rb") as f:  # into the page cache
        while f.read(8 * MiB):
            pass


async def amain(opts: argparse.Namespace) -> None:
    disk_dir = os.environ.get("QSD_BENCH_DISK", "/var/tmp")
    only = [w for w in opts.only.split(",") if w] if opts.only else []
    images: dict[str, str] = {}
    tmpdirs = []
    print("| place | workload | CPU µs/req | user | sys | req/s | MiB/s |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    try:
        for pname, p in places(disk_dir).items():
            for label, write, size, depth, seq in WORKLOADS:
                name = f"{pname} {label} QD{depth}"
                if only and not all(any(w == x for x in (pname, label)) or w in name
                                    for w in only):
                    continue
                if p.get("driver") == "null-co":
                    if opts.format != "raw":
                        continue
                    file_opts: dict[str, object] = {"driver": "null-co", "size": IMAGE}
                else:
                    d = str(p["dir"])
                    if d not in images:
                        td = tempfile.TemporaryDirectory(prefix="qsd-bench-vblk-", dir=d)
                        tmpdirs.append(td)
                        images[d] = os.path.join(td.name, "disk." + opts.format)
                        make_image(images[d], opts.format)
                    file_opts = {"driver": "file", "filename": images[d], "aio": p["aio"]}
                    if p.get("direct"):
                        file_opts["cache"] = {"direct": True}
                opts_ = {"driver": opts.format, "node-name": "disk0", "file": file_opts}
                user, system, rate = await run_one(opts_, write, size, depth, seq, opts.seconds,
                                                   opts.segments, opts.path, opts.scatter)
                place = pname if opts.format == "raw" else f"{pname} {opts.format}"
                print(f"| {place} | {label} QD{depth} | {user + system:.1f} | {user:.1f} | "
                      f"{system:.1f} | {rate:.0f} | {rate * size / MiB:.0f} |", flush=True)
    finally:
        for td in tmpdirs:
            td.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per row")
    ap.add_argument("--segments", type=int, default=SEGMENTS,
                    help="data buffers per 1 MiB request (the guest's seg_max is 126)")
    ap.add_argument("--scatter", action="store_true",
                    help="data segments a page apart (else one after another: one buffer)")
    ap.add_argument("--format", choices=["raw", "qcow2"], default="raw",
                    help="the format node on the file")
    ap.add_argument("--path", choices=["ring", "handler"], default="ring",
                    help="the export's data plane with eventfds, or handler.process() alone")
    ap.add_argument("--only", default="", help="comma-separated words a row must match "
                    "(place or workload names, e.g. shm,1m-read)")
    opts = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    trio.run(amain, opts)
    print(f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
