"""driver=nbd with x-multi-conn: several connections to one export.

Real servers (qemu-nbd -e N, qemu-storage-daemon's and qsd-trio's NBD
exports, nbdkit's memory plugin) serve an image; a qsd-trio client opens it
with ``x-multi-conn=4`` and re-exports the node over NBD to qemu-io.  The
connections are counted on the server's side (``ss``: the established unix
sockets whose local address is the server's socket; nbdkit's log filter
names the connection of every request).
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import qemu_img, qemu_io
from tests.integration.test_job_images import Model
from tests.nbd_relay import relay  # noqa: F401
from tests.nbd_servers import start_nbdkit

MiB = 1 << 20
SIZE = 32 * MiB


def server_connections(sock: Path) -> int:
    """Connections the server listening on ``sock`` has accepted and holds."""
    out = subprocess.run(["ss", "-xaH"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines()
               if line.split()[1:2] == ["ESTAB"] and line.split()[4:5] == [str(sock)])


def wait_for(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Servers:
    """NBD servers of an image, each as export ``disk`` on a unix socket;
    every one is killed at teardown."""

    def __init__(self, daemon_factory, tmp_path: Path):
        self.factory, self.tmp = daemon_factory, tmp_path
        self.procs: list[subprocess.Popen] = []
        self.daemons: list = []
        self.n = 0

    def start(self, kind: str, image: Path | None, fmt: str = "raw",
              sock: Path | None = None) -> Path:
        """kind: qemu-nbd-N (qemu-nbd -e N), qemu, trio or nbdkit (memory,
        with the log filter writing tmp_path/nbdkit.log)."""
        self.n += 1
        sock = sock or self.tmp / f"srv{self.n}.sock"
        sock.unlink(missing_ok=True)
        if kind.startswith("qemu-nbd-"):
            self.procs.append(subprocess.Popen(
                ["qemu-nbd", "-t", "-e", kind.removeprefix("qemu-nbd-"), "-f", fmt,
                 "-x", "disk", "-k", str(sock), "--cache=writeback", str(image)],
                stdin=subprocess.DEVNULL))
        elif kind == "nbdkit":
            self.procs.append(start_nbdkit(sock, "-e", "disk", "--filter=log", "memory",
                                           str(SIZE), f"logfile={self.tmp / 'nbdkit.log'}"))
        else:
            self.daemons.append(self.factory(kind, [
                "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--blockdev", f"driver={fmt},node-name=img,file=f",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=img,name=disk,writable=on",
            ]))
        wait_for(sock.exists, f"{kind} did not start")
        return sock

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        """Stop every server as a user would (SIGTERM; quit for daemons)."""
        for p in self.procs:
            p.terminate()
            p.wait()
        for d in self.daemons:
            d.stop()


@pytest.fixture
def servers(daemon_factory, tmp_path):
    s = Servers(daemon_factory, tmp_path)
    yield s
    s.kill_all()


def client(daemon_factory, tmp_path: Path, srv: Path, **opts: object):
    """A qsd-trio with an nbd node on ``srv`` re-exported as ``re``: the
    daemon and the re-export's URI."""
    sock = tmp_path / "client.sock"
    extra = "".join(f",{k}={v}" for k, v in opts.items())
    d = daemon_factory("trio", [
        "--blockdev", f"driver=nbd,node-name=n,server.type=unix,server.path={srv},"
                      f"export=disk{extra}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
    ])
    return d, f"nbd+unix:///re?socket={sock}"


def image(tmp_path: Path, fmt: str = "raw") -> Path:
    img = tmp_path / f"remote.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(img), str(SIZE))
    return img


@pytest.mark.parametrize("kind, want, expected", [
    ("qemu-nbd-4", 4, 4),
    ("qemu-nbd-16", 3, 3),
    # no NBD_FLAG_CAN_MULTI_CONN: one connection, as libnbd
    ("qemu-nbd-1", 4, 1),
    ("qemu", 4, 4),
    ("trio", 4, 4),
    ("nbdkit", 4, 4),
    # the default is QEMU 7.2's one connection, whatever the server allows
    ("qemu-nbd-4", None, 1),
])
def test_connections_as_the_server_allows(daemon_factory, tmp_path, servers, kind, want,
                                          expected):
    srv = servers.start(kind, None if kind == "nbdkit" else image(tmp_path))
    opts = {} if want is None else {"x-multi-conn": want}
    d, uri = client(daemon_factory, tmp_path, srv, **opts)
    assert server_connections(srv) == expected
    # and they serve: a write and a read through the re-export
    out = qemu_io("-f", "raw", "-c", "write -P 0x5a 1M 3M", "-c", "read -P 0x5a 1M 3M",
                  uri).stdout
    assert "Pattern verification failed" not in out
    assert server_connections(srv) == expected
    d.stop()


def concurrent_io(uri: str, model: Model, rng: random.Random, rounds: int = 3) -> None:
    """Rounds of 48 writes in flight at once (random offsets and lengths,
    disjoint within a round, overlapping earlier rounds), each round
    checked by reads in flight, then all of it read back."""
    for r in range(rounds):
        cmds: list[str] = []
        taken: list[tuple[int, int]] = []
        while len(taken) < 48:
            n = rng.choice([4096, 65536, 300 * 1024, MiB, 2 * MiB + 512])
            off = rng.randrange(0, SIZE - n, 512)
            if any(off < e and s < off + n for s, e in taken):
                continue
            taken.append((off, off + n))
            pat = rng.randrange(1, 256)
            if rng.random() < 0.15:
                cmds += ["-c", f"aio_write -z {off} {n}"]
                model.data[off:off + n] = bytes(n)
            else:
                cmds += ["-c", f"aio_write -P {pat} {off} {n}"]
                model.write(off, n, pat)
        cmds += ["-c", "aio_flush"]
        for s, e in taken:
            cmds += ["-c", f"aio_read -P {model.data[s]} {s} {e - s}"]
        cmds += ["-c", "aio_flush"]
        out = qemu_io("-f", "raw", *cmds, uri)
        text = out.stdout + out.stderr
        assert "Pattern verification failed" not in text, r
        assert "failed" not in text, text


def read_all(uri: str, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / name
    qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(out))
    return out.read_bytes()


@pytest.mark.parametrize("kind, fmt", [("qemu-nbd-5", "qcow2"), ("qemu", "qcow2"),
                                       ("trio", "qcow2"), ("nbdkit", None)])
def test_concurrent_io_equals_the_model(daemon_factory, tmp_path, servers, kind, fmt):
    img = None if fmt is None else image(tmp_path, fmt)
    srv = servers.start(kind, img, fmt or "raw")
    d, uri = client(daemon_factory, tmp_path, srv, **{"x-multi-conn": 4})
    assert server_connections(srv) == 4
    model = Model(SIZE)
    concurrent_io(uri, model, random.Random(kind))
    assert read_all(uri, tmp_path, "via-client.raw") == bytes(model.data)
    # the server's own view, on a connection of its own (qemu-nbd -e 5:
    # room for it beside the client's four)
    assert read_all(f"nbd+unix:///disk?socket={srv}", tmp_path, "direct.raw") == \
        bytes(model.data)
    d.stop()
    if kind == "nbdkit":
        # the writes went over more than one of the four connections
        log = (tmp_path / "nbdkit.log").read_text()
        used = set(re.findall(r"connection=(\d+) (?:Write|Zero) ", log))
        assert len(used) >= 2, used
    else:
        servers.stop_all()
        assert qemu_img("check", "-f", "qcow2", str(img)).returncode == 0


def log_ops(log: str) -> list[tuple[str, str, str, bool]]:
    """nbdkit's log filter's requests: (connection, op, id, is_return), in order."""
    return [(conn, op, rid, bool(ret))
            for conn, ret, op, rid in re.findall(r"connection=(\d+) (\.\.\.)?(\w+) id=(\d+)",
                                                 log)]


def test_flush_after_the_writes_it_covers(daemon_factory, tmp_path, servers):
    """Writes spread over the connections, then one FLUSH (NBD_FLAG_CAN_MULTI_CONN:
    the server makes it cover every connection's completed writes), sent after
    all of them were answered; as many FLUSHes as with one connection."""
    flushes = []
    for want in (1, 4):
        (tmp_path / "nbdkit.log").unlink(missing_ok=True)
        srv = servers.start("nbdkit", None)
        d, uri = client(daemon_factory, tmp_path, srv, **{"x-multi-conn": want})
        cmds = []
        for i in range(24):
            cmds += ["-c", f"aio_write -P {i + 1} {i * MiB} 1M"]
        cmds += ["-c", "aio_flush", "-c", "flush"]
        qemu_io("-f", "raw", *cmds, uri)
        d.stop()
        servers.kill_all()
        ops = log_ops((tmp_path / "nbdkit.log").read_text())
        first_flush = next(i for i, (_, op, _, ret) in enumerate(ops) if op == "Flush"
                           and not ret)
        writes = {(c, i) for c, op, i, ret in ops if op == "Write" and not ret}
        answered = {(c, i) for c, op, i, ret in ops[:first_flush] if op == "Write" and ret}
        assert len(writes) == 24 and answered == writes
        assert len({c for c, _ in writes}) == (1 if want == 1 else 4)
        flushes.append(sum(1 for _, op, _, ret in ops if op == "Flush" and not ret))
    assert flushes[0] == flushes[1] >= 1


@pytest.mark.parametrize("value, error", [
    (0, "Parameter 'x-multi-conn' expects a value between 1 and 16"),
    (17, "Parameter 'x-multi-conn' expects a value between 1 and 16"),
    (256, "Parameter 'x-multi-conn' expects uint8_t"),
    # QEMU's visitor answers a string for any unsigned member so
    # (qemu-storage-daemon 7.2 says the same of reconnect-delay)
    ("4", "Parameter 'x-multi-conn' expects uint64"),
])
def test_bad_values(qsd, tmp_path, servers, value, error):
    srv = servers.start("qemu-nbd-4", image(tmp_path))
    r = qsd.qmp().cmd_raw("blockdev-add", {
        "driver": "nbd", "node-name": "n", "export": "disk", "x-multi-conn": value,
        "server": {"type": "unix", "path": str(srv)}})
    assert r["error"] == {"class": "GenericError", "desc": error}
    assert server_connections(srv) == 0


@pytest.mark.parametrize("delay", [10, 0])
def test_one_connection_cut_mid_io(daemon_factory, tmp_path, servers, relay,  # noqa: F811
                                   delay):
    """One of four connections is cut while writes are in flight on all of
    them (nbdkit's delay filter keeps them there).  With reconnect-delay its
    requests are sent again and nothing is lost; without, they fail with
    EIO, as one connection's would.  Either way that connection alone is
    reconnected and the node goes on."""
    srv = tmp_path / "kit.sock"
    servers.procs.append(start_nbdkit(srv, "-e", "disk", "--filter=delay", "memory",
                                      str(SIZE), "wdelay=200ms"))
    proxy = relay(srv)
    d, uri = client(daemon_factory, tmp_path, tmp_path / "proxy0.sock",
                    **{"x-multi-conn": 4, "reconnect-delay": delay})
    assert len(proxy.links) == 4
    handshake = [p.sent for p in proxy.links]
    model = Model(SIZE)
    cmds = []
    for i in range(32):
        cmds += ["-c", f"aio_write -P {i + 1} {i * 512 * 1024} 512k"]
        model.write(i * 512 * 1024, 512 * 1024, i + 1)
    cmds += ["-c", "aio_flush"]
    io = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    # every connection carries writes, none of them answered yet (200 ms)
    wait_for(lambda: all(p.sent > h + MiB // 2
                         for p, h in zip(proxy.links[:4], handshake, strict=True)),
             "writes on every connection")
    proxy.cut(1)
    out, _ = io.communicate(timeout=60)
    # the cut one came back: five connections made, four live
    wait_for(lambda: len(proxy.links) == 5 and proxy.live() == 4, "a reconnect",
             timeout=30)
    if delay == 0:
        failed = [ln for ln in out.splitlines() if "failed" in ln]
        assert failed and all("Input/output error" in ln for ln in failed), out
        assert len(failed) < 32, out  # the other connections' writes went through
        # what the lost writes left is unknown: the node goes on, all of it
        model = Model(SIZE)
        cmds = []
        for i in range(32):
            cmds += ["-c", f"aio_write -P {0x40 + i} {i * 512 * 1024} 512k"]
            model.write(i * 512 * 1024, 512 * 1024, 0x40 + i)
        out = qemu_io("-f", "raw", *cmds, "-c", "aio_flush", uri).stdout
    assert "failed" not in out, out
    assert read_all(uri, tmp_path, "via-client.raw") == bytes(model.data)
    assert read_all(f"nbd+unix:///disk?socket={srv}", tmp_path, "direct.raw") == \
        bytes(model.data)
    d.stop()


@pytest.mark.parametrize("again, expected", [("qemu-nbd-4", 4), ("qemu-nbd-1", 1)])
def test_server_restart(daemon_factory, tmp_path, servers, again, expected):
    """qemu-nbd -e 4 killed and started again within reconnect-delay: every
    connection comes back (one when the new server does not allow more),
    and the data written before and after is there."""
    img = image(tmp_path)
    srv = servers.start("qemu-nbd-4", img)
    d, uri = client(daemon_factory, tmp_path, srv, **{"x-multi-conn": 4, "reconnect-delay": 30})
    assert server_connections(srv) == 4
    model = Model(SIZE)
    cmds = []
    for i in range(16):
        cmds += ["-c", f"aio_write -P {i + 1} {i * MiB} 1M"]
        model.write(i * MiB, MiB, i + 1)
    qemu_io("-f", "raw", *cmds, "-c", "aio_flush", uri)
    servers.kill_all()
    servers.procs.clear()
    servers.start(again, img, sock=srv)
    # the first requests after the restart wait for a connection; the others
    # come back in the background as requests find them broken
    for r in range(20):
        qemu_io("-f", "raw", "-c", f"write -P {0x80 + r} {(16 + r) * 512 * 1024} 512k", uri)
        model.write((16 + r) * 512 * 1024, 512 * 1024, 0x80 + r)
        if server_connections(srv) == expected and r >= 2:
            break
    wait_for(lambda: server_connections(srv) == expected, f"{expected} connections")
    qemu_io("-f", "raw", "-c", "flush", uri)
    d.stop()
    servers.stop_all()
    assert img.read_bytes() == bytes(model.data)


def test_one_connection_unless_asked_as_qemu_storage_daemon(daemon_factory, tmp_path, servers):
    """Without x-multi-conn a server sees one connection from qsd-trio, as
    from qemu-storage-daemon; x-multi-conn is qsd-trio's own member, which
    qemu-storage-daemon 7.2 refuses."""
    srv = servers.start("qemu-nbd-8", image(tmp_path))
    server = {"type": "unix", "path": str(srv)}
    for kind in ("qemu", "trio"):
        d = daemon_factory(kind)
        q = d.qmp()
        r = q.cmd_raw("blockdev-add", {"driver": "nbd", "node-name": "n", "export": "disk",
                                       "server": server})
        assert r == {"return": {}}, (kind, r)
        assert server_connections(srv) == 1, kind
        r = q.cmd_raw("blockdev-add", {"driver": "nbd", "node-name": "m", "export": "disk",
                                       "server": server, "x-multi-conn": 4})
        if kind == "qemu":
            assert r["error"]["desc"] == "Parameter 'x-multi-conn' is unexpected"
            assert server_connections(srv) == 1
        else:
            assert r == {"return": {}}
            assert server_connections(srv) == 5
        d.stop()
        wait_for(lambda: server_connections(srv) == 0, "the connections closed")
