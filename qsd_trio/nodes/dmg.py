"""The ``dmg`` format (Apple UDIF disk images), read-only, as QEMU 7.2's
block/dmg.c.

Layout (big-endian): the image ends with a 512-byte "koly" trailer, found
in the last 515 bytes of the file (its sector-rounded length), which gives
the data fork offset (0x18), the resource fork (0x28, 0x30), the XML
property list (0xd8, 0xe0) and the sector count (0x1ec).  The chunk table is
made of "mish" (BLKX) blocks, taken from the resource fork when it has a
length, else from the ``<data>`` elements (base64) of the property list.  A
mish block gives its first sector (8) and data offset (0x18) and, from byte
204 on, 40-byte chunk entries: type, sector, sector count, offset and length
in the data fork.  Chunk types: zlib (UDZO), bzip2 (UDBZ), lzfse (ULFO),
raw (UDRW), zeroes (UDZE) and ignore (UDIG, read as zeroes); comments and
the last-entry marker are skipped quietly, unknown types with a warning.

lzfse has no maintained Python binding, so this driver is QEMU built
without its dmg-lzfse module: an lzfse chunk is dropped at open with
QEMU's warning and reading its sectors fails with EIO.  bzip2 chunks are
inflated with the standard library (QEMU with dmg-bz2).

Reads are QEMU's: the chunk holding a sector is found by QEMU's binary
search (after looking at the chunk read last), decompressed whole into one
buffer kept between reads (as ``uncompressed_chunk``; a raw chunk shorter
than its sectors leaves the buffer's older bytes behind it, as in QEMU),
and a sector in no chunk fails the read with EIO.
"""

from __future__ import annotations

import bz2
import struct
from array import array
from typing import Any

import trio

from ..qapi.errors import GenericError, error_report, warn_report
from .cloop import inflate_exact
from .graph import register_driver
from .node import Buffer
from .read_only_format import MASK32, MASK64, SECTOR, ReadOnlyFormatNode, eio

DMG_LENGTHS_MAX = 64 * 1024 * 1024
DMG_SECTORCOUNTS_MAX = DMG_LENGTHS_MAX // SECTOR
PLIST_MAX = 16 * 1024 * 1024
DECOMPRESS_IN_THREAD = 256 * 1024

UDZE, UDRW, UDIG = 0, 1, 2
UDCO, UDZO, UDBZ, ULFO = 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7FFFFFFE, 0xFFFFFFFF
KNOWN = (UDZE, UDRW, UDIG, UDZO, UDBZ)  # ULFO: no dmg-lzfse here
_WARNED: set[str] = set()  # warn_report_once's flags


def bz2_exact(data: bytes, size: int) -> bytes | None:
    """dmg_uncompress_bz2: the stream must end having produced exactly
    ``size`` bytes."""
    d = bz2.BZ2Decompressor()
    try:
        out = d.decompress(data, size) if size else d.decompress(data)
    except (OSError, ValueError):
        return None
    return out if d.eof and len(out) == size else None


_B64 = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   b"0123456789+/")}
_B64[ord("=")] = 0


def g_base64_decode(text: bytes) -> bytes:
    """GLib's g_base64_decode: characters outside the alphabet are skipped,
    '=' counts as a zero digit whose bytes are dropped, an incomplete last
    group is dropped."""
    out = bytearray()
    v = i = 0
    last0 = last1 = 0
    for c in text:
        rank = _B64.get(c)
        if rank is None:
            continue
        last1, last0 = last0, c
        v = ((v << 6) | rank) & 0xFFFFFFFF
        i += 1
        if i == 4:
            out.append((v >> 16) & 0xFF)
            if last1 != 0x3D:
                out.append((v >> 8) & 0xFF)
            if last0 != 0x3D:
                out.append(v & 0xFF)
            i = 0
    return bytes(out)


class _Header:
    """DmgHeaderState: where mish blocks' data lies and the buffer sizes."""

    def __init__(self, data_fork_offset: int) -> None:
        self.data_fork_offset = data_fork_offset
        self.max_compressed_size = 1
        self.max_sectors_per_chunk = 1


@register_driver
class DmgNode(ReadOnlyFormatNode):
    driver = "dmg"

    async def open(self, options: dict[str, Any]) -> None:
        """dmg_open's checks, in its order: its own messages where it has
        them, else the errno it returns, as QEMU words it."""
        await self.open_file_read_only(options)
        self.types = array("I")
        self.offsets = array("Q")
        self.lengths = array("Q")
        self.sectors = array("Q")
        self.sectorcounts = array("Q")
        try:
            await self._open()
        except _Invalid:
            raise GenericError(f"Could not open '{self.file.filename}': "
                               f"Invalid argument") from None
        except OSError as e:
            raise GenericError(f"Could not open '{self.file.filename}': "
                               f"{e.strerror}") from None
        self.n_chunks = len(self.types)
        self.current_chunk = self.n_chunks
        self.chunk = bytearray()  # uncompressed_chunk, allocated on first use
        self.lock = trio.Lock()

    async def _open(self) -> None:
        offset = await self._find_koly()
        u64 = struct.Struct(">Q")
        ds = _Header(u64.unpack(bytes(await self.pread(offset + 0x18, 8)))[0])
        if ds.data_fork_offset > offset:
            raise _Invalid
        rsrc_offset, rsrc_length = struct.unpack(">QQ", bytes(await self.pread(offset + 0x28,
                                                                                16)))
        if rsrc_offset >= offset or rsrc_length > offset - rsrc_offset:
            raise _Invalid
        xml_offset, xml_length = struct.unpack(">QQ", bytes(await self.pread(offset + 0xD8,
                                                                              16)))
        if xml_offset >= offset or xml_length > offset - xml_offset:
            raise _Invalid
        total = struct.unpack(">q", bytes(await self.pread(offset + 0x1EC, 8)))[0]
        if total < 0:
            raise _Invalid
        if rsrc_length:
            await self._read_resource_fork(ds, rsrc_offset, rsrc_length)
        elif xml_length:
            await self._read_plist_xml(ds, xml_offset, xml_length)
        else:
            raise _Invalid
        self.max_compressed_size = ds.max_compressed_size
        self.buffer_size = SECTOR * ds.max_sectors_per_chunk
        self.set_total_sectors(total)
        # bdrv_getlength refuses a size whose byte count overflows int64_t
        if total > (2**63 - 1) // SECTOR:
            raise GenericError("Could not refresh total sector count: File too large")

    async def _find_koly(self) -> int:
        """dmg_find_koly_offset: "koly" in the last 515 bytes of the file
        (its length rounded up to whole sectors, as bdrv_getlength)."""
        length = -(-self.file.length // SECTOR) * SECTOR
        if length < 512:
            raise GenericError("dmg file must be at least 512 bytes long")
        offset = length - 511 - 512 if length > 511 + 512 else 0
        buf = bytes(await self.pread(offset, min(length, 515)))
        i = buf.find(b"koly")
        if i < 0:
            raise GenericError("Could not locate UDIF trailer in dmg file")
        return offset + i

    async def _read_u32(self, offset: int) -> int:
        v: int = struct.unpack(">I", bytes(await self.pread(offset & MASK64, 4)))[0]
        return v

    async def _read_resource_fork(self, ds: _Header, begin: int, length: int) -> None:
        """dmg_read_resource_fork: the resource data's offset and length
        (32-bit, their sum too), then resources as a length and a mish
        block each."""
        data_offset = await self._read_u32(begin)
        if data_offset > length:
            raise _Invalid
        count = await self._read_u32(begin + 8)
        if count == 0 or (data_offset + count) & MASK32 > length:
            raise _Invalid
        offset = (begin + data_offset) & MASK64
        end = (offset + count) & MASK64
        while offset < end:
            count = await self._read_u32(offset)
            if count == 0 or count > end - offset:
                raise _Invalid
            offset = (offset + 4) & MASK64
            self._read_mish_block(ds, bytes(await self.pread(offset, count)))
            offset = (offset + count) & MASK64

    async def _read_plist_xml(self, ds: _Header, begin: int, length: int) -> None:
        """dmg_read_plist_xml: every <data>...</data> of the property list
        (read as a C string: up to its first NUL) is a base64 mish block."""
        if length == 0 or length > PLIST_MAX:
            raise _Invalid
        try:
            xml = bytes(await self.pread(begin, length))
        except OSError:
            raise _Invalid from None
        xml = xml.split(b"\0", 1)[0]
        pos = 0
        while (start := xml.find(b"<data>", pos)) >= 0:
            start += 6
            end = xml.find(b"</data>", start)
            if end < 0:
                raise _Invalid  # malformed XML
            self._read_mish_block(ds, g_base64_decode(xml[start:end]))
            pos = end + 1

    @staticmethod
    def _warn_once(msg: str) -> None:
        # warn_report_once: once per process, as QEMU's
        if msg not in _WARNED:
            _WARNED.add(msg)
            warn_report(msg)

    def _read_mish_block(self, ds: _Header, buf: bytes) -> None:
        """dmg_read_mish_block: a block that is not a mish block (or is
        shorter than 244 bytes) is skipped; chunks of unknown types are left
        out; the sector counts and lengths of the others are bounded."""
        count = len(buf) & MASK32
        if count < 244 or buf[:4] != b"mish":
            return
        out_offset, = struct.unpack_from(">Q", buf, 8)
        in_offset = (ds.data_fork_offset + struct.unpack_from(">Q", buf, 0x18)[0]) & MASK64
        for k in range((count - 204) // 40):
            kind, _, sector, sectorcount, off, length = struct.unpack_from(
                ">IIQQQQ", buf, 204 + 40 * k)
            if kind not in KNOWN:
                if kind == ULFO:
                    self._warn_once("dmg-lzfse module is missing, accessing lzfse "
                                    "compressed blocks will result in I/O errors")
                elif kind not in (UDCM, UDLE):
                    self._warn_once(f"Image contains chunks of unknown type {kind:x}, "
                                    f"accessing them will result in I/O errors")
                continue
            i = len(self.types)
            if kind not in (UDZE, UDIG) and sectorcount > DMG_SECTORCOUNTS_MAX:
                error_report(f"sector count {sectorcount} for chunk {i} is larger than "
                              f"max ({DMG_SECTORCOUNTS_MAX})")
                raise _Invalid
            if length > DMG_LENGTHS_MAX:
                error_report(f"length {length} for chunk {i} is larger than max "
                              f"({DMG_LENGTHS_MAX})")
                raise _Invalid
            self.types.append(kind)
            self.sectors.append((sector + out_offset) & MASK64)
            self.sectorcounts.append(sectorcount)
            self.offsets.append((off + in_offset) & MASK64)
            self.lengths.append(length)
            # update_max_chunk_size
            if kind in (UDZO, UDBZ):
                ds.max_compressed_size = max(ds.max_compressed_size, length)
                ds.max_sectors_per_chunk = max(ds.max_sectors_per_chunk, sectorcount)
            elif kind == UDRW:
                ds.max_sectors_per_chunk = max(ds.max_sectors_per_chunk, -(-length // SECTOR))

    # -- reads -------------------------------------------------------------
    def _in_chunk(self, chunk: int, sector: int) -> bool:
        """is_sector_in_chunk."""
        return (chunk < self.n_chunks and self.sectors[chunk] <= sector
                and (self.sectors[chunk] + self.sectorcounts[chunk]) & MASK64 > sector)

    def _search_chunk(self, sector: int) -> int:
        """search_chunk: QEMU's binary search, n_chunks when none holds
        ``sector`` (the table is not required to be sorted; the search
        then finds what QEMU's finds)."""
        lo, hi = 0, self.n_chunks
        while lo <= hi:
            mid = (lo + hi) // 2
            if mid >= self.n_chunks:
                break  # QEMU reads past its table here: no chunk
            if self.sectors[mid] > sector:
                if mid == 0:
                    break
                hi = mid - 1
            elif (self.sectors[mid] + self.sectorcounts[mid]) & MASK64 > sector:
                return mid
            else:
                lo = mid + 1
        return self.n_chunks

    async def _read_chunk(self, sector: int) -> None:
        """dmg_read_chunk: make ``current_chunk`` the chunk holding
        ``sector``, its data in the buffer; EIO when there is none or it
        does not decompress to its sectors."""
        if self._in_chunk(self.current_chunk, sector):
            return
        chunk = self._search_chunk(sector)
        if chunk >= self.n_chunks:
            raise eio()
        self.current_chunk = self.n_chunks
        kind = self.types[chunk]
        if kind in (UDZO, UDBZ, UDRW):
            try:
                data = bytes(await self.pread(self.offsets[chunk], self.lengths[chunk]))
            except OSError:
                raise eio() from None
            if kind == UDRW:
                self._fill(data)
            else:
                size = SECTOR * self.sectorcounts[chunk]
                fn = inflate_exact if kind == UDZO else bz2_exact
                if len(data) >= DECOMPRESS_IN_THREAD or size >= 8 * DECOMPRESS_IN_THREAD:
                    out = await trio.to_thread.run_sync(fn, data, size)
                else:
                    out = fn(data, size)
                if out is None:
                    raise eio()
                self._fill(out)
        self.current_chunk = chunk

    def _fill(self, data: bytes) -> None:
        """Put ``data`` at the start of the chunk buffer; what lies beyond
        it stays from earlier chunks, as in QEMU's uncompressed_chunk."""
        if len(self.chunk) < self.buffer_size:
            self.chunk.extend(bytes(self.buffer_size - len(self.chunk)))
        self.chunk[:len(data)] = data
        del self.chunk[self.buffer_size:]

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        first, count, skip = self.sector_range(offset, length)
        out = bytearray(count * SECTOR)
        async with self.lock:
            i = 0
            while i < count:
                sector = first + i
                await self._read_chunk(sector)
                c = self.current_chunk
                # the rest of the request that lies in this chunk, at once
                n = min(count - i, (self.sectors[c] + self.sectorcounts[c] - sector) & MASK64)
                if self.types[c] not in (UDZE, UDIG):
                    at = ((sector - self.sectors[c]) & MASK32) * SECTOR
                    piece = self.chunk[at:at + n * SECTOR]
                    # QEMU would read past its buffer here (a corrupt table): zeroes
                    out[i * SECTOR:i * SECTOR + len(piece)] = piece
                i += n
        return memoryview(out)[skip:skip + length]

    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        # inside the chunk read last: no waiting
        c = self.current_chunk
        if self.lock.locked() or c >= self.n_chunks:
            return None
        first, count, skip = self.sector_range(offset, length)
        if not (self._in_chunk(c, first) and self._in_chunk(c, first + count - 1)):
            return None
        if self.types[c] in (UDZE, UDIG):
            return bytearray(length)
        at = ((first - self.sectors[c]) & MASK32) * SECTOR
        if at + count * SECTOR > len(self.chunk):
            return None
        return bytes(memoryview(self.chunk)[at + skip:at + skip + length])


class _Invalid(Exception):
    """dmg_open's -EINVAL without a message of its own."""

