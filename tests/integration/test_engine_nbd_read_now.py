"""The NBD reader stops asking BlockNode.read_now after a run of READs it
could not serve (an image opened with O_DIRECT never can) and starts them
with read_submit directly, then asks again; the same for WRITEs and
write_now/write_submit: in-process, over a memory node whose synchronous
path can be switched off and on, and which counts how often it is asked.
Every reply is checked against the node's data, however it was served.
"""

from __future__ import annotations

import trio
import trio.testing

from qsd_trio.exports import read_now
from qsd_trio.monitor import exports as mx
from qsd_trio.proto import nbd as P
from tests import nbd_client as C

from .nbd_helpers import MemoryNode, make_daemon, ns
from .nbd_raw import RawClient, raw_clients  # noqa: F401 - autouse fixture

SIZE = 8 << 20


class SwitchNode(MemoryNode):
    """read_now serves only while ``fast``; read_submit always serves."""

    fast = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = self.served_now = self.submitted = 0

    def _preadv_now(self, offset, length):
        self.asked += 1
        if not self.fast:
            return None
        self.served_now += 1
        return bytes(self.data[offset:offset + length])

    def _preadv_submit(self, offset, length, done):
        self.submitted += 1
        done(bytes(self.data[offset:offset + length]), None)
        return True

    # writes the same way: write_now takes them only while ``fast``
    w_asked = w_now = w_submitted = 0

    def _pwritev_now(self, offset, mv):
        self.w_asked += 1
        if not self.fast:
            return False
        self.w_now += 1
        self.data[offset:offset + len(mv)] = mv
        return True

    def _pwritev_submit(self, offset, mv, done):
        self.w_submitted += 1
        self.data[offset:offset + len(mv)] = mv
        done(None, None)
        return True


async def _reads(c, node, n, first_handle):
    reqs = b"".join(C.encode_request(P.CMD_READ, first_handle + i, (i * 4096) % SIZE, 4096,
                                     P.CMD_FLAG_DF) for i in range(n))
    await c.s.send_all(reqs)
    for _ in range(n):
        rep, payload = await c.reply()
        i = rep.handle - first_handle
        off = (i * 4096) % SIZE
        assert rep.type == P.REPLY_TYPE_OFFSET_DATA
        assert payload[8:] == bytes(node.data[off:off + 4096])


async def test_read_now_skipped_after_misses_then_asked_again(nursery, tmp_path):
    d = await make_daemon(nursery)
    node = SwitchNode(d.graph, "sw")
    await node.open({"size": SIZE})
    node.data[:] = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
    d.graph.nodes["sw"] = node
    sock = str(tmp_path / "nbd.sock")
    await mx.nbd_server_start(d, ns(addr={"type": "unix", "data": {"path": sock}}))
    await mx.block_export_add(d, ns(id="e", node_name="sw", name="sw"))
    try:
        c = await RawClient.connect(sock)
        await c.go("sw")
        with trio.fail_after(30):
            n = read_now.READ_NOW_MISSES + read_now.READ_NOW_SKIP
            await _reads(c, node, n, 1)
            # asked until the run of misses, then not for the next READ_NOW_SKIP
            assert node.asked == read_now.READ_NOW_MISSES
            assert node.submitted == n
            # the node can serve synchronously again: after the skip the
            # reader asks, and from then on every READ is served inline
            node.fast = True
            await _reads(c, node, n, 1 + n)
            assert node.served_now > 0
            assert node.asked == read_now.READ_NOW_MISSES + node.served_now
            assert node.served_now + (node.submitted - n) == n
            await _reads(c, node, 64, 1 + 2 * n)
            assert node.served_now == node.asked - read_now.READ_NOW_MISSES
            assert node.submitted + node.served_now == 2 * n + 64
    finally:
        await mx.nbd_server_stop(d, None)


async def _writes(c, node, n, first_handle, model):
    for i in range(n):
        off = (i * 4096) % SIZE
        data = bytes([(first_handle + i) % 251]) * 4096
        model[off:off + 4096] = data
        await c.s.send_all(C.encode_request(P.CMD_WRITE, first_handle + i, off, 4096) + data)
    for _ in range(n):
        rep, _payload = await c.reply()
        assert rep.error == 0


async def test_write_now_skipped_after_misses_then_asked_again(nursery, tmp_path):
    d = await make_daemon(nursery)
    node = SwitchNode(d.graph, "sw")
    await node.open({"size": SIZE})
    d.graph.nodes["sw"] = node
    model = bytearray(SIZE)
    sock = str(tmp_path / "nbd.sock")
    await mx.nbd_server_start(d, ns(addr={"type": "unix", "data": {"path": sock}}))
    await mx.block_export_add(d, ns(id="e", node_name="sw", name="sw", writable=True))
    try:
        c = await RawClient.connect(sock)
        await c.go("sw")
        with trio.fail_after(30):
            n = read_now.READ_NOW_MISSES + read_now.READ_NOW_SKIP
            await _writes(c, node, n, 1, model)
            # asked until the run of misses, then not for the next READ_NOW_SKIP
            assert node.w_asked == read_now.READ_NOW_MISSES
            assert node.w_submitted == n
            node.fast = True
            await _writes(c, node, n, 1 + n, model)
            assert node.w_now > 0
            assert node.w_asked == read_now.READ_NOW_MISSES + node.w_now
            assert node.w_now + (node.w_submitted - n) == n
        assert node.data == model
    finally:
        await mx.nbd_server_stop(d, None)
