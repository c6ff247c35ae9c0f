"""LUKS1 and the sector ciphers, as pure code: each batched cipher against
one cryptography cipher object per sector (the textbook construction),
the AF splitter, header round trips, unlocking and secret decoding."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qsd_trio.crypto import luks
from qsd_trio.crypto.cipher import SectorCipher
from qsd_trio.objects.secret import b64decode
from qsd_trio.qapi.errors import GenericError


def _reference(alg, mode, ivgen, key, sector, data, ivhash, decrypt):
    out = b""
    for i in range(len(data) // 512):
        s = sector + i
        iv = ((s & 0xFFFFFFFF) if ivgen == "plain" else s & (2**64 - 1)).to_bytes(16, "little")
        if ivgen == "essiv":
            essiv = hashlib.new(ivhash, key).digest()
            iv = Cipher(algorithms.AES(essiv), modes.ECB()).encryptor().update(iv)
        c = Cipher(algorithms.AES(key), modes.XTS(iv) if mode == "xts" else modes.CBC(iv))
        c = c.decryptor() if decrypt else c.encryptor()
        out += c.update(data[i * 512:(i + 1) * 512])
    return out


MODES = [(alg, mode, ivgen) for alg in ("aes-128", "aes-192", "aes-256")
         for mode in ("xts", "cbc") for ivgen in ("plain", "plain64", "essiv")
         if not (alg == "aes-192" and mode == "xts")]


@pytest.mark.parametrize("alg,mode,ivgen", MODES)
def test_sector_cipher_matches_per_sector_reference(alg, mode, ivgen):
    nkey = int(alg[4:]) // 8 * (2 if mode == "xts" else 1)
    key = os.urandom(nkey)
    ivhash = "sha256" if ivgen == "essiv" else None
    c = SectorCipher(alg, mode, ivgen, key, ivhash)
    data = os.urandom(512 * 9)
    sector = (1 << 32) - 4  # plain wraps at 2^32, plain64 does not
    enc = c.encrypt(sector, data)
    assert enc == _reference(alg, mode, ivgen, key, sector, data, ivhash, False)
    assert c.decrypt(sector, enc) == data
    assert c.decrypt(sector, enc[512:1024]) != data[:512]  # IVs differ per sector


def test_af_split_merge_round_trip():
    key = os.urandom(32)
    for h in ("sha1", "sha256", "sha512"):
        split = luks.af_split(key, 50, h)
        assert len(split) == 50 * 32
        assert luks.af_merge(split, 32, 50, h) == key
        damaged = bytes([split[0] ^ 1]) + split[1:]
        assert luks.af_merge(damaged, 32, 50, h) != key


async def test_create_parse_unlock():
    opts = luks.CreateOptions(cipher_alg="aes-128", cipher_mode="cbc", ivgen_alg="essiv",
                              hash_alg="sha1", iter_time=10)
    hdr, pieces, mk = await trio.to_thread.run_sync(luks.create, opts, b"pass")
    area = bytearray(hdr.payload_offset * 512)
    for off, data in pieces:
        area[off:off + len(data)] = data
    parsed = luks.parse_header(bytes(area))
    assert parsed == hdr
    assert parsed.cipher_mode == "cbc-essiv:sha256" and parsed.key_bytes == 16
    info = parsed.info()
    assert info["ivgen-hash-alg"] == "sha256" and info["cipher-alg"] == "aes-128"
    assert [s["active"] for s in info["slots"]] == [True] + [False] * 7
    assert info["slots"][0]["iters"] >= 1000 and info["master-key-iters"] >= 1000

    async def read(off, n):
        return bytes(area[off:off + n])

    assert await luks.unlock(parsed, b"pass", read) == mk
    with pytest.raises(luks.LuksError, match="Invalid password, cannot unlock any keyslot"):
        await luks.unlock(parsed, b"Pass", read)


def test_parse_rejects():
    with pytest.raises(luks.LuksError, match="Volume is not in LUKS format"):
        luks.parse_header(bytes(4096))
    hdr = luks.LuksHeader(uuid="x", payload_offset=4096)
    bad = bytearray(hdr.pack())
    bad[6:8] = b"\0\2"
    with pytest.raises(luks.LuksError, match="LUKS version 2 is not supported"):
        luks.parse_header(bytes(bad))


def test_secret_base64_like_qemu():
    assert b64decode("YWJj") == b"abc"
    assert b64decode("YWJjZA") == b"abcd"  # glib decodes unpadded input
    with pytest.raises(GenericError, match="Base64 data contains invalid characters"):
        b64decode("a$b")
