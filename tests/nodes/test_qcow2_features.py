"""Compressed writes, concurrent requests, lazy refcounts, block status."""

from __future__ import annotations

import random

import pytest
import trio

from qsd_trio.nodes.node import Status

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_img, qemu_io, run


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("extl2", [False, True])
async def test_compressed_writes(tmp_path, ctype, extl2):
    img = tmp_path / "a.qcow2"
    opts = [f"compression_type={ctype}"] + (["extended_l2=on"] if extl2 else [])
    create(img, 2 << 20, *opts)
    cs = 65536
    model = bytearray(2 << 20)
    async with open_qcow2(img) as node:
        for i in range(8):
            data = bytes([i + 1]) * (cs // 2) + random.Random(i).randbytes(cs // 2)
            await node.write_compressed(i * cs, data)
            model[i * cs:(i + 1) * cs] = data
        # overwrite part of a compressed cluster: copy-on-write out of it
        await node.write(cs + 100, b"\xee" * 1000)
        model[cs + 100:cs + 1100] = b"\xee" * 1000
        assert bytes(await node.read(0, len(model))) == model
    info = check_clean(img)
    assert info.get("leaks", 0) == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == model
    m = qemu_img("map", "--output=json", str(img)).stdout
    assert m.count('"compressed": true') >= 1 or '"data": true' in m


async def test_concurrent_requests(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 8 << 20, "cluster_size=4096")
    model = bytearray(8 << 20)
    rnd = random.Random(5)
    reqs = []
    for i in range(200):
        off = rnd.randrange(0, (8 << 20) - 20000)
        reqs.append((i, off, rnd.randrange(1, 20000)))
    async with open_qcow2(img) as node:
        # writes to overlapping ranges race; apply them in order per batch of
        # disjoint requests so the model stays exact
        batches, cur, used = [], [], []
        for r in reqs:
            if any(not (r[1] + r[2] <= a or b <= r[1]) for a, b in used):
                batches.append(cur)
                cur, used = [], []
            cur.append(r)
            used.append(((r[1] // 4096) * 4096, -(-(r[1] + r[2]) // 4096) * 4096))
        batches.append(cur)
        for batch in batches:
            async with trio.open_nursery() as nursery:
                for i, off, n in batch:
                    data = bytes([i % 251 + 1]) * n
                    model[off:off + n] = data
                    nursery.start_soon(node.write, off, data)
                    nursery.start_soon(node.read, off, n)
        assert bytes(await node.read(0, 8 << 20)) == model
    check_clean(img)
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == model


async def test_lazy_refcounts_dirty_image_repaired(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, 4 << 20, "lazy_refcounts=on")
    # leave the image dirty the way a crash of QEMU with lazy refcounts does
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", "-c", "sigraise 9", str(img),
        check=False)
    assert qemu_img("check", str(img), check=False).returncode != 0
    async with open_qcow2(img) as node:
        assert bytes(await node.read(0, 1 << 20)) == b"\x03" * (1 << 20)
        await node.write(2 << 20, b"\x04" * (1 << 20))
        await node.flush()
        assert node.h.incompatible_features & 1  # dirty while open (lazy refcounts)
    check_clean(img)
    qemu_io(img, "read -P 3 0 1M", "read -P 4 2M 1M")


async def test_block_status(tmp_path):
    base, img = tmp_path / "base.qcow2", tmp_path / "a.qcow2"
    create(base, 4 << 20)
    qemu_io(base, "write -P 1 1M 64k")
    create(img, 4 << 20, backing=str(base))
    qemu_io(img, "write -P 2 0 64k", "write -z 64k 64k", "write -c -P 3 128k 64k")
    async with open_qcow2(img) as node:
        st = await node.block_status(0, 4 << 20)
        assert st.flags == Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
        assert st.length == 65536 and st.depth == 1
        st = await node.block_status(65536, 1 << 20)
        assert st.flags == Status.ZERO | Status.ALLOCATED and st.length == 65536
        st = await node.block_status(131072, 1 << 20)
        assert st.flags == Status.DATA | Status.ALLOCATED and st.length == 65536
        st = await node.block_status(1 << 20, 1 << 20)
        assert st.flags & Status.DATA and st.depth == 2 and not st.flags & Status.OFFSET_VALID
        st = await node.block_status(3 << 20, 1 << 20)
        assert st.flags == Status.ZERO and st.depth == 0


async def test_refcount_table_growth(tmp_path):
    """Small clusters and 64-bit refcounts: many new refblocks and a moved table."""
    img = tmp_path / "a.qcow2"
    create(img, 8 << 20, "cluster_size=512", "refcount_bits=64")
    data = random.Random(9).randbytes(3 << 20)
    async with open_qcow2(img) as node:
        table_before = node.refs.table_offset
        for off in range(0, len(data), 1 << 20):
            await node.write(off, data[off:off + (1 << 20)])
        assert node.refs.table_offset != table_before
    check_clean(img)
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes()[:len(data)] == data


@pytest.mark.parametrize("opts", [(), ("extended_l2=on",)])
async def test_concurrent_writes_into_one_new_cluster(tmp_path, opts):
    """Allocating writes run with the metadata lock released: byte-disjoint
    requests into the same unallocated clusters (copy-on-write from the
    backing file) and zero/discard beside them must not lose each other."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    size, cs = 4 << 20, 65536
    create(base, size)
    qemu_io(base, f"write -P 0x11 0 {size}")
    create(top, size, *opts, backing=str(base))
    model = bytearray(b"\x11" * size)
    rnd = random.Random(7)
    async with open_qcow2(top) as node:
        for rnd_round in range(6):
            # cut a few clusters into byte-disjoint pieces, one request each
            first = rnd.randrange(0, size // cs - 4)
            span = rnd.randrange(1, 4) * cs
            cuts = sorted(rnd.sample(range(1, span), 7))
            pieces = list(zip([0, *cuts], [*cuts, span], strict=True))
            async with trio.open_nursery() as nursery:
                for k, (a, b) in enumerate(pieces):
                    off, n = first * cs + a, b - a
                    if k % 4 == 3:
                        nursery.start_soon(node.write_zeroes, off, n)
                        model[off:off + n] = bytes(n)
                    else:
                        data = bytes([rnd_round * 16 + k + 0x20]) * n
                        nursery.start_soon(node.write, off, data)
                        model[off:off + n] = data
            if rnd_round == 3:
                await node.flush()
        assert bytes(await node.read(0, size)) == model
        assert node._allocating == {}
    info = check_clean(top)
    assert info.get("leaks", 0) == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(top), str(out))
    assert out.read_bytes() == model
