"""driver=dmg: UDIF images built from the format description (koly
trailer, mish blocks in a resource fork or an XML property list; zlib,
bzip2, raw, zero and ignore chunks), each read by qemu-img first
(``convert -O raw``: the reference), then by the driver; dmg_open's checks
with QEMU's messages; chunk tables that are broken, unsorted, short or
point outside the file read or fail as in qemu-img.

The installed qemu-img (Debian's 7.2) is built without the dmg-bz2 and
dmg-lzfse modules: for bzip2 chunks the reference is the data the image
was made from (QEMU with dmg-bz2); lzfse chunks behave as in that build."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qsd_trio.qapi.errors import GenericError
from tests.ro_images import (
    UDBZ,
    UDCO,
    UDIG,
    UDRW,
    UDZE,
    UDZO,
    ULFO,
    koly,
    make_dmg,
    mish,
    opened,
    qemu_img_read,
    read_checks,
    resource_fork,
    sample,
)

SEGS = [(UDZO, sample(8192)), (UDRW, sample(4096, 3)), (UDZE, bytes(16384)),
        (UDIG, bytes(1024)), (UDZO, sample(70000 // 512 * 512, 4)), (UDRW, sample(512, 5))]


def write(tmp_path: Path, img: bytes, name: str = "t.dmg") -> Path:
    p = tmp_path / name
    p.write_bytes(img)
    return p


@pytest.mark.parametrize("form", ["rsrc", "xml"])
@pytest.mark.parametrize("split", [0, 3])
async def test_reads_as_qemu_img(tmp_path, form, split):
    img, data = make_dmg(SEGS, form=form, split=split, lead=b"\x11" * 1000)
    p = write(tmp_path, img)
    want, err = qemu_img_read("dmg", p)
    assert want == data, err
    async with opened("dmg", p) as node:
        await read_checks(node, want)


async def test_odd_file_length(tmp_path):
    """The trailer found at an offset that is not sector-aligned."""
    img, data = make_dmg(SEGS[:2], lead=b"\x22" * 7)
    p = write(tmp_path, img)
    assert qemu_img_read("dmg", p)[0] == data
    async with opened("dmg", p) as node:
        assert bytes(await node.read(0, node.length)) == data


@pytest.mark.parametrize("form", ["rsrc", "xml"])
async def test_bzip2(tmp_path, form):
    """bzip2 chunks decompress with the standard library, as QEMU with its
    dmg-bz2 module; Debian's qemu-img has no such module and fails."""
    img, data = make_dmg([(UDBZ, sample(20480)), (UDZO, sample(4096, 2)),
                          (UDBZ, sample(1024, 3))], form=form)
    p = write(tmp_path, img)
    want, err = qemu_img_read("dmg", p)
    assert want is None and "Input/output error" in err
    async with opened("dmg", p) as node:
        await read_checks(node, data)


async def test_lzfse_and_unknown_chunks(tmp_path, capsys):
    """No lzfse here (no maintained binding): as QEMU without dmg-lzfse, the
    chunk is dropped at open with QEMU's warning and reading it fails with
    EIO; an unknown type (ADC) likewise with its own warning."""
    img, data = make_dmg([(UDZO, sample(4096)), (ULFO, sample(4096, 2)),
                          (UDCO, sample(1024, 3)), (UDRW, sample(512, 4))])
    p = write(tmp_path, img)
    want, err = qemu_img_read("dmg", p)
    assert want is None and "Input/output error" in err
    async with opened("dmg", p) as node:
        assert bytes(await node.read(0, 4096)) == data[:4096]
        assert bytes(await node.read(9216, 512)) == data[9216:]
        for off in (4096, 8192 - 512, 8192):
            with pytest.raises(OSError):
                await node.read(off, 512)
    warned = capsys.readouterr().err
    assert "dmg-lzfse module is missing, accessing lzfse compressed blocks will result " \
           "in I/O errors" in warned
    assert "Image contains chunks of unknown type 80000004, accessing them will result " \
           "in I/O errors" in warned


async def test_read_write_open_refused(tmp_path):
    p = write(tmp_path, make_dmg(SEGS)[0])
    with pytest.raises(GenericError, match="^Image is read-only$"):
        async with opened("dmg", p, **{"read-only": False}):
            pass
    async with opened("dmg", p, **{"read-only": False, "auto-read-only": True}) as node:
        assert node.read_only and node.file.read_only


def _trailer_patched(img: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, b.rfind(b"koly") + at, value)
    return bytes(b)


def _mish_patched(img: bytes, chunk: int, at: int, value: int) -> bytes:
    b = bytearray(img)
    struct.pack_into(">Q", b, b.find(b"mish") + 204 + 40 * chunk + at, value)
    return bytes(b)


def bad_images() -> dict[str, tuple[bytes, str]]:
    img, _ = make_dmg(SEGS)
    xml, _ = make_dmg(SEGS, form="xml")
    inval = "Invalid argument"
    rsrc_at = len(img) - 512 - len(resource_fork([mish(0, 0, [])] * 1)) - 40
    return {
        "empty": (b"", "dmg file must be at least 512 bytes long"),
        # bdrv_getlength rounds up to whole sectors: 400 bytes count as 512
        "short": (img[-400:], "Could not locate UDIF trailer in dmg file"),
        "no-koly": (img[:-512] + bytes(512), "Could not locate UDIF trailer in dmg file"),
        "data-fork-after-koly": (_trailer_patched(img, 0x18, ">Q", len(img)), inval),
        "rsrc-after-koly": (_trailer_patched(img, 0x28, ">Q", len(img)), inval),
        "rsrc-too-long": (_trailer_patched(img, 0x30, ">Q", 1 << 40), inval),
        "xml-after-koly": (_trailer_patched(img, 0xD8, ">Q", 1 << 63), inval),
        "xml-too-long": (_trailer_patched(xml, 0xE0, ">Q", len(img)), inval),
        "no-table": (_trailer_patched(img, 0x30, ">Q", 0), inval),
        "negative-size": (_trailer_patched(img, 0x1EC, ">q", -1), inval),
        "huge-size": (_trailer_patched(img, 0x1EC, ">q", 1 << 54),
                      "Could not refresh total sector count: File too large"),
        "sector-count": (_mish_patched(img, 0, 0x10, 1 << 20), inval),
        "length": (_mish_patched(img, 1, 0x20, 1 << 27), inval),
        "xml-unclosed": (xml.replace(b"</data>", b"</dat>", 1), inval),
        "rsrc-data-offset": (_patch_at(img, rsrc_at, 0xFFFFFFF0), inval),
    }


def _patch_at(img: bytes, at: int, value: int) -> bytes:
    b = bytearray(img)
    rsrc = struct.unpack_from(">Q", b, b.rfind(b"koly") + 0x28)[0]
    struct.pack_into(">I", b, rsrc, value)
    return bytes(b)


BAD = bad_images()


@pytest.mark.parametrize("case", list(BAD))
async def test_open_errors(tmp_path, case):
    img, msg = BAD[case]
    p = write(tmp_path, img)
    if msg == "Invalid argument":
        msg = f"Could not open '{p}': Invalid argument"
    want, err = qemu_img_read("dmg", p)
    assert want is None and err.endswith(": " + msg), err
    with pytest.raises(GenericError) as e:
        async with opened("dmg", p):
            pass
    assert str(e.value) == msg


async def _compare(p: Path) -> None:
    want, err = qemu_img_read("dmg", p)
    try:
        async with opened("dmg", p) as node:
            got: bytes | None = bytes(await node.read(0, node.length))
    except GenericError as e:
        assert want is None and err.endswith(": " + str(e)), (err, e)
        return
    except OSError:
        got = None
    assert got == want, err


@pytest.mark.parametrize("cut", [100, 600, 5000, 20000, -700, -530, -512, -100])
async def test_truncated(tmp_path, cut):
    await _compare(write(tmp_path, make_dmg(SEGS)[0][:cut]))


@pytest.mark.parametrize("case", ["raw-outside", "zlib-outside", "raw-short", "unsorted",
                                  "overlap", "gap", "size-beyond-chunks", "far-offset"])
async def test_odd_tables(tmp_path, case):
    """Chunk tables QEMU reads without complaint at open: data outside the
    file, a raw chunk shorter than its sectors (the buffer's older bytes
    show, as in QEMU), unsorted or overlapping chunks (QEMU's search and
    cache decide), sectors in no chunk (EIO)."""
    img, _ = make_dmg(SEGS)
    if case == "raw-outside":
        img = _mish_patched(img, 1, 0x18, 1 << 30)
    elif case == "zlib-outside":
        img = _mish_patched(img, 0, 0x18, 1 << 30)
    elif case == "raw-short":
        img = _mish_patched(img, 5, 0x20, 100)
    elif case == "unsorted":
        img = _mish_patched(_mish_patched(img, 0, 0x08, 16 + 32 + 2), 3, 0x08, 0)
    elif case == "overlap":
        img = _mish_patched(img, 2, 0x08, 4)
    elif case == "gap":
        img = _mish_patched(img, 1, 0x10, 2)
    elif case == "size-beyond-chunks":
        img = _trailer_patched(img, 0x1EC, ">q", 400)
    elif case == "far-offset":
        img = _mish_patched(img, 1, 0x18, (1 << 63) + 1)
    await _compare(write(tmp_path, img))


async def test_koly_fields_only(tmp_path):
    """An image whose trailer is its only content (a zero-length fork):
    no chunk table, -EINVAL as QEMU."""
    t = koly(data_fork_offset=0, data_fork_length=0, rsrc=(0, 0), xml=(0, 0), sector_count=0)
    await _compare(write(tmp_path, t))
