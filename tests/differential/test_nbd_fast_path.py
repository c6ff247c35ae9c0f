"""Pipelined NBD traffic on both daemons: what the fast path must not change.

qsd-trio serves a READ or WRITE that the node can do without waiting (a
cached read, a write into an allocated cluster) in its reader task
(BlockNode.read_now/write_now), and only the rest in request tasks.  These
tests send a few hundred requests in one burst, well past the point where
the reader stops to let others run, mixed with requests that must take the
long way (FUA, past EOF, bad flags, unallocated clusters), and compare with
qemu-storage-daemon: every reply (sorted by handle: the order replies come
back in is the server's choice), the dirty bitmap and write threshold that
writes must update, and the image afterwards, also against a model.
"""

from __future__ import annotations

import random
import shutil

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests import nbd_client as C
from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io
from tests.integration.nbd_raw import RawClient

pytestmark = pytest.mark.skipif(not HAVE_QEMU or not shutil.which("nbdinfo"),
                                reason="needs qemu-storage-daemon and nbdinfo")

SIZE = 16 << 20
ALLOCATED = 12 << 20  # written before the daemons start; the rest is unallocated


def _requests(seed: int) -> list[tuple]:
    """(type, offset, length, flags, payload) in sending order."""
    rnd = random.Random(seed)
    out = []
    for i in range(400):
        k = rnd.random()
        if k < 0.45:  # 4 KiB writes, mostly into allocated clusters
            off = rnd.randrange(0, (SIZE - (1 << 20)) // 4096) * 4096
            out.append((P.CMD_WRITE, off, 4096, P.CMD_FLAG_FUA if i % 37 == 0 else 0,
                        bytes([i % 251 + 1]) * 4096))
        elif k < 0.9:  # reads of a region no write in the burst touches
            off = (SIZE - (1 << 20)) + rnd.randrange(0, 255) * 4096
            out.append((P.CMD_READ, off, 4096, P.CMD_FLAG_DF if i % 2 else 0, b""))
        elif k < 0.95:  # unaligned write: a page read-modify-write, never inline
            out.append((P.CMD_WRITE, rnd.randrange(0, ALLOCATED - 4096) + 1, 100, 0,
                        bytes([0xEE]) * 100))
        else:
            out.append(rnd.choice([
                (P.CMD_READ, SIZE - 512, 1024, 0, b""),          # past EOF
                (P.CMD_WRITE, SIZE - 2048, 4096, 0, bytes(4096)),  # past EOF
                (P.CMD_READ, 0, 4096, P.CMD_FLAG_REQ_ONE, b""),  # bad flag
                (P.CMD_FLUSH, 0, 0, 0, b""),
            ]))
    return out


def _model(reqs: list[tuple]) -> bytearray:
    # writes never touch the read region, nor (see _no_overlapping_writes)
    # each other
    img = bytearray(b"\x5a") * ALLOCATED + bytearray(SIZE - ALLOCATED)
    for t, off, ln, _fl, data in reqs:
        if t == P.CMD_WRITE and off + ln <= SIZE:
            img[off:off + ln] = data
    return img


def _no_overlapping_writes(reqs: list[tuple]) -> list[tuple]:
    """Drop writes that overlap an earlier one: NBD leaves the order of
    requests in flight together to the server, so only disjoint ones have
    one right answer."""
    taken: list[tuple[int, int]] = []
    out = []
    for r in reqs:
        t, off, ln = r[:3]
        if t == P.CMD_WRITE and off + ln <= SIZE:
            if any(off < e and s < off + ln for s, e in taken):
                continue
            taken.append((off, off + ln))
        out.append(r)
    return out


async def _burst(sock: str, reqs: list[tuple], structured: bool) -> dict:
    c = await RawClient.connect(sock)
    try:
        await c.go("x", structured=structured)
        blob = b"".join(C.encode_request(t, h, off, ln, fl) + data
                        for h, (t, off, ln, fl, data) in enumerate(reqs))
        async with trio.open_nursery() as n:
            n.start_soon(c.s.send_all, blob)  # replies are read while it sends
            replies: dict = {}
            while len(replies) < len(reqs):
                rep, payload = await c.reply()
                t, _off, ln = reqs[rep.handle][:3]
                if structured:
                    replies.setdefault(rep.handle, []).append(
                        (rep.error, rep.type, rep.flags, bytes(payload)))
                    if not rep.done:
                        continue
                else:
                    data = await c.recv(ln) if t == P.CMD_READ and not rep.error else b""
                    replies[rep.handle] = (rep.error, data)
        await c.request(P.CMD_DISC)
        return replies
    finally:
        await c.s.aclose()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("structured", [True, False])
async def test_pipelined_burst_same(tmp_path, fmt, structured):
    reqs = _no_overlapping_writes(_requests(7))
    seen = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}.{fmt}"
        qemu_img("create", "-q", "-f", fmt, str(img), str(SIZE))
        qemu_io("-f", fmt, "-c", f"write -P 0x5a 0 {ALLOCATED}", str(img))
        sock = str(tmp_path / f"{kind}.sock")
        d = Daemon(kind, tmp_path, [
            "--blockdev", f"driver=file,node-name=proto,filename={img}",
            "--blockdev", f"driver={fmt},node-name=fmt0,file=proto",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=fmt0,name=x,writable=on"]).start()
        try:
            q = d.qmp()
            q.cmd("block-dirty-bitmap-add", node="fmt0", name="b0", granularity=65536)
            q.cmd("block-set-write-threshold", **{"node-name": "fmt0",
                                                   "write-threshold": 6 << 20})
            with trio.fail_after(60):
                replies = await _burst(sock, reqs, structured)
            blk = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
            bitmaps = blk["fmt0"]["dirty-bitmaps"]
            stats = [(s["node-name"], s["stats"]["wr_highest_offset"])
                     for s in q.cmd("query-blockstats", **{"query-nodes": True})]
            events = [e["event"] for e in q.get_events()]
            q.close()
        finally:
            d.stop()
        seen[kind] = (sorted(replies.items()), events, bitmaps, stats)
        if fmt == "qcow2":
            assert qemu_img("check", str(img)).returncode == 0
    assert seen["trio"] == seen["qemu"]
    # and the data itself against the model
    (tmp_path / "model").write_bytes(_model(reqs))
    r = qemu_img("compare", "-f", "raw", "-F", fmt, str(tmp_path / "model"),
                 str(tmp_path / f"trio.{fmt}"))
    assert r.returncode == 0, r.stdout
    errors = [h for h, rep in seen["trio"][0]
              if (rep[0][0] or (rep[0][1] or 0) & (1 << 15) if structured else rep[0])]
    assert len(errors) > 5  # the burst did exercise the error paths
    assert "BLOCK_WRITE_THRESHOLD" in seen["trio"][1]
    assert seen["trio"][2][0]["count"] > 0
