"""pipe, serial, pty, udp and mux chardevs with real FIFOs, ttys and UDP
sockets: a QMP monitor over each, logfile, chardev-remove releasing them."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import time

from tests.helpers import command


def read_until(fd_or_sock, count: int = 1, timeout: float = 10) -> list[dict]:
    """``count`` QMP messages (lines ending in CR LF)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\r\n") < count:
        left = deadline - time.monotonic()
        assert left > 0, buf
        if not select.select([fd_or_sock], [], [], left)[0]:
            continue
        if isinstance(fd_or_sock, socket.socket):
            chunk = fd_or_sock.recv(65536)
        else:
            chunk = os.read(fd_or_sock, 65536)
        assert chunk, buf
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\r\n") if line]


def negotiate(send, recv) -> None:
    assert "QMP" in recv()[0]
    send(b'{"execute":"qmp_capabilities"}\n')
    assert recv() == [{"return": {}}]
    send(b'{"execute":"query-version","id":1}\n')
    (reply,) = recv()
    assert reply["id"] == 1 and reply["return"]["qemu"]["major"] == 7


def test_monitor_over_a_pipe_pair_of_fifos(daemon_factory, tmp_path):
    base = tmp_path / "p"
    os.mkfifo(f"{base}.in")
    os.mkfifo(f"{base}.out")
    log = tmp_path / "log"
    daemon_factory("trio", ["--chardev", f"pipe,id=p,path={base},logfile={log}",
                            "--monitor", "p"])
    rd = os.open(f"{base}.out", os.O_RDONLY | os.O_NONBLOCK)
    wr = os.open(f"{base}.in", os.O_WRONLY)
    try:
        negotiate(lambda m: os.write(wr, m), lambda: read_until(rd))
    finally:
        os.close(rd)
        os.close(wr)
    # the log has what the chardev wrote: greeting and replies
    assert log.read_bytes().count(b"\r\n") == 3


def test_monitor_over_a_serial_tty(daemon_factory):
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    try:
        daemon_factory("trio", ["--chardev", f"serial,id=s,path={name}", "--monitor", "s"])
        negotiate(lambda m: os.write(master, m), lambda: read_until(master))
    finally:
        os.close(master)


def test_pty_chardev_add_reply_and_remove(qsd):
    q = qsd.qmp()
    path = q.cmd("chardev-add", id="p", backend={"type": "pty", "data": {}})["pty"]
    assert re.fullmatch(r"/dev/pts/\d+", path)
    info = {c["label"]: c for c in q.cmd("query-chardev")}
    assert info["p"] == {"frontend-open": False, "filename": f"pty:{path}", "label": "p"}
    q.cmd("chardev-remove", id="p")
    assert not os.path.exists(path) or _pty_free(path)


def _pty_free(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return True  # the master is gone: the slave cannot be opened
    return False


def test_monitor_over_pty_from_the_command_line(daemon_factory):
    d = daemon_factory("trio", ["--chardev", "pty,id=p", "--monitor", "p"])
    path = next(c["filename"] for c in d.qmp().cmd("query-chardev")
                if c["label"] == "p").removeprefix("pty:")
    for _ in range(2):
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            negotiate(lambda m, fd=fd: os.write(fd, m), lambda fd=fd: read_until(fd))
        finally:
            os.close(fd)
        # a slave closed and at once opened again may go unnoticed (the
        # master's hang-up is gone before it is read), in QEMU too
        time.sleep(0.5)


def test_monitor_over_udp(daemon_factory):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        peer.bind(("127.0.0.1", 0))
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
        probe.close()
        daemon_factory("trio", [
            "--chardev", f"udp,id=u,host=127.0.0.1,port={peer.getsockname()[1]},"
                         f"localaddr=127.0.0.1,localport={local}",
            "--monitor", "u"])
        peer.connect(("127.0.0.1", local))
        negotiate(peer.send, lambda: read_until(peer))


def test_udp_chardev_add_binds_and_remove_releases(qsd):
    q = qsd.qmp()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = {"type": "udp", "data": {
        "remote": {"type": "inet", "data": {"host": "127.0.0.1", "port": "9"}},
        "local": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}}}
    q.cmd("chardev-add", id="u", backend=backend)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            bound = False
        except OSError:
            bound = True
    assert bound
    q.cmd("chardev-remove", id="u")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))


def test_mux_timestamps_and_quit(tmp_path):
    path = tmp_path / "mux.sock"
    proc = subprocess.Popen(command("trio") + [
        "--chardev", f"socket,id=m,path={path},server=on,wait=off,mux=on",
        "--monitor", "m", "--monitor", "m"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            assert len(read_until(s, 2)) == 2   # both monitors greet
            # C-a t: time stamps from the next line start on
            s.sendall(b'\x01t{"execute":"qmp_capabilities"}\n{"execute":"query-version"}\n')
            buf = b""
            while buf.count(b"\r\n") < 2:
                assert select.select([s], [], [], 10)[0]
                buf += s.recv(65536)
            first, second = buf.split(b"\r\n")[:2]
            assert first == b'{"return": {}}'
            assert re.match(rb"\[00:00:00\.\d{3}\] \{\"return\": \{\"qemu\"", second)
            s.sendall(b"\x01x")
            got = b""
            # stamped byte by byte, as QEMU's mux_chr_write: the \r after
            # the \n starts a line too
            while not re.fullmatch(rb"\[[\d:.]+\] QEMU: Terminated\n\[[\d:.]+\] \r", got):
                assert select.select([s], [], [], 10)[0]
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert err == b""
