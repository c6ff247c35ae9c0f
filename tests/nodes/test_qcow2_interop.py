"""qcow2 both ways against the real tools.

Images are made and filled by ``qemu-img``/``qemu-io`` with each feature and
read back through our driver; then our driver writes (allocating writes,
partial-cluster copy-on-write, zero writes, discards) and the image must be
clean for ``qemu-img check`` and, converted to raw by ``qemu-img`` itself,
equal to a bytearray model of what was written.
"""

from __future__ import annotations

import random

import pytest

from .qcow2_helpers import check_clean, create, open_qcow2, qemu_img, qemu_io

SIZE = 4 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def qemu_fill(path, model: bytearray, cs: int, *, compressed: bool = True,
              extra: tuple = ()) -> None:
    """Fill an image with qemu-io (patterns, zero writes, compressed clusters)."""
    cmds = []

    def w(off, n, p):
        cmds.append(f"write -P {p} {off} {n}")
        model[off:off + n] = bytes([p]) * n

    w(0, 3 * cs // 2 + 512, 0x11)
    w(5 * cs + 1024, 2048, 0x22)
    w(len(model) - 8192, 8192, 0x33)
    cmds.append(f"write -z {cs} {cs}")
    model[cs:2 * cs] = bytes(cs)
    if compressed and cs >= 4096:  # qemu-io fails compressed 512-byte clusters
        off = 8 * cs
        cmds.append(f"write -c -P 0x44 {off} {2 * cs}")
        model[off:off + 2 * cs] = b"\x44" * (2 * cs)
    qemu_io(path, *cmds, extra=extra)


def raw_dump(path, tmp_path, *, opts: tuple = ()) -> bytes:
    out = tmp_path / "dump.raw"
    qemu_img("convert", *opts, "-O", "raw", str(path), str(out))
    return out.read_bytes()


async def our_writes(node, model: bytearray, cs: int, seed: int) -> None:
    rnd = random.Random(seed)
    size = len(model)
    for i in range(24):
        kind = rnd.choice(["w", "w", "w", "z", "zu", "d"])
        off = rnd.randrange(0, size - 1)
        n = min(rnd.choice([1, 511, 4096, cs // 2 + 7, cs, 2 * cs + 5, 300_000]), size - off)
        if kind == "w":
            data = pattern(seed * 100 + i, n)
            await node.write(off, data)
            model[off:off + n] = data
        elif kind in ("z", "zu"):
            await node.write_zeroes(off, n, may_unmap=kind == "zu")
            model[off:off + n] = bytes(n)
        else:
            await node.discard(off, n)
            # discard only drops whole clusters; those then read as zeroes
            a, b = -(-off // cs) * cs, (off + n) // cs * cs
            if off + n == size:
                b = off + n
            if a < b:
                model[a:b] = bytes(b - a)
        if i % 7 == 3:
            await node.flush()
        assert bytes(await node.read(off, n)) == model[off:off + n]


CONFIGS = {
    "default": (),
    "v2": ("compat=0.10",),
    "c512": ("cluster_size=512",),
    "c4k-r1": ("cluster_size=4096", "refcount_bits=1"),
    "r2": ("refcount_bits=2",),
    "r4": ("refcount_bits=4",),
    "r8": ("refcount_bits=8",),
    "r32": ("refcount_bits=32",),
    "r64": ("refcount_bits=64",),
    "c2m": ("cluster_size=2M",),
    "extl2": ("extended_l2=on",),
    "extl2-c16k": ("extended_l2=on", "cluster_size=16384"),
    "zstd": ("compression_type=zstd",),
    "lazy": ("lazy_refcounts=on",),
    "prealloc-meta": ("preallocation=metadata",),
}


def cluster_size(opts) -> int:
    for o in opts:
        if o.startswith("cluster_size="):
            v = o.split("=")[1]
            return int(v[:-1]) << 20 if v.endswith("M") else int(v)
    return 65536


@pytest.mark.parametrize("name", list(CONFIGS))
async def test_qemu_image_roundtrip(tmp_path, name):
    opts = CONFIGS[name]
    cs = cluster_size(opts)
    size = max(SIZE, 12 * cs)
    img = tmp_path / "a.qcow2"
    create(img, size, *opts)
    model = bytearray(size)
    # qemu-io cannot compress into preallocated clusters
    qemu_fill(img, model, cs, compressed="preallocation=metadata" not in opts)
    async with open_qcow2(img) as node:
        assert bytes(await node.read(0, size)) == model
        await our_writes(node, model, cs, seed=len(name))
        assert bytes(await node.read(0, size)) == model
    check_clean(img)
    assert raw_dump(img, tmp_path) == model


async def test_backing_chain(tmp_path):
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    model = bytearray(SIZE)
    create(base, SIZE)
    qemu_fill(base, model, 65536)
    create(mid, SIZE, backing=str(base))
    qemu_io(mid, "write -P 0x55 100000 70000", "write -z 0 4096")
    model[100000:170000] = b"\x55" * 70000
    model[0:4096] = bytes(4096)
    create(top, SIZE, "cluster_size=4096", backing="mid.qcow2")  # relative name
    async with open_qcow2(top) as node:
        assert node.backing is not None and node.backing.backing is not None
        assert bytes(await node.read(0, SIZE)) == model
        st = await node.block_status(100000, 1000)
        assert st.depth == 2
        await our_writes(node, model, 4096, seed=7)
    check_clean(top)
    check_clean(mid)
    assert raw_dump(top, tmp_path) == model
    # the backing files were opened read-only and are unchanged
    assert qemu_io(mid, "read -P 0x55 100000 70000")


async def test_backing_option_forms(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, SIZE)
    qemu_io(base, "write -P 0x66 0 64k")
    create(top, SIZE, backing=str(base))
    async with open_qcow2(top, backing=None) as node:
        assert node.backing is None
        assert bytes(await node.read(0, 4096)) == bytes(4096)
    async with open_qcow2(top, backing={"driver": "qcow2", "file": {
            "driver": "file", "filename": str(base)}}) as node:
        assert bytes(await node.read(0, 4096)) == b"\x66" * 4096


@pytest.mark.parametrize("raw", [False, True])
async def test_data_file(tmp_path, raw):
    img, data = tmp_path / "a.qcow2", tmp_path / "a.data"
    opts = [f"data_file={data}"] + (["data_file_raw=on"] if raw else [])
    create(img, SIZE, *opts)
    model = bytearray(SIZE)
    qemu_fill(img, model, 65536, compressed=False)
    async with open_qcow2(img) as node:
        assert bytes(await node.read(0, SIZE)) == model
        await our_writes(node, model, 65536, seed=3)
    check_clean(img)
    assert raw_dump(img, tmp_path) == model
    if raw:
        assert data.read_bytes().ljust(SIZE, b"\0")[:SIZE] == model


async def test_grow_and_shrink(tmp_path):
    img = tmp_path / "a.qcow2"
    create(img, SIZE)
    model = bytearray(SIZE)
    qemu_fill(img, model, 65536)
    big = 3 << 30  # needs a bigger L1 table than qemu-img made
    async with open_qcow2(img) as node:
        await node.truncate(big)
        assert node.length == big
        await node.write(big - 70000, b"\x77" * 70000)
        assert bytes(await node.read(big - 70000, 70000)) == b"\x77" * 70000
        assert bytes(await node.read(0, SIZE)) == model
    check_clean(img)
    qemu_io(img, f"read -P 0x77 {big - 70000} 70000", f"read -P 0 {SIZE} 1M")
    async with open_qcow2(img) as node:
        await node.truncate(SIZE // 2 + 512)
        assert bytes(await node.read(0, SIZE // 2 + 512)) == model[:SIZE // 2 + 512]
    check_clean(img)
    assert raw_dump(img, tmp_path) == model[:SIZE // 2 + 512]
