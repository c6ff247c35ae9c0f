"""Encrypted I/O shared by the ``luks`` driver and encrypted qcow2.

Ciphers work on whole 512-byte sectors, so a write that starts or ends
inside a sector is a read-modify-write of the edge sectors.  Two writes
touching one sector must not interleave their read and write (one would
put back the other's old bytes), so every write of an encrypted node runs
under :meth:`SectorWrites.hold`, which waits for in-flight writes whose
sector ranges overlap (QEMU makes such requests serialising).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..crypto import luks
from ..crypto import secrets as secretmod
from ..crypto.cipher import SECTOR, SectorCipher
from ..qapi.errors import GenericError

if TYPE_CHECKING:
    from .graph import BlockGraph


def align_down(x: int) -> int:
    return x & ~(SECTOR - 1)


def align_up(x: int) -> int:
    return (x + SECTOR - 1) & ~(SECTOR - 1)


class SectorWrites:
    """In-flight writes by sector-aligned byte range."""

    def __init__(self) -> None:
        self._inflight: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            for a, b, ev in self._inflight:
                if a < end and start < b:
                    await ev.wait()
                    break
            else:
                break
        me = (start, end, trio.Event())
        self._inflight.append(me)
        try:
            yield
        finally:
            self._inflight.remove(me)
            me[2].set()


ReadPlain = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]
WritePlain = Callable[[int, bytes | bytearray | memoryview], Awaitable[None]]


async def write_sectors(writes: SectorWrites, offset: int, data: memoryview, read: ReadPlain,
                        write: WritePlain, limit: int) -> None:
    """Write ``data`` at ``offset`` as whole sectors: the partial edge
    sectors are read back (as plaintext, through ``read``) and merged.
    ``limit`` is the node's length (the last sector may be short of it)."""
    a, b = align_down(offset), align_up(offset + len(data))
    async with writes.hold(a, b):
        if a == offset and b == offset + len(data):
            await write(a, data)
            return
        buf = bytearray(b - a)
        if a < offset:
            buf[:SECTOR] = _pad(await read(a, min(SECTOR, limit - a)))
        end = offset + len(data)
        if end < b and (end > a + SECTOR or a == offset):
            t = b - SECTOR
            buf[t - a:] = _pad(await read(t, min(SECTOR, limit - t)))
        buf[offset - a:end - a] = data
        await write(a, buf)


def _as_bytes(read: ReadPlain) -> Callable[[int, int], Awaitable[bytes]]:
    """``read`` for the header code, which takes bytes (key material is
    read at open and amend only)."""
    async def read_bytes(off: int, n: int) -> bytes:
        return bytes(await read(off, n))
    return read_bytes


def _pad(d: bytes | bytearray | memoryview) -> bytes:
    return bytes(d).ljust(SECTOR, b"\0")


async def open_luks(graph: BlockGraph, secret_id: str | None, read: ReadPlain, *,
                    prefix: str = "") -> tuple[luks.LuksHeader, SectorCipher]:
    """Unlock a LUKS volume whose header ``read`` reads (offset 0 = its start).

    The secret is looked up first, then the header checked, as QEMU does.
    Errors are :class:`GenericError` with QEMU's texts.
    """
    if secret_id is None:
        raise GenericError(f"Parameter '{prefix}key-secret' is required for cipher")
    password = secretmod.lookup_utf8(graph, secret_id)
    try:
        hdr = luks.parse_header(bytes(await read(0, luks.HEADER_SIZE)))
        key = await luks.unlock(hdr, password, _as_bytes(read))
        return hdr, hdr.sector_cipher(key)
    except luks.LuksError as e:
        raise GenericError(str(e)) from None


def _value(v: Any) -> Any:
    """A QAPI member's plain value (an enum member's string)."""
    return v.value if isinstance(v, enum.Enum) else v


def create_options(o: Any) -> luks.CreateOptions:
    """luks.CreateOptions from a QCryptoBlockCreateOptionsLUKS (or a type
    that extends it, such as BlockdevCreateOptionsLUKS)."""
    d = luks.CreateOptions()
    given = {"cipher_alg": o.cipher_alg, "cipher_mode": o.cipher_mode,
             "ivgen_alg": o.ivgen_alg, "ivgen_hash_alg": o.ivgen_hash_alg,
             "hash_alg": o.hash_alg, "iter_time": o.iter_time}
    for name, v in given.items():
        if v is not None:
            setattr(d, name, _value(v))
    return d


async def create_luks(graph: BlockGraph, o: Any,
                      prefix: str = "") -> tuple[luks.LuksHeader, list[tuple[int, bytes]], bytes]:
    """A new LUKS header for blockdev-create options ``o``: (header,
    [(offset, bytes)] to write, master key).  PBKDF2 runs in a thread."""
    secret_id = o.key_secret
    if secret_id is None:
        raise GenericError(f"Parameter '{prefix}key-secret' is required for cipher")
    password = secretmod.lookup_utf8(graph, secret_id)
    opts = create_options(o)
    try:
        return await trio.to_thread.run_sync(luks.create, opts, password)
    except luks.LuksError as e:
        raise GenericError(str(e)) from None


async def amend_luks(graph: BlockGraph, hdr: luks.LuksHeader, read: ReadPlain, o: Any, *,
                     open_secret: str,
                     force: bool) -> list[tuple[int, bytes]]:
    """x-blockdev-amend of a LUKS header (a QCryptoBlockAmendOptionsLUKS
    ``o``): the checks and texts of QEMU, then :func:`luks.amend`.  Returns
    the writes to make, offsets from the header."""
    active = _value(o.state) == "active"
    new, old = o.new_secret, o.old_secret
    iter_time = o.iter_time
    if active:
        if new is None:
            raise GenericError("'new-secret' is required to activate a keyslot")
        if old is not None:
            raise GenericError("'old-secret' must not be given when activating keyslots")
    else:
        if new is not None:
            raise GenericError("'new-secret' must not be given when erasing keyslots")
        if iter_time is not None:
            raise GenericError("'iter-time' must not be given when erasing keyslots")
    unlock_id = o.secret or open_secret
    try:
        return await luks.amend(
            hdr, _as_bytes(read), active=active,
            unlock_password=secretmod.lookup_utf8(graph, unlock_id) if active else b"",
            new_password=secretmod.lookup_utf8(graph, new) if new is not None else None,
            old_password=secretmod.lookup_utf8(graph, old) if old is not None else None,
            keyslot=o.keyslot, iter_time=iter_time if iter_time is not None else 2000,
            force=force)
    except luks.LuksError as e:
        raise GenericError(str(e)) from None
