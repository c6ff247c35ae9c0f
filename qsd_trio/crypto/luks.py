"""LUKS1: the on-disk header, key slots, the AF splitter and PBKDF2.

The layout is the LUKS1 specification's (version 1.2.3), as QEMU's
crypto/block-luks.c writes it: a 592-byte big-endian header in sector 0
(magic, version, cipher name, cipher mode such as ``xts-plain64`` or
``cbc-essiv:sha256``, hash, payload offset in sectors, key length, the
master key digest with its salt and PBKDF2 iterations, a UUID, then eight
48-byte key slots), each active slot's key material at its own sector
offset, then the payload.

Unlocking a slot: PBKDF2(hash, passphrase, slot salt, slot iterations)
gives a key that decrypts the slot's key material (the master key split
into ``stripes`` pieces by the AF splitter, encrypted with the payload's
cipher, sectors numbered from 0); merging the pieces gives a candidate
master key, and PBKDF2 of the candidate must equal the header's digest.

Everything here is synchronous and pure; the callers read and write the
header through their own node (``read(offset, length)`` callables).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid as uuidmod
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from .cipher import CIPHER_KEY_BYTES, HASHES, SECTOR, CipherError, SectorCipher

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
HEADER_SIZE = 592
NUM_SLOTS = 8
SALT_LEN = 32
DIGEST_LEN = 20
STRIPES = 4000
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
# QEMU aligns key material and the payload to 4 KiB, the first slot at 4 KiB
ALIGN = 4096
MIN_SLOT_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")


class LuksError(ValueError):
    """Anything that stops an open or create; the text is QEMU's."""


@attrs.define
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset: int = 0  # sectors
    stripes: int = STRIPES


@attrs.define
class LuksHeader:
    cipher_name: str = "aes"
    cipher_mode: str = "xts-plain64"
    hash_spec: str = "sha256"
    payload_offset: int = 0  # sectors
    key_bytes: int = 64
    mk_digest: bytes = bytes(DIGEST_LEN)
    mk_digest_salt: bytes = bytes(SALT_LEN)
    mk_digest_iterations: int = 0
    uuid: str = ""
    slots: list[KeySlot] = attrs.Factory(lambda: [KeySlot() for _ in range(NUM_SLOTS)])

    # -- the cipher this header names ----------------------------------------
    @property
    def mode(self) -> str:
        return self.cipher_mode.split("-", 1)[0]

    @property
    def ivgen(self) -> str:
        rest = self.cipher_mode.split("-", 1)[1] if "-" in self.cipher_mode else "plain"
        return rest.split(":", 1)[0]

    @property
    def ivgen_hash(self) -> str | None:
        rest = self.cipher_mode.split("-", 1)[1] if "-" in self.cipher_mode else ""
        return rest.split(":", 1)[1] if ":" in rest else None

    @property
    def cipher_alg(self) -> str:
        if self.cipher_name != "aes":
            raise LuksError(f"Algorithm '{self.cipher_name}' with key size "
                            f"{self.key_bytes} bytes not supported")
        key = self.key_bytes // 2 if self.mode == "xts" else self.key_bytes
        alg = f"aes-{key * 8}"
        if alg not in CIPHER_KEY_BYTES:
            raise LuksError(f"Algorithm '{self.cipher_name}' with key size "
                            f"{self.key_bytes} bytes not supported")
        return alg

    def sector_cipher(self, key: bytes) -> SectorCipher:
        try:
            return SectorCipher(self.cipher_alg, self.mode, self.ivgen, key, self.ivgen_hash)
        except CipherError as e:
            raise LuksError(str(e)) from None

    def pack(self) -> bytes:
        out = bytearray(_HDR.pack(
            MAGIC, VERSION, self.cipher_name.encode(), self.cipher_mode.encode(),
            self.hash_spec.encode(), self.payload_offset, self.key_bytes, self.mk_digest,
            self.mk_digest_salt, self.mk_digest_iterations, self.uuid.encode()))
        for s in self.slots:
            out += _SLOT.pack(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
        return bytes(out)

    def info(self) -> dict[str, Any]:
        """QCryptoBlockInfoLUKS members, in QEMU's order."""
        d: dict[str, Any] = {"ivgen-alg": self.ivgen}
        if self.ivgen_hash is not None:
            d["ivgen-hash-alg"] = self.ivgen_hash
        d.update({"hash-alg": self.hash_spec, "cipher-alg": self.cipher_alg,
                  "uuid": self.uuid, "cipher-mode": self.mode})
        slots = []
        for s in self.slots:
            if s.active == SLOT_ENABLED:
                slots.append({"active": True, "iters": s.iterations,
                              "key-offset": s.key_offset * SECTOR, "stripes": s.stripes})
            else:
                slots.append({"active": False, "key-offset": s.key_offset * SECTOR})
        d["slots"] = slots
        d["payload-offset"] = self.payload_offset * SECTOR
        d["master-key-iters"] = self.mk_digest_iterations
        return d


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_header(buf: bytes) -> LuksHeader:
    """The header in ``buf`` (at least 592 bytes), checked as QEMU checks it."""
    if len(buf) < HEADER_SIZE or buf[:6] != MAGIC:
        raise LuksError("Volume is not in LUKS format")
    f = _HDR.unpack_from(buf, 0)
    if f[1] != VERSION:
        raise LuksError(f"LUKS version {f[1]} is not supported")
    h = LuksHeader(cipher_name=_cstr(f[2]), cipher_mode=_cstr(f[3]), hash_spec=_cstr(f[4]),
                   payload_offset=f[5], key_bytes=f[6], mk_digest=f[7], mk_digest_salt=f[8],
                   mk_digest_iterations=f[9], uuid=_cstr(f[10]), slots=[])
    for i in range(NUM_SLOTS):
        a, it, salt, off, stripes = _SLOT.unpack_from(buf, _HDR.size + i * _SLOT.size)
        h.slots.append(KeySlot(a, it, salt, off, stripes))
    if h.hash_spec not in HASHES:
        raise LuksError(f"Unknown hash algorithm '{h.hash_spec}'")
    if h.mode not in ("xts", "cbc") or h.ivgen not in ("plain", "plain64", "essiv"):
        raise LuksError(f"Unsupported cipher mode '{h.cipher_mode}'")
    h.cipher_alg  # noqa: B018 - raises for an unsupported cipher
    for i, s in enumerate(h.slots):
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise LuksError(f"Keyslot {i} state (active/disable) is corrupted")
        if s.active == SLOT_ENABLED and s.stripes != STRIPES:
            raise LuksError(f"Keyslot {i} is corrupted (stripes {s.stripes} != {STRIPES})")
    return h


# -- AF splitter (LUKS1 spec, "AF-Splitter") ------------------------------------------

def _diffuse(block: bytes, hash_name: str) -> bytes:
    dlen = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i in range(0, len(block), dlen):
        chunk = block[i:i + dlen]
        out += hashlib.new(hash_name, struct.pack(">I", i // dlen) + chunk).digest()[:len(chunk)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_merge(split: bytes, block_len: int, stripes: int, hash_name: str) -> bytes:
    buf = bytes(block_len)
    for i in range(stripes - 1):
        buf = _diffuse(_xor(buf, split[i * block_len:(i + 1) * block_len]), hash_name)
    return _xor(buf, split[(stripes - 1) * block_len:stripes * block_len])


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    n = len(key)
    out = bytearray()
    buf = bytes(n)
    for _ in range(stripes - 1):
        r = os.urandom(n)
        out += r
        buf = _diffuse(_xor(buf, r), hash_name)
    out += _xor(buf, key)
    return bytes(out)


# -- PBKDF2 ------------------------------------------------------------------------

def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, n: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, n)


def count_iters(hash_name: str, key_len: int, out_len: int) -> int:
    """PBKDF2 iterations per second of this thread's CPU time (QEMU's
    qcrypto_pbkdf2_count_iters measures RUSAGE_THREAD the same way): runs
    of doubling length until one takes 50 ms, scaled to a second."""
    iters = 1 << 15
    pw, salt = bytes(key_len), bytes(SALT_LEN)
    while True:
        t = time.thread_time()
        pbkdf2(hash_name, pw, salt, iters, out_len)
        dt = time.thread_time() - t
        if dt >= 0.05 or iters >= 1 << 30:
            return max(1, int(iters / max(dt, 1e-6)))
        iters *= 2


def _split_len(h: LuksHeader, s: KeySlot) -> int:
    n = h.key_bytes * s.stripes
    return -(-n // SECTOR) * SECTOR


ReadFn = Callable[[int, int], Awaitable[bytes]]


async def unlock(h: LuksHeader, password: bytes, read: ReadFn) -> bytes:
    """The master key, from the first slot that ``password`` opens.

    ``read(offset, length)`` reads the volume's header area.  Raises
    :class:`LuksError` ("Invalid password, cannot unlock any keyslot").
    """
    import trio

    for s in h.slots:
        if s.active != SLOT_ENABLED:
            continue
        material = await read(s.key_offset * SECTOR, _split_len(h, s))
        key = await trio.to_thread.run_sync(_try_slot, h, s, password, bytes(material))
        if key is not None:
            return key
    raise LuksError("Invalid password, cannot unlock any keyslot")


def _try_slot(h: LuksHeader, s: KeySlot, password: bytes, material: bytes) -> bytes | None:
    slot_key = pbkdf2(h.hash_spec, password, s.salt, s.iterations, h.key_bytes)
    split = h.sector_cipher(slot_key).decrypt(0, material)
    mk = af_merge(split, h.key_bytes, s.stripes, h.hash_spec)
    digest = pbkdf2(h.hash_spec, mk, h.mk_digest_salt, h.mk_digest_iterations, DIGEST_LEN)
    return mk if digest == h.mk_digest else None


@attrs.define
class CreateOptions:
    """QCryptoBlockCreateOptionsLUKS, with QEMU's defaults."""
    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = 2000  # milliseconds


def create(opts: CreateOptions, password: bytes
           ) -> tuple[LuksHeader, list[tuple[int, bytes]], bytes]:
    """A new header with key slot 0 for ``password``.

    Returns (header, [(offset, bytes)] to write below the payload offset,
    master key).  The rest of the header area stays unwritten (sparse), as
    QEMU leaves it.
    Runs PBKDF2 benchmarks for ``iter_time``: call it from a worker thread.
    """
    if opts.cipher_alg not in CIPHER_KEY_BYTES:
        raise LuksError(f"Cipher algorithm '{opts.cipher_alg}' not supported")
    if opts.hash_alg not in HASHES:
        raise LuksError(f"Hash algorithm '{opts.hash_alg}' not supported")
    ivhash = opts.ivgen_hash_alg
    if opts.ivgen_alg == "essiv":
        ivhash = ivhash or "sha256"
        mode = f"{opts.cipher_mode}-essiv:{ivhash}"
    else:
        mode = f"{opts.cipher_mode}-{opts.ivgen_alg}"
    key_bytes = CIPHER_KEY_BYTES[opts.cipher_alg] * (2 if opts.cipher_mode == "xts" else 1)
    h = LuksHeader(cipher_name="aes", cipher_mode=mode, hash_spec=opts.hash_alg,
                   key_bytes=key_bytes, uuid=str(uuidmod.uuid4()), slots=[])
    split_sectors = -(-key_bytes * STRIPES // SECTOR)
    slot_sectors = -(-split_sectors * SECTOR // ALIGN) * ALIGN // SECTOR
    for i in range(NUM_SLOTS):
        h.slots.append(KeySlot(SLOT_DISABLED, 0, bytes(SALT_LEN),
                               ALIGN // SECTOR + i * slot_sectors, STRIPES))
    h.payload_offset = ALIGN // SECTOR + NUM_SLOTS * slot_sectors
    cipher = h.sector_cipher(os.urandom(key_bytes))  # validates mode and ivgen
    del cipher
    mk = os.urandom(key_bytes)
    h.mk_digest_salt = os.urandom(SALT_LEN)
    per_sec = count_iters(h.hash_spec, key_bytes, DIGEST_LEN)
    h.mk_digest_iterations = max(per_sec * opts.iter_time // 1000 // 8, MIN_MASTER_KEY_ITERS)
    h.mk_digest = pbkdf2(h.hash_spec, mk, h.mk_digest_salt, h.mk_digest_iterations, DIGEST_LEN)

    s = h.slots[0]
    s.salt = os.urandom(SALT_LEN)
    per_sec = count_iters(h.hash_spec, len(password) or 1, key_bytes)
    s.iterations = max(per_sec * opts.iter_time // 1000, MIN_SLOT_ITERS)
    slot_key = pbkdf2(h.hash_spec, password, s.salt, s.iterations, key_bytes)
    split = af_split(mk, STRIPES, h.hash_spec)
    split = split.ljust(split_sectors * SECTOR, b"\0")
    material = h.sector_cipher(slot_key).encrypt(0, split)
    s.active = SLOT_ENABLED

    return h, [(0, h.pack()), (s.key_offset * SECTOR, material)], mk


# -- amending key slots (x-blockdev-amend) ------------------------------------------

def _store_key(h: LuksHeader, i: int, mk: bytes, password: bytes,
               iter_time: int) -> tuple[int, bytes]:
    """Key slot ``i`` made active for ``password``: (offset, key material)."""
    s = h.slots[i]
    s.salt = os.urandom(SALT_LEN)
    s.stripes = STRIPES
    per_sec = count_iters(h.hash_spec, len(password) or 1, h.key_bytes)
    s.iterations = max(per_sec * iter_time // 1000, MIN_SLOT_ITERS)
    slot_key = pbkdf2(h.hash_spec, password, s.salt, s.iterations, h.key_bytes)
    split = af_split(mk, STRIPES, h.hash_spec).ljust(_split_len(h, s), b"\0")
    s.active = SLOT_ENABLED
    return s.key_offset * SECTOR, h.sector_cipher(slot_key).encrypt(0, split)


def _erase_key(h: LuksHeader, i: int) -> tuple[int, bytes]:
    """Key slot ``i`` made inactive; its key material overwritten with noise."""
    s = h.slots[i]
    n = _split_len(h, s)
    s.active, s.iterations, s.salt = SLOT_DISABLED, 0, bytes(SALT_LEN)
    return s.key_offset * SECTOR, os.urandom(n)


async def _slot_matches(h: LuksHeader, i: int, password: bytes, read: ReadFn) -> bool:
    import trio

    s = h.slots[i]
    material = bytes(await read(s.key_offset * SECTOR, _split_len(h, s)))
    return await trio.to_thread.run_sync(_try_slot, h, s, password, material) is not None


async def amend(h: LuksHeader, read: ReadFn, *, active: bool, unlock_password: bytes,
                new_password: bytes | None, old_password: bytes | None,
                keyslot: int | None, iter_time: int, force: bool) -> list[tuple[int, bytes]]:
    """QEMU's qcrypto_block_luks_amend_options on ``h`` (changed in place).

    The caller checked which secrets were given.  Returns the writes
    [(offset, bytes)] that make the change on disk, the header last.
    """
    import trio

    writes = []
    if keyslot is not None and not 0 <= keyslot < NUM_SLOTS:
        raise LuksError(f"Invalid keyslot {keyslot} specified, must be between 0 "
                        f"and {NUM_SLOTS - 1}")
    active_slots = [i for i, s in enumerate(h.slots) if s.active == SLOT_ENABLED]
    if active:
        if keyslot is None:
            free = [i for i in range(NUM_SLOTS) if i not in active_slots]
            if not free:
                raise LuksError("Can't add a keyslot - all keyslots are in use")
            keyslot = free[0]
        elif keyslot in active_slots and not force:
            raise LuksError(f"Refusing to overwrite active keyslot {keyslot} - "
                            "please erase it first")
        mk = await unlock(h, unlock_password, read)
        assert new_password is not None
        writes.append(await trio.to_thread.run_sync(
            _store_key, h, keyslot, mk, new_password, iter_time))
    else:
        if keyslot is not None:
            if keyslot not in active_slots:
                raise LuksError(f"Given keyslot {keyslot} is already erased (inactive) ")
            if old_password is not None and not await _slot_matches(h, keyslot,
                                                                    old_password, read):
                raise LuksError(f"Given keyslot {keyslot} doesn't contain the given "
                                "old password for erase operation")
            if active_slots == [keyslot] and not force:
                raise LuksError(f"Attempt to erase the only active keyslot {keyslot} "
                                "which will erase all the data in the image "
                                "irreversibly - refusing operation")
            erase = [keyslot]
        elif old_password is not None:
            erase = [i for i in active_slots
                     if await _slot_matches(h, i, old_password, read)]
            if not erase:
                raise LuksError("No keyslots match given (old) password for erase operation")
            if erase == active_slots and not force:
                raise LuksError("All the active keyslots match the (old) password that was "
                                "given and erasing them will erase all the data in the "
                                "image irreversibly - refusing operation")
        else:
            raise LuksError("To erase keyslot(s), either explicit keyslot index or the "
                            "password currently contained in them must be given")
        for i in erase:
            writes.append(_erase_key(h, i))
    writes.append((0, h.pack()))
    return writes
