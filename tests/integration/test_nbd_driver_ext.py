"""driver=nbd and extended headers (NBD_OPT_EXTENDED_HEADERS), on the wire.

A recording proxy sits between a qsd-trio client (driver=nbd, re-exported
over NBD to qemu-io) and a real server of a 6 GiB sparse raw image: a
second qsd-trio, which offers extended headers, and qemu-storage-daemon
7.2, qemu-nbd 7.2 and nbdkit 1.32, which refuse them.  qemu-io writes and
reads through the re-export, then the client mirrors the remote disk to a
local file (a mirror from a remote node asks block status for the rest of
the disk after data: more than 4 GiB in one request where the header
allows it).  The server's image and the mirror's copy must equal a model
image that qemu-io wrote directly (raw images: qemu-img has no check for
them).

The proxy's copy of both directions is decoded afterwards with the codec:
with the qsd-trio server every request is an extended one (writes with
NBD_CMD_FLAG_PAYLOAD_LEN) and every reply an extended chunk, and a block
status request covers more than 32 bits; with the others the option is
refused with NBD_REP_ERR_UNSUP and everything is as before (structured
replies, compact requests of at most 32-bit lengths).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qsd_trio.proto import nbd as P
from tests.helpers import qemu_img, qemu_io
from tests.integration.test_mirror_hole_then_data import mirror
from tests.integration.test_nbd_driver import Server, servers  # noqa: F401
from tests.nbd_relay import relay  # noqa: F401
from tests.nbd_servers import wait_socket

MiB = 1 << 20
GiB = 1 << 30
SIZE = 6 * GiB
# (offset, length, pattern); 0 is a zero write
WRITES = [(MiB, 64 * 1024, 0x11), (5 * GiB, MiB, 0x22), (5 * GiB + 256 * 1024, 128 * 1024, 0),
          (SIZE - 4096, 4096, 0x33)]
# what reads back from them
READS = [(MiB, 64 * 1024, 0x11), (5 * GiB, 256 * 1024, 0x22),
         (5 * GiB + 256 * 1024, 128 * 1024, 0), (5 * GiB + 384 * 1024, 640 * 1024, 0x22),
         (SIZE - 4096, 4096, 0x33)]


def options_and_replies(down: bytes) -> tuple[list[tuple[int, int]], int]:
    """The server's option replies as (option, reply type), and where the
    transmission phase starts (after NBD_OPT_GO's final reply)."""
    pos = P.GREETING_SIZE
    out = []
    while True:
        opt, rep, n = P.parse_option_reply_header(down[pos:pos + P.OPTION_REPLY_HEADER_SIZE])
        pos += P.OPTION_REPLY_HEADER_SIZE + n
        out.append((opt, rep))
        if opt == P.OPT_GO and rep != P.REP_INFO:
            return out, pos


def requests(up: bytes, extended: bool) -> list[P.Request]:
    """The client's requests after its options."""
    pos = 4  # the client flags
    while True:
        _, opt, n = struct.unpack_from(">QII", up, pos)
        pos += 16 + n
        if opt == P.OPT_GO:
            break
    out = []
    while pos < len(up):
        if extended:
            req = P.parse_ext_request(up[pos:pos + P.EXT_REQUEST_SIZE])
            pos += P.EXT_REQUEST_SIZE
        else:
            req = P.parse_request(up[pos:pos + P.REQUEST_SIZE])
            pos += P.REQUEST_SIZE
        out.append(req)
        if req.type == P.CMD_WRITE:
            pos += req.length
    return out


def reply_magics(down: bytes, pos: int) -> set[int]:
    """The magics of the server's replies (all of them carry their length:
    with structured replies no simple reply has data)."""
    out = set()
    while pos < len(down):
        size = P.reply_header_size(down[pos:pos + 4])
        rep = P.parse_reply_header(down[pos:pos + size])
        out.add(struct.unpack_from(">I", down, pos)[0])
        pos += size + (rep.length if rep.type is not None else 0)
    return out


def start_server(kind: str, daemon_factory, tmp_path: Path, img: Path,
                 procs: list) -> tuple[Path, Callable[[], None]]:
    """The server's socket, and how to stop it (so that the image is free)."""
    if kind == "nbdkit":
        sock = tmp_path / "nbdkit.sock"
        proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(img)],
                                stdin=subprocess.DEVNULL)
        procs.append(proc)
        wait_socket(sock)

        def stop() -> None:
            proc.terminate()
            proc.wait()
        return sock, stop
    srv = Server(kind, daemon_factory, tmp_path, img).start()
    if srv.proc is not None:
        procs.append(srv.proc)
    return srv.sock, srv.stop


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("kind", ["trio", "qemu", "qemu-nbd", "nbdkit"])
def test_extended_headers_when_the_server_offers_them(daemon_factory, tmp_path, procs,
                                                      relay, kind):  # noqa: F811
    if kind == "nbdkit" and shutil.which("nbdkit") is None:
        pytest.fail("nbdkit is not installed")
    img, model, copy = (tmp_path / n for n in ("remote.raw", "model.raw", "copy.raw"))
    for p in (img, model, copy):
        qemu_img("create", "-q", "-f", "raw", str(p), str(SIZE))
    cmds = []
    for off, n, pat in WRITES:
        cmds += ["-c", f"write -z {off} {n}" if pat == 0 else f"write -P {pat} {off} {n}"]
    qemu_io("-f", "raw", *cmds, str(model))

    srv, stop_server = start_server(kind, daemon_factory, tmp_path, img, procs)
    rec = relay(srv, record=True)
    sock = tmp_path / "client.sock"
    c = daemon_factory("trio", [
        "--blockdev", f"driver=nbd,node-name=n,server.type=unix,"
                      f"server.path={tmp_path / 'proxy0.sock'},export=disk",
        "--blockdev", f"driver=file,node-name=copy,filename={copy}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
    ])
    uri = f"nbd+unix:///re?socket={sock}"
    qemu_io("-f", "raw", *cmds, uri)
    out = qemu_io("-f", "raw", *[a for off, n, pat in READS
                                 for a in ("-c", f"read -P {pat} {off} {n}")], uri).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == len(READS)

    mirror(c.qmp(), "n", "copy", "block-job-cancel")
    c.stop()
    rec.close()  # the client's connection has ended: its bytes are all there
    stop_server()

    for p in (img, copy):
        assert qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(model), str(p),
                        check=False).returncode == 0, p

    assert rec.conns
    for up, down in rec.conns:
        opts, pos = options_and_replies(bytes(down))
        offered = kind == "trio"
        assert opts[0] == (P.OPT_EXTENDED_HEADERS,
                           P.REP_ACK if offered else P.REP_ERR_UNSUP)
        # structured replies are asked for only when extended headers are refused
        assert [o for o, _ in opts].count(P.OPT_STRUCTURED_REPLY) == (0 if offered else 1)
        reqs = requests(bytes(up), offered)
        assert reqs[-1].type == P.CMD_DISC
        writes = [r for r in reqs if r.type == P.CMD_WRITE]
        status = [r for r in reqs if r.type == P.CMD_BLOCK_STATUS]
        if offered:
            assert all(r.flags & P.CMD_FLAG_PAYLOAD_LEN for r in writes)
            assert reply_magics(bytes(down), pos) == {P.EXTENDED_REPLY_MAGIC}
            assert max(r.length for r in status) > 1 << 32
        else:
            assert reply_magics(bytes(down), pos) <= {P.SIMPLE_REPLY_MAGIC,
                                                      P.STRUCTURED_REPLY_MAGIC}
            assert max(r.length for r in status) < 1 << 32
        assert writes and status
