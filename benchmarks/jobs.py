"""Block job throughput, qsd-trio against qemu-storage-daemon in the same run.

    .venv/bin/python benchmarks/jobs.py [--size-mib 1024] [--rounds 2]

Workloads on a fully allocated qcow2 image of ``--size-mib`` (default 1 GiB,
the issue's figure): mirror (to READY, then complete), backup (full), stream
(a 2-layer chain, the backing layer holding the data) and commit (active
commit: the top layer holding the data, committed into its backing, READY
then complete).  Each figure is MiB/s
from the command to BLOCK_JOB_COMPLETED; the daemons alternate (A B A B) so
that drift hits both.  Timing belongs here, never in a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import HEADER, Started, alternate, machine, row
from qemu.qmp.legacy import QEMUMonitorProtocol

MiB = 1 << 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def make_data_image(path: Path, size: int, fmt: str = "qcow2", backing: Path | None = None,
                    data: bool = True) -> None:
    b = ["-u", "-b", str(backing), "-F", "qcow2"] if backing else []
    sh("qemu-img", "create", "-q", "-f", fmt, *b, str(path), str(size))
    if data:
        sh("qemu-io", "-f", fmt, "-c", f"write -P 0x5a 0 {size}", str(path))


def wait(qmp: QEMUMonitorProtocol, name: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ev = qmp.pull_event(wait=max(deadline - time.monotonic(), 0.01))
        if ev and ev["event"] == name:
            return ev


def run_job(kind: str, workdir: Path, size: int, job: str, master: dict[str, Path]) -> float:
    d = workdir / f"{kind}-{job}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for name, path in master.items():
        shutil.copy(path, d / name)
    sock = d / "qmp.sock"
    args = ["--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    if job in ("mirror", "backup"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(d / "tgt.qcow2"), str(size))
        args += ["--blockdev", f"driver=qcow2,node-name=src,file.driver=file,"
                               f"file.filename={d / 'src.qcow2'}",
                 "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,"
                               f"file.filename={d / 'tgt.qcow2'}"]
    else:
        args += ["--blockdev", f"driver=qcow2,node-name=base,read-only=off,file.driver=file,"
                               f"file.filename={d / 'base.qcow2'}",
                 "--blockdev", f"driver=qcow2,node-name=top,backing=base,file.driver=file,"
                               f"file.filename={d / 'top.qcow2'}"]
    daemon = Started(kind, args, str(d))
    try:
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect()
        qmp.settimeout(600)
        t0 = time.perf_counter()
        if job == "mirror":
            qmp.cmd_raw("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                            "sync": "full"})
            wait(qmp, "BLOCK_JOB_READY")
            qmp.cmd_raw("job-complete", {"id": "j"})
        elif job == "backup":
            qmp.cmd_raw("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                            "sync": "full"})
        elif job == "stream":
            qmp.cmd_raw("block-stream", {"job-id": "j", "device": "top"})
        elif job == "commit":
            # the top is the active layer: an active commit, READY then complete
            qmp.cmd_raw("block-commit", {"job-id": "j", "device": "top", "base-node": "base"})
            wait(qmp, "BLOCK_JOB_READY")
            qmp.cmd_raw("job-complete", {"id": "j"})
        ev = wait(qmp, "BLOCK_JOB_COMPLETED")
        dt = time.perf_counter() - t0
        if "error" in ev.get("data", {}):
            raise RuntimeError(f"{kind} {job}: {ev['data']['error']}")
        qmp.close()
    finally:
        daemon.stop()
    shutil.rmtree(d, ignore_errors=True)
    return size / MiB / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", default="mirror,backup,stream,commit")
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-", dir=os.environ.get("TMPDIR")))
    try:
        src = work / "src.qcow2"
        make_data_image(src, size)
        # stream: data in the backing layer; commit: data in the top layer
        sbase, stop_ = work / "s-base.qcow2", work / "s-top.qcow2"
        shutil.copy(src, sbase)
        make_data_image(stop_, size, backing=Path("base.qcow2"), data=False)
        cbase, ctop = work / "c-base.qcow2", work / "c-top.qcow2"
        make_data_image(cbase, size, data=False)
        make_data_image(ctop, size)
        sh("qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", str(ctop))
        masters = {"mirror": {"src.qcow2": src}, "backup": {"src.qcow2": src},
                   "stream": {"base.qcow2": sbase, "top.qcow2": stop_},
                   "commit": {"base.qcow2": cbase, "top.qcow2": ctop}}
        print(f"{machine()}; image {opts.size_mib} MiB qcow2, fully allocated\n")
        print(HEADER)
        for job in opts.jobs.split(","):
            res = alternate(lambda kind, job=job: run_job(kind, work, size, job, masters[job]),
                            opts.rounds)
            print(row(f"{job} ({opts.size_mib} MiB)", "MiB/s", res, target=0.9), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
