"""The socket chardev's options beyond a plain socket: telnet, tn3270,
websocket, reconnect, the option checks and query-chardev's names; the
same scenario against qemu-storage-daemon 7.2 and qsd-trio, compared byte
for byte (TLS is in test_chardev_socket_tls_diff.py).

Normalised: the QMP greeting (version, package), the Date header of
WebSocket replies, port numbers (the system picks them) and the program
name in messages.  Waited for, never timed: a step reads until its
sentinel reply (a command with an id) has arrived; QEMU's WebSocket stall
is nudged through the other monitor (see chardev_socket_clients).  QEMU
writes a GLib warning on stderr when a WebSocket client leaves; qsd-trio
may write nothing there.

Where qsd-trio differs on purpose (a pong carries the ping's payload only)
the test says so and checks ours against RFC 6455.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from tests.chardev_socket_clients import (
    ACCEPTED_REQUESTS,
    REFUSED_REQUESTS,
    Conn,
    WsConn,
    chardev_filename,
    client_frame,
    listen_port,
    no_ports,
    normalise,
    upgrade_request,
    wait_disconnected,
    wait_for,
)
from tests.helpers import HAVE_QEMU, command, normalise_prog

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

KINDS = ("qemu", "trio")
WS_SERVER = "host=127.0.0.1,port=0,server=on,wait=off,websocket=on"


def start(daemon_factory, kind: str, opts: str, **kw):
    """A daemon with ``--chardev socket,id=c,OPTS --monitor c`` (and its
    own QMP monitor on qmp0)."""
    return daemon_factory(kind, ["--chardev", f"socket,id=c,{opts}", "--monitor", "c"], **kw)


def sentinel(n: int) -> bytes:
    return b'{"execute":"sync","id":"s%d"}' % n


def exchange(conn: Conn, data: bytes, n: int) -> bytes:
    """Send ``data`` and a sentinel; what came back up to its reply."""
    conn.send(data + sentinel(n))
    out = conn.read_until(b'"s%d"' % n)
    return normalise(out + conn.read_until(b"\r\n"))


# -- telnet -----------------------------------------------------------------------

# the byte after IAC NOP/IP is an option in telnet mode, not in TN3270
TELNET_PROBES = [
    b'{"execute":"abc\xff\xf1defg"}',
    b'{"execute":"abc\xff\xf3defg"}',          # BREAK
    b'{"execute":"abc\xff\xfbdefg"}',
    b'{"execute":"abc\xff\xf4defg"}',
    b'{"execute":"abc\xff\xfd\xffdefg"}',      # DO IAC
    b'{"execute":"abc\xffdefg"}',              # IAC d e
    b'\xff\xff{"execute":"lit"}',              # a literal 0xff
    b'{"exe' + b'\xff\xfb\x01' * 3 + b'cute":"split"}',
]
# EOR, SB and SE take an option byte in telnet mode; in TN3270 mode QEMU's
# monitor gets IAC IAC for them (see qsd_trio/chardev/telnet.py), two 0xff
# bytes that qsd-trio's JSON lexer reads as one error where QEMU's reads
# two (monitor/qmp_json.py, not the chardev): telnet mode only here, and
# tests/unit/test_telnet.py checks what the filter passes on
TELNET_ONLY_PROBES = [
    b'{"execute":"a"}\xff\xef{"execute":"b"}',
    b'{"execute":"a"}\xff\xfa{"execute":"b"}',
    b'{"execute":"a"}\xff\xf0{"execute":"b"}',
]


def telnet_transcript(d, probes: list[bytes]) -> list[bytes]:
    q = d.qmp()
    port = listen_port(q)
    out = [chardev_filename(q).replace(str(port), "P").encode()]
    conn = Conn(socket.create_connection(("127.0.0.1", port)))
    out.append(normalise(conn.read_until(b"\r\n")))  # the announcements, then the greeting
    out.append(exchange(conn, b'{"execute":"qmp_capabilities"}', 0))
    for n, probe in enumerate(probes, 1):
        out.append(exchange(conn, probe, n))
    # a command cut at the end of a connection goes on in the next one.  Over
    # TCP: QEMU reads what is left before the end (a unix socket's hang-up
    # makes it drop what its monitor had not read yet)
    conn.send(b'{"execute":"last","id":"last"}\xff')
    out.append(normalise(conn.read_until(b'"last"') + conn.read_until(b"\r\n")))
    conn.close()
    wait_disconnected(q)
    conn = Conn(socket.create_connection(("127.0.0.1", port)))
    out.append(normalise(conn.read_until(b"\r\n")))
    out.append(exchange(conn, b'xy{"execute":"qmp_capabilities"}', 99))
    conn.close()
    return out


@pytest.mark.parametrize("mode", ["telnet=on", "tn3270=on", "telnet=on,tn3270=on"])
def test_telnet_transcript(daemon_factory, mode):
    got = {}
    for kind in KINDS:
        d = start(daemon_factory, kind, f"host=127.0.0.1,port=0,server=on,wait=off,{mode}")
        probes = TELNET_PROBES + (TELNET_ONLY_PROBES if "tn3270" not in mode else [])
        got[kind] = telnet_transcript(d, probes)
        d.stop()
    assert got["trio"] == got["qemu"]
    # what was measured: QEMU's announcements first, IAC NOP's swallowed byte
    announce = "fffd19fffb19fffd00fffb00fffd18fffa1801fff0" if "tn3270" in mode else \
        "fffb01fffb03fffb00fffd00"
    assert got["qemu"][1] == bytes.fromhex(announce) + b"<greeting>\r\n"
    assert (b"The command abcdefg" if "tn3270" in mode else b"The command abcefg") in got["qemu"][3]
    assert got["qemu"][-1].startswith(b'{"return": {}}')  # "xy" went with the IAC


def test_telnet_client_mode_sends_nothing(daemon_factory, tmp_path):
    """telnet=on on a client chardev names it "telnet" but negotiates nothing."""
    got = {}
    for kind in KINDS:
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        d = start(daemon_factory, kind, f"host=127.0.0.1,port={port},telnet=on")
        peer, _ = lsock.accept()
        conn = Conn(peer)
        first = normalise(conn.read_until(b"\r\n"))
        name = no_ports(chardev_filename(d.qmp()))
        got[kind] = (first, exchange(conn, b'{"execute":"qmp_capabilities"}\xff\xf1x', 1), name)
        conn.close()
        lsock.close()
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][0] == b"<greeting>\r\n"


# -- WebSocket --------------------------------------------------------------------

def ws_connect(q, poke=True) -> WsConn:
    """A connection to chardev c; ``q``: the daemon's QMP client (its one
    monitor connection: a monitor serves one client at a time)."""
    port = listen_port(q)
    return WsConn(socket.create_connection(("127.0.0.1", port)),
                  nudge=(lambda: q.cmd("query-version")) if poke else None)


PONG = 0x8A


def ws_exchange(conn: WsConn, parts: list[bytes], n: int) -> list:
    """Send each part (after a ping, the pong is awaited first), then a
    sentinel; the frames that came back up to its reply.

    Waiting for the pong keeps a ping alone in QEMU's buffer: QEMU 7.2
    echoes whatever follows it there too, and drops a pong while another
    is unsent (see test_pong_carries_the_ping_payload_only)."""
    got = []
    for part in parts:
        conn.send(part)
        if part[0] & 0x0F == 0x9 or part in PINGS_BY_CONTINUATION:
            got += conn.frames_until(PONG)
    conn.send(client_frame(sentinel(n)))
    return got + conn.frames_until(b'"s%d"' % n)


PADDED = b'{"execute":"qmp_capabilities"' + b" " * 300 + b"}"
# a continuation after a ping between fragments continues the ping
CONTINUED_PING = client_frame(b'"query-y"}', op=0)
PINGS_BY_CONTINUATION = [CONTINUED_PING]
WS_PROBES = [
    [client_frame(b'{"execute":"qmp_capabilities"}')],
    [client_frame(b"hello", op=9)],
    [client_frame(b"", op=9)],
    [client_frame(b"hello", op=10)],
    [client_frame(b'{"execute":', fin=False) + client_frame(b'"query-x"}', op=0)],
    [client_frame(b'{"execute":', fin=False), client_frame(b"hi", op=9), CONTINUED_PING,
     client_frame(b'"z"}')],
    [bytes([0xC2]) + client_frame(b'{"execute":"rsv"}')[1:]],
    [client_frame(b"")],
    [client_frame(PADDED)],                                  # a 16-bit length
    [client_frame(b'{"execute":"' + b"x" * 9000 + b'"}')],   # a reply of two frames
    [client_frame(b'{"execute":"query-z"}', mask=b"\xff\x00\x80\x01")],
]


def test_websocket_frames(daemon_factory):
    got = {}
    for kind in KINDS:
        d = start(daemon_factory, kind, WS_SERVER)
        q = d.qmp()
        conn = ws_connect(q)
        out = conn.upgrade()
        out.append(no_ports(chardev_filename(q)))
        for n, probe in enumerate(WS_PROBES):
            out.append(ws_exchange(conn, probe, n))
        conn.close()
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    # the reply of more than 8192 bytes comes in two frames
    long_reply = got["qemu"][3 + 9]
    assert len(long_reply[0][1]) == 8192 and long_reply[1][1].endswith(b"not been found\"}}\r\n")


WS_FAULTS = [
    client_frame(b'{"execute":"x"}', masked=False),
    client_frame(b"text frame", op=1),
    client_frame(b"fragmented text", op=1, fin=False),
    client_frame(b"x", op=3),
    client_frame(b"x" * 200, op=9),
    client_frame(b"ping", op=9, fin=False),
    client_frame(b"\x03\xe8bye", op=8),
    client_frame(b"", op=8),
    client_frame(b"x", op=8, masked=False) + b"zzzz",
    client_frame(b"x", op=0),
    b"\x00" * 20,
    client_frame(b'{"execute":"qmp_capabilities"}') + client_frame(b"", op=8)[:2],
]


def test_websocket_faults_close_as_qemu(daemon_factory):
    got = {}
    for kind in KINDS:
        d = start(daemon_factory, kind, WS_SERVER)
        q = d.qmp()
        out = []
        for fault in WS_FAULTS:
            conn = ws_connect(q)
            conn.upgrade()
            conn.send(fault)
            if fault.endswith(b"\x88\x80"):
                # a close frame's header is read once 6 bytes are there
                out.append(conn.frames_until(b'"return"'))
                conn.send(b"mask")
            out.append(conn.frames_until(None))
            conn.close()
            wait_disconnected(q)
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]


def test_websocket_commands_read_with_a_close_never_run(daemon_factory):
    """What comes in the same read as a close frame is dropped (QEMU's
    channel fails that read): the object-add before it does not happen."""
    got = {}
    for kind in KINDS:
        d = start(daemon_factory, kind, WS_SERVER)
        q = d.qmp()
        conn = ws_connect(q)
        conn.upgrade()
        out = [ws_exchange(conn, [client_frame(b'{"execute":"qmp_capabilities"}')], 1)]
        conn.send(client_frame(b'{"execute":"object-add","arguments":{"qom-type":"secret",'
                               b'"id":"zz","data":"x"}}') + client_frame(b"", op=8))
        out.append(conn.frames_until(None))
        conn.close()
        out.append(q.cmd_raw("object-add", {"qom-type": "secret", "id": "zz", "data": "x"}))
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][-1] == {"return": {}}


WS_REQUESTS = REFUSED_REQUESTS + ACCEPTED_REQUESTS + [b"x" * 4096,
                                                     b"GET / HTTP/1.1\r\n" + b"x" * 4080]


def test_websocket_handshakes(daemon_factory):
    got = {}
    for kind in KINDS:
        d = start(daemon_factory, kind, WS_SERVER)
        q = d.qmp()
        out = []
        for request in WS_REQUESTS:
            conn = ws_connect(q)
            conn.send(request)
            reply = conn.read_until(b"\r\n")
            if reply.startswith(b"HTTP/1.1 101"):
                reply += conn.read_until(b"\r\n\r\n")
                out.append((normalise(reply), conn.frames_until(b"<greeting>")))
                conn.close()
            else:
                out.append(normalise(reply + conn.read_to_eof()))
                conn.close()
            wait_disconnected(q)
        # a client that leaves before the end of its request gets nothing
        conn = ws_connect(q)
        conn.send(upgrade_request()[:20])
        conn.sock.shutdown(socket.SHUT_WR)
        out.append(conn.read_to_eof())
        conn.close()
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][0].endswith(b"Sec-WebSocket-Version: 13\r\n")  # sic, no blank line


def test_websocket_telnet_over_unix(daemon_factory, tmp_path):
    """websocket=on works on a unix socket too; telnet goes inside the frames."""
    got = {}
    for kind in KINDS:
        # qemu-storage-daemon 7.2 now and then (about 1 run in 15 on a busy
        # machine, and once in CI) answers the first frame after the
        # greeting with a second greeting and drops the connection; its
        # run is then made again with a new daemon, up to 3 times.
        # qsd-trio's run is never made twice.
        for attempt in range(3 if kind == "qemu" else 1):
            path = tmp_path / f"ws-{kind}-{attempt}.sock"
            d = start(daemon_factory, kind,
                      f"path={path},server=on,wait=off,websocket=on,telnet=on")
            q = d.qmp()
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            conn = WsConn(sock, nudge=lambda q=q: q.cmd("query-version"))
            try:
                out = conn.upgrade()
                frames = [client_frame(b'{"execute":"qmp_capabilities"}\xff\xf1x')]
                try:
                    out.append(ws_exchange(conn, frames, 1))
                except AssertionError as e:
                    if kind == "qemu" and attempt < 2 and "closed before" in str(e) \
                            and "<greeting>" in str(e):
                        continue  # QEMU's dropped connection (above)
                    raise
                out.append(chardev_filename(q).replace(str(path), "P"))
            finally:
                conn.close()
                d.stop()
            got[kind] = out
            break
    assert got["trio"] == got["qemu"]
    assert got["qemu"][1][0] == (0x82, bytes.fromhex("fffb01fffb03fffb00fffd00"))


def test_pong_carries_the_ping_payload_only(daemon_factory):
    """A ping with more frames behind it in the same read: QEMU 7.2 echoes
    those frames' bytes in its pong too; qsd-trio answers as RFC 6455 says."""
    d = start(daemon_factory, "trio", WS_SERVER)
    conn = ws_connect(d.qmp(), poke=False)
    conn.upgrade()
    conn.send(client_frame(b"ping!", op=9) + client_frame(b'{"execute":"q"}'))
    assert conn.frames_until(b"capabilities negotiation") == [
        (0x8A, b"ping!"),
        (0x82, b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities '
               b'negotiation with \'qmp_capabilities\'"}}\r\n')]
    conn.close()


# -- option checks ----------------------------------------------------------------

OBJECTS = ["--object", "tls-creds-anon,id=ts,endpoint=server",
           "--object", "tls-creds-anon,id=tc,endpoint=client",
           "--object", "secret,id=sec,data=x"]

CLI_CASES = [
    "path=/nonexistent/x.sock,server=on,wait=off,reconnect=2",
    "fd=3,reconnect=1",
    "fd=3,server=off,reconnect=1",
    "fd=3,tls-creds=tc",
    "path=/nonexistent/x.sock,server=on,wait=off,tls-creds=ts",
    "path=/nonexistent/x.sock,tls-creds=tc",
    "path=/nonexistent/x.sock,tls-creds=nope",
    "path=/nonexistent/x.sock,tls-creds=sec",
    "path=/nonexistent/x.sock,tls-authz=nope",
    "host=127.0.0.1,port=0,server=on,wait=off,tls-authz=z",
    "host=127.0.0.1,port=0,server=on,wait=off,tls-creds=tc",
    "host=127.0.0.1,port=0,server=on,wait=off,tls-creds=tc,reconnect=1",
    "host=127.0.0.1,port=1,tls-creds=ts,wait=on",
    "host=127.0.0.1,port=0,server=on,wait=off,tls-creds=sec",
    "host=127.0.0.1,port=0,server=on,wait=off,reconnect=-1",
    "host=127.0.0.1,port=1,server=off,reconnect=-1",
    "host=127.0.0.1,port=1,server=off,reconnect=0",
    "host=127.0.0.1,port=1,server=off,wait=off",
    "host=127.0.0.1,port=1,websocket=on",
    "path=/nonexistent/x.sock,websocket=on",
    "path=/nonexistent/x.sock,server=on,wait=off,telnet=maybe",
    "host=127.0.0.1,port=1,server=off,telnet=on,tn3270=on",
    "path=/nonexistent/x.sock,server=on,wait=off,reconnect=x",
]


@pytest.mark.parametrize("opts", CLI_CASES)
def test_cli_errors_match(opts):
    args = OBJECTS + ["--chardev", f"socket,id=c,{opts}"]
    got = {}
    for kind in KINDS:
        p = subprocess.run(command(kind) + args, capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        got[kind] = (p.returncode, p.stdout, normalise_prog(p.stderr))
    assert got["trio"] == got["qemu"]
    assert got["qemu"][0] == 1
    assert "Traceback" not in got["trio"][2]


U = {"type": "unix", "data": {"path": "/nonexistent/x.sock"}}
I0 = {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}
I1 = {"type": "inet", "data": {"host": "127.0.0.1", "port": "1"}}
F = {"type": "fd", "data": {"str": "3"}}
QMP_CASES = [
    dict(addr=U, server=True, wait=False, reconnect=2),
    dict(addr=U, reconnect=2),
    dict(addr=U, server=False, reconnect=0),
    dict(addr=U, server=False, reconnect=-1),
    dict(addr=F, server=False, reconnect=1),
    dict(addr=F, server=False, **{"tls-creds": "tc"}),
    dict(addr=F, server=False, **{"tls-creds": "ts"}),
    dict(addr=U, server=False, **{"tls-creds": "ts"}),
    dict(addr=U, server=True, wait=False, **{"tls-creds": "tc"}),
    dict(addr=U, server=True, wait=False, reconnect=1, **{"tls-creds": "nope"}),
    dict(addr=U, server=True, wait=False, **{"tls-creds": "sec"}),
    dict(addr=I0, server=True, wait=False, reconnect=1, **{"tls-creds": "tc"}),
    dict(addr=I0, server=True, wait=False, **{"tls-authz": "z"}),
    dict(addr=I1, server=False, websocket=True),
    dict(addr=I1, server=False, websocket=False, wait=True),
    dict(addr=I1, server=False, websocket=True, **{"tls-creds": "ts"}),
    dict(addr=I1, server=False, **{"tls-creds": "tc", "tls-authz": "nope"}),
    dict(addr=I1, server=False, telnet=True),
    dict(addr=I0, server=True, wait=False, websocket=True, telnet=True),
    dict(addr=I0, server=True, wait=False, **{"tls-creds": "ts", "tls-authz": "nope"}),
    dict(addr=I0),        # QMP's defaults: a server that does not wait
    dict(addr=I0, tn3270=True, wait=False),
]


def test_chardev_add_errors_match(daemon_factory):
    got = {}
    for kind in KINDS:
        q = daemon_factory(kind, OBJECTS).qmp()
        out = []
        for n, data in enumerate(QMP_CASES):
            r = q.cmd_raw("chardev-add", {"id": f"c{n}", "backend": {"type": "socket",
                                                                     "data": data}})
            out.append(r)
            if "return" in r:
                out.append(no_ports(chardev_filename(q, f"c{n}")))
                out.append(q.cmd_raw("chardev-remove", {"id": f"c{n}"}))
        got[kind] = out
    assert got["trio"] == got["qemu"]


# -- query-chardev ----------------------------------------------------------------

def test_filenames(daemon_factory, tmp_path):
    """How each kind of socket chardev reads in query-chardev, connected or not."""
    got = {}
    for kind in KINDS:
        lpath = tmp_path / f"l-{kind}.sock"
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(str(lpath))
        lsock.listen(4)
        tsock = socket.create_server(("127.0.0.1", 0))
        tport = tsock.getsockname()[1]
        d = daemon_factory(kind, [
            "--chardev", f"socket,id=a,path={tmp_path}/a-{kind}.sock,server=on,wait=off,"
                         "telnet=on",
            "--chardev", "socket,id=b,host=127.0.0.1,port=0,server=on,wait=off,telnet=on",
            "--chardev", "socket,id=b2,host=localhost,port=0,server=on,wait=off,websocket=on",
            "--chardev", "socket,id=b3,host=,port=0,server=on,wait=off,tn3270=on",
            "--chardev", "socket,id=b4,host=::1,port=0,server=on,wait=off,telnet=on",
            "--monitor", "b4",  # a chardev without a frontend accepts nobody here
            "--chardev", "socket,id=b5,host=127.0.0.1,port=0,server=on,wait=off,telnet=on,"
                         "websocket=on",
            "--chardev", f"socket,id=d,path={lpath},telnet=on",
            "--chardev", f"socket,id=e,host=127.0.0.1,port={tport},telnet=on",
            "--chardev", f"socket,id=f,host=127.0.0.1,port={tport},reconnect=100",
            "--chardev", f"socket,id=g,path={lpath},reconnect=100",
        ])
        q = d.qmp()
        # QEMU connects the reconnecting ones in the background
        for label in ("f", "g"):
            wait_for(lambda q=q, label=label: not chardev_filename(q, label).startswith("dis"),
                     f"{label} to connect")
        names = {c["label"]: c["filename"] for c in q.cmd("query-chardev")}
        port = int(names["b4"].rsplit(":", 1)[1].split(",")[0])
        with socket.create_connection(("::1", port)):
            wait_for(lambda q=q: "<->" in chardev_filename(q, "b4"), "the connection")
            names["b4-connected"] = chardev_filename(q, "b4")
        got[kind] = sorted((k, no_ports(v.replace(f"-{kind}", "")))
                           for k, v in names.items() if k != "qmp0")
        lsock.close()
        tsock.close()
    assert got["trio"] == got["qemu"]


def test_wait_on_startup_message(tmp_path):
    """server=on,wait=on: QEMU's info line, then startup waits for a client,
    which gets the telnet announcements and the greeting (the pidfile only
    then)."""
    got = {}
    for kind in KINDS:
        pidfile = tmp_path / f"{kind}.pid"
        proc = subprocess.Popen(command(kind) + [
            "--chardev", "socket,id=c,host=127.0.0.1,port=0,server=on,telnet=on",
            "--monitor", "c", "--pidfile", str(pidfile)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            line = proc.stderr.readline().decode()
            assert not pidfile.exists()
            port = int(re.search(r":(\d+),server=on", line).group(1))
            conn = Conn(socket.create_connection(("127.0.0.1", port)))
            first = normalise(conn.read_until(b"\r\n"))
            wait_for(pidfile.exists, "the pidfile")
            conn.close()
        finally:
            proc.terminate()
            proc.wait(30)
            proc.stderr.close()
        # QEMU sends the announcements once or twice here, as a race goes
        # (the monitor attached while the first were pending starts them
        # again; the first may have gone out already): once counts
        init = bytes.fromhex("fffb01fffb03fffb00fffd00")
        got[kind] = (normalise_prog(line).replace(str(port), "P"), first.replace(init * 2, init))
    assert got["trio"] == got["qemu"]
    assert got["qemu"][0] == ("--chardev socket,id=c,host=127.0.0.1,port=0,server=on,telnet=on: "
                              "info: QEMU waiting for connection on: "
                              "disconnected:telnet:127.0.0.1:P,server=on\n")


# -- reconnect --------------------------------------------------------------------

def reconnect_transcript(d, lpath) -> list:
    """The chardev starts before its server exists, connects when it comes,
    and again after the server closes the connection, and reports that the
    server is gone."""
    q = d.qmp()
    out: list = [chardev_filename(q)]
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(lpath))
    lsock.listen(1)
    lsock.settimeout(30)
    for _ in range(2):
        peer, _ = lsock.accept()
        conn = Conn(peer)
        out.append(normalise(conn.read_until(b"\r\n")))
        out.append(exchange(conn, b'{"execute":"qmp_capabilities"}', 1))
        out.append(chardev_filename(q))
        conn.close()
        wait_disconnected(q)
    os.unlink(lpath)  # first: the next attempt finds no file, whenever it comes
    lsock.close()
    return out


def test_reconnect(daemon_factory, tmp_path):
    got = {}
    for kind in KINDS:
        lpath = tmp_path / f"r-{kind}.sock"
        d = start(daemon_factory, kind, f"path={lpath},reconnect=1",
                  allow_stderr=r"^qsd-trio: Unable to connect character device c: ")
        out = reconnect_transcript(d, lpath)
        # reported again once it was connected in between
        wait_for(lambda d=d: d.stderr().count("Unable to connect") == 2, "the second report")
        out.append(normalise_prog(d.stderr()))
        got[kind] = [x.replace(f"-{kind}", "") if isinstance(x, str) else x for x in out]
        d.stop()
    assert got["trio"] == got["qemu"]
    assert "Unable to connect character device c: Failed to connect to" in got["qemu"][-1]


def test_client_without_reconnect_stays_disconnected(daemon_factory, tmp_path):
    got = {}
    for kind in KINDS:
        lsock = socket.socket(socket.AF_UNIX)
        lpath = tmp_path / f"n-{kind}.sock"
        lsock.bind(str(lpath))
        lsock.listen(1)
        d = start(daemon_factory, kind, f"path={lpath}")
        peer, _ = lsock.accept()
        conn = Conn(peer)
        q = d.qmp()
        out = [normalise(conn.read_until(b"\r\n")), chardev_filename(q)]
        conn.close()
        wait_disconnected(q)
        lsock.settimeout(2)
        with pytest.raises(TimeoutError):
            lsock.accept()  # no second connection (a bounded wait for an absence)
        out.append(chardev_filename(q).replace(f"-{kind}", ""))
        got[kind] = out
        lsock.close()
        d.stop()
    assert got["trio"] == got["qemu"]


def test_reconnect_without_frontend_reports_first_failure(daemon_factory, tmp_path):
    """A client chardev with reconnect that nothing uses and whose server
    is missing: its first failure is reported all the same, once."""
    got = {}
    for kind in KINDS:
        path = tmp_path / f"missing-{kind}.sock"
        d = daemon_factory(kind, ["--chardev", f"socket,id=c,path={path},reconnect=1"],
                           allow_stderr=r"^qsd-trio: Unable to connect character device c: ")
        wait_for(lambda d=d: "Unable to connect" in d.stderr(), "the first report")
        q = d.qmp()
        got[kind] = [x.replace(f"-{kind}", "")  # each daemon's own socket path
                     for x in (chardev_filename(q), normalise_prog(d.stderr()))]
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][1].count("Unable to connect character device c: Failed to connect to") == 1


def test_reconnect_picks_up_a_late_server(daemon_factory, tmp_path):
    """A tcp client with reconnect whose server starts after it: the
    monitor works once connected (QMP through the connection)."""
    got = {}
    for kind in KINDS:
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        d = start(daemon_factory, kind, f"host=127.0.0.1,port={port},reconnect=1",
                  allow_stderr=r"^qsd-trio: Unable to connect character device c: ")
        wait_for(lambda d=d: "Unable to connect" in d.stderr(), "the first report")
        lsock = socket.create_server(("127.0.0.1", port))
        lsock.settimeout(30)
        peer, _ = lsock.accept()
        conn = Conn(peer)
        out = [normalise(conn.read_until(b"\r\n")),
               exchange(conn, b'{"execute":"qmp_capabilities"}', 1),
               normalise_prog(d.stderr()).replace(str(port), "P")]
        conn.close()
        lsock.close()
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
