"""driver=bochs: images built from the format description (qemu-img makes
none), each read by qemu-img first (``convert -O raw``: the reference),
then by the driver; bochs_open's checks with QEMU's messages; truncated
files and catalog entries outside the file read as qemu-img reads them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qsd_trio.qapi.errors import GenericError
from tests.ro_images import make_bochs, opened, qemu_img_read, read_checks, sample

DATA = bytes(sample(40960) + bytes(12288) + sample(3584, 2) + bytes(512) + sample(1024, 3))


def write(tmp_path: Path, img: bytes, name: str = "t.bochs") -> Path:
    p = tmp_path / name
    p.write_bytes(img)
    return p


@pytest.mark.parametrize("kw", [
    {}, {"version": 1}, {"reverse": True, "extent": 8192}, {"extent": 512},
    {"header": 1024, "bitmap": 100, "catalog": 40}, {"extent": 65536, "bitmap": 2048},
], ids=["v2", "v1", "reverse-8k", "extent-512", "header-1k", "extent-64k"])
async def test_reads_as_qemu_img(tmp_path, kw):
    p = write(tmp_path, make_bochs(DATA, **kw))
    want, err = qemu_img_read("bochs", p)
    assert want == DATA, err
    async with opened("bochs", p) as node:
        await read_checks(node, want)
        assert node.filename == str(p)


async def test_read_write_open_refused(tmp_path):
    """bdrv_apply_auto_read_only before the file is opened: read-write
    fails with "Image is read-only" (even for a file that does not exist);
    auto-read-only=on opens read-only, the file child too."""
    p = write(tmp_path, make_bochs(DATA))
    for path in (p, tmp_path / "missing"):
        with pytest.raises(GenericError, match="^Image is read-only$"):
            async with opened("bochs", path, **{"read-only": False}):
                pass
    async with opened("bochs", p, **{"read-only": False, "auto-read-only": True}) as node:
        assert node.read_only and node.file.read_only
        assert bytes(await node.read(0, 4096)) == DATA[:4096]


def _patched(tmp_path: Path, at: int, fmt: str, value: int | bytes) -> Path:
    img = bytearray(make_bochs(DATA))
    struct.pack_into(fmt, img, at, value)
    return write(tmp_path, bytes(img), "bad.bochs")


BAD = {
    "magic": (0, "<4s", b"Bxch", "Image not in Bochs format"),
    "magic-no-nul": (22, "<B", 0x21, "Image not in Bochs format"),
    "type": (32, "<8s", b"Undoable", "Image not in Bochs format"),
    "subtype": (48, "<8s", b"Volatile", "Image not in Bochs format"),
    "version": (64, "<I", 0x00030000, "Image not in Bochs format"),
    "catalog-too-large": (72, "<I", 0x100001, "Catalog size is too large"),
    "extent-small": (80, "<I", 256, "Extent size must be at least 512"),
    "extent-zero": (80, "<I", 0, "Extent size must be at least 512"),
    "extent-not-pow2": (80, "<I", 3072, "Extent size 3072 is not a power of two"),
    "extent-too-large": (80, "<I", 0x1000000, "Extent size 16777216 is too large"),
    "catalog-too-small": (88, "<Q", 1 << 40, "Catalog size is too small for this disk size"),
    "disk-absurd": (88, "<Q", (1 << 64) - 1, "Catalog size is too small for this disk size"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_open_errors(tmp_path, case):
    at, fmt, value, msg = BAD[case]
    p = _patched(tmp_path, at, fmt, value)
    want, err = qemu_img_read("bochs", p)
    assert want is None and err.endswith(": " + msg), err
    with pytest.raises(GenericError) as e:
        async with opened("bochs", p):
            pass
    assert str(e.value) == msg


async def _compare(p: Path) -> None:
    """The driver opens, reads or fails where qemu-img does, with the same
    data or message."""
    want, err = qemu_img_read("bochs", p)
    try:
        async with opened("bochs", p) as node:
            got: bytes | None = bytes(await node.read(0, node.length))
    except GenericError as e:
        assert want is None and err.endswith(": " + str(e)), (err, e)
        return
    except OSError:
        got = None
    assert got == want, err


@pytest.mark.parametrize("cut", [0, 100, 520, 560, 1000, 5000, 30000])
async def test_truncated(tmp_path, cut):
    """Cut in the header, the catalog or the data: what is missing reads as
    zeroes (a short catalog maps extents to stored extent 0), as in QEMU."""
    p = write(tmp_path, make_bochs(DATA)[:cut])
    await _compare(p)


@pytest.mark.parametrize("entry", [1000, 0x7FFFFF, 0xFFFFFFFE])
async def test_catalog_outside_the_file(tmp_path, entry):
    """An extent stored past the end of the file reads as zeroes (its bitmap
    reads as zero); one whose offset lies beyond QEMU's largest length fails
    the read with EIO, as in qemu-img; nothing is read past the file."""
    img = bytearray(make_bochs(DATA, extent=512))
    struct.pack_into("<I", img, 512 + 4 * 3, entry)
    p = write(tmp_path, bytes(img))
    await _compare(p)


async def test_odd_header_fields(tmp_path):
    """A catalog offset beyond the file, a zero bitmap size (0x800000
    bitmap sectors in QEMU's 32-bit arithmetic) and a data offset that
    wraps at 32 bits give what qemu-img gives."""
    for at, fmt, value in ((68, "<I", 0xFFFFFE00), (76, "<I", 0), (68, "<I", 0xFFFFFFF0)):
        img = bytearray(make_bochs(DATA))
        struct.pack_into(fmt, img, at, value)
        await _compare(write(tmp_path, bytes(img), f"odd-{at}-{value}.bochs"))
