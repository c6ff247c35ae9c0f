"""The ``luks`` format (BlockdevOptionsLUKS): a LUKS1 volume on its ``file``.

The header and key slots fill the start of the file up to the payload
offset; the guest's data follows, sector ``n`` of the guest encrypted with
IV ``n``.  The node's size is the file's size minus the payload offset, and
resizing the node resizes the file, as in QEMU.  Reads and writes are done
in whole sectors (:mod:`.crypt`); zero writes fall back to writing
encrypted zeroes and discard does nothing (an encrypted sector of zeroes is
not a zero sector on the file).

``blockdev-create`` with ``driver=luks`` is :func:`create_luks_on`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..crypto.cipher import SECTOR
from ..qapi.errors import GenericError
from . import crypt
from .graph import register_driver
from .node import BlockNode, Buffer, json_filename

if TYPE_CHECKING:
    from .graph import BlockGraph


@register_driver
class LuksNode(BlockNode):
    driver = "luks"
    encrypted = True

    async def open(self, options: dict[str, Any]) -> None:
        self.file_edge = await self.open_child(options, "file")
        self.file: BlockNode = self.file_edge.node
        self.key_secret: str | None = options.get("key-secret")

        async def read(off: int, n: int) -> Buffer:
            return await self.file.read(off, max(0, min(n, self.file.length - off)))

        self.header, self.cipher = await crypt.open_luks(self.graph, self.key_secret, read)
        self.payload = self.header.payload_offset * SECTOR
        if self.file.length < self.payload:
            # QEMU's length is negative there, and bdrv_open fails with EIO
            raise GenericError("Could not refresh total sector count: Input/output error")
        self.request_alignment = SECTOR
        self._writes = crypt.SectorWrites()

    @property
    def filename(self) -> str:
        return json_filename({"driver": "luks", "file": self.file.full_open_options(),
                              "key-secret": self.key_secret})

    def info_extra(self) -> dict[str, Any]:
        return {"format-specific": {"type": "luks", "data": self.header.info()},
                "encrypted": True}

    def _length(self) -> int:
        return max(0, self.file.length - self.payload)

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        a, b = crypt.align_down(offset), crypt.align_up(offset + length)
        avail = min(b, self._length()) - a
        raw = bytes(await self.file.read(self.payload + a, avail))
        raw += bytes(-len(raw) % SECTOR)
        plain = self.cipher.decrypt(a // SECTOR, raw)
        return plain[offset - a:offset - a + length]

    async def _write_aligned(self, a: int, buf: Buffer) -> None:
        enc = self.cipher.encrypt(a // SECTOR, buf)
        # a file whose size is not a whole number of sectors: not past its end
        await self.file.write(self.payload + a, enc[:max(0, self._length() - a)])

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await crypt.write_sectors(self._writes, offset, data, self._co_preadv,
                                  self._write_aligned, self._length())
        if fua:
            await self.file.flush()

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        await self.file.truncate(self.payload + size, exact=exact, prealloc=prealloc)

    async def amend(self, options: Any, force: bool) -> None:
        """x-blockdev-amend: add or erase key slots (BlockdevAmendOptionsLUKS)."""
        async def read(off: int, n: int) -> Buffer:
            return await self.file.read(off, n)

        writes = await crypt.amend_luks(self.graph, self.header, read, options,
                                        open_secret=self.key_secret or "", force=force)
        for off, data in writes:
            await self.file.write(off, data)
        await self.file.flush()


async def create_luks_on(graph: BlockGraph, file: BlockNode, o: Any) -> None:
    """blockdev-create driver=luks: header and key slot 0 on ``file``, which
    is then sized to the payload offset plus ``size``."""
    prealloc = o.preallocation.value if o.preallocation is not None else "off"
    hdr, pieces, _key = await crypt.create_luks(graph, o)
    payload = hdr.payload_offset * SECTOR
    if file.length:
        await file.truncate(0, exact=True)
    await file.truncate(payload, exact=True)
    for off, data in pieces:
        await file.write(off, data)
    await file.truncate(payload + o.size, exact=True, prealloc=prealloc)
    await file.flush()
