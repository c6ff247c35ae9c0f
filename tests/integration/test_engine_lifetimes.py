"""Requests in flight when their client or export goes away (issue 11), per
engine, under load and in a loop.

(a) Clients that send 64 reads and writes and hang up without waiting for a
    reply, twenty times, while another client keeps writing and verifying
    its own region.
(b) ``block-export-del`` with ``mode=hard`` while a client has 64 requests
    in flight, then ``blockdev-del`` of the node, then the node added and
    exported again, in a loop.

Each time: the daemon keeps serving, prints no traceback, the verified data
is intact, every 4 KiB block the dropped requests wrote holds either what it
held before or exactly what was written (a completion landing in a reused
buffer shows as anything else), and after a clean shutdown ``qemu-img
check`` finds the image clean and the verifier's region equal to its model.
"""

from __future__ import annotations

import random

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests.engines import ENGINES, drop_page_cache, stop_clean
from tests.helpers import qemu_img

from .nbd_raw import RawClient, raw_clients  # noqa: F401 - the fixture closes them

MiB = 1 << 20
K4 = 4096
SIZE = 64 * MiB
DROPPED_AT = 0  # the region the dropped requests write, 4 KiB blocks
VERIFIED_AT = 32 * MiB  # the verifier's region
VERIFIED_BLOCKS = 256


def block_pattern(n: int) -> bytes:
    return random.Random(n).randbytes(K4)


async def send_and_drop(sock: str, name: str, first_block: int) -> None:
    """64 requests, 32 writes of their own 4 KiB blocks from ``first_block``
    and 32 reads of 64 KiB across both regions, then hang up."""
    c = await RawClient.connect(sock)
    await c.go(name, structured=True)
    rnd = random.Random(first_block)
    for i in range(32):
        b = first_block + i
        await c.request(P.CMD_WRITE, 2 * i, DROPPED_AT + b * K4, K4,
                        data=block_pattern(b))
        off = rnd.choice([DROPPED_AT, VERIFIED_AT]) + rnd.randrange(0, 2 * MiB, K4)
        await c.request(P.CMD_READ, 2 * i + 1, off, 65536)
    RawClient.opened.remove(c)
    await c.s.aclose()


async def verifier(sock: str, name: str, model: bytearray, stop: trio.Event) -> int:
    """Write a block of the verified region, read it back, again and again."""
    c = await RawClient.connect(sock)
    await c.go(name, structured=False)
    rnd = random.Random(99)
    n = 0
    while not stop.is_set() or n < 8:
        b = rnd.randrange(VERIFIED_BLOCKS)
        data = rnd.randbytes(K4)
        off = VERIFIED_AT + b * K4
        assert (await c.command(P.CMD_WRITE, n, off, K4, data=data))[0][1] == 0
        model[b * K4:(b + 1) * K4] = data
        got = await c.command(P.CMD_READ, n, off, K4)
        assert got[0][1] == 0 and got[0][4] == data, f"block {b} read back wrong"
        n += 1
    return n


async def hung_up(c: RawClient) -> None:
    """Read what the server still sent until it closes the connection."""
    try:
        while await c.s.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass  # reset by the server: hung up as well


def check_dropped_region(data: bytes, blocks: int) -> None:
    for b in range(blocks):
        got = data[b * K4:(b + 1) * K4]
        assert got in (bytes(K4), block_pattern(b)), f"block {b} holds neither"


async def read_region(sock: str, name: str, offset: int, length: int) -> bytes:
    c = await RawClient.connect(sock)
    await c.go(name, structured=False)
    out = bytearray()
    for off in range(offset, offset + length, MiB):
        chunks = await c.command(P.CMD_READ, 1, off, min(MiB, offset + length - off))
        assert chunks[0][1] == 0
        out += chunks[0][4]
    return bytes(out)


def image_daemon(daemon_factory, tmp_path, engine):
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}"
        + engine.keyval("file."),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=q,name=q,writable=on"])
    return d, img, str(sock)


def check_image(d, img, tmp_path, model: bytearray) -> None:
    stop_clean(d)
    qemu_img("check", str(img))
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    with open(out, "rb") as f:
        f.seek(VERIFIED_AT)
        assert f.read(len(model)) == bytes(model), "the verified region changed on disk"


@pytest.mark.parametrize("engine", ENGINES)
async def test_clients_hang_up_with_requests_in_flight(daemon_factory, tmp_path, engine):
    d, img, sock = image_daemon(daemon_factory, tmp_path, engine)
    model = bytearray(VERIFIED_BLOCKS * K4)
    stop = trio.Event()
    rounds = 20
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            n.start_soon(verifier, sock, "q", model, stop)
            for r in range(rounds):
                drop_page_cache(img)  # the reads go to the engine
                await send_and_drop(sock, "q", r * 32)
            stop.set()
        # the daemon still serves, and every dropped write is whole or absent
        data = await read_region(sock, "q", DROPPED_AT, rounds * 32 * K4)
    check_dropped_region(data, rounds * 32)
    assert await read_region(sock, "q", VERIFIED_AT, len(model)) == model
    check_image(d, img, tmp_path, model)


@pytest.mark.parametrize("engine", ENGINES)
async def test_hard_export_del_with_requests_in_flight(daemon_factory, tmp_path, engine):
    d, img, sock = image_daemon(daemon_factory, tmp_path, engine)
    qmp = d.qmp()
    model = bytearray(VERIFIED_BLOCKS * K4)
    loops = 8
    for r in range(loops):
        name = "q" if r == 0 else f"q{r}"
        with trio.fail_after(60):
            stop = trio.Event()
            stop.set()  # a few verified writes and reads per round
            await verifier(sock, name, model, stop)
            drop_page_cache(img)  # the reads go to the engine
            c = await RawClient.connect(sock)
            await c.go(name, structured=True)
            for i in range(32):
                b = r * 32 + i
                await c.request(P.CMD_WRITE, 2 * i, DROPPED_AT + b * K4, K4,
                                data=block_pattern(b))
                await c.request(P.CMD_READ, 2 * i + 1, VERIFIED_AT + i * 65536, 65536)
        eid = "e" if r == 0 else f"e{r}"
        # the client reads what replies come until the server hangs up on it
        # (QMP runs on a thread meanwhile)
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(hung_up, c)
                assert await trio.to_thread.run_sync(
                    qmp.cmd_raw, "block-export-del", {"id": eid, "mode": "hard"}) == \
                    {"return": {}}
                ev = await trio.to_thread.run_sync(lambda: qmp.pull_event(wait=30))
                assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": eid}, ev
        assert qmp.cmd_raw("blockdev-del", {"node-name": name}) == {"return": {}}
        RawClient.opened.remove(c)
        await c.s.aclose()
        new = f"q{r + 1}"
        assert qmp.cmd_raw("blockdev-add", {
            "driver": "qcow2", "node-name": new,
            "file": {"driver": "file", "filename": str(img), **engine.options()}}) == \
            {"return": {}}
        assert qmp.cmd_raw("block-export-add", {
            "type": "nbd", "id": f"e{r + 1}", "node-name": new, "name": new,
            "writable": True}) == {"return": {}}
    last = f"q{loops}"
    with trio.fail_after(60):
        check_dropped_region(await read_region(sock, last, DROPPED_AT, loops * 32 * K4),
                             loops * 32)
        assert await read_region(sock, last, VERIFIED_AT, len(model)) == model
    check_image(d, img, tmp_path, model)
