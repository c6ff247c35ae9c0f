"""driver=nbd against real NBD servers, with real clients through it.

A "server" process (a second qsd-trio, qemu-storage-daemon 7.2 or
qemu-nbd) exports an image; a qsd-trio "client" opens it with driver=nbd
and uses the node as nodes are used: re-exported over NBD to qemu-io and
qemu-img, under a qcow2 format node, as a blockdev-mirror target.  The
image is then checked on the server's side with qemu-img.
"""

from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import qemu_img, qemu_io
from tests.integration.test_job_images import Model, qemu_io_write, raw_bytes, wait_event
from tests.nbd_servers import wait_socket

MiB = 1 << 20
SIZE = 16 * MiB


def nbd_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


class Server:
    """An NBD server of one image file, as export ``disk`` on a unix socket."""

    def __init__(self, kind: str, daemon_factory, tmp_path: Path, image: Path,
                 fmt: str = "raw", name: str = "srv"):
        self.kind, self.factory, self.image, self.fmt = kind, daemon_factory, image, fmt
        self.sock = tmp_path / f"{name}.sock"
        self.proc: subprocess.Popen | None = None
        self.daemon = None

    def start(self) -> Server:
        if self.kind == "qemu-nbd":
            self.sock.unlink(missing_ok=True)
            self.proc = subprocess.Popen(
                ["qemu-nbd", "-t", "-e", "8", "-f", self.fmt, "-x", "disk", "-k", str(self.sock),
                 "--cache=writeback", str(self.image)], stdin=subprocess.DEVNULL)
            wait_socket(self.sock)
            return self
        self.daemon = self.factory(self.kind, [
            "--blockdev", f"driver=file,node-name=f,filename={self.image}",
            *(["--blockdev", f"driver={self.fmt},node-name=img,file=f"]
              if self.fmt != "file" else []),
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", f"type=nbd,id=e,node-name={'f' if self.fmt == 'file' else 'img'},"
                        "name=disk,writable=on",
        ])
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            self.daemon.proc.kill()
            self.daemon.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        elif self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def servers():
    made: list[Server] = []
    yield made
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def nbd_node(sock: Path, name: str = "n", **extra: object) -> str:
    opts = "".join(f",{k}={v}" for k, v in extra.items())
    return (f"driver=nbd,node-name={name},server.type=unix,server.path={sock},"
            f"export=disk{opts}")


@pytest.mark.parametrize("kind", ["trio", "qemu", "qemu-nbd"])
def test_reexport_qemu_io_and_block_status(daemon_factory, tmp_path, servers, kind):
    img = tmp_path / "remote.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(SIZE))
    model = Model(SIZE)
    qemu_io_write(str(img), "raw", [(MiB, MiB, 0x11)], model)
    srv = Server(kind, daemon_factory, tmp_path, img).start()
    servers.append(srv)
    sock = tmp_path / "client.sock"
    c = daemon_factory("trio", [
        "--blockdev", nbd_node(srv.sock),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
    ])
    writes = [(0, 64 * 1024, 0x22), (3 * MiB + 512, 5000, 0x33), (15 * MiB, MiB, 0x44)]
    qemu_io_write(nbd_uri(sock, "re"), "raw", writes, model)
    # a read through the chain sees what was written, and the file has it
    out = qemu_io("-f", "raw", "-c", "read -P 0x11 1M 1M", "-c", "read -P 0x44 15M 1M",
                  nbd_uri(sock, "re")).stdout
    assert "Pattern verification failed" not in out
    qemu_io("-f", "raw", "-c", f"write -z {8 * MiB} {MiB}", nbd_uri(sock, "re"))
    model.data[8 * MiB:9 * MiB] = bytes(MiB)
    # block status through the chain: the re-export answers with what the
    # server said for base:allocation (qemu-img map over both agree)
    via_client = qemu_img("map", "--output=json", "-f", "raw", nbd_uri(sock, "re")).stdout
    via_server = qemu_img("map", "--output=json", "-f", "raw", nbd_uri(srv.sock, "disk")).stdout
    assert via_client == via_server
    c.qmp().cmd_raw("block-export-del", {"id": "re"})
    c.stop()
    srv.stop()
    assert img.read_bytes() == bytes(model.data)


def test_qcow2_over_nbd(daemon_factory, tmp_path, servers):
    img = tmp_path / "remote.qcow2"
    # an NBD export does not grow: the image has room for every cluster
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(img), str(SIZE))
    srv = Server("trio", daemon_factory, tmp_path, img, fmt="file").start()
    servers.append(srv)
    sock = tmp_path / "client.sock"
    c = daemon_factory("trio", [
        "--blockdev", nbd_node(srv.sock),
        "--blockdev", "driver=qcow2,node-name=q,file=n",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=q,name=re,writable=on",
    ])
    model = Model(SIZE)
    qemu_io_write(nbd_uri(sock, "re"), "raw",
                  [(0, MiB, 0x5A), (7 * MiB + 4096, 70000, 0x6B), (SIZE - 4096, 4096, 0x7C)],
                  model)
    info = c.qmp().cmd_raw("query-named-block-nodes")["return"]
    q = next(n for n in info if n["node-name"] == "q")
    assert q["image"]["format"] == "qcow2"
    assert q["file"] == f"nbd+unix:///disk?socket={srv.sock}"
    c.stop()
    srv.stop()
    qemu_img("check", "-q", str(img))
    assert raw_bytes(img, "qcow2", tmp_path) == bytes(model.data)


def _mirror_setup(daemon_factory, tmp_path, servers, *, delay: int = 0, fmt: str = "qcow2"):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(SIZE))
    model = Model(SIZE)
    qemu_io_write(str(src), "qcow2", [(0, 4 * MiB, 0x11), (10 * MiB, 2 * MiB, 0x22)], model)
    tgt = tmp_path / f"tgt.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(tgt), str(SIZE))
    srv = Server("trio", daemon_factory, tmp_path, tgt, fmt=fmt).start()
    servers.append(srv)
    sock = tmp_path / "client.sock"
    extra = {"reconnect-delay": delay} if delay else {}
    c = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=srcf,filename={src}",
        "--blockdev", "driver=qcow2,node-name=src,file=srcf",
        "--blockdev", nbd_node(srv.sock, "tgt", **extra),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on",
    ])
    return src, tgt, model, srv, c, sock


def test_mirror_to_remote_with_writes_then_pivot(daemon_factory, tmp_path, servers):
    src, tgt, model, srv, c, sock = _mirror_setup(daemon_factory, tmp_path, servers)
    qmp = c.qmp()
    r = qmp.cmd_raw("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                        "sync": "full", "speed": 4 * MiB})
    assert r == {"return": {}}
    qemu_io_write(nbd_uri(sock, "disk"), "raw",
                  [(MiB, 64 * 1024, 0x55), (12 * MiB, 3 * MiB, 0x66), (SIZE - 4096, 4096, 0x77)],
                  model)
    assert qmp.cmd_raw("query-jobs")["return"][0]["status"] == "running"
    qmp.cmd_raw("block-job-set-speed", {"device": "m", "speed": 0})
    wait_event(qmp, "BLOCK_JOB_READY")
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(6 * MiB, MiB, 0x99)], model)
    assert qmp.cmd_raw("job-complete", {"id": "m"}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"]
    # after the pivot the export writes to the remote node
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(5 * MiB, MiB, 0xAA)], model)
    c.stop()
    srv.stop()
    qemu_img("check", "-q", str(tgt))
    assert raw_bytes(tgt, "qcow2", tmp_path) == bytes(model.data)


def test_server_killed_mid_mirror_comes_back_within_reconnect_delay(daemon_factory, tmp_path,
                                                                   servers):
    # a raw target: what the server acknowledged is in the file when it is
    # killed (a qcow2 server would lose the metadata it had not flushed)
    src, tgt, model, srv, c, sock = _mirror_setup(daemon_factory, tmp_path, servers, delay=60,
                                                  fmt="raw")
    qmp = c.qmp()
    qmp.cmd_raw("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                    "sync": "full", "speed": 2 * MiB})
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(2 * MiB, MiB, 0x55)], model)
    srv.kill()
    # writes to the source go on while the target is away
    qemu_io_write(nbd_uri(sock, "disk"), "raw", [(13 * MiB, MiB, 0x66)], model)
    assert qmp.cmd_raw("query-jobs")["return"][0]["status"] == "running"
    srv.start()
    qmp.cmd_raw("block-job-set-speed", {"device": "m", "speed": 0})
    wait_event(qmp, "BLOCK_JOB_READY")
    assert qmp.cmd_raw("job-complete", {"id": "m"}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"]
    c.stop()
    srv.stop()
    assert tgt.read_bytes() == bytes(model.data)


def test_server_gone_gives_eio(daemon_factory, tmp_path, servers):
    img = tmp_path / "remote.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(SIZE))
    srv = Server("trio", daemon_factory, tmp_path, img).start()
    servers.append(srv)
    sock = tmp_path / "client.sock"
    c = daemon_factory("trio", [
        "--blockdev", nbd_node(srv.sock, **{"reconnect-delay": 1}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
    ])
    qemu_io("-f", "raw", "-c", "write -P 1 0 4k", nbd_uri(sock, "re"))
    srv.kill()
    for cmd in ("read 0 4k", "write -P 2 0 4k"):
        out = qemu_io("-f", "raw", "-c", cmd, nbd_uri(sock, "re"), check=False)
        assert "Input/output error" in out.stdout + out.stderr
    # the daemon and its other nodes are unaffected
    info = c.qmp().cmd_raw("query-named-block-nodes")["return"]
    assert [n["node-name"] for n in info] == ["n"]
    c.stop()


def test_open_timeout_waits_for_the_server(daemon_factory, tmp_path, servers):
    """--blockdev with open-timeout retries the connect: a server that comes up
    after the client started is found, and the node opens."""
    import threading

    img = tmp_path / "remote.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(SIZE))
    srv = Server("qemu-nbd", daemon_factory, tmp_path, img)
    servers.append(srv)
    # started once the client is already connecting (the socket does not exist)
    timer = threading.Timer(3, srv.start)
    timer.start()
    try:
        c = daemon_factory("trio", ["--blockdev", nbd_node(srv.sock, **{"open-timeout": 60})])
    finally:
        timer.join()
    info = c.qmp().cmd_raw("query-named-block-nodes")["return"]
    assert info[0]["image"]["virtual-size"] == SIZE
    c.stop()


def test_open_timeout_expires_with_the_connect_error(daemon_factory, tmp_path):
    d = daemon_factory("trio")
    r = d.qmp().cmd_raw("blockdev-add", {
        "driver": "nbd", "node-name": "n", "open-timeout": 1,
        "server": {"type": "unix", "path": str(tmp_path / "none.sock")}})
    assert r["error"]["desc"] == f"Failed to connect to '{tmp_path / 'none.sock'}': " \
                                 "No such file or directory"


def test_mirror_over_tcp(daemon_factory, tmp_path):
    """A mirror of 64 MiB of random data to a qsd-trio server over TCP on
    localhost: 1 MiB writes, 16 in flight, so the client's socket fills and
    requests leave in pieces (the send path's partial sends and its inline
    wait for room); the target equals the source, and qemu-img check is
    clean."""
    size = 64 * MiB
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(15).randbytes(size))
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(size))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=f,filename={tgt}",
        "--blockdev", "driver=qcow2,node-name=img,file=f",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=e,node-name=img,name=disk,writable=on",
    ])
    c = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=src,filename={src}",
        "--blockdev", f"driver=nbd,node-name=tgt,server.type=inet,server.host=127.0.0.1,"
                      f"server.port={port},export=disk",
    ])
    qmp = c.qmp()
    assert qmp.cmd_raw("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                           "sync": "full"}) == {"return": {}}
    wait_event(qmp, "BLOCK_JOB_READY", timeout=120)
    assert qmp.cmd_raw("job-complete", {"id": "m"}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", timeout=120)
    assert "error" not in ev["data"]
    c.stop()
    srv.stop()
    qemu_img("check", "-q", str(tgt))
    assert raw_bytes(tgt, "qcow2", tmp_path) == src.read_bytes()
