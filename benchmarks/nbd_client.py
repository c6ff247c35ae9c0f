"""The NBD client driver (driver=nbd), qsd-trio beside qemu-storage-daemon.

One server exports a raw image of random data on tmpfs: qemu-nbd (``-e 16``,
``--cache=writeback``; the default), or with ``--server trio`` a qsd-trio
(the issue's "mirror to a remote qsd-trio"), or ``--server qemu`` a
qemu-storage-daemon, each with an NBD export of a file node.  The daemon
under test, qemu-storage-daemon or qsd-trio, opens it with driver=nbd over a
unix socket or TCP on localhost.  The same server serves both daemons (A, B,
A, B), so the ratio compares only the clients (a qsd-trio server offers
extended headers, which only qsd-trio's client asks for).

- ``client-mirror-read``: blockdev-mirror (sync=full) from the nbd node to a
  null-co node of the same size, from the command to BLOCK_JOB_READY: the
  client's read throughput;
- ``client-mirror-write``: blockdev-mirror from a raw file on tmpfs to the nbd
  node: its write throughput (the figure docs/nbd-client.md first gave, there
  against a qsd-trio server);
- ``client-fio-*``: the daemon re-exports the nbd node over NBD on a unix
  socket and fio --ioengine=nbd runs 4 KiB random read and write at QD32 and
  1 MiB sequential read and write at QD8 against that export; the daemon's
  own NBD export is in the path too.

Beside MiB/s or IOPS and the ratio qsd-trio/qemu, each row gives the daemon's
CPU time (utime + stime, /proc/PID/stat): per request fio completed for the
fio rows, per MiB copied for the mirror rows.

With ``--multi-conn N`` both sides are qsd-trio: the "qemu" column is its nbd
node with one connection (``x-multi-conn=1``, QEMU 7.2's behaviour), the
"trio" column the same node with ``x-multi-conn=N``, so the ratio is what N
connections give (docs/nbd-client.md, "Multi-conn").

    .venv/bin/python benchmarks/nbd_client.py [--size 1024] [--rounds 2] [--runtime 3]
                                              [--server qemu-nbd|trio|qemu]
                                              [--only unix,tcp,mirror,fio,...]
                                              [--multi-conn N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common as b  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

TRANSPORTS = ("unix", "tcp")
# id, label, fio rw, block size, iodepth (None: a mirror)
WORKLOADS = [
    ("client-mirror-read", "mirror nbd -> null-co", None, None, 0),
    ("client-mirror-write", "mirror file -> nbd", None, None, 0),
    ("client-fio-randread", "re-export 4k randread QD32", "randread", "4k", 32),
    ("client-fio-randwrite", "re-export 4k randwrite QD32", "randwrite", "4k", 32),
    ("client-fio-read-1m", "re-export 1M seq read QD8", "read", "1M", 8),
    ("client-fio-write-1m", "re-export 1M seq write QD8", "write", "1M", 8),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NbdServer:
    """An NBD server of ``image`` as export ``disk`` on a unix socket or TCP:
    qemu-nbd, or a qemu-storage-daemon or qsd-trio with an NBD export of a
    file node ("qemu", "trio")."""

    def __init__(self, image: str, transport: str, workdir: str, kind: str = "qemu-nbd"):
        self.transport = transport
        if transport == "unix":
            self.path = os.path.join(workdir, "server.sock")
            if os.path.exists(self.path):
                os.unlink(self.path)
            where = ["-k", self.path]
            addr = f"addr.type=unix,addr.path={self.path}"
            self.server = f"server.type=unix,server.path={self.path}"
        else:
            self.port = free_port()
            where = ["-b", "127.0.0.1", "-p", str(self.port)]
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"
            self.server = f"server.type=inet,server.host=127.0.0.1,server.port={self.port}"
        self.proc: subprocess.Popen | None = None
        self.daemon: b.Started | None = None
        if kind != "qemu-nbd":
            self.daemon = b.Started(kind, [
                "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--nbd-server", addr,
                "--export", "type=nbd,id=e,node-name=f,name=disk,writable=on"],
                tempfile.mkdtemp(prefix="qsd-bench-nbd-server-", dir=workdir))
            self.pid = self.daemon.pid
            return
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-t", "-e", "16", "-f", "raw", "-x", "disk", "--cache=writeback",
             *where, image], stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.02)

    def _ready(self) -> bool:
        if self.transport == "unix":
            return os.path.exists(self.path)
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def wait(qmp: QEMUMonitorProtocol, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {name} within {timeout:.0f} s")
        ev = qmp.pull_event(wait=left)
        if ev and ev["event"] == name:
            if "error" in ev.get("data", {}):
                raise RuntimeError(f"{name}: {ev['data']['error']}")
            return ev


# --multi-conn N: the side ("qemu" or "trio") -> (daemon, x-multi-conn)
MULTI_CONN: dict[str, tuple[str, int]] = {}


def client_kind(kind: str) -> str:
    """The daemon that runs for a side of the comparison."""
    return MULTI_CONN[kind][0] if MULTI_CONN else kind


def nbd_node(server: NbdServer, kind: str, name: str = "n") -> str:
    extra = f",x-multi-conn={MULTI_CONN[kind][1]}" if MULTI_CONN else ""
    return f"driver=nbd,node-name={name},{server.server},export=disk{extra}"


def run_mirror(kind: str, wid: str, server: NbdServer, local: str, size_mib: int, d: str,
               timeout: float) -> tuple[float, float]:
    """MiB/s of one mirror to READY in a fresh daemon, and its CPU µs per MiB."""
    qsock = os.path.join(d, f"{kind}-qmp.sock")
    args = ["--chardev", f"socket,id=m,path={qsock},server=on,wait=off", "--monitor", "chardev=m",
            "--blockdev", nbd_node(server, kind)]
    if wid == "client-mirror-read":
        args += ["--blockdev", f"driver=null-co,node-name=l,size={size_mib * b.MiB}"]
        src, tgt = "n", "l"
    else:
        args += ["--blockdev", f"driver=file,node-name=l,filename={local}"]
        src, tgt = "l", "n"
    daemon = b.Started(client_kind(kind), args, d)
    try:
        qmp = QEMUMonitorProtocol(qsock)
        qmp.connect()
        qmp.settimeout(timeout)
        c0, s0 = b.cpu_seconds(daemon.pid), b.cpu_seconds(server.pid)
        t0 = time.perf_counter()
        r = qmp.cmd_raw("blockdev-mirror", {"job-id": "j", "device": src, "target": tgt,
                                            "sync": "full"})
        if "error" in r:
            raise RuntimeError(f"blockdev-mirror: {r['error'].get('desc')}")
        wait(qmp, "BLOCK_JOB_READY", timeout)
        dt = time.perf_counter() - t0
        c1, s1 = b.cpu_seconds(daemon.pid), b.cpu_seconds(server.pid)
        b.log(f"  server CPU {(s1 - s0) * 1e6 / size_mib:.0f} µs/MiB ({(s1 - s0) / dt:.2f} "
              f"core), client {(c1 - c0) / dt:.2f} core")
        qmp.cmd_raw("block-job-cancel", {"device": "j"})
        wait(qmp, "BLOCK_JOB_COMPLETED", timeout)
        qmp.close()
    finally:
        daemon.stop()
    return size_mib / dt, (c1 - c0) * 1e6 / size_mib


def run_fio(kind: str, server: NbdServer, d: str, work: list, rows: dict[str, b.Row],
            runtime: float) -> None:
    sock = os.path.join(d, f"{kind}-export.sock")
    args = ["--blockdev", nbd_node(server, kind),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=n,name=re,writable=on"]
    daemon = b.Started(client_kind(kind), args, d)
    try:
        fio_rows(kind, f"nbd-client {server.transport}", daemon.pid,
                 ["--ioengine=nbd", f"--uri=nbd+unix:///re?socket={sock}"], work, rows, runtime)
    finally:
        daemon.stop()


def fio_rows(kind: str, tag: str, pid: int, target: list[str], work: list,
             rows: dict[str, b.Row], runtime: float) -> None:
    """fio for each (id, label, rw, bs, depth) of ``work`` against ``target``,
    each result (or failure) added to its row and logged."""
    for wid, _label, rw, bs, depth in work:
        try:
            res = b.fio(target, pid, rw, bs, depth, runtime)
        except Exception as e:  # the row shows it; the run goes on
            rows[wid].fail(kind, e)
            continue
        rows[wid].add(kind, res.figure, res.cpu_us)
        b.log(f"{tag} {kind:4} {wid:22} {res.figure:10.1f} {rows[wid].unit:5} "
              f"{res.cpu_us:7.1f} µs/req")


def selected(only: str | None, wid: str, transport: str) -> bool:
    words = [w.strip() for w in (only or "").split(",") if w.strip()]
    transports = [w for w in words if w in TRANSPORTS]
    others = [w for w in words if w not in TRANSPORTS]
    short = wid.removeprefix("client-")
    return ((not transports or transport in transports)
            and (not others or any(short == w or short.startswith(w) for w in others)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="unix, tcp and workloads (mirror-read, mirror-write, "
                                   "fio-randread, ..., or a prefix: mirror, fio)")
    ap.add_argument("--rounds", type=int, default=2, help="A,B pairs (default 2)")
    ap.add_argument("--runtime", type=float, default=3, help="seconds per fio run (default 3)")
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--server", choices=("qemu-nbd", "trio", "qemu"), default="qemu-nbd",
                    help="the NBD server both clients use (default qemu-nbd)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per mirror")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--multi-conn", type=int, metavar="N",
                    help="compare qsd-trio's nbd node with N connections (x-multi-conn) "
                         "against the same with one, instead of against qemu-storage-daemon")
    opts = ap.parse_args()
    if opts.multi_conn is not None:
        MULTI_CONN.update(qemu=("trio", 1), trio=("trio", opts.multi_conn))
    for tool in ("fio", "qemu-nbd", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    ws = b.Workspace("qsd-bench-nbd-client-")
    d = tempfile.mkdtemp(prefix="qsd-bench-nbdc-")
    rows: list[b.Row] = []
    try:
        remote = ws.image("shm", "raw", opts.size, "remote")
        local = ws.image("shm", "raw", opts.size, "local")
        for transport in TRANSPORTS:
            work = [w for w in WORKLOADS if selected(opts.only, w[0], transport)]
            if not work:
                continue
            mine = {}
            for wid, label, rw, bs, _depth in work:
                if rw is None:
                    unit, cpu = "MiB/s", "µs/MiB"
                else:
                    unit, cpu = ("IOPS" if bs == "4k" else "MiB/s"), "µs/req"
                mine[wid] = b.Row("tmpfs", f"{transport} {label} (CPU {cpu})", unit, 1.0)
            rows.extend(mine.values())
            server = NbdServer(remote, transport, d, opts.server)
            try:
                def one(kind: str, transport=transport, work=work, mine=mine,
                        server=server) -> float:
                    for wid, _label, rw, _bs, _depth in work:
                        if rw is not None:
                            continue
                        try:
                            mibs, cpu = run_mirror(kind, wid, server, local, opts.size, d,
                                                   opts.timeout)
                        except Exception as e:  # the row shows it; the run goes on
                            mine[wid].fail(kind, e)
                            continue
                        mine[wid].add(kind, mibs, cpu)
                        b.log(f"nbd-client {transport} {kind:4} {wid:22} {mibs:10.1f} MiB/s "
                              f"{cpu:7.1f} µs/MiB")
                    fio_work = [w for w in work if w[2] is not None]
                    if fio_work:
                        try:
                            run_fio(kind, server, d, fio_work, mine, opts.runtime)
                        except Exception as e:
                            for w in fio_work:
                                mine[w[0]].fail(kind, e)
                    return 0.0

                b.alternate(one, opts.rounds)
            finally:
                server.stop()
    finally:
        ws.cleanup()
        shutil.rmtree(d, ignore_errors=True)
    sides = (f"; \"qemu\" is qsd-trio with x-multi-conn=1, \"trio\" with x-multi-conn="
             f"{opts.multi_conn}" if MULTI_CONN else "")
    b.finish(rows, opts, f"NBD client driver (driver=nbd against {opts.server}, raw image on "
                         f"tmpfs) on {b.machine()}; {opts.size} MiB image; fio "
                         f"{opts.runtime:g} s per run; {opts.rounds} rounds (A,B,A,B), "
                         f"medians{sides}")


if __name__ == "__main__":
    main()
