"""PskTlsStream over an in-memory stream pair: handshake, both directions at
once (the NBD connection's reader and writer run concurrently), close, and
refused keys.  The GnuTLS clients users have are in
tests/differential/test_nbd_tls_psk.py."""

from __future__ import annotations

import secrets

import pytest
import trio
import trio.testing

from qsd_trio.exports.tls_psk import PskTlsStream, lookup_key

KEY = secrets.token_bytes(32)


@pytest.fixture
def key_file(tmp_path):
    p = tmp_path / "keys.psk"
    p.write_text(f"bob:{secrets.token_hex(16)}\nalice:{KEY.hex()}\n")
    return str(p)


def test_lookup_key(key_file, tmp_path):
    assert lookup_key(key_file, "alice") == KEY
    assert lookup_key(key_file, "carol") is None
    assert lookup_key(str(tmp_path / "missing"), "alice") is None
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:not-hex\n")
    assert lookup_key(str(bad), "alice") is None


async def pair(key_file, identity="alice", key=KEY):
    a, b = trio.testing.memory_stream_pair()
    server = PskTlsStream(a, key_file)
    client = PskTlsStream(b, "", client=(identity, key))
    return server, client


async def test_handshake_and_both_directions_at_once(key_file):
    server, client = await pair(key_file)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(server.do_handshake)
            n.start_soon(client.do_handshake)
        assert server.identity == "alice"
        up = secrets.token_bytes(3 << 20)
        down = secrets.token_bytes(5 << 20)
        got: dict[str, bytearray] = {"server": bytearray(), "client": bytearray()}

        async def send(stream, data):
            for i in range(0, len(data), 100_000):  # many records, many calls
                await stream.send_all(data[i:i + 100_000])

        async def receive(stream, into, n):
            while len(into) < n:
                chunk = await stream.receive_some(1 << 20)
                assert chunk
                into += chunk

        async with trio.open_nursery() as n:
            n.start_soon(send, client, up)
            n.start_soon(send, server, down)
            n.start_soon(receive, server, got["server"], len(up))
            n.start_soon(receive, client, got["client"], len(down))
        assert got["server"] == up and got["client"] == down
        await client.aclose()
        assert await server.receive_some(100) == b""  # close_notify: a clean end
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"x")


@pytest.mark.parametrize("identity,key", [("alice", secrets.token_bytes(32)),
                                          ("carol", KEY)],
                         ids=["wrong-key", "unknown-identity"])  # stable ids: keys are random
async def test_wrong_key_or_identity_is_refused(key_file, identity, key):
    server, client = await pair(key_file, identity, key)
    failed = []

    async def shake(stream, who):
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            failed.append(who)
            await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(shake, server, "server")
            n.start_soon(shake, client, "client")
    assert "server" in failed and server.identity is None
