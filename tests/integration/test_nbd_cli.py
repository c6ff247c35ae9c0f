"""qsd-trio as a subprocess, exactly as users start it, with real NBD clients."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest
import trio

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io

from .nbd_helpers import fio_verify, make_pki
from .nbd_raw import RawClient


def nbdinfo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "64M")
    return p


def start(daemon_factory, image, sock, *extra_export):
    return daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=fmt0,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=fmt0,name=disk,writable=on" + "".join(extra_export),
    ])


def test_qcow2_writes_through_nbd_are_clean(daemon_factory, image, tmp_path):
    sock = tmp_path / "n.sock"
    d = start(daemon_factory, image, sock)
    uri = f"nbd+unix:///disk?socket={sock}"
    model = bytearray(64 << 20)
    ops = [("write -P 0x5a 0 1M", 0, 1 << 20, 0x5A), ("write -P 0x11 3M 64k", 3 << 20, 65536, 0x11),
           ("write -z 512k 128k", 512 << 10, 128 << 10, 0),
           # blockdev's default discard=ignore: TRIM leaves the data, as in QEMU
           ("discard 3M 64k", 3 << 20, 65536, None),
           ("write -P 0x77 60M 4M", 60 << 20, 4 << 20, 0x77)]
    argv = []
    for cmd, off, ln, pat in ops:
        argv += ["-c", cmd]
        if pat is not None:
            model[off:off + ln] = bytes([pat]) * ln
    qemu_io("-f", "raw", *argv, uri)
    # qemu-img through NBD sees the same bytes as the model
    ref = tmp_path / "model.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", uri, str(ref), check=False).returncode == 0
    d.stop()  # SIGTERM: flush and close
    assert d.proc.returncode == 0
    assert qemu_img("check", str(image)).returncode == 0
    assert qemu_img("compare", "-F", "raw", str(image), str(ref), check=False).returncode == 0


def test_dirty_bitmap_context(daemon_factory, image, tmp_path):
    sock = tmp_path / "n.sock"
    d = start(daemon_factory, image, sock)
    q = d.qmp()
    assert "return" in q.cmd_raw("block-dirty-bitmap-add", {"node": "fmt0", "name": "b0"})
    qemu_io("-f", "raw", "-c", "write -P 1 1M 64k", "-c", "write -P 2 5M 128k",
            f"nbd+unix:///disk?socket={sock}")
    r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "e2", "node-name": "fmt0",
                                       "name": "snap", "bitmaps": ["b0"]})
    assert r["error"]["desc"] == "Enabled bitmap 'b0' incompatible with readonly export"
    r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "e2", "node-name": "fmt0",
                                       "name": "snap", "bitmaps": ["nope"], "writable": True})
    assert r["error"]["desc"] == "Bitmap 'nope' is not found"
    assert "return" in q.cmd_raw("block-export-add", {
        "type": "nbd", "id": "e2", "node-name": "fmt0", "name": "snap", "bitmaps": ["b0"],
        "writable": True})
    out = nbdinfo("--map=qemu:dirty-bitmap:b0", "--json", f"nbd+unix:///snap?socket={sock}")
    assert out.returncode == 0, out.stderr
    dirty = [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1]
    assert dirty == [(1 << 20, 64 << 10), (5 << 20, 128 << 10)]
    # exported bitmaps are busy
    r = q.cmd_raw("block-dirty-bitmap-remove", {"node": "fmt0", "name": "b0"})
    assert "error" in r and "in use" in r["error"]["desc"]
    info = json.loads(nbdinfo("--json", f"nbd+unix:///snap?socket={sock}").stdout)
    assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:b0"]


async def test_shutdown_with_clients_connected(daemon_factory, image, tmp_path):
    sock = tmp_path / "n.sock"
    d = start(daemon_factory, image, sock)
    q = d.qmp()
    c = await RawClient.connect(str(sock))
    try:
        with trio.fail_after(10):
            await c.go("disk")
            from qsd_trio.proto import nbd as P
            await c.request(P.CMD_WRITE, handle=1, offset=0, length=4096, data=b"q" * 4096)
            assert (await c.reply())[0].error == 0
        r = q.cmd_raw("block-export-del", {"id": "e"})
        assert r["error"]["desc"] == "export 'e' still in use"
        q.cmd_raw("quit")
        ev = q.pull_event(wait=10)
        assert (ev["event"], ev["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
        with trio.fail_after(10):
            assert await c.closed()
        assert d.wait(20) == 0
    finally:
        await c.s.aclose()
    r = qemu_io("-f", "qcow2", "-c", "read -P 0x71 0 4k", str(image))
    assert "Pattern verification failed" not in r.stdout
    assert qemu_img("check", str(image)).returncode == 0


def test_inet_and_max_connections(daemon_factory, image):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=fmt0,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=1",
        "--export", "type=nbd,id=e,node-name=fmt0,name=disk",
    ])
    uri = f"nbd://127.0.0.1:{port}/disk"
    assert json.loads(nbdinfo("--json", uri).stdout)["exports"][0]["export-size"] == 64 << 20
    # one client holds the only slot: a second one waits instead of being served
    hold = socket.create_connection(("127.0.0.1", port))
    try:
        assert hold.recv(18)[:8] == b"NBDMAGIC"
        second = socket.create_connection(("127.0.0.1", port))
        second.settimeout(0.5)
        with pytest.raises(TimeoutError):
            second.recv(18)
        hold.close()
        second.settimeout(10)
        assert second.recv(18)[:8] == b"NBDMAGIC"
        second.close()
    finally:
        hold.close()


def test_qmp_server_start_stop(daemon_factory, image, tmp_path):
    d = daemon_factory("trio", ["--blockdev",
                                f"driver=qcow2,node-name=fmt0,file.driver=file,file.filename={image}"])
    q = d.qmp()
    sock = str(tmp_path / "q.sock")
    assert q.cmd_raw("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == \
        {"return": {}}
    assert q.cmd_raw("nbd-server-add", {"device": "fmt0", "name": "old"}) == {"return": {}}
    assert nbdinfo(f"nbd+unix:///old?socket={sock}").returncode == 0
    assert q.cmd_raw("query-block-exports")["return"] == [
        {"id": "old", "type": "nbd", "node-name": "fmt0", "shutting-down": False}]
    assert q.cmd_raw("nbd-server-stop") == {"return": {}}
    ev = q.pull_event(wait=5)
    assert (ev["event"], ev["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "old"})
    assert nbdinfo(f"nbd+unix:///old?socket={sock}").returncode != 0
    r = q.cmd_raw("nbd-server-start", {"addr": {"type": "unix",
                                                "data": {"path": "/nonexistent/dir/s"}}})
    assert r["error"]["desc"].startswith("Failed to bind socket to /nonexistent/dir/s")


@pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-storage-daemon")
def test_bind_error_text_matches_qemu(tmp_path):
    texts = {}
    for kind in ("qemu", "trio"):
        d = Daemon(kind, tmp_path, ["--nbd-server", "addr.type=unix,addr.path=/nonexistent/x"])
        try:
            with pytest.raises(RuntimeError) as e:
                d.start()
            texts[kind] = d.stderr().replace("qemu-storage-daemon: ", "").replace("qsd-trio: ", "")
        finally:
            d.stop()
    assert texts["trio"] == texts["qemu"], e


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server and a client certificate in QEMU's/libnbd's file names."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    return d


def tls_daemon(daemon_factory, image, sock, pki, identity, kind="trio", verify="on"):
    return daemon_factory(kind, [
        "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer={verify}",
        "--object", "authz-simple,id=az0,identity=" + identity.replace(",", ",,"),
        "--blockdev", f"driver=qcow2,node-name=fmt0,file.driver=file,file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=az0",
        "--export", "type=nbd,id=e,node-name=fmt0,name=disk,writable=on",
    ])


def test_tls_x509_with_authz(daemon_factory, image, tmp_path, pki):
    sock = tmp_path / "t.sock"
    tls_daemon(daemon_factory, image, sock, pki, "C=GB,O=Example,CN=client.example.com")
    uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={pki}"
    info = json.loads(nbdinfo("--json", uri).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 64 << 20
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x42" * (64 << 20))
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=60)
    out = tmp_path / "out.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=60)
    assert out.read_bytes() == src.read_bytes()
    # without TLS the server refuses to serve
    assert nbdinfo(f"nbd+unix:///disk?socket={sock}").returncode != 0


def test_tls_authz_denied(daemon_factory, image, tmp_path, pki):
    sock = tmp_path / "t.sock"
    tls_daemon(daemon_factory, image, sock, pki, "CN=someone.else")
    r = nbdinfo(f"nbds+unix:///disk?socket={sock}&tls-certificates={pki}")
    assert r.returncode != 0


@pytest.mark.parametrize("kind", ["qemu", "trio"])
def test_tls_authz_needs_verify_peer(daemon_factory, image, tmp_path, pki, kind):
    """QEMU 7.2 checks tls-authz against the client's certificate only when
    the x509 credentials verify it: with verify-peer=off anyone is let in."""
    if kind == "qemu" and not HAVE_QEMU:
        pytest.skip("qemu-storage-daemon not installed")
    sock = tmp_path / "t.sock"
    tls_daemon(daemon_factory, image, sock, pki, "CN=someone.else", kind=kind, verify="off")
    r = nbdinfo("--json", f"nbds+unix:///disk?socket={sock}&tls-certificates={pki}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exports"][0]["export-size"] == 64 << 20


@pytest.mark.skipif(not shutil.which("fio"), reason="needs fio")
def test_fio_verify_over_nbd(daemon_factory, image, tmp_path):
    """Concurrent random writes at depth 32, each block read back and checksummed."""
    sock = tmp_path / "n.sock"
    d = start(daemon_factory, image, sock)
    # the first pass allocates clusters (the request tasks) while writes into
    # clusters allocated a moment ago take the reader's fast path; the second
    # pass, another random order, overwrites allocated clusters only
    for seed in ("1", "2"):
        fio_verify(f"nbd+unix:///disk?socket={sock}", tmp_path, seed=seed)
    d.stop()
    assert qemu_img("check", str(image)).returncode == 0
