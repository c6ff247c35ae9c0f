"""Unaligned requests on O_DIRECT nodes (issue 11): read-modify-write with
nothing lost, for request_alignment 512 and 4096, on every engine.

The device is a loop device with 512- or 4096-byte logical sectors over a
file full of random bytes, opened by ``host_device`` with
``cache.direct=on``; the 4096 case is also run with the ``file`` driver and
qcow2 on an ext4 file system made on such a device.  Clients write pieces
that start and end anywhere, one after another and then many at once from
several connections, pieces that share sectors but no bytes: a
read-modify-write that is not serialised against its neighbours loses one
of them.  The device's bytes must equal the model, including every byte
around the pieces that nobody wrote.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
import trio

from qsd_trio.proto import nbd as P
from tests.engines import DIRECT_ENGINES, stop_clean
from tests.helpers import first_difference, loop_device, mounted, qemu_img, qemu_io, run

from .nbd_raw import RawClient, raw_clients  # noqa: F401 - the fixture closes them

MiB = 1 << 20
SIZE = 8 * MiB
SECTORS = [512, 4096]


@pytest.fixture(params=SECTORS, ids=lambda s: f"sector{s}")
def device(request, tmp_path):
    """(loop device with random contents, its backing file, sector size)."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(random.Random(7).randbytes(SIZE))
    with loop_device(backing, request.param) as dev:
        yield dev, backing, request.param


def host_device_daemon(factory, kind, dev, engine, sock):
    return factory(kind, [
        "--blockdev", f"driver=host_device,node-name=h,filename={dev},discard=unmap"
        + engine.keyval(),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=h,name=h,writable=on"])


def block_sizes(uri: str) -> tuple:
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    e = info["exports"][0]
    return e["block_size_minimum"], e["block_size_preferred"], e["export-size"]


def pieces(seed: int, start: int, length: int, n: int) -> list[tuple[int, int]]:
    """``n`` pieces that cover [start, start+length) exactly, cut anywhere."""
    cuts = sorted(random.Random(seed).sample(range(1, length), n - 1))
    bounds = [0, *cuts, length]
    return [(start + a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]


async def write_concurrently(sock: str, work: list[tuple[int, bytes | None]],
                             clients: int) -> None:
    """Each client sends its share of ``work`` (offset, data; None for write
    zeroes) at once and only then reads the replies: all of it in flight."""
    async def one(share):
        c = await RawClient.connect(sock)
        await c.go("h", structured=False)
        for handle, (off, data) in share:
            if data is None:
                await c.request(P.CMD_WRITE_ZEROES, handle, off, zlen[handle])
            else:
                await c.request(P.CMD_WRITE, handle, off, len(data), data=data)
        seen = set()
        for _ in share:
            rep, _payload = await c.reply()
            assert rep.error == 0, (rep, share)
            seen.add(rep.handle)
        assert seen == {h for h, _ in share}

    zlen = {}
    numbered = []
    for handle, (off, data) in enumerate(work):
        if isinstance(data, int):  # a zero write of that length
            zlen[handle] = data
            data = None
        numbered.append((handle, (off, data)))
    random.Random(3).shuffle(numbered)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(clients):
                n.start_soon(one, numbered[i::clients])


def unaligned_work(seed: int, start: int, sector: int, model: bytearray) -> list:
    """Pieces over 16 sectors at ``start`` (a sector boundary moved by 100
    bytes, so the edges are unaligned too): data, or zeroes for every
    fourth; ``model`` updated."""
    rnd = random.Random(seed)
    work = []
    for i, (off, n) in enumerate(pieces(seed, start + 100, 16 * sector, 96)):
        if i % 4 == 3:
            work.append((off, n))
            model[off:off + n] = bytes(n)
        else:
            data = rnd.randbytes(n)
            work.append((off, data))
            model[off:off + n] = data
    return work


SEQUENTIAL = [  # (offset, length) in sectors and bytes: sector + delta
    (0, 1), (1, 1), (511, 2), (4095, 2), (4097, 100), (8191, 4098), (20000, 70001),
    (SIZE - 1, 1), (SIZE - 4097, 4000)]


@pytest.mark.parametrize("engine", DIRECT_ENGINES)
async def test_unaligned_rmw_host_device(daemon_factory, tmp_path, device, engine):
    dev, backing, sector = device
    model = bytearray(backing.read_bytes())
    sock = tmp_path / "nbd.sock"
    d = host_device_daemon(daemon_factory, "trio", dev, engine, sock)
    uri = f"nbd+unix:///h?socket={sock}"
    assert block_sizes(uri)[0] == sector

    cmds = []
    for i, (off, n) in enumerate(SEQUENTIAL):
        cmds += ["-c", f"write -P {0x30 + i} {off} {n}"]
        model[off:off + n] = bytes([0x30 + i]) * n
    for off, n in [(3 * 4096 + 3, 9000), (MiB - 5, 10)]:
        cmds += ["-c", f"write -z {off} {n}"]
        model[off:off + n] = bytes(n)
    qemu_io("-f", "raw", *cmds, uri)

    await write_concurrently(str(sock), unaligned_work(1, 2 * MiB, sector, model), 4)
    # the same sectors once more, cut elsewhere: RMW over data just written
    await write_concurrently(str(sock), unaligned_work(2, 2 * MiB, sector, model), 4)

    ref = tmp_path / "model.raw"
    ref.write_bytes(model)
    r = qemu_img("compare", "-f", "raw", "-F", "raw", uri, str(ref), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    stop_clean(d)
    got = backing.read_bytes()
    assert got == model, first_difference(got, model)


@pytest.mark.parametrize("engine", DIRECT_ENGINES)
async def test_unaligned_rmw_qcow2_on_ext4_4k(daemon_factory, tmp_path, engine):
    """The file driver on a file system with 4 KiB sectors, qcow2 on top with
    512-byte clusters, so its own metadata writes are unaligned too."""
    backing = tmp_path / "fs.img"
    backing.write_bytes(b"")
    os.truncate(backing, 64 * MiB)
    with loop_device(backing, 4096) as dev:
        run("mkfs.ext4", "-q", "-b", "4096", dev)
        with mounted(tmp_path / "mnt", dev) as mnt:
            img = mnt / "disk.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "4M")
            sock = tmp_path / "nbd.sock"
            d = daemon_factory("trio", [
                "--blockdev", f"driver=qcow2,node-name=h,file.driver=file,"
                              f"file.filename={img}" + engine.keyval("file."),
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=h,name=h,writable=on"])
            uri = f"nbd+unix:///h?socket={sock}"
            model = bytearray(4 * MiB)
            await write_concurrently(str(sock), unaligned_work(5, 0, 4096, model), 4)
            await write_concurrently(str(sock), unaligned_work(6, MiB, 4096, model), 8)
            qemu_io("-f", "raw", "-c", "write -P 0x77 12345 6789", uri)
            model[12345:12345 + 6789] = b"\x77" * 6789
            ref = tmp_path / "model.raw"
            ref.write_bytes(model)
            stop_clean(d)
            qemu_img("check", str(img))
            r = qemu_img("compare", "-F", "raw", str(img), str(ref), check=False)
            assert r.returncode == 0, r.stdout + r.stderr
