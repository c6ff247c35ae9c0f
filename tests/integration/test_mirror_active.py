"""copy-mode=write-blocking: a guest write reaches the mirror target before
it is acknowledged.

qsd-trio mirrors a qcow2 source (exported over NBD) to a raw file at a
speed so low that the background copy stops after its first chunk.  A
real NBD client (nbdsh, libnbd) writes through the export and, after each
acknowledged request, reads the target file itself: with write-blocking the
data is there already (the aligned part of a write; an unaligned edge of a
still-dirty granule is left to the background copy, as in QEMU), with the
default background mode it is not.  The job then completes; both images
are compared with a model of what was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.helpers import qemu_img

MiB = 1 << 20
K64 = 64 << 10
SIZE = 8 * MiB

# (offset, length, fill byte) of the writes; zero writes use fill None (this one
# lands in the first chunk, which the background copy has already copied)
WRITES = [(1 * MiB, K64, 0x11), (3 * MiB + K64, 2 * K64, 0x22), (7 * MiB, MiB, 0x33),
          (MiB // 2, K64, None), (5 * MiB, K64, 0x44), (5 * MiB, K64, 0x55)]
# unaligned: its whole granules (4 MiB + 64 KiB .. 4 MiB + 192 KiB) reach the
# target at once; an edge in a granule that is still dirty would be left to
# the background copy
UNALIGNED = (4 * MiB + 1000, 3 * K64, 0x66)

CLIENT = """
import json, os
fd = os.open(os.environ["TARGET"], os.O_RDONLY)
seen = []
for off, n, fill in json.loads(os.environ["WRITES"]):
    if fill is None:
        h.zero(n, off)
        want = bytes(n)
    else:
        want = bytes([fill]) * n
        h.pwrite(want, off)
    # acknowledged: what does the target hold now?
    seen.append(os.pread(fd, n, off) == want)
off, n, fill = json.loads(os.environ["UNALIGNED"])
h.pwrite(bytes([fill]) * n, off)
a = -(-off // 65536) * 65536
b = (off + n) // 65536 * 65536
seen.append(os.pread(fd, b - a, a) == bytes([fill]) * (b - a))
h.flush()
print(json.dumps(seen))
"""


def _ok(reply):
    assert "return" in reply, reply
    return reply["return"]


def _wait_job(q, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        jobs = q.cmd_raw("query-block-jobs", {})["return"]
        if jobs and pred(jobs[0]):
            return jobs[0]
        assert time.monotonic() < deadline, jobs
        time.sleep(0.02)


def _wait_event(q, name, **match):
    while True:
        ev = q.pull_event(wait=20.0)
        assert ev is not None
        if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
            return ev


@pytest.mark.parametrize("mode", ["write-blocking", "background"])
def test_guest_writes_reach_the_target_before_the_ack(daemon_factory, tmp_path, mode):
    src, dst, sock = tmp_path / "src.qcow2", tmp_path / "dst.raw", tmp_path / "nbd.sock"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    model = bytearray(SIZE)
    model[:3 * MiB] = b"\x07" * (3 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {3 * MiB}", str(src)],
                   check=True, capture_output=True)
    dst.write_bytes(b"")
    os.truncate(dst, SIZE)
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=src-f,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=src-f",
        "--blockdev", f"driver=file,node-name=dst,filename={dst}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=src,name=src,writable=on"])
    q = d.qmp()
    _ok(q.cmd_raw("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst",
                                      "sync": "full", "speed": 1, "copy-mode": mode}))
    # the first chunk is copied, then the job waits for its (tiny) speed
    _wait_job(q, lambda j: j["offset"] > 0 and not j["busy"])

    env = dict(os.environ, TARGET=str(dst), WRITES=json.dumps(WRITES),
               UNALIGNED=json.dumps(UNALIGNED), PATH="/usr/bin:" + os.environ["PATH"])
    p = subprocess.run(["nbdsh", "-u", f"nbd+unix:///src?socket={sock}", "-c", CLIENT],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout)
    if mode == "write-blocking":
        assert seen == [True] * (len(WRITES) + 1)
    else:
        assert seen == [False] * (len(WRITES) + 1)
    for off, n, fill in [*WRITES, UNALIGNED]:
        model[off:off + n] = bytes(n) if fill is None else bytes([fill]) * n

    _ok(q.cmd_raw("block-job-set-speed", {"device": "j", "speed": 0}))
    _wait_event(q, "BLOCK_JOB_READY")
    _ok(q.cmd_raw("job-complete", {"id": "j"}))
    _wait_event(q, "JOB_STATUS_CHANGE", id="j", status="null")
    d.stop()
    qemu_img("check", "-q", str(src))
    assert dst.read_bytes() == bytes(model)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", str(src), str(dst))
