"""Small bochs, cloop and dmg images for the read-only format drivers.

qemu-img creates none of these formats, so the tests build them from the
format descriptions in QEMU 7.2's block/bochs.c, block/cloop.c and
block/dmg.c (the fields those drivers read), and check every image against
qemu-img itself (``qemu-img convert -O raw`` must give the data the image
was made from).
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import random
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.node import BlockNode, Status

SECTOR = 512


# -- bochs ("growing" redolog) ----------------------------------------------
def make_bochs(data: bytes, *, extent: int = 4096, version: int = 2,
               catalog: int | None = None, header: int = SECTOR, bitmap: int = SECTOR,
               reverse: bool = False) -> bytes:
    """A growing bochs image holding ``data`` (whole sectors): a 512-byte
    header, the catalog (one 32-bit entry per extent, 0xffffffff when the
    extent is not allocated) at ``header``, then for each allocated extent
    its sector bitmap (``bitmap`` bytes, rounded up to sectors) and its
    data.  Sectors of zeroes are left out of the bitmaps; extents of
    zeroes are not allocated; ``reverse`` allocates extents last first."""
    assert len(data) % SECTOR == 0
    per = extent // SECTOR
    n = -(-len(data) // extent)
    cat_size = n if catalog is None else catalog
    bitmap_blocks = 1 + (bitmap - 1) // SECTOR
    extent_blocks = 1 + (extent - 1) // SECTOR
    used = [i for i in range(n) if any(data[i * extent:(i + 1) * extent])]
    if reverse:
        used.reverse()
    entries = [0xFFFFFFFF] * cat_size
    body = bytearray()
    for host, i in enumerate(used):
        entries[i] = host
        bits = bytearray(bitmap_blocks * SECTOR)
        chunk = bytearray(extent_blocks * SECTOR)
        for s in range(per):
            sec = data[i * extent + s * SECTOR:i * extent + (s + 1) * SECTOR]
            if any(sec):
                bits[s // 8] |= 1 << (s % 8)
                chunk[s * SECTOR:s * SECTOR + len(sec)] = sec
            else:
                # an unmarked sector reads as zeroes whatever the file holds
                chunk[s * SECTOR:(s + 1) * SECTOR] = b"\xee" * SECTOR
        body += bits + chunk
    h = bytearray(SECTOR)
    h[0:22] = b"Bochs Virtual HD Image"
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    struct.pack_into("<IIIII", h, 64, 0x00020000 if version == 2 else 0x00010000,
                     header, cat_size, bitmap, extent)
    struct.pack_into("<Q", h, 88 if version == 2 else 84, len(data))
    out = bytearray(h) + bytes(max(0, header - SECTOR))
    out += struct.pack(f"<{cat_size}I", *entries) + body
    return bytes(out)


# -- cloop (V2.0) ------------------------------------------------------------
CLOOP_PREAMBLE = (b"#!/bin/sh\n#V2.0 Format\n"
                  b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n")


def make_cloop(data: bytes, block_size: int = 65536, level: int = 9) -> bytes:
    """A cloop V2.0 image: the shell preamble padded to 128 bytes, the block
    size and block count (big-endian 32-bit), ``n + 1`` 64-bit offsets and
    the blocks, each a zlib stream of ``block_size`` bytes (the last one
    padded with zeroes), as create_compressed_fs writes them."""
    n = -(-len(data) // block_size)
    blocks = [zlib.compress(data[i * block_size:(i + 1) * block_size].ljust(block_size, b"\0"),
                            level) for i in range(n)]
    offsets = [128 + 8 + 8 * (n + 1)]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    return (CLOOP_PREAMBLE.ljust(128, b"\0") + struct.pack(">II", block_size, n)
            + struct.pack(f">{n + 1}Q", *offsets) + b"".join(blocks))


# -- dmg (UDIF) --------------------------------------------------------------
UDZE, UDRW, UDIG = 0, 1, 2
UDCO, UDZO, UDBZ, ULFO = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7FFFFFFE, 0xFFFFFFFF


def mish(first_sector: int, data_offset: int,
         entries: Sequence[tuple[int, int, int, int, int]], sector_count: int = 0) -> bytes:
    """A BLKX ("mish") block: the header QEMU reads (first sector at 8, data
    offset at 0x18), 204 bytes in all, then 40-byte chunk entries
    (type, comment, sector, sector count, offset, length)."""
    head = bytearray(204)
    struct.pack_into(">4sIQQQII", head, 0, b"mish", 1, first_sector, sector_count,
                     data_offset, 0, 0)
    struct.pack_into(">I", head, 200, len(entries))
    return bytes(head) + b"".join(struct.pack(">IIQQQQ", t, 0, s, c, o, n)
                                  for t, s, c, o, n in entries)


def resource_fork(blocks: Sequence[bytes]) -> bytes:
    """A resource fork as dmg_read_resource_fork reads it: the data offset
    and data length at 0 and 8, then each resource as a 32-bit length and
    its bytes; a (minimal) resource map follows the data."""
    data = b"".join(struct.pack(">I", len(b)) + b for b in blocks)
    rmap = bytes(30)
    return struct.pack(">IIII", 256, 256 + len(data), len(data), len(rmap)) + bytes(240) \
        + data + rmap


def plist(blocks: Sequence[bytes]) -> bytes:
    """The XML property list: each mish block base64-encoded in a <data>
    element of the blkx array, wrapped at 52 columns as hdiutil does."""
    items = []
    for i, b in enumerate(blocks):
        b64 = base64.b64encode(b).decode()
        lines = "\n".join("\t\t\t\t" + b64[j:j + 52] for j in range(0, len(b64), 52))
        items.append(f"\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n"
                     f"\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n{lines}\n\t\t\t\t</data>\n"
                     f"\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t</dict>\n")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n'
            "\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n"
            + "".join(items) + "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").encode()


def koly(*, data_fork_offset: int, data_fork_length: int, rsrc: tuple[int, int],
         xml: tuple[int, int], sector_count: int) -> bytes:
    """The 512-byte UDIF trailer: the fields dmg_open reads (data fork at
    0x18, resource fork at 0x28/0x30, XML at 0xd8/0xe0, sector count at
    0x1ec), big-endian."""
    t = bytearray(512)
    struct.pack_into(">4sIII", t, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQQQQ", t, 0x10, 0, data_fork_offset, data_fork_length, *rsrc)
    struct.pack_into(">II", t, 0x38, 1, 1)
    struct.pack_into(">QQ", t, 0xD8, *xml)
    struct.pack_into(">IQ", t, 0x1E8, 1, sector_count)
    return bytes(t)


def compress(kind: int, raw: bytes) -> bytes:
    if kind == UDZO:
        return zlib.compress(raw)
    if kind == UDBZ:
        return bz2.compress(raw)
    if kind == UDRW:
        return raw
    return b""


def make_dmg(segments: Sequence[tuple[int, bytes]], *, form: str = "rsrc",
             split: int = 0, lead: bytes = b"") -> tuple[bytes, bytes]:
    """A UDIF image from ``segments`` (chunk type, the sectors' data; the
    data of a zero or ignore chunk gives only its length), as (image, the
    data QEMU reads from it).  The data fork starts after ``lead``; the
    chunk table is in a resource fork (``form="rsrc"``) or in the XML
    property list (``"xml"``); with ``split`` the chunks after the first
    ``split`` go into a second mish block, with its own first sector and
    data offset, as images with several partitions have.  A comment and
    a last-entry chunk, which QEMU skips, end each block."""
    fork = bytearray()
    entries = []
    sector = 0
    expect = bytearray()
    for kind, raw in segments:
        assert len(raw) % SECTOR == 0
        payload = compress(kind, raw)
        entries.append((kind, sector, len(raw) // SECTOR, len(fork), len(payload)))
        fork += payload
        expect += raw if kind not in (UDZE, UDIG) else bytes(len(raw))
        sector += len(raw) // SECTOR
    tail = [(UDCM, sector, 0, len(fork), 0), (UDLE, sector, 0, len(fork), 0)]
    if split:
        a, b = entries[:split], entries[split:]
        s0, o0 = (b[0][1], b[0][3]) if b else (sector, len(fork))
        b = [(t, s - s0, c, o - o0, n) for t, s, c, o, n in b]
        tail = [(t, s - s0, c, o - o0, n) for t, s, c, o, n in tail]
        blocks = [mish(0, 0, a + tail[:1]), mish(s0, o0, b + tail)]
    else:
        blocks = [mish(0, 0, entries + tail, sector)]
    img = bytearray(lead) + fork
    if form == "rsrc":
        rsrc = (len(img), len(resource_fork(blocks)))
        img += resource_fork(blocks)
        xml = (0, 0)
    else:
        rsrc = (0, 0)
        xml = (len(img), len(plist(blocks)))
        img += plist(blocks)
    img += koly(data_fork_offset=len(lead), data_fork_length=len(fork), rsrc=rsrc, xml=xml,
                sector_count=sector)
    return bytes(img), bytes(expect)


def sample(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that compress somewhat and differ from sector to sector."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{seed}:{i:08d} ".encode() * 3 + bytes([(i * 7 + seed) % 251]) * 37
        i += 1
    return bytes(out[:n])


# -- helpers for the tests ---------------------------------------------------
def qemu_img_read(fmt: str, path: Path) -> tuple[bytes | None, str]:
    """What qemu-img reads from the image (``convert -O raw``), or None and
    its last line of error; the lines Debian's build prints about its
    missing dmg modules are left out of the error."""
    out = path.with_name(path.name + ".qemu.raw")
    r = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                       capture_output=True, text=True, check=False)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("qemu: module ")]
    if r.returncode:
        return None, lines[-1] if lines else ""
    data = out.read_bytes()
    out.unlink()
    return data, "\n".join(lines)


@contextlib.asynccontextmanager
async def opened(fmt: str, path: Path, **opts: Any) -> AsyncIterator[BlockNode]:
    graph = BlockGraph()
    options = {"driver": fmt, "node-name": "top", "read-only": True,
               "file": {"driver": "file", "filename": str(path)}, **opts}
    node = await graph.add(options)
    try:
        yield node
    finally:
        await graph.close_all()


async def read_checks(node: BlockNode, want: bytes) -> None:
    """What every read-only format must do: read all of it, read unaligned
    pieces (several at once), answer block status DATA|ALLOCATED over the
    whole range (none of the three has bdrv_co_block_status), refuse
    writes, and serve read_now from what it holds or decline."""
    assert node.length == len(want)
    assert bytes(await node.read(0, node.length)) == want
    rnd = random.Random(len(want))
    pieces = [(o, rnd.randint(1, min(70000, len(want) - o)))
              for o in (rnd.randrange(len(want)) for _ in range(24))]
    got: dict[int, bytes] = {}

    async def one(i: int, off: int, n: int) -> None:
        got[i] = bytes(await node.read(off, n))

    async with trio.open_nursery() as nursery:
        for i, (off, n) in enumerate(pieces):
            nursery.start_soon(one, i, off, n)
    for i, (off, n) in enumerate(pieces):
        assert got[i] == want[off:off + n], (off, n)
    for off, n in pieces:
        fast = node.read_now(off, n)
        assert fast is None or bytes(fast) == want[off:off + n]
    st = await node.block_status(0, node.length)
    assert st.flags == Status.DATA | Status.ALLOCATED and st.length == node.length
    assert node.read_only and node.request_alignment == 512
    with pytest.raises(OSError):
        await node.write(0, b"x" * 512)
    with pytest.raises(OSError):
        await node.read(node.length - 1, 2)
