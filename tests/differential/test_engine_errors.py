"""I/O errors from each engine reach clients as with qemu-storage-daemon
(issue 11): the same command line for both daemons, the same replies.

- EIO and other errnos injected by blkdebug (once and always, on reads and
  writes) below a raw node exported over NBD: every reply chunk, errno and
  message included, is compared.  NBD exports have no rerror/werror in 7.2
  (a failed request is reported to the client), so the replies are the
  whole story.
- ENOSPC from a small tmpfs (8 MiB, the image a sparse 32 MiB raw file):
  NBD writes until the file system is full, trim to make room, write again.
- ENOSPC on a mirror target on such a tmpfs with on-target-error
  report/stop/enospc: the events and QMP replies are compared (timestamps
  and progress numbers dropped, repeats of one event in a row counted once:
  how many requests were in flight when the disk filled is not the point).
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests.differential.test_jobs import Transcript
from tests.engines import ALL, ENGINES
from tests.helpers import HAVE_QEMU, Daemon, mounted
from tests.integration.nbd_raw import RawClient

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
KINDS = ("qemu", "trio")


def summary(chunks: list) -> list:
    """Reply chunks with data replaced by its length and digest."""
    out = []
    for handle, error, type_, flags, payload in chunks:
        if len(payload) > 64:
            payload = (payload[:8] if type_ == P.REPLY_TYPE_OFFSET_DATA else b"",
                       len(payload), hashlib.sha256(payload).hexdigest()[:16])
        out.append((handle, error, type_, flags, payload))
    return out


async def transcript(sock: str, requests: list, *, structured: bool = True) -> list:
    """Each request in turn, with its whole reply; a server that drops the
    connection (QEMU does for some read errors) is recorded, and the next
    request goes over a new connection."""
    out = []
    c = None
    try:
        with trio.fail_after(60):
            for i, (type_, off, length, flags, data) in enumerate(requests):
                if c is None:
                    c = await RawClient.connect(sock)
                    await c.go("x", structured=structured)
                try:
                    chunks = await c.command(type_, i, off, length, flags, data)
                except (EOFError, trio.BrokenResourceError):
                    out.append((i, "disconnected"))
                    RawClient.opened.remove(c)
                    await c.s.aclose()
                    c = None
                    continue
                out.append((i, summary(chunks)))
        return out
    finally:
        if c is not None:
            RawClient.opened.remove(c)
            await c.s.aclose()


def failed(transcript: list) -> list:
    """The requests of a transcript that failed (or lost the connection)."""
    return [i for i, chunks in transcript if chunks == "disconnected"
            or any(c[1] or c[2] == P.REPLY_TYPE_ERROR for c in chunks)]


def start(kind: str, tmp_path, blockdev: str, sock) -> Daemon:
    d = Daemon(kind, tmp_path, ["--blockdev", blockdev,
                                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                "--export", "type=nbd,id=e,node-name=n,name=x,writable=on"])
    return d.start()


# -- blkdebug ---------------------------------------------------------------------------
# event, errno, sector, once, iotype ("" for blkdebug's default set)
RULES = [
    ("read_aio", 5, 8192, "on", "read"), ("write_aio", 5, 4096, "off", "write"),
    ("write_aio", 28, 12288, "on", "write"), ("read_aio", 1, 14336, "off", "read"),
    ("write_aio", 27, 10240, "on", "write"), ("read_aio", 12, 6144, "on", "read")]


def blkdebug_blockdev(img, engine, rules=RULES) -> str:
    opts = (f"driver=raw,node-name=n,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={img}" + engine.keyval("file.image."))
    for i, (event, err, sector, once, iotype) in enumerate(rules):
        opts += (f",file.inject-error.{i}.event={event},file.inject-error.{i}.errno={err}"
                 f",file.inject-error.{i}.sector={sector},file.inject-error.{i}.once={once}")
        if iotype:
            opts += f",file.inject-error.{i}.iotype={iotype}"
    return opts


def blkdebug_requests(rules=RULES, mid_sector=False) -> list:
    w = random.Random(1).randbytes(65536)
    R, W, Z = P.CMD_READ, P.CMD_WRITE, P.CMD_WRITE_ZEROES
    reqs = []
    for sector in sorted({r[2] for r in rules}):
        off = sector * 512
        if mid_sector:  # starts after the rule's offset, inside its sector
            reqs += [(R, off + 100, 1000, 0, b""), (W, off + 100, 1000, 0, w[:1000])]
        reqs += [(R, off, 4096, 0, b""), (R, off, 4096, 0, b""),  # once, or again
                 (R, off - 512, 1024, 0, b""), (W, off, 4096, 0, w[:4096]),
                 (W, off, 4096, 0, w[:4096]), (W, off - 4096, 8192, P.CMD_FLAG_FUA, w[:8192]),
                 (Z, off, 4096, 0, b""), (R, off - 4096, 65536, 0, b"")]
    return reqs + [(P.CMD_FLUSH, 0, 0, 0, b""), (R, 0, 65536, 0, b""),
                   (W, 65536, 65536, 0, w), (R, 65536, 65536, 0, b"")]


async def blkdebug_same(tmp_path, engine, rules, structured, mid_sector=False) -> None:
    seen = {}
    for kind in KINDS:
        img = tmp_path / f"{kind}.raw"
        img.write_bytes(random.Random(2).randbytes(8 * MiB))
        sock = tmp_path / f"{kind}.sock"
        d = start(kind, tmp_path, blkdebug_blockdev(img, engine, rules), sock)
        try:
            seen[kind] = await transcript(str(sock), blkdebug_requests(rules, mid_sector),
                                          structured=structured)
        finally:
            d.stop()
        assert "Traceback" not in d.stderr(), d.stderr()
        seen[kind].append(hashlib.sha256(img.read_bytes()).hexdigest())
    assert len(failed(seen["qemu"][:-1])) > 2  # errors were injected
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q


@pytest.mark.parametrize("engine", ENGINES)
async def test_blkdebug_errors_same(tmp_path, engine):
    """Read and write errors, once and always, in simple replies."""
    await blkdebug_same(tmp_path, engine, RULES, structured=False)


@pytest.mark.parametrize("engine", ENGINES)
async def test_blkdebug_write_errors_structured_same(tmp_path, engine):
    """Write errors as error chunks (read errors in structured replies are
    test_blkdebug_structured_read_error_same's)."""
    await blkdebug_same(tmp_path, engine, [r for r in RULES if r[4] == "write"],
                        structured=True)


async def test_blkdebug_structured_read_error_same(tmp_path):
    """A read that fails in a structured reply: qemu-storage-daemon 7.2 drops
    the connection ('Failed to send reply: reading from file failed')."""
    await blkdebug_same(tmp_path, ALL[0], [r for r in RULES if r[4] == "read"],
                        structured=True)


async def test_blkdebug_default_rules_same(tmp_path):
    """Rules without iotype (blkdebug's default set: read, write,
    write-zeroes, discard, flush; not block-status): a rule is armed by its
    event (read_aio, write_aio) and disarmed by the next event that has
    rules, as QEMU's active_rules are; a rule's sector matches requests that
    contain its first byte; EDQUOT reaches NBD clients as ENOSPC (QEMU's
    system_errno_to_nbd_errno)."""
    rules = [r[:4] + ("",) for r in RULES] + [("write_aio", 122, 2048, "on", "")]
    await blkdebug_same(tmp_path, ALL[0], rules, structured=False, mid_sector=True)


# -- ENOSPC through NBD -----------------------------------------------------------------
def small_tmpfs(tmp_path, name):
    return mounted(tmp_path / name, "-t", "tmpfs", "-o", "size=8M", "tmpfs")


def sparse_image(path, size) -> None:
    path.write_bytes(b"")
    os.truncate(path, size)


def enospc_requests() -> list:
    W, R = P.CMD_WRITE, P.CMD_READ
    reqs = [(W, i * MiB, MiB, 0, bytes([i + 1]) * MiB) for i in range(10)]
    reqs += [(P.CMD_FLUSH, 0, 0, 0, b""), (R, 0, 4096, 0, b""), (R, 9 * MiB, 4096, 0, b""),
             (W, 20 * MiB + 100, 5000, P.CMD_FLAG_FUA, b"u" * 5000),
             (P.CMD_WRITE_ZEROES, 24 * MiB, MiB, P.CMD_FLAG_NO_HOLE, b""),
             (P.CMD_TRIM, 0, 4 * MiB, 0, b""),
             (W, 9 * MiB, MiB, 0, b"\x99" * MiB), (R, 9 * MiB, MiB, 0, b""),
             (P.CMD_WRITE_ZEROES, 24 * MiB, MiB, P.CMD_FLAG_NO_HOLE, b""),
             (W, 28 * MiB, 4 * MiB, 0, b"\x42" * 4 * MiB), (P.CMD_FLUSH, 0, 0, 0, b""),
             (R, 28 * MiB, 65536, 0, b"")]
    return reqs


@pytest.mark.parametrize("engine", ENGINES)
async def test_enospc_nbd_same(tmp_path, engine):
    seen = {}
    for kind in KINDS:
        with small_tmpfs(tmp_path, f"fs-{kind}") as mnt:
            img = mnt / "disk.raw"
            sparse_image(img, 32 * MiB)
            sock = tmp_path / f"{kind}.sock"
            d = start(kind, tmp_path, f"driver=file,node-name=n,filename={img},discard=unmap"
                      + engine.keyval(), sock)
            try:
                seen[kind] = await transcript(str(sock), enospc_requests())
            finally:
                d.stop()
            assert "Traceback" not in d.stderr(), d.stderr()
            seen[kind].append(hashlib.sha256(img.read_bytes()).hexdigest())
    assert len(failed(seen["qemu"][:-1])) > 2  # the scenario does fill the file system
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q


# -- ENOSPC on a mirror target ----------------------------------------------------------
def collapsed(lines: list) -> list:
    out = []
    for line in lines:
        if not out or out[-1] != line:
            out.append(line)
    return out


@pytest.mark.parametrize("policy", ["report", "stop", "enospc"])
@pytest.mark.parametrize("engine", ENGINES)
def test_mirror_target_enospc_same(daemon_factory, tmp_path, engine, policy):
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(3).randbytes(12 * MiB))
    seen = {}
    for kind in KINDS:
        with small_tmpfs(tmp_path, f"fs-{kind}") as mnt:
            tgt = mnt / "tgt.raw"
            sparse_image(tgt, 12 * MiB)
            d = daemon_factory(kind, [
                "--blockdev", f"driver=file,node-name=src,filename={src}" + engine.keyval(),
                "--blockdev", f"driver=file,node-name=tgt,filename={tgt}" + engine.keyval()])
            t = Transcript(d.qmp())
            # one operation at a time: the failing one is the first to reach a full disk
            t.cmd("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                      "sync": "full", "on-target-error": policy,
                                      "granularity": MiB, "buf-size": MiB})
            if policy == "report":
                t.until("JOB_STATUS_CHANGE", timeout=5, status="null")
            else:
                t.until("JOB_STATUS_CHANGE", timeout=5, status="paused")
                t.cmd("query-block-jobs")
                t.cmd("block-job-resume", {"device": "j"})
                t.until("JOB_STATUS_CHANGE", timeout=5, status="paused")
                t.cmd("job-cancel", {"id": "j"})
                t.until("JOB_STATUS_CHANGE", timeout=5, status="null")
            t.cmd("query-block-jobs")
            time.sleep(0.1)
            t.events()
            d.stop()
            assert "Traceback" not in d.stderr(), d.stderr()
            seen[kind] = collapsed(t.lines)
            # what reached the target is the source's, wherever it stopped
            got = tgt.read_bytes()
            want = src.read_bytes()
            assert all(got[i:i + MiB] in (want[i:i + MiB], bytes(MiB))
                       for i in range(0, len(got), MiB))
    assert ("event", "BLOCK_JOB_ERROR", {"device": "j", "operation": "write",
                                         "action": "report" if policy == "report" else "stop"}
            ) in seen["qemu"]
    assert seen["trio"] == seen["qemu"]
