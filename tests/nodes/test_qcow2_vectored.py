"""qcow2's vectored requests: read_into/read_into_now and writev/writev_submit
with the data in many views (a virtio-blk request's pieces of guest memory).

A run of clusters contiguous on the host gets the views as they are, one
request of the file child (one preadv/pwritev): a 1 MiB guest request in 64
pieces is one file request, without a task where the page cache or the
engine serves it.  Everything else (allocation, copy-on-write, zero,
compressed and unallocated clusters over a backing file, extended L2,
encryption) must read and write the same bytes as a single buffer would:
checked against an independent model and ``qemu-img`` after random
workloads.
"""

from __future__ import annotations

import random

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph

from .qcow2_helpers import check_clean, create, qemu_img, qemu_io

MiB = 1 << 20
KiB = 1 << 10
SIZE = 4 * MiB


def _scattered(data: bytes, rng: random.Random, pieces: int) -> list[memoryview]:
    """``data`` cut at random places into ``pieces`` views, each in a
    buffer of its own (apart, as guest pages are)."""
    cuts = sorted(rng.sample(range(1, len(data)), pieces - 1)) if pieces > 1 else []
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        buf = bytearray(b - a + 512)  # something after each piece, never touched
        buf[:b - a] = data[a:b]
        out.append(memoryview(buf)[:b - a])
    return out


def _pages(n: int, rng: random.Random) -> tuple[bytes, list[memoryview]]:
    """``n`` random bytes in 16 KiB pieces a page apart (a guest's 1 MiB
    write: 64 buffers)."""
    data = rng.randbytes(n)
    mem = bytearray(2 * n)
    views = []
    for i in range(0, n, 16 * KiB):
        at = 2 * i
        mem[at:at + 16 * KiB] = data[i:i + 16 * KiB]
        views.append(memoryview(mem)[at:at + 16 * KiB])
    return data, views


async def _open(path, **file_opts):
    graph = BlockGraph()
    node = await graph.add({"driver": "qcow2", "node-name": "q", "discard": "unmap",
                            "file": {"driver": "file", "filename": str(path),
                                     "aio": "threads", **file_opts}})
    return graph, node


async def test_a_run_of_owned_clusters_is_one_file_request_without_a_task(tmp_path):
    """writev_submit and read_into_now take 64 views over 16 allocated
    clusters: one write and one read of the file, the bytes where they
    belong."""
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    qemu_io(img, "write -P 0x11 0 4M")
    rng = random.Random(1)
    graph, node = await _open(img)
    try:
        child = node.data
        # the first write loads the L2 table and builds the overlap index
        await node.write(3 * MiB, b"\x11" * 4096)
        data, views = _pages(MiB, rng)
        w0 = child.stats["wr_operations"]
        done = trio.Event()
        errors: list[OSError | None] = []

        def finished(_res: object, err: OSError | None) -> None:
            errors.append(err)
            done.set()

        assert node.writev_submit(MiB, views, finished)
        with trio.fail_after(30):
            await done.wait()
        assert errors == [None]
        assert child.stats["wr_operations"] - w0 == 1

        r0 = child.stats["rd_operations"]
        _, into = _pages(MiB, rng)
        assert node.read_into_now(MiB, into)
        assert b"".join(into) == data
        assert child.stats["rd_operations"] - r0 == 1
    finally:
        await graph.close_all()
    check_clean(img)
    out = tmp_path / "a.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    raw = out.read_bytes()
    assert raw[MiB:2 * MiB] == data
    assert raw[:MiB] + raw[2 * MiB:] == b"\x11" * (SIZE - MiB)


LAYOUTS = {
    "default": (),
    "c4k": ("cluster_size=4096",),
    "extl2": ("extended_l2=on",),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_random_vectored_workload_matches_a_model(tmp_path, layout):
    """Random writev/read_into (2 to 40 views, any lengths) and writes of
    zeroes over an image with data, zero, compressed and unallocated
    clusters and a shorter backing file: every read equals the model, and
    so do qemu-img's view of the image and its check afterwards."""
    base = tmp_path / "base.qcow2"
    create(base, 3 * MiB)
    qemu_io(base, "write -P 0x5a 0 3M")
    img = tmp_path / "top.qcow2"
    create(img, SIZE, *LAYOUTS[layout], backing=str(base))
    qemu_io(img, "write -c -P 0x33 0 64k", "write -z 128k 64k", "write -P 0x44 1M 256k",
            "write -P 0x45 2560k 64k")
    model = bytearray(b"\x33" * 65536 + b"\x5a" * (3 * MiB - 65536) + bytes(MiB))
    model[128 * KiB:192 * KiB] = bytes(64 * KiB)
    model[MiB:MiB + 256 * KiB] = b"\x44" * (256 * KiB)
    model[2560 * KiB:2624 * KiB] = b"\x45" * (64 * KiB)
    rng = random.Random(f"vectored-{layout}")
    graph, node = await _open(img)
    try:
        for step in range(120):
            op = rng.random()
            off = rng.randrange(0, SIZE - 1)
            n = rng.randrange(1, min(SIZE - off, 600 * KiB) + 1)
            if rng.random() < 0.5:  # sector-aligned, as a guest's requests are
                off &= ~511
                n = max(512, n & ~511)
                n = min(n, SIZE - off)
            pieces = rng.randrange(2, min(40, n) + 1) if n > 1 else 1
            if op < 0.45:
                data = rng.randbytes(n)
                await node.writev(off, _scattered(data, rng, pieces))
                model[off:off + n] = data
            elif op < 0.5:
                await node.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
                model[off:off + n] = bytes(n)
            else:
                into = _scattered(bytes(n), rng, pieces)
                await node.read_into(off, into)
                assert b"".join(into) == model[off:off + n], (step, off, n)
        for i in range(0, SIZE, MiB):
            into = _scattered(bytes(MiB), rng, 64)
            if not node.read_into_now(i, into):
                await node.read_into(i, into)
            assert b"".join(into) == model[i:i + MiB]
    finally:
        await graph.close_all()
    check_clean(img)
    out = tmp_path / "top.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == model
