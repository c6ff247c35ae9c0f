"""Run by an init system: sd_notify readiness, socket activation by name,
--daemonize.

The notify socket is a real SOCK_DGRAM socket bound and read by the test;
descriptors are passed the way systemd passes them (listening sockets at
3, 4, ... with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES), by the test
itself and by ``systemd-socket-activate``; QMP and NBD clients then talk
to the daemon through those sockets (and a vhost-user front-end to a
vhost-user-blk export).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.helpers import command

NULL_SIZE = 1 << 30  # null-co's default size


class NotifySocket:
    """The service manager's end: a datagram socket the daemon writes to."""

    def __init__(self, tmp_path: Path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"qsd-trio-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            self.env = path
        self.sock.settimeout(30)
        self.messages: list[dict[str, str]] = []

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n"))
        self.messages.append(msg)
        return msg

    def until(self, key: str, value: str | None = None) -> dict[str, str]:
        """Read until a message carries ``key`` (with ``value``, if given)."""
        while True:
            msg = self.next()
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path)
    yield n
    n.close()


def listening_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    return s


def spawn_activated(argv: list[str], socks: list[socket.socket], names: list[str] | None,
                    env: dict[str, str], *, pid: str = "self",
                    stderr=subprocess.PIPE) -> subprocess.Popen:
    """Exec ``argv`` with ``socks`` at descriptors 3, 4, ... and LISTEN_*
    set, as systemd does; ``pid="self"`` sets LISTEN_PID to the daemon's
    own pid (the shell execs it, keeping its pid)."""
    high = [os.dup(s.fileno()) for s in socks]
    # above any descriptor the child could be given otherwise
    moved = []
    for i, fd in enumerate(high):
        moved.append(os.dup2(fd, 100 + i, inheritable=False))
        os.close(fd)
    targets = [3 + i for i in range(len(socks))]

    def place() -> None:
        for src, dst in zip(moved, targets, strict=True):
            os.dup2(src, dst)  # dup2 leaves dst inheritable

    env = dict(os.environ, **env, LISTEN_FDS=str(len(socks)))
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    if pid != "self":
        env["LISTEN_PID"] = pid
    shell = 'export LISTEN_PID=$$; exec "$@"' if pid == "self" else 'exec "$@"'
    try:
        return subprocess.Popen(["sh", "-c", shell, "sh", *argv], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=place, pass_fds=targets)
    finally:
        for fd in moved:
            os.close(fd)


def stop(proc: subprocess.Popen) -> bytes:
    """SIGTERM (if still running), wait; what it wrote to stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or b""


def nbd_size(path: Path, export: str) -> int:
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///{export}?socket={path}"],
                       capture_output=True, text=True, timeout=30, check=True)
    return int(r.stdout)


# -- sd_notify --------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_after_pidfile_then_status_then_stopping(tmp_path, abstract):
    notify = NotifySocket(tmp_path, abstract)
    pidfile = tmp_path / "d.pid"
    qmp_path = tmp_path / "qmp.sock"
    nbd_path = tmp_path / "nbd.sock"
    proc = subprocess.Popen(command("trio") + [
        "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off", "--monitor", "chardev=m",
        "--blockdev", "null-co,node-name=n0", "--pidfile", str(pidfile)],
        env=dict(os.environ, NOTIFY_SOCKET=notify.env), stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        ready = notify.until("READY", "1")
        # the pidfile is written before READY=1, and names the process
        assert pidfile.read_text() == f"{proc.pid}\n"
        assert ready["MAINPID"] == str(proc.pid)
        assert notify.until("STATUS")["STATUS"] == "Serving 0 exports, 0 jobs running"
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        try:
            assert "return" in qmp.cmd_raw("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": str(nbd_path)}}})
            assert "return" in qmp.cmd_raw("block-export-add", {
                "type": "nbd", "id": "e0", "node-name": "n0"})
            assert (notify.until("STATUS")["STATUS"]
                    == "Serving 1 export (e0), 0 jobs running")
            assert "return" in qmp.cmd_raw("block-export-del", {"id": "e0"})
            assert (notify.until("STATUS")["STATUS"]
                    == "Serving 0 exports, 0 jobs running")
        finally:
            qmp.close()
        proc.send_signal(signal.SIGTERM)
        assert notify.until("STOPPING")["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        err = stop(proc)
        notify.close()
    assert err == b""
    # READY came once, and before any STOPPING
    kinds = [k for m in notify.messages for k in m if k in ("READY", "STOPPING")]
    assert kinds == ["READY", "STOPPING"]


def test_status_shows_running_jobs(tmp_path, notify):
    qmp_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(command("trio") + [
        "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off", "--monitor", "chardev=m",
        "--blockdev", "null-co,node-name=src,size=1073741824",
        "--blockdev", "null-co,node-name=dst,size=1073741824"],
        env=dict(os.environ, NOTIFY_SOCKET=notify.env), stdin=subprocess.DEVNULL)
    try:
        notify.until("READY")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        try:
            # a mirror stays running (ready) until it is completed or cancelled
            assert "return" in qmp.cmd_raw("blockdev-mirror", {
                "job-id": "m0", "device": "src", "target": "dst", "sync": "full"})
            notify.until("STATUS", "Serving 0 exports, 1 job running (m0)")
            assert "return" in qmp.cmd_raw("block-job-cancel", {"device": "m0", "force": True})
            notify.until("STATUS", "Serving 0 exports, 0 jobs running")
        finally:
            qmp.close()
    finally:
        stop(proc)


def test_watchdog_pings_at_half_the_interval(tmp_path, notify):
    pidfile = tmp_path / "d.pid"
    proc = subprocess.Popen(command("trio") + ["--pidfile", str(pidfile)],
                            env=dict(os.environ, NOTIFY_SOCKET=notify.env,
                                     WATCHDOG_USEC="200000"),
                            stdin=subprocess.DEVNULL)
    try:
        notify.until("READY")
        for _ in range(3):
            notify.until("WATCHDOG", "1")
    finally:
        stop(proc)


def test_watchdog_for_another_pid_is_not_ours(tmp_path, notify):
    qmp_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen(command("trio") + [
        "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off", "--monitor", "chardev=m"],
        env=dict(os.environ, NOTIFY_SOCKET=notify.env, WATCHDOG_USEC="200000",
                 WATCHDOG_PID="1"), stdin=subprocess.DEVNULL)
    try:
        notify.until("READY")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        # a round trip after READY: a watchdog would have pinged by now,
        # as its first ping goes out when it starts
        assert "return" in qmp.cmd_raw("query-version")
        qmp.close()
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING")
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    assert not any("WATCHDOG" in m for m in notify.messages)


# -- socket activation ------------------------------------------------------------

def test_qmp_and_nbd_through_passed_sockets(tmp_path, notify):
    qmp_path, nbd_path = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    pidfile = tmp_path / "d.pid"
    socks = [listening_unix(qmp_path), listening_unix(nbd_path)]
    proc = spawn_activated(command("trio") + [
        "--chardev", "socket,id=qmp0,fd=qmp,server=on,wait=off", "--monitor", "chardev=qmp0",
        "--nbd-server", "addr.type=fd,addr.str=nbd",
        "--blockdev", "null-co,node-name=n0",
        "--export", "nbd,id=e0,node-name=n0,name=disk",
        "--pidfile", str(pidfile)], socks, ["qmp", "nbd"], {"NOTIFY_SOCKET": notify.env})
    try:
        for s in socks:
            s.close()  # the daemon holds them now
        notify.until("READY")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        try:
            assert qmp.cmd_raw("query-block-exports")["return"][0]["id"] == "e0"
            assert nbd_size(nbd_path, "disk") == NULL_SIZE
        finally:
            qmp.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        err = stop(proc)
    assert err == b""


def test_vhost_user_blk_through_a_passed_socket(tmp_path):
    vu_path = tmp_path / "vu.sock"
    pidfile = tmp_path / "d.pid"
    socks = [listening_unix(vu_path)]
    proc = spawn_activated(command("trio") + [
        "--blockdev", "null-co,node-name=n0",
        "--export", "vhost-user-blk,id=vu0,node-name=n0,addr.type=fd,addr.str=vhost",
        "--pidfile", str(pidfile)], socks, ["vhost"], {})
    try:
        socks[0].close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(vu_path))
            # VHOST_USER_GET_FEATURES (1), version 1; the reply carries the
            # reply flag (0x4) and a u64
            s.sendall(struct.pack("<III", 1, 1, 0))
            reply = b""
            while len(reply) < 20:
                chunk = s.recv(20 - len(reply))
                assert chunk
                reply += chunk
        request, flags, size, features = struct.unpack("<IIIQ", reply)
        assert (request, flags & 0x4, size) == (1, 0x4, 8)
        assert features & (1 << 30)  # VHOST_USER_F_PROTOCOL_FEATURES
    finally:
        err = stop(proc)
    assert err == b""


def test_numeric_fds_still_work_under_activation(tmp_path):
    qmp_path = tmp_path / "qmp.sock"
    pidfile = tmp_path / "d.pid"
    socks = [listening_unix(qmp_path)]
    proc = spawn_activated(command("trio") + [
        "--chardev", "socket,id=qmp0,fd=3,server=on,wait=off", "--monitor", "chardev=qmp0",
        "--pidfile", str(pidfile)], socks, None, {})
    try:
        socks[0].close()
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        assert "return" in qmp.cmd_raw("query-version")
        qmp.close()
    finally:
        stop(proc)


@pytest.mark.parametrize("option", [
    ["--chardev", "socket,id=qmp0,fd=nosuch,server=on,wait=off"],
    ["--nbd-server", "addr.type=fd,addr.str=nosuch"],
], ids=["chardev", "nbd-server"])
def test_a_name_that_was_not_passed(tmp_path, option):
    socks = [listening_unix(tmp_path / "s.sock")]
    proc = spawn_activated(command("trio") + option, socks, ["other"], {})
    socks[0].close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == (f"qsd-trio: {option[0]} {option[1]}: "
                            "File descriptor named 'nosuch' has not been found\n")


def test_a_name_serves_once(tmp_path):
    """Two users of one passed socket: the second finds no such name (the
    first took it), so nothing listens twice."""
    socks = [listening_unix(tmp_path / "s.sock")]
    proc = spawn_activated(command("trio") + [
        "--chardev", "socket,id=a,fd=qmp,server=on,wait=off",
        "--nbd-server", "addr.type=fd,addr.str=qmp"], socks, ["qmp"], {})
    socks[0].close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == ("qsd-trio: --nbd-server addr.type=fd,addr.str=qmp: "
                            "File descriptor named 'qmp' has not been found\n")


def test_descriptors_for_another_process_are_ignored(tmp_path):
    """LISTEN_PID names another process: the names mean nothing here, and
    the error is QEMU's for a text that is not a number."""
    socks = [listening_unix(tmp_path / "s.sock")]
    proc = spawn_activated(command("trio") + [
        "--chardev", "socket,id=a,fd=qmp,server=on,wait=off"], socks, ["qmp"], {}, pid="1")
    socks[0].close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == ("qsd-trio: --chardev socket,id=a,fd=qmp,server=on,wait=off: "
                            "Unable to parse FD number qmp\n")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate(tmp_path, notify):
    qmp_path, nbd_path = tmp_path / "qmp.sock", tmp_path / "nbd.sock"
    pidfile = tmp_path / "d.pid"
    # it listens, and execs the daemon when the first client connects
    proc = subprocess.Popen([
        "systemd-socket-activate", "-l", str(qmp_path), "-l", str(nbd_path),
        "--fdname=qmp:nbd", "-E", f"NOTIFY_SOCKET={notify.env}", *command("trio"),
        "--chardev", "socket,id=qmp0,fd=qmp,server=on,wait=off", "--monitor", "chardev=qmp0",
        "--nbd-server", "addr.type=fd,addr.str=nbd",
        "--blockdev", "null-co,node-name=n0", "--export", "nbd,id=e0,node-name=n0",
        "--pidfile", str(pidfile)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1500):
            if qmp_path.exists():
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()  # the connection that starts the daemon
        qmp.settimeout(30)
        try:
            notify.until("READY")
            # systemd-socket-activate execs: the daemon has its pid
            assert pidfile.read_text() == f"{proc.pid}\n"
            assert nbd_size(nbd_path, "n0") == NULL_SIZE
        finally:
            qmp.close()
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING")
        assert proc.wait(30) == 0
    finally:
        err = stop(proc).decode()
    assert "qsd-trio" not in err, err


# -- --daemonize ------------------------------------------------------------------

def test_daemonize_with_passed_socket_and_notify(tmp_path, notify):
    """LISTEN_PID names the process started, which forks: the names are read
    before the fork, the child serves the passed socket, the parent exits 0
    once the child is ready."""
    qmp_path = tmp_path / "qmp.sock"
    pidfile = tmp_path / "d.pid"
    socks = [listening_unix(qmp_path)]
    proc = spawn_activated(command("trio") + [
        "--daemonize", "--pidfile", str(pidfile),
        "--chardev", "socket,id=qmp0,fd=qmp,server=on,wait=off", "--monitor", "chardev=qmp0"],
        socks, ["qmp"], {"NOTIFY_SOCKET": notify.env})
    socks[0].close()
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, b"")
    pid = int(pidfile.read_text())  # written before the parent exited
    try:
        assert notify.until("READY")["MAINPID"] == str(pid)
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        qmp.settimeout(30)
        assert "return" in qmp.cmd_raw("query-version")
        qmp.close()
    finally:
        os.kill(pid, signal.SIGTERM)
    notify.until("STOPPING")


def test_daemonize_failure_reports_the_childs_error(tmp_path, notify):
    pidfile = tmp_path / "d.pid"
    r = subprocess.run(command("trio") + [
        "--daemonize", "--pidfile", str(pidfile),
        "--blockdev", "null-co,node-name=n0",
        "--nbd-server", "addr.type=unix,addr.path=/nonexistent/dir/nbd.sock"],
        env=dict(os.environ, NOTIFY_SOCKET=notify.env),
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr == ("qsd-trio: --nbd-server addr.type=unix,addr.path=/nonexistent/dir/nbd.sock: "
                        "Failed to bind socket to /nonexistent/dir/nbd.sock: "
                        "No such file or directory\n")
    assert not pidfile.exists()
    # never ready: neither READY=1 nor STOPPING=1 was sent
    notify.sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        notify.next()


# -- the shipped units ------------------------------------------------------------

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def unit_settings(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a unit file, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_systemd_units_as_shipped(tmp_path, notify):
    """The service's ExecStart under the sockets its .socket units name."""
    service = unit_settings(CONTRIB / "systemd" / "qsd-trio@.service")
    qmp_unit = unit_settings(CONTRIB / "systemd" / "qsd-trio@.socket")
    nbd_unit = unit_settings(CONTRIB / "systemd" / "qsd-trio-nbd@.socket")
    assert service["Type"] == "notify"
    run = str(tmp_path)

    def expand(value: str) -> str:
        return value.replace("%i", "vol0").replace("/run/qsd-trio", run)

    qmp_path, nbd_path = expand(qmp_unit["ListenStream"]), expand(nbd_unit["ListenStream"])
    exec_start = expand(service["ExecStart"]).split()
    assert exec_start[0] == "/usr/bin/qsd-trio" and exec_start[-1] == "$QSD_TRIO_ARGS"
    argv = command("trio") + exec_start[1:-1] + [
        "--blockdev", "null-co,node-name=disk", "--export", "nbd,id=e0,node-name=disk,name=vol0"]
    proc = subprocess.Popen([
        "systemd-socket-activate", "-l", qmp_path, "-l", nbd_path,
        f"--fdname={qmp_unit['FileDescriptorName']}:{nbd_unit['FileDescriptorName']}",
        "-E", f"NOTIFY_SOCKET={notify.env}", *argv],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1500):
            if os.path.exists(nbd_path):
                break
            assert proc.poll() is None
            time.sleep(0.02)
        # the first NBD client starts the daemon
        assert nbd_size(Path(nbd_path), "vol0") == NULL_SIZE
        notify.until("READY")
        assert (tmp_path / "vol0.pid").read_text() == f"{proc.pid}\n"
        qmp = QEMUMonitorProtocol(qmp_path)
        qmp.connect()
        qmp.settimeout(30)
        assert qmp.cmd_raw("query-block-exports")["return"][0]["id"] == "e0"
        qmp.close()
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING")
        assert proc.wait(30) == 0
    finally:
        err = stop(proc).decode()
    assert "qsd-trio" not in err, err


def test_openrc_script_command_line(tmp_path):
    """The OpenRC script's command and arguments, run as start-stop-daemon
    would: --daemonize returns once the daemon serves."""
    script = CONTRIB / "openrc" / "qsd-trio"
    env = dict(os.environ, RC_SVCNAME="qsd-trio.vol0", QSD_TRIO=" ".join(command("trio")),
               QSD_TRIO_RUNDIR=str(tmp_path),
               QSD_TRIO_ARGS=f"--blockdev null-co,node-name=disk "
                             f"--nbd-server addr.type=unix,addr.path={tmp_path}/vol0.nbd "
                             f"--export nbd,id=e0,node-name=disk,name=vol0")
    r = subprocess.run(["sh", "-c", '. "$0"; exec $command $command_args', str(script)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    pid = int((tmp_path / "vol0.pid").read_text())
    try:
        assert nbd_size(tmp_path / "vol0.nbd", "vol0") == NULL_SIZE
        assert (tmp_path / "vol0.qmp").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(1500):  # it removes its pidfile last
        if not (tmp_path / "vol0.pid").exists():
            break
        time.sleep(0.02)
    assert not (tmp_path / "vol0.pid").exists()
