"""One NBD scenario, two daemons: qemu-storage-daemon 7.2 and qsd-trio.

Each test starts both daemons with the same command line over copies of the
same image and compares what clients see: nbdinfo --json / --map output,
option and command replies at byte level (reply types, error codes, error
messages), QMP replies and events, and the data written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests import nbd_client as C
from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io
from tests.integration.nbd_helpers import make_pki
from tests.integration.nbd_raw import RawClient

pytestmark = pytest.mark.skipif(not HAVE_QEMU or not shutil.which("nbdinfo"),
                                reason="needs qemu-storage-daemon and nbdinfo")

KINDS = ("qemu", "trio")


def make_image(path, fmt="raw"):
    qemu_img("create", "-f", fmt, str(path), "64M")
    qemu_io("-f", fmt, "-c", "write -P 0xab 1M 2M", "-c", "write -z 8M 1M",
            "-c", "write -P 7 20M 64k", str(path))


@pytest.fixture
def pair(tmp_path):
    """pair(extra_args, fmt) -> {kind: (daemon, socket path, image path)}."""
    started: list[Daemon] = []

    def start(export_args: list[str], fmt: str = "raw", blockdev: str | None = None):
        out = {}
        for kind in KINDS:
            img = tmp_path / f"{kind}.{fmt}"
            make_image(img, fmt)
            sock = tmp_path / f"nbd-{kind}.sock"
            bd = blockdev or (f"driver=file,node-name=file0,filename={img}" if fmt == "raw" else
                              f"driver={fmt},node-name=fmt0,file.driver=file,file.filename={img}")
            node = "file0" if fmt == "raw" and blockdev is None else "fmt0"
            args = ["--blockdev", bd, "--nbd-server", f"addr.type=unix,addr.path={sock}"]
            for e in export_args:
                args += ["--export", e.format(node=node)]
            d = Daemon(kind, tmp_path, args)
            started.append(d)
            d.start()
            out[kind] = (d, str(sock), img)
        return out

    yield start
    for d in started:
        d.stop()


def nbdinfo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60)


def norm(text: str, sock: str) -> str:
    return text.replace(sock, "SOCK")


@pytest.mark.parametrize("export", [
    "type=nbd,id=e,node-name={node},writable=on,description=hello",
    "type=nbd,id=e,node-name={node},name=ro",
    "type=nbd,id=e,node-name={node},name=d,allocation-depth=on,writable=on",
])
def test_nbdinfo_json_same(pair, export):
    p = pair([export])
    seen = {}
    for kind, (_d, sock, _img) in p.items():
        r = nbdinfo("--json", "--list", f"nbd+unix:///?socket={sock}")
        assert r.returncode == 0, r.stderr
        seen[kind] = json.loads(norm(r.stdout, sock))
    assert seen["trio"] == seen["qemu"]


def test_names_with_nul_same(pair):
    """A NUL in a QMP string is kept as the bytes C0 80 (QEMU's modified
    UTF-8): the export's name and description go on the wire that way, and
    a client asks for the export by those bytes."""
    p = pair([])
    seen = {}
    for kind, (d, sock, _img) in p.items():
        q = d.qmp()
        r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "n", "node-name": "file0",
                                           "name": "a\u0000b", "description": "d\u0000"})
        assert r == {"return": {}}, r
        listing = subprocess.run(["nbdinfo", "--list", f"nbd+unix:///?socket={sock}"],
                                 capture_output=True, timeout=60)
        size = nbdinfo("--size", f"nbd+unix:///a%C0%80b?socket={sock}")
        seen[kind] = (listing.returncode, listing.stdout.replace(sock.encode(), b"SOCK"),
                      size.returncode, size.stdout)
    assert seen["trio"] == seen["qemu"]
    assert b"a\xc0\x80b" in seen["qemu"][1] and seen["qemu"][2:] == (0, "67108864\n")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("ctx", ["base:allocation", "qemu:allocation-depth"])
def test_map_same(pair, fmt, ctx):
    p = pair(["type=nbd,id=e,node-name={node},name=x,allocation-depth=on"], fmt)
    seen = {}
    for kind, (_d, sock, _img) in p.items():
        r = nbdinfo(f"--map={ctx}", "--json", f"nbd+unix:///x?socket={sock}")
        assert r.returncode == 0, r.stderr
        seen[kind] = json.loads(r.stdout)
    assert seen["trio"] == seen["qemu"]


def test_writes_land_the_same(pair):
    p = pair(["type=nbd,id=e,node-name={node},name=x,writable=on"], "qcow2")
    ops = ["write -P 0x11 0 4k", "write -P 0x22 1M 1M", "write -z 1536k 64k", "discard 20M 64k",
           "write -z -u 2M 2M", "write -P 0x33 63M 1M", "aio_write -P 0x44 30M 8k",
           "aio_write -P 0x55 30728k 4k", "aio_flush"]  # concurrent, not overlapping
    for _kind, (d, sock, _img) in p.items():
        argv = []
        for op in ops:
            argv += ["-c", op]
        qemu_io("-f", "raw", *argv, f"nbd+unix:///x?socket={sock}")
        d.stop()
    qimg, timg = p["qemu"][2], p["trio"][2]
    assert qemu_img("check", str(timg)).returncode == 0
    assert qemu_img("compare", str(qimg), str(timg)).returncode == 0
    # and against an independent expectation of a few ranges
    r = qemu_io("-f", "qcow2", "-c", "read -P 0x11 0 4k", "-c", "read -P 0x22 1M 512k",
                "-c", "read -P 0 1536k 64k", "-c", "read -P 0x55 30728k 4k",
                "-c", "read -P 0x44 30M 8k", "-c", "read -P 0x33 63M 1M", str(timg))
    assert "Pattern verification failed" not in r.stdout


async def _transcript(sock: str) -> list:
    """Option- and command-level replies to a fixed series of odd requests."""
    out: list = []
    c = await RawClient.connect(sock)
    try:
        await c.handshake()
        for opt, data in [
            (99, b"junk"),
            (P.OPT_LIST, b"x"),
            (P.OPT_INFO, C.encode_info_request("nope", [])),
            (P.OPT_INFO, b"\0\0\0\x09short"),
            (P.OPT_SET_META_CONTEXT, C.encode_meta_request("x", ["base:allocation"])),
            (P.OPT_STARTTLS, b""),
            (P.OPT_STARTTLS, b"x"),
            (P.OPT_PEEK_EXPORT, b""),
            (P.OPT_STRUCTURED_REPLY, b"x"),
            (P.OPT_STRUCTURED_REPLY, b""),
            (P.OPT_STRUCTURED_REPLY, b""),
            (P.OPT_LIST_META_CONTEXT, C.encode_meta_request("x", [])),
            (P.OPT_LIST_META_CONTEXT, C.encode_meta_request("x", ["qemu:"])),
            (P.OPT_LIST_META_CONTEXT, C.encode_meta_request("nope", [])),
            (P.OPT_SET_META_CONTEXT, C.encode_meta_request("x", ["base:allocation", "qemu:"])),
            (P.OPT_INFO, C.encode_info_request("x", [P.INFO_NAME, P.INFO_BLOCK_SIZE, 77])),
            (P.OPT_GO, C.encode_info_request("x", [])),
        ]:
            out.append(("opt", opt, await c.option(opt, data)))
        for t, off, ln, fl, data in [
            (P.CMD_READ, (64 << 20) - 512, 1024, 0, b""),
            (P.CMD_READ, 0, 0, 0, b""),
            (P.CMD_READ, 1 << 20, 4096, P.CMD_FLAG_DF, b""),
            (P.CMD_READ, (1 << 20) - 4096, 8192, 0, b""),
            (P.CMD_WRITE, 0, 4, 0, b"abcd"),
            (P.CMD_WRITE_ZEROES, 0, 4096, 0, b""),
            (P.CMD_TRIM, 0, 4096, 0, b""),
            (P.CMD_FLUSH, 0, 0, P.CMD_FLAG_DF, b""),
            (P.CMD_READ, 0, 512, P.CMD_FLAG_REQ_ONE, b""),
            (42, 0, 0, 0, b""),
            (P.CMD_BLOCK_STATUS, 0, 0, 0, b""),
            (P.CMD_BLOCK_STATUS, 0, 64 << 20, P.CMD_FLAG_REQ_ONE, b""),
            (P.CMD_BLOCK_STATUS, 512, 10 << 20, 0, b""),
            (P.CMD_CACHE, 0, 4096, 0, b""),
            (P.CMD_FLUSH, 0, 0, 0, b""),
            (P.CMD_READ, 0, (32 << 20) + 1, 0, b""),
        ]:
            await c.request(t, handle=len(out), offset=off, length=ln, flags=fl, data=data)
            chunks = []
            while True:
                rep, payload = await c.reply()
                if rep.type == P.REPLY_TYPE_OFFSET_DATA:
                    payload = (payload[:8], len(payload))
                chunks.append((rep.handle, rep.error, rep.type, rep.flags, payload))
                if rep.done:
                    break
            if t == P.CMD_READ and not chunks[0][2] and not chunks[0][1]:
                chunks.append(await c.recv(ln))
            out.append(("cmd", t, chunks))
        await c.request(P.CMD_DISC)
        out.append(("closed after disc", await c.closed()))
    finally:
        await c.s.aclose()
    return out


async def test_protocol_transcript_same(pair):
    p = pair(["type=nbd,id=e,node-name={node},name=x,allocation-depth=on"])
    seen = {}
    for kind, (_d, sock, _img) in p.items():
        with trio.fail_after(30):
            seen[kind] = await _transcript(sock)
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",
    b"\0\0\0\x03" + b"NOTMAGIC" + bytes(8),
    b"\0\0\0\x03" + C.encode_option(P.OPT_EXPORT_NAME, b"nope"),
    b"\0\0\0\x03" + C.encode_option(P.OPT_ABORT),
    b"\0\0\0\x01" + C.encode_option(99),
])
async def test_bad_handshakes_same(pair, garbage):
    p = pair(["type=nbd,id=e,node-name={node},name=x"])
    seen = {}
    for kind, (_d, sock, _img) in p.items():
        c = await RawClient.connect(sock)
        try:
            await c.recv(18)
            await c.s.send_all(garbage)
            got, closed = b"", False
            # what the server says, and whether it hangs up within a second
            with trio.move_on_after(1):
                while True:
                    try:
                        d = await c.s.receive_some(4096)
                    except trio.BrokenResourceError:
                        d = b""
                    if not d:
                        closed = True
                        break
                    got += d
            seen[kind] = (got, closed)
        finally:
            await c.s.aclose()
        # the daemon goes on serving
        assert nbdinfo(f"nbd+unix:///x?socket={sock}").returncode == 0
    assert seen["trio"] == seen["qemu"]


def _qmp_script(d: Daemon, sock2: str) -> list:
    q = d.qmp()
    out = []
    for cmd, args in [
        ("query-block-exports", {}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "nope"}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "file0"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "file0"}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "file0", "name": "y",
                              "description": "d", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e4", "node-name": "file0", "name": "z",
                              "iothread": "nope"}),
        ("block-export-add", {"type": "nbd", "id": "1bad", "node-name": "file0"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock2}}}),
        ("query-block-exports", {}),
        ("block-export-del", {"id": "nope"}),
        ("block-export-del", {"id": "e3"}),
        ("nbd-server-remove", {"name": "nope"}),
        ("nbd-server-add", {"device": "file0", "name": "old", "writable": True}),
        ("nbd-server-remove", {"name": "old", "mode": "hard"}),
        ("blockdev-del", {"node-name": "file0"}),
        ("nbd-server-stop", {}),
        ("query-block-exports", {}),
        ("nbd-server-stop", {}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "file0"}),
    ]:
        r = q.cmd_raw(cmd, args) if hasattr(q, "cmd_raw") else q.cmd(cmd, args)
        r.pop("id", None)
        out.append((cmd, r))
    events = [(e["event"], e.get("data")) for e in q.get_events(wait=0.5)]
    out.append(("events", sorted(events, key=str)))
    return out


def test_qmp_export_commands_same(pair, tmp_path):
    p = pair(["type=nbd,id=e,node-name={node},name=x"])
    seen = {kind: _qmp_script(d, str(tmp_path / f"x-{kind}.sock")) for kind, (d, _s, _i) in p.items()}
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q


async def test_safe_delete_with_client_same(pair):
    p = pair(["type=nbd,id=e,node-name={node},name=x"])
    seen = {}
    for kind, (d, sock, _img) in p.items():
        q = d.qmp()
        c = await RawClient.connect(sock)
        try:
            with trio.fail_after(10):
                await c.go("x")
            res = [q.cmd_raw("block-export-del", {"id": "e"}),
                   q.cmd_raw("query-block-exports"),
                   q.cmd_raw("block-export-del", {"id": "e", "mode": "hard"})]
            ev = q.pull_event(wait=5.0)
            res.append((ev["event"], ev["data"]))
            with trio.fail_after(10):
                res.append(("client closed", await c.closed()))
            res.append(q.cmd_raw("query-block-exports"))
            for r in res:
                if isinstance(r, dict):
                    r.pop("id", None)
            seen[kind] = res
        finally:
            await c.s.aclose()
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"][0]["error"]["desc"] == "export 'e' still in use"


def test_dirty_bitmap_map_same(pair):
    p = pair(["type=nbd,id=e,node-name={node},name=x,writable=on"], "qcow2")
    seen = {}
    for kind, (d, sock, _img) in p.items():
        q = d.qmp()
        assert "return" in q.cmd_raw("block-dirty-bitmap-add",
                                     {"node": "fmt0", "name": "b0", "granularity": 65536})
        qemu_io("-f", "raw", "-c", "write -P 1 100k 10k", "-c", "write -z 5M 1M",
                "-c", "write -P 2 63M 1M", f"nbd+unix:///x?socket={sock}")
        r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "b", "node-name": "fmt0",
                                           "name": "b", "bitmaps": ["b0"]})
        res = [r.get("error")]
        q.cmd_raw("block-dirty-bitmap-disable", {"node": "fmt0", "name": "b0"})
        r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "b", "node-name": "fmt0",
                                           "name": "b", "bitmaps": ["b0"]})
        res.append(r)
        out = nbdinfo("--map=qemu:dirty-bitmap:b0", "--json", f"nbd+unix:///b?socket={sock}")
        res.append(json.loads(out.stdout) if out.returncode == 0 else out.stderr)
        res.append(norm(nbdinfo("--json", f"nbd+unix:///b?socket={sock}").stdout, sock))
        seen[kind] = res
    assert seen["trio"] == seen["qemu"]


async def _transcript_rw(sock: str) -> list:
    out: list = []
    c = await RawClient.connect(sock)
    try:
        await c.handshake()
        await c.option(P.OPT_STRUCTURED_REPLY)
        out.append(await c.option(P.OPT_SET_META_CONTEXT,
                                  C.encode_meta_request("x", ["base:allocation",
                                                             "qemu:allocation-depth"])))
        out.append(await c.option(P.OPT_GO, C.encode_info_request("x", [P.INFO_BLOCK_SIZE])))
        for t, off, ln, fl, data in [
            (P.CMD_WRITE, 4096, 4096, P.CMD_FLAG_FUA, b"w" * 4096),
            (P.CMD_WRITE, (64 << 20) - 2, 4, 0, b"over"),
            (P.CMD_WRITE_ZEROES, 1 << 20, 65536, P.CMD_FLAG_NO_HOLE, b""),
            (P.CMD_WRITE_ZEROES, 2 << 20, 65536, P.CMD_FLAG_FAST_ZERO, b""),
            (P.CMD_WRITE_ZEROES, 0, 8192, 0, b""),
            (P.CMD_WRITE_ZEROES, 0, 0, P.CMD_FLAG_DF, b""),
            (P.CMD_TRIM, 20 << 20, 65536, 0, b""),
            (P.CMD_TRIM, 64 << 20, 1, 0, b""),
            (P.CMD_READ, 0, 16384, 0, b""),
            (P.CMD_BLOCK_STATUS, 0, 4 << 20, 0, b""),
            (P.CMD_BLOCK_STATUS, 1 << 20, 3 << 20, P.CMD_FLAG_REQ_ONE, b""),
            (P.CMD_FLUSH, 0, 0, 0, b""),
        ]:
            await c.request(t, handle=len(out), offset=off, length=ln, flags=fl, data=data)
            chunks = []
            while True:
                rep, payload = await c.reply()
                if rep.type == P.REPLY_TYPE_OFFSET_DATA:
                    payload = (payload[:8], len(payload), payload[8:].count(b"w"))
                chunks.append((rep.handle, rep.error, rep.type, rep.flags, payload))
                if rep.done:
                    break
            out.append(("cmd", t, chunks))
    finally:
        await c.s.aclose()
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_protocol_transcript_writable_same(pair, fmt):
    p = pair(["type=nbd,id=e,node-name={node},name=x,allocation-depth=on,writable=on"], fmt)
    seen = {}
    for kind, (_d, sock, _img) in p.items():
        with trio.fail_after(30):
            seen[kind] = await _transcript_rw(sock)
    for q, t in zip(seen["qemu"], seen["trio"], strict=True):
        assert t == q


async def test_tls_required_transcript_same(tmp_path):
    """A client that does not start TLS gets the same refusals from both."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    d = tmp_path / "pki"
    d.mkdir()
    await trio.to_thread.run_sync(make_pki, d)
    img = tmp_path / "img.raw"
    make_image(img)
    seen = {}
    for kind in KINDS:
        sock = tmp_path / f"t-{kind}.sock"
        daemon = Daemon(kind, tmp_path, [
            "--object", f"tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=off",
            "--blockdev", f"driver=file,node-name=f,filename={img},read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
            "--export", "type=nbd,id=e,node-name=f,name=x"])
        daemon.start()
        try:
            c = await RawClient.connect(str(sock))
            out = []
            with trio.fail_after(10):
                await c.handshake()
                try:
                    # a STARTTLS with a payload, then an option that would get
                    # an answer: whether the connection survives it shows
                    for opt, data in [(P.OPT_LIST, b""), (P.OPT_GO, C.encode_info_request("x")),
                                      (P.OPT_STRUCTURED_REPLY, b""), (P.OPT_STARTTLS, b"x"),
                                      (P.OPT_LIST, b"")]:
                        out.append(await c.option(opt, data))
                    await c.s.send_all(C.encode_option(P.OPT_EXPORT_NAME, b"x"))
                    out.append("closed" if await c.closed() else "open")
                except (trio.BrokenResourceError, EOFError):
                    out.append("closed")  # a reset rather than a clean close: same to a client
            await c.s.aclose()
            seen[kind] = out
        finally:
            daemon.stop()
    assert seen["trio"] == seen["qemu"], seen


def test_server_start_variants_same(tmp_path):
    seen = {}
    for kind in KINDS:
        d = Daemon(kind, tmp_path, ["--blockdev", "driver=null-co,node-name=n"])
        d.start()
        try:
            q = d.qmp()
            sock = str(tmp_path / f"s-{kind}.sock")
            res = []
            for cmd, args in [
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
                ("nbd-server-stop", {}),
                ("nbd-server-start", {"addr": {"type": "inet",
                                               "data": {"host": "127.0.0.1", "port": "0"}}}),
                ("nbd-server-stop", {}),
                ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nofd"}}}),
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                      "tls-creds": "nope"}),
                ("nbd-server-start", {"addr": {"type": "inet", "data": {
                    "host": "127.0.0.1", "port": "nosuchservice"}}}),
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                      "tls-authz": "nope", "max-connections": 2}),
            ]:
                r = q.cmd_raw(cmd, args)
                r.pop("id", None)
                res.append((cmd, r, os.path.exists(sock)))
            seen[kind] = res
        finally:
            d.stop()
    assert seen["trio"] == seen["qemu"]
