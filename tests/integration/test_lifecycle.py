"""The process: quit, signals, pidfile, --daemonize, fd passing, monitors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers import Daemon, command


def test_quit_replies_exits_0_and_removes_pidfile(qsd):
    qmp = qsd.qmp()
    assert qmp.cmd_raw("quit") == {"return": {}}
    assert qsd.wait() == 0
    assert not qsd.pidfile.exists()
    assert not qsd.qmp_path.exists()  # the monitor socket is unlinked too


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_shut_down_cleanly(qsd, sig):
    pid = int(qsd.pidfile.read_text())
    assert pid == qsd.proc.pid  # the daemon itself, no wrapper process
    qsd.proc.send_signal(sig)
    assert qsd.wait() == 0
    assert not qsd.pidfile.exists()


def test_second_daemon_with_same_pidfile_fails(tmp_path, qsd):
    r = subprocess.run(command("trio") + ["--pidfile", str(qsd.pidfile)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr == ("qsd-trio: cannot create PID file: Cannot lock pid file: "
                        "Resource temporarily unavailable\n")
    # the first daemon's pidfile is untouched
    assert int(qsd.pidfile.read_text()) == qsd.proc.pid


def test_daemonize_success(tmp_path):
    pidfile = tmp_path / "d.pid"
    sock = tmp_path / "qmp.sock"
    r = subprocess.run(command("trio") + [
        "--daemonize", "--pidfile", str(pidfile),
        "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # startup was complete when the parent exited: pidfile and socket exist
    pid = int(pidfile.read_text())
    try:
        assert pid != os.getpid()
        assert os.getsid(pid) != os.getsid(0)  # detached from our session
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            assert b'"QMP"' in s.recv(4096)
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(500):
        if not pidfile.exists():
            break
        time.sleep(0.02)
    assert not pidfile.exists()


def test_daemonize_failure_exit_status(tmp_path):
    r = subprocess.run(command("trio") + [
        "--daemonize", "--blockdev", "driver=null-co,node-name=n",
        "--blockdev", "driver=null-co,node-name=n"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "Duplicate nodes with node-name='n'" in r.stderr


def test_fd_passing_as_in_the_man_page(tmp_path):
    path = str(tmp_path / "qmp.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listen_sock:
        listen_sock.bind(path)
        listen_sock.listen()
        fd = listen_sock.fileno()
        proc = subprocess.Popen(command("trio") + [
            "--chardev", f"socket,fd={fd},server=on,id=char1", "--monitor", "chardev=char1"],
            pass_fds=[fd])
    try:
        qmp_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_sock.connect(path)
        qmp_sock.settimeout(30)
        assert qmp_sock.recv(4096).startswith(b'{"QMP": {"version": {"qemu": {"micro": 0, '
                                              b'"minor": 2, "major": 7}')
        qmp_sock.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_client_mode_monitor_connects_out(tmp_path):
    """server=off: the daemon connects to a listening socket (QEMU's test
    harness style)."""
    path = str(tmp_path / "listen.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(30)
    proc = subprocess.Popen(command("trio") + [
        "--chardev", f"socket,id=m,path={path}", "--monitor", "chardev=m"])
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        assert b'"QMP"' in conn.recv(4096)
        conn.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
        data = b""
        while data.count(b"return") < 2:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.close()
        assert data == b'{"return": {}}\r\n{"return": {}}\r\n'
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        srv.close()


def test_several_monitors_and_one_client_per_chardev(tmp_path):
    d = Daemon("trio", tmp_path, [
        "--chardev", f"socket,id=m2,path={tmp_path}/m2.sock,server=on,wait=off",
        "--monitor", "chardev=m2,pretty=on"])
    with d:
        a = d.qmp()
        # the second monitor is independent of the first
        b = socket.socket(socket.AF_UNIX)
        b.connect(f"{tmp_path}/m2.sock")
        b.settimeout(30)
        assert b.recv(4096).startswith(b'{\r\n    "QMP": {')
        # a second client of the first chardev waits until the first leaves
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(d.qmp_path))
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(4096)
        assert a.cmd_raw("query-version")["return"]["qemu"]["major"] == 7
        a.close()
        c.settimeout(30)
        assert c.recv(4096).startswith(b'{"QMP"')
        c.close()
        b.close()


def test_events_reach_every_negotiated_session(tmp_path, daemon_factory):
    d = daemon_factory("trio", [
        "--chardev", f"socket,id=m2,path={tmp_path}/m2.sock,server=on,wait=off",
        "--monitor", "chardev=m2",
        "--blockdev", "null-co,node-name=n0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
        "--export", "nbd,id=e0,node-name=n0"])
    a = d.qmp()
    from qemu.qmp.legacy import QEMUMonitorProtocol
    b = QEMUMonitorProtocol(f"{tmp_path}/m2.sock")
    b.connect()
    b.settimeout(30)
    try:
        assert a.cmd_raw("block-export-del", {"id": "e0"}) == {"return": {}}
        for client in (a, b):
            ev = client.pull_event(wait=True)
            assert ev["event"] == "BLOCK_EXPORT_DELETED"
            assert ev["data"] == {"id": "e0"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    finally:
        b.close()


def test_quit_reply_follows_shutdown_events(tmp_path, daemon_factory):
    d = daemon_factory("trio", [
        "--blockdev", "null-co,node-name=n0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
        "--export", "nbd,id=e0,node-name=n0"])
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(d.qmp_path))
    s.settimeout(30)
    s.recv(4096)
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    assert s.recv(4096) == b'{"return": {}}\r\n'
    s.sendall(b'{"execute":"quit"}\n')
    data = b""
    while not data.endswith(b'{"return": {}}\r\n'):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    s.close()
    assert b'"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}\r\n{"return": {}}' in data
    assert d.wait() == 0


def test_stdio_monitor():
    proc = subprocess.run(command("trio") + ["--chardev", "stdio,id=s", "--monitor", "chardev=s"],
                          input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                          capture_output=True, timeout=30)
    assert proc.returncode == 0
    lines = proc.stdout.split(b"\r\n")
    assert lines[0].startswith(b'{"QMP": ')
    assert lines[1:] == [b'{"return": {}}', b'{"return": {}}', b""]


def test_inet_monitor_and_file_chardev(tmp_path, daemon_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "chr.out"
    daemon_factory("trio", [
        "--chardev", f"socket,id=tcp0,host=127.0.0.1,port={port},server=on,wait=off",
        "--monitor", "chardev=tcp0",
        "--chardev", f"file,id=f0,path={out}"])
    import json
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        assert b'"QMP"' in f.readline()
        s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-chardev"}')
        assert json.loads(f.readline()) == {"return": {}}
        chardevs = {c["label"]: c for c in json.loads(f.readline())["return"]}
        local = s.getsockname()
        f.close()
    assert chardevs["tcp0"] == {
        "frontend-open": True, "label": "tcp0",
        "filename": f"tcp:127.0.0.1:{port},server=on <-> {local[0]}:{local[1]}"}
    # QEMU's words for the file chardev and for a listener nobody uses
    assert chardevs["f0"] == {"frontend-open": False, "label": "f0", "filename": "file"}
    assert out.exists()
