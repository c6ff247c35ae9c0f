"""NBD server in-process, driven by real clients and a raw-socket client.

The server runs in the test's trio loop over a memory node (tests/integration
/nbd_helpers.py); real clients (nbdinfo, qemu-io, nbdsh, nbdcopy) run as
subprocesses.  Data written is checked against an independent model.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import trio
import trio.testing

from qsd_trio import events
from qsd_trio.monitor import exports as mx
from qsd_trio.proto import nbd as P
from qsd_trio.qapi.errors import QapiError
from tests import nbd_client as C

from .nbd_helpers import make_daemon, ns
from .nbd_raw import RawClient, raw_clients  # noqa: F401 - autouse fixture

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/nbdinfo"), reason="needs libnbd tools")


async def run(*cmd, check=True, stdin=None):
    with trio.fail_after(60):
        r = await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True,
                                   check=False, stdin=stdin)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed {r.returncode}: {r.stderr.decode()}")
    return r


@pytest.fixture
async def env(nursery, tmp_path):
    d = await make_daemon(nursery)
    sock = str(tmp_path / "nbd.sock")
    await mx.nbd_server_start(d, ns(addr={"type": "unix", "data": {"path": sock}}))
    d.sock = sock
    d.uri = lambda name="mem": f"nbd+unix:///{name}?socket={sock}"
    yield d
    if d.nbd_server is not None:
        await mx.nbd_server_stop(d, None)


# -- real clients ----------------------------------------------------------------

async def test_nbdinfo_json_writable(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True, description="d"))
    info = json.loads((await run("nbdinfo", "--json", env.uri())).stdout)
    (exp,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert exp["export-name"] == "mem" and exp["description"] == "d"
    assert exp["export-size"] == 64 << 20
    assert exp["contexts"] == ["base:allocation"]
    for k in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn",
              "can_trim", "can_zero"):
        assert exp[k] is True, k
    assert exp["is_read_only"] is False
    assert (exp["block_size_minimum"], exp["block_size_preferred"],
            exp["block_size_maximum"]) == (1, 4096, 32 << 20)


async def test_nbdinfo_readonly_list_and_contexts(env):
    await mx.block_export_add(env, ns(id="a", node_name="mem", name="ro", allocation_depth=True))
    await mx.block_export_add(env, ns(id="b", node_name="mem", name="other", description="two"))
    info = json.loads((await run("nbdinfo", "--json", env.uri("ro"))).stdout)["exports"][0]
    assert info["is_read_only"] is True and info["can_trim"] is False and info["can_zero"] is False
    assert info["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    listing = json.loads((await run("nbdinfo", "--list", "--json", env.uri(""))).stdout)
    assert sorted((e["export-name"], e.get("description")) for e in listing["exports"]) == \
        [("other", "two"), ("ro", None)]


async def test_qemu_io_patterns_against_model(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    model = bytearray(64 << 20)
    rng = random.Random(4)
    cmds = []
    for _ in range(20):
        off = rng.randrange(0, (64 << 20) - (1 << 20))
        ln = rng.choice([512, 4096, 65536, 1 << 20, 3000])
        pat = rng.randrange(1, 256)
        op = rng.choice(["write", "write", "zero", "discard"])
        if op == "write":
            cmds.append(f"write -P {pat} {off} {ln}")
            model[off:off + ln] = bytes([pat]) * ln
        elif op == "zero":
            cmds.append(f"write -z -u {off} {ln}" if pat & 1 else f"write -z {off} {ln}")
            model[off:off + ln] = bytes(ln)
        else:
            cmds.append(f"discard {off} {ln}")
            model[off:off + ln] = bytes(ln)  # the memory node zeroes discarded bytes
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = await run(*argv, env.uri())
    assert b"error" not in r.stdout.lower()
    assert env.graph.nodes["mem"].data == model
    # read back through NBD too: qemu-img compare against a file holding the model
    path = env.sock + ".model"
    await trio.Path(path).write_bytes(model)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", env.uri(), path)


async def test_map_holes_and_data(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True,
                                      allocation_depth=True))
    await run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 128k", env.uri())
    out = (await run("nbdinfo", "--map", "--json", env.uri())).stdout
    m = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert m == [(0, 1 << 20, 3), (1 << 20, 128 << 10, 0), ((1 << 20) + (128 << 10),
                                                            (63 << 20) - (128 << 10), 3)]
    out = (await run("nbdinfo", "--map=qemu:allocation-depth", "--json", env.uri())).stdout
    assert [(e["offset"], e["type"]) for e in json.loads(out)] == \
        [(0, 0), (1 << 20, 1), ((1 << 20) + (128 << 10), 0)]


async def test_nbdcopy_roundtrip(env, tmp_path):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    src = tmp_path / "src.raw"
    data = bytearray(64 << 20)
    rng = random.Random(1)
    for _ in range(50):
        off = rng.randrange(0, len(data) - 65536)
        data[off:off + 65536] = rng.randbytes(65536)
    src.write_bytes(data)
    await run("nbdcopy", str(src), env.uri())
    assert env.graph.nodes["mem"].data == data
    out = tmp_path / "out.raw"
    await run("nbdcopy", env.uri(), str(out))
    assert out.read_bytes() == data


async def test_info_go_and_commands(env):
    # nbdsh is not installed here: the raw client covers the option-level cases
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True, description="dd"))
    c = await RawClient.connect(env.sock)
    await c.handshake()
    (rep, msg), = await c.option(P.OPT_INFO, C.encode_info_request("nope", []))
    assert rep == P.REP_ERR_UNKNOWN and msg == b"export 'nope' not present"
    r = await c.option(P.OPT_INFO, C.encode_info_request("mem", [P.INFO_NAME]))
    assert r == [(P.REP_INFO, P.info_name("mem")), (P.REP_INFO, P.info_description("dd")),
                 (P.REP_INFO, P.info_block_size(1, 4096, 32 << 20)),
                 (P.REP_INFO, P.info_export(64 << 20, 0xDED)), (P.REP_ACK, b"")]
    (rep, _), = await c.option(P.OPT_STRUCTURED_REPLY)
    (rep, msg), = await c.option(P.OPT_STRUCTURED_REPLY)
    assert rep == P.REP_ERR_INVALID and msg == b"structured reply already negotiated"
    (rep, msg), = await c.option(P.OPT_STARTTLS)
    assert rep == P.REP_ERR_POLICY
    r = await c.option(P.OPT_LIST_META_CONTEXT, C.encode_meta_request("mem", []))
    assert r == [(P.REP_META_CONTEXT, b"\0\0\0\0base:allocation"), (P.REP_ACK, b"")]
    assert (await c.option(P.OPT_GO, C.encode_info_request("mem")))[-1][0] == P.REP_ACK
    ops = [
        (P.CMD_WRITE, 1, 8192, 4096, P.CMD_FLAG_FUA, b"x" * 4096),
        (P.CMD_WRITE_ZEROES, 2, 8192, 2048, P.CMD_FLAG_FAST_ZERO, b""),
        (P.CMD_WRITE_ZEROES, 3, 0, 0, P.CMD_FLAG_NO_HOLE, b""),
        (P.CMD_CACHE, 4, 0, 4096, 0, b""),
        (P.CMD_TRIM, 5, 1 << 20, 4096, P.CMD_FLAG_FUA, b""),
        (P.CMD_FLUSH, 6, 0, 0, 0, b""),
    ]
    for t, h, off, ln, fl, data in ops:
        await c.request(t, handle=h, offset=off, length=ln, flags=fl, data=data)
        rep, _ = await c.reply()
        assert (rep.handle, rep.type, rep.error) == (h, None, 0)
    assert env.graph.nodes["mem"].data[8192:8192 + 4096] == bytes(2048) + b"x" * 2048
    await c.request(P.CMD_READ, handle=7, offset=(64 << 20) - 256, length=512)
    rep, payload = await c.reply()
    assert rep.type == P.REPLY_TYPE_ERROR and C.parse_error_chunk(payload)[0] == P.EINVAL
    # a zero-length read is one NONE chunk
    await c.request(P.CMD_READ, handle=8, offset=0, length=0)
    rep, _ = await c.reply()
    assert rep.type == P.REPLY_TYPE_NONE and rep.done


# -- byte-level and fault cases ------------------------------------------------------

async def test_raw_unknown_option_and_command(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem"))
    c = await RawClient.connect(env.sock)
    await c.handshake()
    (rep, msg), = await c.option(99, b"junk")
    assert rep == P.REP_ERR_UNSUP and msg == b"Unsupported option 99 (<unknown>)"
    (rep, _), = await c.option(P.OPT_LIST, b"x")
    assert rep == P.REP_ERR_INVALID
    r = await c.option(P.OPT_SET_META_CONTEXT, C.encode_meta_request("mem", ["base:allocation"]))
    assert r[-1][0] == P.REP_ERR_INVALID  # structured replies not negotiated yet
    await c.option(P.OPT_STRUCTURED_REPLY)
    r = await c.option(P.OPT_SET_META_CONTEXT,
                       C.encode_meta_request("mem", ["base:allocation", "qemu:nothing"]))
    assert r == [(P.REP_META_CONTEXT, b"\0\0\0\0base:allocation"), (P.REP_ACK, b"")]
    await c.go(structured=False, handshake=False)
    # unknown command: error chunk, connection goes on
    await c.request(42, handle=5)
    rep, payload = await c.reply()
    assert rep.handle == 5 and rep.type == P.REPLY_TYPE_ERROR
    assert C.parse_error_chunk(payload)[0] == P.EINVAL
    # write to a read-only export: EPERM, payload consumed, still in sync
    await c.request(P.CMD_WRITE, handle=6, offset=0, length=4, data=b"abcd")
    rep, payload = await c.reply()
    assert rep.handle == 6 and C.parse_error_chunk(payload)[0] == P.EINVAL  # as QEMU
    # unsupported flag
    await c.request(P.CMD_FLUSH, handle=7, flags=P.CMD_FLAG_DF)
    rep, payload = await c.reply()
    assert C.parse_error_chunk(payload)[0] == P.EINVAL
    # block status, one extent only
    await c.request(P.CMD_BLOCK_STATUS, handle=8, offset=0, length=1 << 20,
                    flags=P.CMD_FLAG_REQ_ONE)
    rep, payload = await c.reply()
    assert rep.type == P.REPLY_TYPE_BLOCK_STATUS and rep.done
    assert C.parse_block_status_chunk(payload) == (0, [(1 << 20, 3)])
    # sparse read: one hole chunk
    await c.request(P.CMD_READ, handle=9, offset=0, length=8192)
    rep, payload = await c.reply()
    assert rep.type == P.REPLY_TYPE_OFFSET_HOLE and rep.done
    # DF read: one data chunk
    await c.request(P.CMD_READ, handle=10, offset=0, length=8192, flags=P.CMD_FLAG_DF)
    rep, payload = await c.reply()
    assert rep.type == P.REPLY_TYPE_OFFSET_DATA and payload == bytes(8 + 8192)
    await c.request(P.CMD_DISC)
    assert await c.closed()


async def test_raw_simple_replies_and_oversized_write(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    c = await RawClient.connect(env.sock)
    await c.go(structured=False)
    await c.request(P.CMD_WRITE, handle=1, offset=100, length=3, data=b"xyz")
    assert (await c.reply())[0].error == 0
    await c.request(P.CMD_READ, handle=2, offset=99, length=5)
    rep, _ = await c.reply()
    assert rep.error == 0 and await c.recv(5) == b"\0xyz\0"
    await c.request(P.CMD_READ, handle=3, offset=64 << 20, length=1)
    assert (await c.reply())[0].error == P.EINVAL
    await c.request(P.CMD_WRITE_ZEROES, handle=4, offset=(64 << 20) - 1, length=2)
    assert (await c.reply())[0].error == P.EINVAL  # as QEMU 7.2
    await c.request(P.CMD_BLOCK_STATUS, handle=5, offset=0, length=1)
    assert (await c.reply())[0].error == P.EINVAL  # no meta context negotiated
    # a write beyond the advertised maximum: error reply, then hang up
    await c.request(P.CMD_WRITE, handle=6, offset=0, length=P.MAX_BUFFER_SIZE + 1)
    rep, _ = await c.reply()
    assert rep.handle == 6 and rep.error == P.EINVAL
    assert await c.closed()
    assert env.graph.nodes["mem"].data[99:104] == b"\0xyz\0"


@pytest.mark.parametrize("garbage", [
    b"\xff" * 4,                                   # unknown client flags
    b"\0\0\0\x03" + b"NOTMAGIC" + bytes(8),        # bad option magic
    b"\0\0\0\x03" + C.encode_option(P.OPT_EXPORT_NAME, b"nope"),  # unknown export
    b"\0\0\0\x03" + C.encode_option(P.OPT_GO)[:10],              # truncated option
])
async def test_garbage_handshake_disconnects_only_that_client(env, garbage):
    await mx.block_export_add(env, ns(id="e", node_name="mem"))
    bad = await RawClient.connect(env.sock)
    await bad.recv(18)
    await bad.s.send_all(garbage)
    if len(garbage) in (14,):  # truncated: we hang up ourselves
        await bad.s.aclose()
    else:
        assert await bad.closed()
    good = await RawClient.connect(env.sock)
    await good.go()
    await run("nbdinfo", env.uri())


async def test_client_vanishes_mid_write_and_acked_data_kept(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    c = await RawClient.connect(env.sock)
    await c.go()
    await c.request(P.CMD_WRITE, handle=1, offset=0, length=4096, data=b"a" * 4096)
    assert (await c.reply())[0].error == 0
    await c.request(P.CMD_WRITE, handle=2, offset=4096, length=4096, data=b"b" * 100)
    await c.s.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert env.exports["e"].client_count() == 0
    assert env.graph.nodes["mem"].data[:4096] == b"a" * 4096
    assert env.graph.nodes["mem"].data[4096:8192] == bytes(4096)
    await run("nbdinfo", env.uri())


async def test_concurrent_requests_out_of_order(env):
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    c = await RawClient.connect(env.sock)
    await c.go()
    for h in range(1, 33):
        await c.request(P.CMD_WRITE, handle=h, offset=h * 4096, length=4096,
                        data=bytes([h]) * 4096)
    seen = set()
    for _ in range(32):
        rep, _ = await c.reply()
        assert rep.type is None and rep.error == 0
        seen.add(rep.handle)
    assert seen == set(range(1, 33))
    for h in range(1, 33):
        assert env.graph.nodes["mem"].data[h * 4096:(h + 1) * 4096] == bytes([h]) * 4096


async def test_max_connections_queue(nursery, tmp_path):
    d = await make_daemon(nursery)
    sock = str(tmp_path / "m.sock")
    await mx.nbd_server_start(d, ns(addr={"type": "unix", "path": sock}, max_connections=1))
    await mx.block_export_add(d, ns(id="e", node_name="mem"))
    first = await RawClient.connect(sock)
    await first.go()
    second = await RawClient.connect(sock)  # sits in the backlog, no greeting yet
    with trio.move_on_after(0.3) as cs:
        await second.recv(18)
    assert cs.cancelled_caught
    await first.request(P.CMD_DISC)
    with trio.fail_after(5):
        assert C.parse_server_greeting(await second.recv(18)) == 3
    await mx.nbd_server_stop(d, None)


# -- QMP side ------------------------------------------------------------------------

async def test_export_errors_and_delete_modes(env):
    got = []
    unsub = events.subscribe(got.append)
    try:
        with pytest.raises(QapiError, match="Cannot find device='' nor node-name='nope'"):
            await mx.block_export_add(env, ns(id="x", node_name="nope"))
        with pytest.raises(QapiError, match="Invalid block export id"):
            await mx.block_export_add(env, ns(id="1x", node_name="mem"))
        await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
        with pytest.raises(QapiError, match="Block export id 'e' is already in use"):
            await mx.block_export_add(env, ns(id="e", node_name="mem"))
        with pytest.raises(QapiError, match="NBD server already has export named 'mem'"):
            await mx.block_export_add(env, ns(id="e2", node_name="mem"))
        with pytest.raises(QapiError, match="export name 'x+' too long"):
            await mx.block_export_add(env, ns(id="e3", node_name="mem", name="x" * 4097))
        with pytest.raises(QapiError, match="NBD server already running"):
            await mx.nbd_server_start(env, ns(addr={"type": "unix", "path": env.sock + "2"}))
        assert await mx.query_block_exports(env, None) == [
            {"id": "e", "type": "nbd", "node-name": "mem", "shutting-down": False}]

        c = await RawClient.connect(env.sock)
        await c.go()
        with pytest.raises(QapiError, match="export 'e' still in use"):
            await mx.block_export_del(env, ns(id="e"))
        export = env.exports["e"]
        await mx.block_export_del(env, ns(id="e", mode="hard"))
        assert await c.closed()
        with trio.fail_after(5):
            await export.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert "e" not in env.exports
        assert [(e.name, e.data) for e in got] == [("BLOCK_EXPORT_DELETED", {"id": "e"})]
        with pytest.raises(QapiError, match="Export 'e' is not found"):
            await mx.block_export_del(env, ns(id="e"))
        assert env.graph.nodes["mem"].parents == []

        await mx.nbd_server_add(env, ns(device="mem", name="old", writable=True, bitmap=None))
        await mx.nbd_server_remove(env, ns(name="old"))
        await mx.nbd_server_stop(env, None)
        with pytest.raises(QapiError, match="NBD server not running"):
            await mx.nbd_server_stop(env, None)
        with pytest.raises(QapiError, match="NBD server not running"):
            await mx.block_export_add(env, ns(id="z", node_name="mem"))
    finally:
        unsub()


async def test_write_in_flight_completes_when_client_vanishes(env):
    node = env.graph.nodes["mem"]
    real = node._co_pwritev

    async def slow_write(offset, data, fua):
        await trio.sleep(0.2)  # the client is gone by the time this returns
        await real(offset, data, fua)

    node._co_pwritev = slow_write
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    c = await RawClient.connect(env.sock)
    await c.go()
    await c.request(P.CMD_WRITE, handle=1, offset=65536, length=8192, data=b"z" * 8192)
    await trio.testing.wait_all_tasks_blocked()
    await c.s.aclose()
    with trio.fail_after(5):
        await trio.sleep(0.3)  # past the write's delay
        await trio.testing.wait_all_tasks_blocked()
    assert env.exports["e"].client_count() == 0
    assert node.data[65536:65536 + 8192] == b"z" * 8192
    await run("nbdinfo", env.uri())


async def test_hard_delete_lets_requests_in_flight_finish(env):
    node = env.graph.nodes["mem"]
    real = node._co_pwritev

    async def slow_write(offset, data, fua):
        await trio.sleep(0.2)
        await real(offset, data, fua)

    node._co_pwritev = slow_write
    await mx.block_export_add(env, ns(id="e", node_name="mem", writable=True))
    export = env.exports["e"]
    c = await RawClient.connect(env.sock)
    await c.go()
    await c.request(P.CMD_WRITE, handle=7, offset=0, length=4096, data=b"h" * 4096)
    await trio.testing.wait_all_tasks_blocked()
    await mx.block_export_del(env, ns(id="e", mode="hard"))
    await trio.testing.wait_all_tasks_blocked()
    assert (await mx.query_block_exports(env, None))[0]["shutting-down"] is True
    rep, _ = await c.reply()  # the write in flight is answered
    assert (rep.handle, rep.error) == (7, 0)
    assert await c.closed()
    with trio.fail_after(5):
        await export.finished.wait()
    assert node.data[:4096] == b"h" * 4096
