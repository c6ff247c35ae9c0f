"""Sector ciphers: what dm-crypt and QEMU's crypto/block.c apply to a disk.

A disk is encrypted sector by sector (512 bytes); each sector gets its own
IV from its sector number (the "ivgen": ``plain`` is the number's low 32
bits, ``plain64`` all 64, ``essiv`` the plain64 value encrypted with a key
hashed from the master key), little-endian and zero-padded to the cipher's
block size.  The modes are AES in XTS (IEEE 1619; the IV is the tweak, the
key is data key then tweak key) or CBC.

Python-level speed matters here (a 64 KiB cluster is 128 sectors), so no
mode creates a cipher object per sector: XTS computes every tweak with one
ECB call over the IVs, multiplies them by the powers of alpha with
lane-parallel big-integer arithmetic, and encrypts the whole request with
one ECB call; CBC decrypts in one ECB call and encrypts a column of blocks
(block j of every sector) per call.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

# what sectors arrive as: the caller's buffer, not copied
Data = bytes | bytearray | memoryview

SECTOR = 512
_BLOCK = 16

CIPHER_KEY_BYTES = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


class CipherError(ValueError):
    """A cipher, mode, ivgen or hash we cannot use; the text is QEMU's."""


def hash_digest_len(alg: str) -> int:
    return hashlib.new(alg).digest_size


def _ecb(key: bytes) -> Cipher[modes.ECB]:
    # imported here: the cryptography package costs every start of the
    # daemon ~20 ms, and only encrypted images need it
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.ECB())


def _lanes(n: int, lane_bits: int, value: int) -> int:
    """``value`` repeated in ``n`` lanes of ``lane_bits`` bits."""
    return int.from_bytes(value.to_bytes(lane_bits // 8, "little") * n, "little")


def _xor(a: Data, b: Data) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


class SectorCipher:
    """Encrypts and decrypts whole sectors, given the first sector's number."""

    def __init__(self, alg: str, mode: str, ivgen: str, key: bytes,
                 ivgen_hash: str | None = None) -> None:
        if alg not in CIPHER_KEY_BYTES:
            raise CipherError(f"Cipher algorithm '{alg}' not supported")
        if mode not in ("xts", "cbc"):
            raise CipherError(f"Cipher mode '{mode}' not supported")
        if ivgen not in ("plain", "plain64", "essiv"):
            raise CipherError(f"Unknown ivgen algorithm '{ivgen}'")
        self.alg, self.mode, self.ivgen, self.ivgen_hash = alg, mode, ivgen, ivgen_hash
        nkey = CIPHER_KEY_BYTES[alg] * (2 if mode == "xts" else 1)
        if len(key) != nkey:
            raise CipherError(f"Cipher key length {len(key)} must be {nkey}")
        if mode == "xts":
            half = len(key) // 2
            self._data = _ecb(key[:half])
            self._tweak = _ecb(key[half:])
        else:
            self._data = _ecb(key)
        self._essiv = None
        if ivgen == "essiv":
            if ivgen_hash is None:
                raise CipherError("Missing ivgen hash algorithm")
            salt = hashlib.new(ivgen_hash, key).digest()
            if len(salt) not in (16, 24, 32):
                raise CipherError(f"Hash '{ivgen_hash}' cannot make an ESSIV key")
            self._essiv = _ecb(salt)

    # -- IVs ---------------------------------------------------------------
    def ivs(self, sector: int, n: int) -> bytes:
        """The IVs of ``n`` sectors from ``sector``, 16 bytes each."""
        if self.ivgen == "plain":
            nums = [(s & 0xFFFFFFFF) for s in range(sector, sector + n)]
        else:
            nums = [(s & 0xFFFFFFFFFFFFFFFF) for s in range(sector, sector + n)]
        out = bytearray(16 * n)
        mv = memoryview(out).cast("Q")
        mv[0::2] = memoryview(struct.pack(f"<{n}Q", *nums)).cast("Q")
        if self._essiv is not None:
            return self._essiv.encryptor().update(bytes(out))
        return bytes(out)

    # -- XTS -----------------------------------------------------------------
    def _xts_tweaks(self, sector: int, n: int) -> bytes:
        """The XTS tweak of every 16-byte block of ``n`` sectors."""
        t0 = self._tweak.encryptor().update(self.ivs(sector, n))
        per = SECTOR // _BLOCK
        lsb = _lanes(n, 128, 1)
        nottop = _lanes(n, 128, (1 << 127) - 1)
        x = int.from_bytes(t0, "little")
        out = bytearray(n * SECTOR)
        view = memoryview(out).cast("Q")
        stride = SECTOR // 8
        for j in range(per):
            if j:
                # multiply every lane by alpha in GF(2^128) (x^128 + x^7 + x^2 + x + 1)
                x = ((x & nottop) << 1) ^ (((x >> 127) & lsb) * 0x87)
            row = memoryview(x.to_bytes(16 * n, "little")).cast("Q")
            view[2 * j::stride] = row[0::2]
            view[2 * j + 1::stride] = row[1::2]
        return bytes(out)

    # -- the interface -----------------------------------------------------
    def encrypt(self, sector: int, data: Data) -> bytes:
        """``data`` (a whole number of sectors) encrypted, first sector ``sector``."""
        n = len(data) // SECTOR
        if not n:
            return b""
        if self.mode == "xts":
            t = self._xts_tweaks(sector, n)
            return _xor(self._data.encryptor().update(_xor(data, t)), t)
        return self._cbc_encrypt(sector, n, data)

    def decrypt(self, sector: int, data: Data) -> bytes:
        n = len(data) // SECTOR
        if not n:
            return b""
        if self.mode == "xts":
            t = self._xts_tweaks(sector, n)
            return _xor(self._data.decryptor().update(_xor(data, t)), t)
        # CBC: P[i] = D(C[i]) ^ C[i-1], with the sector's IV before its first block
        prev = bytearray(len(data))
        prev[_BLOCK:] = data[:-_BLOCK]
        pv = memoryview(prev).cast("Q")
        iv = memoryview(self.ivs(sector, n)).cast("Q")
        stride = SECTOR // 8
        pv[0::stride] = iv[0::2]
        pv[1::stride] = iv[1::2]
        return _xor(self._data.decryptor().update(bytes(data)), prev)

    def _cbc_encrypt(self, sector: int, n: int, data: Data) -> bytes:
        # column by column: block j of every sector depends on block j-1
        src = memoryview(bytes(data)).cast("Q")
        out = bytearray(len(data))
        dst = memoryview(out).cast("Q")
        stride = SECTOR // 8
        enc = self._data.encryptor()
        prev = self.ivs(sector, n)
        col = bytearray(16 * n)
        cv = memoryview(col).cast("Q")
        for j in range(SECTOR // _BLOCK):
            cv[0::2] = src[2 * j::stride]
            cv[1::2] = src[2 * j + 1::stride]
            prev = enc.update(_xor(col, prev))
            pv = memoryview(prev).cast("Q")
            dst[2 * j::stride] = pv[0::2]
            dst[2 * j + 1::stride] = pv[1::2]
        return bytes(out)
