"""Encrypted qcow2 (qcow2.rst: "crypt_method", "Full disk encryption header pointer").

``crypt_method`` 2 is LUKS: the header extension 0x0537be77 holds the
offset and length of a LUKS1 header area (header and key slots, no
payload) stored in clusters of the image file; the master key it unlocks
encrypts every data cluster, each 512-byte sector with its *host* offset
in the image file as the sector number (QEMU's ``crypt_physical_offset``:
a guest sector moved to another cluster is re-encrypted).

``crypt_method`` 1 is the legacy AES-CBC scheme: the key is the first 16
bytes of the passphrase (zero-padded), the IV the *guest* sector number
(plain64).  qemu-storage-daemon 7.2 still opens and writes such images
(only system emulators refuse them), so qsd-trio does too; nothing checks
the passphrase, so a wrong one reads garbage, as in QEMU.

Metadata is never encrypted, and zero or unallocated clusters read as
zeroes without decryption.  :class:`Qcow2Crypto` is what the driver calls
around its data-cluster I/O; :func:`open_encryption` and
:func:`setup_encryption` handle opening and ``blockdev-create``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ...crypto import luks
from ...crypto import secrets as secretmod
from ...crypto.cipher import SECTOR, SectorCipher
from ...qapi.errors import GenericError
from .. import crypt
from ..node import json_filename
from .header import EXT_CRYPTO, Header

if TYPE_CHECKING:
    from ..node import BlockNode
    from .driver import Qcow2Node

CRYPT_AES = 1
CRYPT_LUKS = 2
_NAMES = {CRYPT_AES: "aes", CRYPT_LUKS: "luks"}


class Qcow2Crypto:
    """The cipher of an open encrypted image and what query commands show."""

    def __init__(self, method: int, cipher: SectorCipher, key_secret: str,
                 header: luks.LuksHeader | None = None) -> None:
        self.method = method
        self.cipher = cipher
        self.key_secret = key_secret
        self.header = header
        self.physical = method == CRYPT_LUKS
        self.writes = crypt.SectorWrites()

    def decrypt(self, goff: int, host: int, data: bytes | bytearray | memoryview) -> bytes:
        """Plaintext of whole sectors read from ``host`` for guest ``goff``."""
        return self.cipher.decrypt((host if self.physical else goff) // SECTOR, data)

    def encrypt(self, goff: int, host: int, data: bytes | bytearray | memoryview) -> bytes:
        """Ciphertext of whole sectors to be written at ``host`` for guest ``goff``."""
        return self.cipher.encrypt((host if self.physical else goff) // SECTOR, data)

    async def read(self, data_node: BlockNode, goff: int, host: int, n: int) -> bytes:
        """Plaintext of guest ``goff``..``goff+n``, stored contiguously from
        ``host`` (clusters are sector-aligned in both spaces): the whole
        sectors around it are read and decrypted."""
        a = crypt.align_down(goff)
        delta = goff - a
        raw = bytes(await data_node.read(host - delta, crypt.align_up(goff + n) - a))
        raw += bytes(-len(raw) % SECTOR)
        return self.decrypt(a, host - delta, raw)[delta:delta + n]

    async def pwritev(self, node: Qcow2Node, offset: int, data: memoryview, fua: bool) -> None:
        """A guest write as whole sectors (the node's own write path, which
        encrypts each piece where it lands)."""
        async def write(a: int, buf: bytes | bytearray | memoryview) -> None:
            await node._co_pwritev(a, memoryview(buf), False, _sectors=True)

        await crypt.write_sectors(self.writes, offset, data, node._co_preadv, write, node.size)
        if fua:
            await node._co_flush()

    def info(self) -> dict[str, Any]:
        """ImageInfoSpecificQCow2's ``encrypt`` member."""
        if self.header is None:
            return {"format": "aes"}
        d = self.header.info()
        out: dict[str, Any] = {}
        for k, v in d.items():
            out[k] = v
            if k == "uuid":
                out["format"] = "luks"  # where QEMU's visitor puts the tag
        return out

    def json_filename(self, file_node: BlockNode) -> str:
        """QEMU spells the node out: the key secret is a strong option."""
        return json_filename({"driver": "qcow2", "file": file_node.full_open_options(),
                              "encrypt.key-secret": self.key_secret})


def _encrypt_opts(options: dict[str, Any]) -> tuple[str | None, str | None]:
    enc = options.get("encrypt")
    if enc is None:
        return None, None
    if not isinstance(enc, dict):  # a BlockdevQcow2Encryption variant
        return enc.format.value, enc.key_secret
    return enc.get("format"), enc.get("key-secret")


async def open_encryption(node: Qcow2Node, h: Header,
                          options: dict[str, Any]) -> Qcow2Crypto | None:
    """The image's encryption, unlocked with ``encrypt.key-secret``; None for
    an unencrypted image.  Errors carry QEMU's texts."""
    fmt, secret_id = _encrypt_opts(options)
    method = h.crypt_method
    if not method:
        if fmt is not None:
            raise GenericError(f"No encryption in image header, but options specified "
                               f"format '{fmt}'")
        return None
    name = _NAMES.get(method)
    if name is None:
        raise GenericError(f"Unsupported encryption method: {method}")
    if fmt is not None and fmt != name:
        raise GenericError(f"Header reported '{name}' encryption format but options "
                           f"specify '{fmt}'")
    if method == CRYPT_AES:
        if secret_id is None:
            raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
        password = secretmod.lookup_utf8(node.graph, secret_id)
        key = password[:16].ljust(16, b"\0")
        return Qcow2Crypto(method, SectorCipher("aes-128", "cbc", "plain64", key), secret_id)

    ext = h.ext(EXT_CRYPTO)
    if ext is None or len(ext) < 16:
        raise GenericError("Missing CRYPTO header for crypt method 2")
    off, length = struct.unpack_from(">QQ", ext)
    file = node.file

    async def read(o: int, n: int) -> bytes | bytearray | memoryview:
        if o + n > length:
            raise GenericError("Request for data outside of extension header")
        return await file.read(off + o, n)

    if secret_id is None:
        raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
    hdr, cipher = await crypt.open_luks(node.graph, secret_id, read, prefix="encrypt.")
    return Qcow2Crypto(method, cipher, secret_id, hdr)


async def setup_encryption(node: Qcow2Node, o: Any) -> None:
    """blockdev-create: give the freshly created image ``node`` (open, empty)
    a LUKS header in new clusters, as QEMU's qcow2_set_up_encryption does."""
    fmt, secret_id = o.format.value, o.key_secret  # a QCryptoBlockCreateOptions
    if fmt == "qcow":
        # legacy AES: only the header says so (qemu-img creates these;
        # qemu-storage-daemon 7.2 aborts on an assertion instead)
        if secret_id is None:
            raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
        key = secretmod.lookup_utf8(node.graph, secret_id)[:16].ljust(16, b"\0")
        node.h.crypt_method = CRYPT_AES
        await node.rewrite_header()
        node.crypto = Qcow2Crypto(CRYPT_AES, SectorCipher("aes-128", "cbc", "plain64", key),
                                  secret_id)
        node.encrypted = True
        return
    if fmt != "luks":
        raise GenericError(f"Unsupported encryption format '{fmt}'")
    if secret_id is None:
        raise GenericError("Parameter 'encrypt.key-secret' is required for cipher")
    hdr, pieces, key = await crypt.create_luks(node.graph, o, prefix="encrypt.")
    size = hdr.payload_offset * SECTOR
    clusters = -(-size // node.cs)
    host = await node.refs.alloc(clusters)
    # zeroed first: the unused key slots are never written
    await node.file.write_zeroes(host, clusters * node.cs)
    for off, data in pieces:
        await node.file.write(host + off, data)
    node.h.crypt_method = CRYPT_LUKS
    node.h.set_ext(EXT_CRYPTO, struct.pack(">QQ", host, size))
    await node.rewrite_header()
    node.crypto = Qcow2Crypto(CRYPT_LUKS, hdr.sector_cipher(key), secret_id, hdr)
    node.encrypted = True


async def amend_encryption(node: Qcow2Node, o: Any, force: bool) -> None:
    """x-blockdev-amend with ``encrypt`` (QCryptoBlockAmendOptions): add or
    erase key slots of the LUKS header in the image file."""
    c = node.crypto
    if c is None:
        raise GenericError("image is not encrypted, can't amend")
    if c.header is None:
        raise GenericError("Only LUKS encryption options can be amended for qcow2 with "
                           "blockdev-amend")
    ext = node.h.ext(EXT_CRYPTO)
    if ext is None:  # opened as LUKS: the header has it
        raise GenericError("Missing CRYPTO header for crypt method 2")
    off, length = struct.unpack_from(">QQ", ext)

    async def read(o_: int, n: int) -> bytes | bytearray | memoryview:
        return await node.file.read(off + o_, n)

    writes = await crypt.amend_luks(node.graph, c.header, read, o,
                                    open_secret=c.key_secret, force=force)
    for o_, data in writes:
        if o_ + len(data) > length:
            raise GenericError("Request for data outside of extension header")
    for o_, data in writes:
        await node.file.write(off + o_, data)
    await node.file.flush()


def with_encrypt_info(spec: dict[str, Any], c: Qcow2Crypto) -> dict[str, Any]:
    """ImageInfoSpecificQCow2 with ``encrypt`` where QEMU lists it (after
    ``refcount-bits``)."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        out[k] = v
        if k == "refcount-bits":
            out["encrypt"] = c.info()
    return out
