"""A minimal NBD client over the shared codec, for byte-level test cases."""

from __future__ import annotations

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests import nbd_client as C


class RawClient:
    """A minimal NBD client over the shared codec, for byte-level cases."""

    def __init__(self, stream):
        self.s = stream
        self.buf = bytearray()
        self.extended = False  # set once NBD_OPT_EXTENDED_HEADERS is acknowledged

    opened: list[RawClient] = []  # closed by the raw_clients fixture

    @classmethod
    async def connect(cls, path):
        c = cls(await trio.open_unix_socket(path))
        cls.opened.append(c)
        return c

    async def recv(self, n):
        while len(self.buf) < n:
            with trio.fail_after(10):  # a reply that never comes fails, not hangs
                d = await self.s.receive_some(65536)
            if not d:
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
            self.buf += d
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    async def closed(self) -> bool:
        try:
            await self.recv(1)
        except (EOFError, trio.BrokenResourceError):
            return True
        return False

    async def handshake(self):
        assert C.parse_server_greeting(await self.recv(18)) == 3
        await self.s.send_all(C.client_flags())

    async def option(self, opt, data=b""):
        await self.s.send_all(C.encode_option(opt, data))
        replies = []
        while True:
            o, rep, n = C.parse_option_reply_header(await self.recv(20))
            assert o == opt
            payload = await self.recv(n)
            replies.append((rep, payload))
            if rep == P.REP_ACK or rep & (1 << 31):
                return replies

    async def go(self, name="mem", structured=True, handshake=True):
        if handshake:
            await self.handshake()
        if structured:
            assert (await self.option(P.OPT_STRUCTURED_REPLY))[-1][0] == P.REP_ACK
        r = await self.option(P.OPT_GO, C.encode_info_request(name, [P.INFO_BLOCK_SIZE]))
        assert r[-1][0] == P.REP_ACK, r
        return r

    async def request(self, type, handle=1, offset=0, length=0, flags=0, data=b""):
        encode = C.encode_ext_request if self.extended else C.encode_request
        await self.s.send_all(encode(type, handle, offset, length, flags) + data)

    async def reply(self):
        """(Reply, payload) of the next simple reply or chunk."""
        head = await self.recv(4)
        rest = await self.recv(C.reply_header_size(head) - 4)
        rep = C.parse_reply_header(head + rest)
        return rep, (await self.recv(rep.length) if rep.type is not None else b"")

    async def command(self, type, handle=1, offset=0, length=0, flags=0, data=b""):
        """One request and its whole reply: a list of (handle, error, chunk
        type, flags, payload); a simple read reply's data is its payload."""
        await self.request(type, handle, offset, length, flags, data)
        chunks = []
        while True:
            rep, payload = await self.reply()
            if rep.type is None and type == P.CMD_READ and not rep.error:
                payload = await self.recv(length)
            chunks.append((rep.handle, rep.error, rep.type, rep.flags, payload))
            if rep.done:
                return chunks


@pytest.fixture(autouse=True)
async def raw_clients():
    """Closes the raw clients a test opened; a module imports it to use it."""
    yield
    while RawClient.opened:
        await RawClient.opened.pop().s.aclose()
