"""NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO: qemu-storage-daemon 7.2
and qsd-trio refuse (NBD_ENOTSUP) exactly the requests that would have to be
served by writing zeroes as data, and zero the others.

QEMU passes BDRV_REQ_NO_FALLBACK down the graph: a file on a file system
with fallocate zeroes any range; qcow2 v3 zeroes whole subclusters with the
zero flag and a part of one only when the rest of it already reads as zeroes
(backing files included) and it is unallocated or zero in the image; qcow2
v2 and null-co have no zero write at all; a request not aligned to a node's
request alignment (O_DIRECT) is refused before any driver sees it.  Each case runs on its own
connection against the same images in both daemons; the replies, the image
contents and the qcow2 maps must agree.
"""

from __future__ import annotations

import json
import shutil

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests import nbd_client as C
from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io
from tests.integration.nbd_raw import RawClient

pytestmark = pytest.mark.skipif(not HAVE_QEMU or not shutil.which("nbdinfo"),
                                reason="needs qemu-storage-daemon")

K = 1024
M = K * K
FAST = P.CMD_FLAG_FAST_ZERO
FAST_NO_HOLE = P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_NO_HOLE

# (export, offset, length, flags): chosen so that no case changes what
# another one sees
CASES = [
    # raw file on a file system with fallocate: everything is fast
    ("raw", 0, 64 * K, FAST),
    ("raw", 4 * K + 100, 5000, FAST),
    ("raw", 2 * M + 512, 1000, FAST_NO_HOLE),
    # qcow2 v3, no backing; data in [0, 1M)
    ("q", 128 * K, 64 * K, FAST),                 # whole data cluster: zero flag
    ("q", 64 * K + 100, 100, FAST),               # part of a data cluster: refused
    ("q", 2 * M + 4 * K, 4 * K, FAST),            # part of an unallocated cluster
    ("q", M - 4 * K, 8 * K, FAST),                # head in data: refused
    ("q", 3 * M + 4 * K, 64 * K, FAST_NO_HOLE),   # head and tail in unallocated clusters
    ("q", 512 * K, 64 * K, FAST_NO_HOLE),
    # qcow2 over a raw backing file with data in [0, 1M); own data at 3M
    ("ov", 8 * K, 4 * K, FAST),                   # backing data around it: refused
    ("ov", 2 * M + 8 * K, 4 * K, FAST),           # backing hole: fine
    ("ov", 256 * K, 64 * K, FAST),                # whole cluster over backing data
    ("ov", 3 * M + 4 * K, 4 * K, FAST),           # own data: refused
    ("ov", 1024 * K - 32 * K, 64 * K, FAST),      # head over backing data: refused
    # qcow2 with extended L2 entries (2 KiB subclusters); data in [0, 1M)
    ("x", 2 * K, 2 * K, FAST),                    # one whole subcluster
    ("x", 64 * K + 100, 1000, FAST),              # part of a data subcluster: refused
    ("x", 2 * M + 100, 1000, FAST),               # part of an unallocated subcluster
    # O_DIRECT: a request not aligned to the file's request alignment cannot
    # be made efficient (the raw format above it passes it down)
    ("direct", 100, 1000, FAST),
    ("direct", 64 * K, 128 * K, FAST),
    ("direct", 200, 1000, 0),
    ("direct", 300 * K + 1000, 20000, 0),  # data edges, zeroed middle
    # no zero write at all
    ("q2", 0, 64 * K, FAST),
    ("null", 0, 64 * K, FAST),
    # without the flag every case is served
    ("q", 64 * K + 300, 100, 0),
    ("null", 0, 64 * K, 0),
]

EXPORTS = {
    "raw": "driver=raw,node-name=raw,file.driver=file,file.filename={d}/r.img",
    "q": "driver=qcow2,node-name=q,file.driver=file,file.filename={d}/q.qcow2",
    "ov": "driver=qcow2,node-name=ov,file.driver=file,file.filename={d}/ov.qcow2",
    "x": "driver=qcow2,node-name=x,file.driver=file,file.filename={d}/x.qcow2",
    "q2": "driver=qcow2,node-name=q2,file.driver=file,file.filename={d}/q2.qcow2",
    "null": "driver=null-co,node-name=null,size=4194304",
    "direct": "driver=raw,node-name=direct,cache.direct=on,"
              "file.driver=file,file.filename={d}/rd.img",
}


def make_images(d) -> None:
    d.mkdir()
    qemu_img("create", "-f", "raw", f"{d}/r.img", "4M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 1M", f"{d}/r.img")
    qemu_img("create", "-f", "raw", f"{d}/rd.img", "4M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 1M", f"{d}/rd.img")
    qemu_img("create", "-f", "qcow2", f"{d}/q.qcow2", "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", f"{d}/q.qcow2")
    qemu_img("create", "-f", "raw", f"{d}/base.img", "4M")
    qemu_io("-f", "raw", "-c", "write -P 2 0 1M", f"{d}/base.img")
    qemu_img("create", "-f", "qcow2", "-b", f"{d}/base.img", "-F", "raw", f"{d}/ov.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 3 3M 64k", f"{d}/ov.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", f"{d}/x.qcow2", "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", f"{d}/x.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", f"{d}/q2.qcow2", "4M")


async def _run_cases(sock: str) -> list:
    out = []
    for name, off, ln, flags in CASES:
        c = await RawClient.connect(sock)
        try:
            await c.go(name)
            await c.request(P.CMD_WRITE_ZEROES, 7, off, ln, flags)
            rep, payload = await c.reply()
            err = C.parse_error_chunk(payload) if rep.type == P.REPLY_TYPE_ERROR else (0, "")
            # the connection goes on: a read after the refusal is served
            await c.request(P.CMD_READ, 8, off, 512, P.CMD_FLAG_DF)
            rep2, _ = await c.reply()
            out.append((name, off, ln, flags, rep.handle, rep.done, err, rep2.type))
            await c.request(P.CMD_DISC)
        finally:
            await c.s.aclose()
    return out


async def test_fast_zero_refused_as_qemu(tmp_path):
    seen, maps, dirs = {}, {}, {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        await trio.to_thread.run_sync(make_images, d)
        sock = str(tmp_path / f"nbd-{kind}.sock")
        args = []
        for bd in EXPORTS.values():
            args += ["--blockdev", bd.format(d=d)]
        args += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
        for name in EXPORTS:
            args += ["--export", f"type=nbd,id={name},node-name={name},writable=on"]
        daemon = Daemon(kind, tmp_path, args)
        daemon.start()
        try:
            with trio.fail_after(60):
                seen[kind] = await _run_cases(sock)
        finally:
            daemon.stop()
        maps[kind] = {img: json.loads(qemu_img("map", "--output=json", f"{d}/{img}").stdout)
                      for img in ("q.qcow2", "ov.qcow2", "x.qcow2")}
        dirs[kind] = d
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q
    # the refusals are the ones the module docstring describes
    refused = {(n, o) for n, o, _l, _f, _h, _d, err, _r in seen["trio"] if err[0] == P.ENOTSUP}
    assert refused == {("q", 64 * K + 100), ("q", M - 4 * K), ("ov", 8 * K),
                       ("ov", 3 * M + 4 * K), ("ov", 1024 * K - 32 * K), ("x", 64 * K + 100),
                       ("q2", 0), ("null", 0), ("direct", 100)}
    for img in ("r.img", "rd.img", "q.qcow2", "ov.qcow2", "x.qcow2", "q2.qcow2"):
        qemu_img("compare", f"{dirs['qemu']}/{img}", f"{dirs['trio']}/{img}")
    for img in ("q.qcow2", "ov.qcow2", "x.qcow2", "q2.qcow2"):
        assert qemu_img("check", f"{dirs['trio']}/{img}").returncode == 0

    def layout(m):
        # where zeroes and data are, not which host offsets hold them
        return [(e["start"], e["length"], e["data"], e["zero"], e.get("depth")) for e in m]

    for img in maps["qemu"]:
        assert layout(maps["trio"][img]) == layout(maps["qemu"][img]), img
