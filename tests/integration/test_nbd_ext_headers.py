"""NBD extended headers (NBD_OPT_EXTENDED_HEADERS) against the daemon, with
the raw client over the shared codec: no Debian client speaks them yet, and
qemu-storage-daemon 7.2 answers NBD_REP_ERR_UNSUP (QEMU 8.2 added them).

The export is a 6 GiB sparse raw file, so 64-bit effect lengths (a 5 GiB
zero write, block status over the whole disk) are real.
"""

from __future__ import annotations

import os

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests import nbd_client as C

from .nbd_raw import RawClient, raw_clients  # noqa: F401 - autouse fixture

GiB = 1 << 30
SIZE = 6 * GiB


@pytest.fixture
def served(daemon_factory, tmp_path):
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "x.sock"
    daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=f,filename={img},discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=f,name=x,writable=on",
    ])
    return str(sock), img


async def negotiate(sock: str) -> RawClient:
    c = await RawClient.connect(sock)
    await c.handshake()
    assert (await c.option(P.OPT_EXTENDED_HEADERS))[-1][0] == P.REP_ACK
    c.extended = True
    r = await c.option(P.OPT_SET_META_CONTEXT, C.encode_meta_request("x", ["base:allocation"]))
    assert [rep for rep, _ in r] == [P.REP_META_CONTEXT, P.REP_ACK]
    r = await c.option(P.OPT_GO, C.encode_info_request("x", [P.INFO_BLOCK_SIZE]))
    assert r[-1][0] == P.REP_ACK
    return c


async def replies(c: RawClient) -> list:
    """The chunks of one reply, up to the one marked done."""
    out = []
    while True:
        rep, payload = await c.reply()
        out.append((rep, payload))
        if rep.done:
            return out


async def test_option_haggling(served):
    sock, _ = served
    with trio.fail_after(20):
        c = await RawClient.connect(sock)
        await c.handshake()
        seen = []
        for opt, data in [(P.OPT_EXTENDED_HEADERS, b"x"), (P.OPT_EXTENDED_HEADERS, b""),
                          (P.OPT_EXTENDED_HEADERS, b""), (P.OPT_STRUCTURED_REPLY, b""),
                          (P.OPT_LIST_META_CONTEXT, C.encode_meta_request("x", []))]:
            seen.append([(rep, payload) for rep, payload in await c.option(opt, data)])
        assert seen == [
            [(P.REP_ERR_INVALID, b"option 'extended headers' has unexpected length")],
            [(P.REP_ACK, b"")],
            [(P.REP_ERR_INVALID, b"extended headers already negotiated")],
            [(P.REP_ERR_EXT_HEADER_REQD, b"extended headers already negotiated")],
            # meta contexts need structured replies or extended headers: the latter do
            [(P.REP_META_CONTEXT, P.meta_context_reply(0, "base:allocation")), (P.REP_ACK, b"")],
        ]
        # NBD_OPT_EXPORT_NAME is not allowed any more: the server hangs up
        await c.s.send_all(C.encode_option(P.OPT_EXPORT_NAME, b"x"))
        assert await c.closed()


async def test_transmission_with_64_bit_lengths(served):
    sock, img = served
    with trio.fail_after(30):
        c = await negotiate(sock)
        at = 5 * GiB + 8192
        # a write carries its payload length
        await c.request(P.CMD_WRITE, 1, at, 4096, P.CMD_FLAG_PAYLOAD_LEN, b"\xab" * 4096)
        [(rep, _)] = await replies(c)
        assert (rep.handle, rep.type, rep.offset, rep.done) == (1, P.REPLY_TYPE_NONE, at, True)
        # a sparse read: a hole then data, every chunk echoing the request's offset
        await c.request(P.CMD_READ, 2, at - 4096, 8192)
        chunks = await replies(c)
        assert [(r.type, r.offset) for r, _ in chunks] == [
            (P.REPLY_TYPE_OFFSET_HOLE, at - 4096), (P.REPLY_TYPE_OFFSET_DATA, at - 4096)]
        assert chunks[0][1] == (at - 4096).to_bytes(8, "big") + (4096).to_bytes(4, "big")
        assert chunks[1][1] == at.to_bytes(8, "big") + b"\xab" * 4096
        # block status over the whole disk: the first extent is longer than 32 bits
        await c.request(P.CMD_BLOCK_STATUS, 3, 0, SIZE)
        [(rep, payload)] = await replies(c)
        assert (rep.type, rep.offset) == (P.REPLY_TYPE_BLOCK_STATUS_EXT, 0)
        ctx, ext = C.parse_block_status_ext_chunk(payload)
        assert ctx == 0
        assert ext[0] == (at, P.STATE_HOLE | P.STATE_ZERO) and ext[0][0] > 1 << 32
        assert ext[1][1] == 0 and sum(n for n, _ in ext) == SIZE
        # a 5 GiB zero write (an effect length, no payload)
        await c.request(P.CMD_WRITE_ZEROES, 4, 0, 5 * GiB)
        [(rep, _)] = await replies(c)
        assert (rep.type, rep.offset) == (P.REPLY_TYPE_NONE, 0)
        # refusals are error chunks with the extended header, and the connection goes on
        for handle, (t, off, ln, flags, data) in enumerate([
            (P.CMD_TRIM, 0, 16, P.CMD_FLAG_PAYLOAD_LEN, bytes(16)),  # payload consumed
            (P.CMD_WRITE, 0, 512, 0, b""),  # a write must say its payload length
            (P.CMD_READ, SIZE - 512, 1024, 0, b""),  # past EOF
        ], start=10):
            await c.request(t, handle, off, ln, flags, data)
            [(rep, payload)] = await replies(c)
            assert (rep.handle, rep.type, rep.offset) == (handle, P.REPLY_TYPE_ERROR, off)
            assert C.parse_error_chunk(payload)[0] == P.EINVAL
        await c.request(P.CMD_FLUSH, 20)
        [(rep, _)] = await replies(c)
        assert (rep.handle, rep.type) == (20, P.REPLY_TYPE_NONE)
        await c.request(P.CMD_DISC)
        assert await c.closed()
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, at) == b"\xab" * 4096
    finally:
        os.close(fd)
