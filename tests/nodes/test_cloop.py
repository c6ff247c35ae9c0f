"""driver=cloop: V2.0 images built from the format description and, where
cloop-utils is installed, by create_compressed_fs, each read by qemu-img
first (``convert -O raw``: the reference), then by the driver;
cloop_open's checks with QEMU's messages; truncated files, broken blocks
and offsets outside the file read or fail as in qemu-img."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest
import trio

from qsd_trio.qapi.errors import GenericError
from tests.ro_images import make_cloop, opened, qemu_img_read, read_checks, sample

DATA = bytes(sample(70000) + bytes(40000) + sample(9000, 2))


def write(tmp_path: Path, img: bytes, name: str = "t.cloop") -> Path:
    p = tmp_path / name
    p.write_bytes(img)
    return p


def padded(data: bytes, block: int) -> bytes:
    return data + bytes(-len(data) % block)


@pytest.mark.parametrize("block", [512, 16384, 65536, 1 << 20])
async def test_reads_as_qemu_img(tmp_path, block):
    p = write(tmp_path, make_cloop(DATA, block))
    want, err = qemu_img_read("cloop", p)
    assert want == padded(DATA, block), err
    async with opened("cloop", p) as node:
        await read_checks(node, want)


@pytest.mark.skipif(shutil.which("create_compressed_fs") is None, reason="no cloop-utils")
async def test_create_compressed_fs(tmp_path):
    """An image made by cloop-utils reads as qemu-img reads it."""
    raw = tmp_path / "in.raw"
    raw.write_bytes(DATA)
    p = tmp_path / "cfs.cloop"
    r = await trio.run_process(["create_compressed_fs", "-q", "-B", "16384", str(raw), str(p)],
                               capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr
    want, err = qemu_img_read("cloop", p)
    assert want == padded(DATA, 16384), err
    async with opened("cloop", p) as node:
        await read_checks(node, want)


async def test_read_write_open_refused(tmp_path):
    p = write(tmp_path, make_cloop(DATA, 16384))
    with pytest.raises(GenericError, match="^Image is read-only$"):
        async with opened("cloop", p, **{"read-only": False}):
            pass
    async with opened("cloop", p, **{"read-only": False, "auto-read-only": True}) as node:
        assert node.read_only and node.file.read_only


def _patched(tmp_path: Path, at: int, fmt: str, value: int) -> Path:
    img = bytearray(make_cloop(DATA, 16384))
    struct.pack_into(fmt, img, at, value)
    return write(tmp_path, bytes(img), "bad.cloop")


BAD = {
    "block-size-odd": (128, ">I", 1000, "block_size 1000 must be a multiple of 512"),
    "block-size-zero": (128, ">I", 0, "block_size cannot be zero"),
    "block-size-large": (128, ">I", 128 << 20, "block_size 134217728 must be 64 MB or less"),
    "n-blocks-overflow": (132, ">I", 0xFFFFFFFF, "n_blocks 4294967295 must be 536870911 or less"),
    "n-blocks-wrap": (132, ">I", 536870911, "Could not allocate offsets table"),
    "too-many-offsets": (132, ">I", 100 << 20,
                         "image requires too many offsets, try increasing block size"),
    "not-monotonic": (136 + 8 * 2, ">Q", 10,
                      "offsets not monotonically increasing at index 2, image file is corrupt"),
    "block-too-large": (136 + 8 * 3, ">Q", 1 << 30,
                        "invalid compressed block size at index 3, image file is corrupt"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_open_errors(tmp_path, case):
    at, fmt, value, msg = BAD[case]
    p = _patched(tmp_path, at, fmt, value)
    want, err = qemu_img_read("cloop", p)
    assert want is None and err.endswith(": " + msg), err
    with pytest.raises(GenericError) as e:
        async with opened("cloop", p):
            pass
    assert str(e.value) == msg


async def _compare(p: Path) -> None:
    want, err = qemu_img_read("cloop", p)
    try:
        async with opened("cloop", p) as node:
            got: bytes | None = bytes(await node.read(0, node.length))
    except GenericError as e:
        assert want is None and err.endswith(": " + str(e)), (err, e)
        return
    except OSError:
        got = None
    assert got == want, err


@pytest.mark.parametrize("cut", [0, 100, 130, 140, 170, 500, 3000, 12000])
async def test_truncated(tmp_path, cut):
    """Cut in the header, the offsets or the blocks: the offsets the file
    lacks read as zeroes (not monotonic, or a disk of unreadable blocks),
    a block cut short does not inflate: EIO, as in qemu-img."""
    await _compare(write(tmp_path, make_cloop(DATA, 16384)[:cut]))


async def test_many_blocks_small_file(tmp_path):
    """A block count of millions in a file of a few hundred bytes: the
    offsets past the end read as zeroes and the open succeeds as QEMU's
    does, without reading or keeping a table the file does not hold."""
    img = bytearray(make_cloop(DATA, 16384)[:136])
    struct.pack_into(">I", img, 132, 60_000_000)
    p = write(tmp_path, bytes(img))
    async with opened("cloop", p) as node:
        # n_blocks * sectors_per_block, in 32 bits
        assert node.length == ((60_000_000 * 32) & 0xFFFFFFFF) * 512
        with pytest.raises(OSError):
            await node.read(0, 512)  # an empty block does not inflate


@pytest.mark.parametrize("what", ["garbage", "short", "long", "far"])
async def test_broken_blocks(tmp_path, what):
    """A block that is not zlib, inflates short or long, or lies beyond
    the largest offset QEMU reads: EIO for the reads that touch it, as in
    qemu-img; the other blocks read."""
    block = 16384
    n = -(-len(DATA) // block)
    blocks = [zlib.compress(padded(DATA, block)[i * block:(i + 1) * block]) for i in range(n)]
    if what == "garbage":
        blocks[2] = b"\x00" * 40
    elif what == "short":
        blocks[2] = zlib.compress(bytes(block - 512))
    elif what == "long":
        blocks[2] = zlib.compress(bytes(block + 512))
    offsets = [136 + 8 * (n + 1)]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    img = bytearray(make_cloop(DATA, block)[:136]) + struct.pack(f">{n + 1}Q", *offsets)
    img += b"".join(blocks)
    if what == "far":
        struct.pack_into(f">{n - 1}Q", img, 136 + 16, *[(1 << 63) + 5] * (n - 1))
    p = write(tmp_path, bytes(img))
    await _compare(p)
    if what != "far":
        async with opened("cloop", p) as node:
            assert bytes(await node.read(0, block)) == DATA[:block]
            with pytest.raises(OSError):
                await node.read(2 * block + 512, 512)
