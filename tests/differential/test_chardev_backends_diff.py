"""pipe, serial, parallel, pty, udp and mux chardevs: both daemons, the same
errors, replies, terminal settings and monitor transcripts.

Normalised: the program name, the version and package of QMP greetings,
the /dev/pts numbers.  Differences kept on purpose (see
qsd_trio/chardev/udp.py and fd.py): QMP over udp (QEMU 7.2 crashes on the
first command), QEMU's occasional second greeting on a pty's first open,
and C-a x, after which qemu-storage-daemon waits for its next event.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import termios
import time

import pytest

from tests.helpers import HAVE_QEMU, command, normalise_prog

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

CLI_CASES = [
    ["--chardev", "pipe,id=c"],
    ["--chardev", "pipe,id=c,path=/nonexistent/p"],
    ["--chardev", "pipe,id=c,path=/dev/null,bogus=1"],
    ["--chardev", "serial,id=c"],
    ["--chardev", "tty,id=c"],
    ["--chardev", "serial,id=c,path=/nonexistent/tty"],
    ["--chardev", "parallel,id=c"],
    ["--chardev", "parport,id=c"],
    ["--chardev", "parallel,id=c,path=/dev/null"],
    ["--chardev", "parallel,id=c,path=/nonexistent/pp"],
    ["--chardev", "udp,id=c"],
    ["--chardev", "udp,id=c,port="],
    ["--chardev", "udp,id=c,port=x"],
    ["--chardev", "udp,id=c,port=5,ipv4=off,ipv6=off"],
    ["--chardev", "udp,id=c,port=5,ipv4=maybe"],
    ["--chardev", "udp,id=c,port=5,localport=x"],
    ["--chardev", "udp,id=c,host=127.0.0.1,port=5,localaddr=192.0.2.1"],
    ["--chardev", "udp,id=c,host=::1,port=5,localaddr=127.0.0.1"],
    ["--chardev", "null,id=c,mux=maybe"],
    ["--chardev", "null,id=c,logfile=/nonexistent/log"],
    ["--chardev", "pty,id=c,mux=on,logfile=/nonexistent/log"],
    ["--chardev", "null,id=c,size=x"],
    ["--chardev", "null,id=c,rows=x"],
    ["--chardev", "mux,id=m"],
    ["--chardev", "null,id=c d"],
    ["--chardev", "null,id=1c"],
    ["--chardev", "null,id=c,mux=on", "--chardev", "null,id=1c,mux=on"],
    ["--chardev", "mux,id=m,chardev=nope"],
    ["--chardev", "null,id=c", "--chardev", "mux,id=m,chardev=c",
     "--chardev", "mux,id=m2,chardev=c"],
    ["--chardev", "null,id=c", "--monitor", "c", "--monitor", "c"],
    ["--chardev", "null,id=c,mux=on"] + ["--monitor", "c"] * 5,
    ["--chardev", "null,id=c-base", "--chardev", "null,id=c,mux=on"],
    ["--chardev", "null,id=c", "--chardev", "null,id=c,mux=on"],
    ["--chardev", "null,id=c", "--chardev", "mux,id=m,chardev=c", "--monitor", "c"],
    ["--chardev", "null,id=c,server,nowait,delay,bogus=1,nodelay"],
    ["--chardev", "null,id=c,bogus=1,help"],
    ["--chardev", "null,id=c,server,help,bogus=1"],
    ["--chardev", "help"],
    ["--chardev", "?"],
    ["--chardev", "file,id=c,path=/dev/null,input-path=/dev/null"],
    ["--chardev", "null,id=c,width=0x10,size=1k,rows=1.5"],
    ["--chardev", "socket,id=c,path=/nonexistent/s,server=on,wait=off,tight=maybe"],
]


def run_both(args: list[str]) -> dict[str, tuple[int, str]]:
    """Both daemons at once on the same command line (each fails fast)."""
    procs = {kind: subprocess.Popen(command(kind) + args, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind in ("qemu", "trio")}
    out = {}
    for kind, proc in procs.items():
        stdout, err = proc.communicate(timeout=30)
        out[kind] = (proc.returncode, stdout, normalise_prog(err))
    return out


@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(c) for c in CLI_CASES])
def test_cli_errors_match(args):
    # qemu-storage-daemon sometimes aborts while it exits after a mux
    # error (an assertion in qemu_chr_be_update_read_handlers), and once
    # (make test, 2026-12-08) exited 1 after a mux error with nothing on
    # stderr: ask again
    for _ in range(5):
        got = run_both(args)
        rc, _, err = got["qemu"]
        if rc >= 0 and "Assertion" not in err and (rc == 0 or err):
            break
    else:
        # it aborted every time (a loaded machine makes it likelier): what
        # it printed before the failed assertion, and the exit status 1 it
        # was exiting with, are what a user gets from the error itself
        rc, out, err = got["qemu"]
        err = "".join(ln for ln in err.splitlines(keepends=True) if "Assertion" not in ln)
        got["qemu"] = (1 if rc == -6 else rc, out, err)
    assert got["trio"] == got["qemu"]
    assert "Traceback" not in got["trio"][2]


PTS = re.compile(r"/dev/pts/\d+|(qmp|mux)-(qemu|trio)(-\d+)?")
BPTS = re.compile(PTS.pattern.encode())


def add_transcript(d, tmp_path) -> list:
    fifo = tmp_path / f"fifo-{d.kind}"
    os.mkfifo(f"{fifo}.in")
    os.mkfifo(f"{fifo}.out")
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    cmds = [
        ("pty", {"type": "pty", "data": {}}),
        ("s", {"type": "serial", "data": {"device": "/nonexistent/tty"}}),
        ("s2", {"type": "serial", "data": {"device": str(plain)}}),
        ("pp", {"type": "parallel", "data": {"device": str(plain)}}),
        ("pp2", {"type": "parallel", "data": {"device": "/nonexistent/pp"}}),
        ("pi", {"type": "pipe", "data": {"device": "/nonexistent/pipe"}}),
        ("pi2", {"type": "pipe", "data": {"device": str(plain)}}),
        ("pi3", {"type": "pipe", "data": {"device": str(fifo)}}),
        ("u", {"type": "udp", "data": {"remote": {"type": "inet",
                                                  "data": {"host": "127.0.0.1", "port": "9"}}}}),
        ("u2", {"type": "udp", "data": {"remote": {"type": "unix", "data": {"path": "/x"}}}}),
        ("u3", {"type": "udp", "data": {"remote": {"type": "inet",
                                                   "data": {"host": "127.0.0.1", "port": ""}}}}),
        ("u4", {"type": "udp", "data": {"remote": {"type": "inet",
                                                   "data": {"host": "127.0.0.1", "port": "9"}},
                                        "local": {"type": "inet",
                                                  "data": {"host": "192.0.2.1", "port": "0"}}}}),
        ("lg", {"type": "null", "data": {"logfile": "/nonexistent/log"}}),
        ("m", {"type": "mux", "data": {"chardev": "nope"}}),
        ("m", {"type": "mux", "data": {"chardev": "u"}}),
        ("m2", {"type": "mux", "data": {"chardev": "u"}}),
        ("m3", {"type": "mux", "data": {"chardev": "qmp0"}}),
        ("m4", {"type": "mux", "data": {"chardev": "m"}}),
        # chardev-add takes any id, --chardev only an identifier (CLI_CASES)
        ("1c", {"type": "null", "data": {}}),
        ("c d", {"type": "null", "data": {}}),
        ("", {"type": "null", "data": {}}),
        ("c\u0000", {"type": "null", "data": {}}),
        ("c\u00e9", {"type": "null", "data": {}}),
    ]
    q = d.qmp()
    out = [(id, b["type"], q.cmd_raw("chardev-add", {"id": id, "backend": b})) for id, b in cmds]
    out.append(q.cmd_raw("query-chardev"))
    for id in ("u", "m", "m4", "m", "u", "pty", "pi3", "s2"):
        out.append((id, q.cmd_raw("chardev-remove", {"id": id})))
    out.append(q.cmd_raw("query-chardev"))
    q.cmd("chardev-add", id="n", backend={"type": "null", "data": {}})
    for id, b in [("n", {"type": "pty", "data": {}}), ("zz", {"type": "null", "data": {}}),
                  ("m", {"type": "null", "data": {}}), ("u", {"type": "null", "data": {}}),
                  ("n", {"type": "serial", "data": {"device": "/nonexistent/tty"}})]:
        out.append((id, q.cmd_raw("chardev-change", {"id": id, "backend": b})))
    out.append(q.cmd_raw("query-chardev"))
    return json.loads(PTS.sub("X", json.dumps(out)))


def test_chardev_add_and_remove_match(daemon_factory, tmp_path):
    theirs = add_transcript(daemon_factory("qemu"), tmp_path)
    ours = add_transcript(daemon_factory("trio"), tmp_path)
    for o, t in zip(ours, theirs, strict=True):
        assert o == t


def tty_state(fd: int) -> list:
    return termios.tcgetattr(fd)


def test_serial_and_pty_terminal_settings_match(daemon_factory):
    """serial: QEMU's tty_serial_init on a tty we hold the master of; pty:
    qemu_openpty_raw's cfmakeraw."""
    states = {}
    for kind in ("qemu", "trio"):
        master, slave = os.openpty()
        name = os.ttyname(slave)
        os.close(slave)
        try:
            d = daemon_factory(kind, ["--chardev", f"serial,id=s,path={name}"])
            q = d.qmp()
            pty = q.cmd("chardev-add", id="p", backend={"type": "pty", "data": {}})["pty"]
            fd = os.open(name, os.O_RDWR | os.O_NOCTTY)
            pfd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
            try:
                states[kind] = (tty_state(fd), tty_state(pfd))
            finally:
                os.close(fd)
                os.close(pfd)
            d.stop()
        finally:
            os.close(master)
    assert states["trio"] == states["qemu"]


GREETING = re.compile(rb'\{"QMP": \{"version": \{[^}]*\}, "package": "[^"]*"\}, '
                      rb'"capabilities": \["oob"\]\}\}\r\n')


def read_for(fd_or_sock, quiet: float = 0.1, first: float = 5) -> bytes:
    """What arrives until nothing has come for ``quiet`` seconds."""
    out = b""
    wait = first
    while select.select([fd_or_sock], [], [], wait)[0]:
        chunk = (fd_or_sock.recv(65536) if isinstance(fd_or_sock, socket.socket)
                 else os.read(fd_or_sock, 65536))
        if not chunk:
            break
        out += chunk
        wait = quiet
    return out


MUX_INPUT = [
    b'{"execute":"qmp_capabilities"}\n',
    b'{"execute":"query-chardev"}\n',
    b"\x01c",
    b'{"execute":"query-version"}\n',
    b"\x01h",
    b"\x01?",
    b"\x01\x01\n",
    b'\x01c{"execute":"qmp_capabilities","id":2}\n',
    b"\x01b\x01z",
    b'{"execute":"query-chardev-backends"}\n',
]


def mux_transcript(kind: str, tmp_path) -> tuple[list, int]:
    path = tmp_path / f"mux-{kind}.sock"
    proc = subprocess.Popen(command(kind) + [
        "--chardev", f"socket,id=m,path={path},server=on,wait=off,mux=on",
        "--monitor", "m", "--monitor", "m"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        out = []
        for inputs in (MUX_INPUT, MUX_INPUT[:2]):  # the next client is greeted again
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                out.append(GREETING.sub(b"GREETING\n", read_for(s)))
                for msg in inputs:
                    s.sendall(msg)
                    got = read_for(s, 0.1, 0.2 if msg.startswith(b"\x01") else 5)
                    out.append((msg, BPTS.sub(b"X", got)))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            read_for(s)
            s.sendall(b"\x01x")
            out.append(read_for(s))
        if kind == "qemu":
            # qemu-storage-daemon's quit from the monitor's I/O thread sets
            # exit_requested without waking its main loop: it would leave
            # at its next event only (SIGTERM does not wake it either).  Ours
            # leaves at once.
            proc.kill()
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    return out, rc


def test_mux_monitors_match(tmp_path):
    """Two monitors on one mux: both greet, the focused one answers, C-a
    escapes (c, h, ?, C-a, b, unknown) act as in QEMU, C-a x quits."""
    theirs = mux_transcript("qemu", tmp_path)
    ours = mux_transcript("trio", tmp_path)
    assert ours[0][0] == b"GREETING\nGREETING\n"
    for o, t in zip(ours[0], theirs[0], strict=True):
        assert o == t
    assert ours[0][-1] == theirs[0][-1] == b"QEMU: Terminated\n\r"
    assert ours[1] == 0


PIPE_INPUT = [
    b'{"execute":"query-version"}\n',
    b'{"execute":"qmp_capabilities"}\n',
    b'{"execute":"query-chardev"}\n',
    b'{"execute":"chardev-remove","arguments":{"id":"p"}}\n',
    b'{"execute": "bogus"}\n',
]


def pipe_transcript(kind: str, daemon_factory, tmp_path) -> list:
    base = tmp_path / f"p-{kind}"
    os.mkfifo(f"{base}.in")
    os.mkfifo(f"{base}.out")
    d = daemon_factory(kind, ["--chardev", f"pipe,id=p,path={base}", "--monitor", "p"])
    rd = os.open(f"{base}.out", os.O_RDONLY | os.O_NONBLOCK)
    wr = os.open(f"{base}.in", os.O_WRONLY)
    try:
        out = [GREETING.sub(b"GREETING\n", read_for(rd))]
        for msg in PIPE_INPUT:
            os.write(wr, msg)
            out.append((msg, PTS.sub("X", read_for(rd).decode())))
    finally:
        os.close(rd)
        os.close(wr)
    d.stop()
    return out


def test_pipe_monitor_matches(daemon_factory, tmp_path):
    theirs = pipe_transcript("qemu", daemon_factory, tmp_path)
    ours = pipe_transcript("trio", daemon_factory, tmp_path)
    assert ours[0] == b"GREETING\n"
    for o, t in zip(ours, theirs, strict=True):
        assert o == t


def read_greetings(fd: int, count: int) -> bytes:
    got = b""
    while got.count(b"\r\n") < count:
        assert select.select([fd], [], [], 10)[0], got
        got += os.read(fd, 65536)
    return got


def pty_transcript(kind: str, daemon_factory) -> list:
    d = daemon_factory(kind, ["--chardev", "pty,id=p", "--monitor", "p"])
    path = next(c["filename"] for c in d.qmp().cmd("query-chardev") if c["label"] == "p")
    path = path.removeprefix("pty:")
    out = []
    for again in (False, True):  # the slave closed and opened again: a new session
        if again:
            time.sleep(0.5)  # a hang-up at once undone may go unnoticed
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            # QEMU may greet twice on the first open (when a greeting
            # written at startup waited in the pty; its poll comes within
            # a second), we once: keep one
            got = read_greetings(fd, 1)
            if kind == "qemu" and not again:
                got += read_for(fd, 0.1, 1.2)
            got = GREETING.sub(b"GREETING\n", got)
            out.append(got.replace(b"GREETING\nGREETING\n", b"GREETING\n"))
            for msg in PIPE_INPUT[:3]:
                os.write(fd, msg)
                out.append((msg, PTS.sub("X", read_for(fd).decode())))
        finally:
            os.close(fd)
    d.stop()
    return out


def test_pty_monitor_matches(daemon_factory):
    theirs = pty_transcript("qemu", daemon_factory)
    ours = pty_transcript("trio", daemon_factory)
    assert ours[0] == b"GREETING\n"
    for o, t in zip(ours, theirs, strict=True):
        assert o == t


def test_pty_announced_at_startup_as_qemu(tmp_path):
    # QEMU's stdout to a pipe is flushed at exit: compare what both printed
    outs = {}
    for kind in ("qemu", "trio"):
        proc = subprocess.Popen(command(kind) + ["--chardev", "pty,id=mine", "--chardev",
                                                 "pty,id=other,mux=on"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(1 if kind == "qemu" else 0)
        deadline = time.monotonic() + 20
        if kind == "trio":
            lines = b""
            while lines.count(b"\n") < 2 and time.monotonic() < deadline:
                lines += os.read(proc.stdout.fileno(), 4096)
        proc.terminate()
        out, err = proc.communicate(timeout=20)
        outs[kind] = PTS.sub("X", (lines + out if kind == "trio" else out).decode())
        assert not err
    assert outs["trio"] == outs["qemu"] == (
        "char device redirected to X (label mine)\n"
        "char device redirected to X (label other-base)\n")
