"""The ``cloop`` format (compressed loop images, V2.0), read-only, as QEMU
7.2's block/cloop.c.

Layout (big-endian): 128 bytes of shell preamble (not checked), the block
size and the number of blocks (32-bit) at 128, then ``n_blocks + 1``
64-bit file offsets; block ``i`` is the zlib stream between offsets ``i``
and ``i + 1`` and inflates to exactly one block.  The disk is ``n_blocks``
blocks (the count of sectors computed in 32 bits, as QEMU).

Reads inflate a whole block and keep the last one (QEMU's
``current_block``), under a lock as QEMU's ``s->lock``; a block that does
not inflate to exactly the block size fails the read with EIO.  The offset
table is checked at open as cloop_open does; only the part of it that the
file holds is kept (the rest reads as zeroes, as QEMU's pread pads it).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import trio

from ..qapi.errors import GenericError
from .graph import register_driver
from .node import Buffer
from .read_only_format import MASK32, SECTOR, ReadOnlyFormatNode, eio

MAX_BLOCK_SIZE = 64 * 1024 * 1024
N_BLOCKS_MAX = (0xFFFFFFFF - 1) // 8
OFFSETS_SIZE_MAX = 512 * 1024 * 1024
INFLATE_IN_THREAD = 256 * 1024  # blocks at least this big inflate off the event loop


def inflate_exact(data: bytes, size: int) -> bytes | None:
    """inflate(Z_FINISH) into a ``size``-byte buffer: the output only when
    the stream ends having produced exactly ``size`` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size) if size else d.decompress(data)
    except zlib.error:
        return None
    return out if d.eof and len(out) == size else None


@register_driver
class CloopNode(ReadOnlyFormatNode):
    driver = "cloop"

    async def open(self, options: dict[str, Any]) -> None:
        """cloop_open's checks, in its order, with its messages."""
        await self.open_file_read_only(options)
        block_size, n_blocks = struct.unpack(">II", bytes(await self.pread(128, 8)))
        if block_size % SECTOR:
            raise GenericError(f"block_size {block_size} must be a multiple of 512")
        if block_size == 0:
            raise GenericError("block_size cannot be zero")
        if block_size > MAX_BLOCK_SIZE:
            raise GenericError(f"block_size {block_size} must be "
                               f"{MAX_BLOCK_SIZE // (1024 * 1024)} MB or less")
        if n_blocks > N_BLOCKS_MAX:
            raise GenericError(f"n_blocks {n_blocks} must be {N_BLOCKS_MAX} or less")
        offsets_size = ((n_blocks + 1) * 8) & MASK32
        if offsets_size > OFFSETS_SIZE_MAX:
            raise GenericError("image requires too many offsets, try increasing block size")
        if offsets_size == 0:
            # (n_blocks + 1) * 8 wrapped to 0 in 32 bits: g_try_malloc(0) is NULL
            raise GenericError("Could not allocate offsets table")
        # the entries the file holds; the rest are zeroes (pread pads)
        self.offsets = await self.load_table(136, n_blocks + 1, ">Q")
        stored = len(self.offsets)
        for i in range(1, n_blocks + 1):
            prev = self.offsets[i - 1]
            cur = self.offsets[i]
            if cur < prev:
                raise GenericError(f"offsets not monotonically increasing at index {i}, "
                                   f"image file is corrupt")
            # poorly compressed blocks may be larger than a block, but not this large
            if cur - prev > 2 * MAX_BLOCK_SIZE:
                raise GenericError(f"invalid compressed block size at index {i}, "
                                   f"image file is corrupt")
            if i >= stored:
                break  # only zero entries follow
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.sectors_per_block = block_size // SECTOR
        self.current_block = n_blocks
        self.block = b""
        self.lock = trio.Lock()
        self.set_total_sectors((n_blocks * self.sectors_per_block) & MASK32)


    async def _read_block(self, num: int) -> bytes:
        """cloop_read_block: block ``num``, inflated (or the one kept)."""
        if num == self.current_block:
            return self.block
        start = self.offsets[num]
        size = (self.offsets[num + 1] - start) & MASK32
        try:
            data = bytes(await self.pread(start, size))
        except OSError:
            raise eio() from None
        if size >= INFLATE_IN_THREAD:
            out = await trio.to_thread.run_sync(inflate_exact, data, self.block_size)
        else:
            out = inflate_exact(data, self.block_size)
        if out is None:
            raise eio()
        self.block = out
        self.current_block = num
        return out

    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        # inside the block kept from the last read: no waiting
        bs = self.block_size
        if (self.lock.locked() or offset // bs != self.current_block
                or (offset + length - 1) // bs != self.current_block):
            return None
        return memoryview(self.block)[offset % bs:offset % bs + length]

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        bs = self.block_size
        out = bytearray(length)
        done = 0
        async with self.lock:
            while done < length:
                num, in_block = divmod(offset + done, bs)
                n = min(length - done, bs - in_block)
                block = await self._read_block(num)
                out[done:done + n] = block[in_block:in_block + n]
                done += n
        return out
