"""The socket chardev with tls-creds and tls-authz: qemu-storage-daemon 7.2
and qsd-trio, the same clients, the same transcripts (QMP inside TLS),
the same refusals.

Certificates are made per module (tests/integration/nbd_helpers.make_pki:
a CA, a server and a client certificate for DNS:localhost).  Clients:
Python's ssl (x509, anonymous DH) and, for PSK, the project's pyOpenSSL
session in client mode (Python's ssl has no TLS-PSK).  QEMU 7.2 leaves a
record gnutls read ahead unread until more comes: every client here sends
a blank record while it waits (QMP ignores it); see chardev_socket_clients.

Normalised as in test_chardev_socket_diff: the greeting, port numbers.
"""

from __future__ import annotations

import socket
import ssl

import pytest
import trio

from tests.chardev_socket_clients import (
    DEADLINE,
    Conn,
    WsConn,
    chardev_filename,
    client_frame,
    listen_port,
    no_ports,
    normalise,
    wait_disconnected,
)
from tests.helpers import HAVE_QEMU
from tests.integration.nbd_helpers import make_pki

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

KINDS = ("qemu", "trio")
DN = "C=GB,O=Example,CN=client.example.com"
PSK = bytes.fromhex("0123456789abcdef0123456789abcdef")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    psk = tmp_path_factory.mktemp("psk")
    (psk / "keys.psk").write_text(f"alice:{PSK.hex()}\n")
    return {"x509": d, "psk": psk}


def server_args(pki, creds: str, extra: str = "") -> list[str]:
    objects = {
        "x509": f"tls-creds-x509,id=t,endpoint=server,dir={pki['x509']}",
        "psk": f"tls-creds-psk,id=t,endpoint=server,dir={pki['psk']}",
        "anon": "tls-creds-anon,id=t,endpoint=server",
    }
    return ["--object", objects[creds],
            "--object", f"authz-simple,id=allow,identity={DN.replace(',', ',,')}",
            "--object", "authz-simple,id=deny,identity=CN=nobody",
            "--object", "authz-list,id=glob,policy=deny,rules.0.match=C=GB*,"
                        "rules.0.policy=allow,rules.0.format=glob",
            "--chardev", f"socket,id=c,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=t{extra}",
            "--monitor", "c"]


def x509_client(pki, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki["x509"] / "ca-cert.pem")
    if cert:
        ctx.load_cert_chain(pki["x509"] / "client-cert.pem", pki["x509"] / "client-key.pem")
    return ctx


def anon_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    return ctx


def session(port: int, ctx: ssl.SSLContext) -> list[bytes]:
    """A QMP session through TLS: what the client got, or b"" where the
    server ended the connection (during or right after the handshake)."""
    raw = socket.create_connection(("127.0.0.1", port))
    try:
        tls = ctx.wrap_socket(raw)
    except (ssl.SSLError, OSError):
        raw.close()
        return [b""]
    conn = Conn(tls, nudge=lambda: tls.sendall(b" "))
    try:
        first = conn.read_until(b"\r\n")
    except AssertionError:
        conn.close()
        return [conn.buf]  # closed before any greeting
    conn.send(b'{"execute":"qmp_capabilities","id":"cap"}')
    second = conn.read_until(b'"cap"}\r\n')
    conn.send(b'{"execute":"query-chardev-backends","id":"q"}')
    third = conn.read_until(b'"q"}\r\n')
    conn.close()
    return [normalise(first), second, third]


CASES = [
    ("x509", "", True),
    ("x509", "", False),                       # no client certificate: refused
    ("x509", ",tls-authz=allow", True),
    ("x509", ",tls-authz=deny", True),
    ("x509", ",tls-authz=glob", True),
    ("x509", ",tls-authz=missing", True),      # looked up per client: denied
    ("anon", "", None),
    ("anon", ",tls-authz=deny", None),         # authz checks x509 certificates only
]


@pytest.mark.parametrize(("creds", "extra", "cert"), CASES,
                         ids=[f"{c}{e}-{'cert' if k else 'nocert'}" for c, e, k in CASES])
def test_server_sessions(daemon_factory, pki, creds, extra, cert):
    got = {}
    for kind in KINDS:
        d = daemon_factory(kind, server_args(pki, creds, extra))
        q = d.qmp()
        port = listen_port(q)
        ctx = anon_client() if creds == "anon" else x509_client(pki, cert)
        # twice: a refused client leaves the chardev listening
        got[kind] = [session(port, ctx), session(port, ctx)]
        wait_disconnected(q)
        got[kind].append(no_ports(chardev_filename(q)))
        d.stop()
    assert got["trio"] == got["qemu"]
    refused = (cert is False) or extra in (",tls-authz=deny", ",tls-authz=missing")
    if creds == "anon":
        refused = False
    assert (got["qemu"][0] == [b""]) == refused


async def _psk_session(port: int, identity: str, key: bytes) -> list[bytes]:
    from qsd_trio.exports.tls_psk import PskTlsStream

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = PskTlsStream(stream, "", client=(identity, key))
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError:
        await tls.aclose()
        return [b""]
    buf = b""

    async def until(marker: bytes) -> bytes:
        nonlocal buf
        with trio.fail_after(DEADLINE):
            while marker not in buf:
                with trio.move_on_after(0.2) as idle:
                    data = await tls.receive_some()
                    if not data:
                        return buf
                    buf += data
                if idle.cancelled_caught:
                    await tls.send_all(b" ")  # QEMU's read-ahead record
        i = buf.index(marker) + len(marker)
        out, buf = buf[:i], buf[i:]
        return out

    out = [normalise(await until(b"\r\n"))]
    if out[0]:
        await tls.send_all(b'{"execute":"qmp_capabilities","id":"cap"}')
        out.append(await until(b'"cap"}\r\n'))
    await tls.aclose()
    return out


def test_psk_server(daemon_factory, pki):
    got = {}
    for kind in KINDS:
        d = daemon_factory(kind, server_args(pki, "psk"))
        port = listen_port(d.qmp())
        got[kind] = [trio.run(_psk_session, port, "alice", PSK),
                     trio.run(_psk_session, port, "alice", bytes(16)),   # the wrong key
                     trio.run(_psk_session, port, "mallory", PSK)]       # nobody it knows
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][0][0] == b"<greeting>\r\n" and got["qemu"][1] == [b""]


def test_creds_kept_after_object_del(daemon_factory, pki):
    """object-del of the chardev's credentials succeeds (QEMU holds its own
    reference) and the chardev goes on serving TLS."""
    got = {}
    for kind in KINDS:
        d = daemon_factory(kind, server_args(pki, "x509"))
        q = d.qmp()
        out = [q.cmd_raw("object-del", {"id": "t"}), q.cmd_raw("object-del", {"id": "allow"})]
        out.append(session(listen_port(q), x509_client(pki)))
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][2][0] == b"<greeting>\r\n"


def test_plain_client_of_a_tls_server_gets_nothing(daemon_factory, pki):
    got = {}
    for kind in KINDS:
        d = daemon_factory(kind, server_args(pki, "x509"))
        q = d.qmp()
        conn = Conn(socket.create_connection(("127.0.0.1", listen_port(q))))
        conn.send(b'{"execute":"qmp_capabilities"}\r\n')
        got[kind] = conn.read_to_eof()  # QEMU resets, qsd-trio closes: both the end
        conn.close()
        wait_disconnected(q)
        d.stop()
    assert got["trio"] == got["qemu"] == b""


def tls_server_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["x509"] / "server-cert.pem", pki["x509"] / "server-key.pem")
    ctx.load_verify_locations(pki["x509"] / "ca-cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_client_mode(daemon_factory, pki, host):
    """A client chardev with tls-creds: the server's certificate must name
    the host it connects to (DNS:localhost here, so 127.0.0.1 is refused)."""
    got = {}
    for kind in KINDS:
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        d = daemon_factory(kind, [
            "--object", f"tls-creds-x509,id=t,endpoint=client,dir={pki['x509']}",
            "--chardev", f"socket,id=c,host={host},port={port},tls-creds=t",
            "--monitor", "c"])
        q = d.qmp()
        lsock.settimeout(DEADLINE)
        peer, _ = lsock.accept()
        out: list = []
        try:
            tls = tls_server_context(pki).wrap_socket(peer, server_side=True)
        except (ssl.SSLError, OSError):
            out.append("handshake refused")
            peer.close()
        else:
            out.append(dict(tls.getpeercert()["subject"][-1]))
            conn = Conn(tls, nudge=lambda tls=tls: tls.sendall(b" "))
            try:
                out.append(normalise(conn.read_until(b"\r\n")))
                conn.send(b'{"execute":"qmp_capabilities","id":"cap"}')
                out.append(conn.read_until(b'"cap"}\r\n'))
            except AssertionError:
                out.append(conn.buf)  # closed after the handshake
            out.append(no_ports(chardev_filename(q)))
            conn.close()
        wait_disconnected(q)
        out.append(no_ports(chardev_filename(q)))
        lsock.close()
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    assert (b"<greeting>\r\n" in got["qemu"]) == (host == "localhost")


def test_tls_websocket_telnet(daemon_factory, pki):
    """All three layers, in QEMU's order: TLS, the WebSocket upgrade inside
    it, the telnet announcements in the first frame."""
    got = {}
    for kind in KINDS:
        d = daemon_factory(kind, server_args(pki, "x509", ",websocket=on,telnet=on"))
        q = d.qmp()
        raw = socket.create_connection(("127.0.0.1", listen_port(q)))
        tls = x509_client(pki).wrap_socket(raw)

        def nudge(q=q, tls=tls):
            q.cmd("query-version")                  # QEMU's WebSocket stall
            tls.sendall(client_frame(b" "))         # and its TLS read-ahead

        conn = WsConn(tls, nudge=nudge)
        out = conn.upgrade()
        conn.send(client_frame(b'{"execute":"qmp_capabilities","id":"cap"}\xff\xfb\x01'))
        out.append(conn.frames_until(b'"cap"'))
        conn.close()
        got[kind] = out
        d.stop()
    assert got["trio"] == got["qemu"]
    assert got["qemu"][1][0] == (0x82, bytes.fromhex("fffb01fffb03fffb00fffd00"))


def test_no_stall_in_qsd_trio(daemon_factory, pki):
    """qsd-trio answers each TLS record as it comes (no blank record needed)."""
    d = daemon_factory("trio", server_args(pki, "x509"))
    tls = x509_client(pki).wrap_socket(socket.create_connection(("127.0.0.1",
                                                                 listen_port(d.qmp()))))
    conn = Conn(tls)
    assert normalise(conn.read_until(b"\r\n")) == b"<greeting>\r\n"
    for n in range(3):
        conn.send(b'{"execute":"qmp_capabilities","id":%d}' % n)
        assert b'"id": %d' % n in conn.read_until(b"\r\n")
    conn.close()
