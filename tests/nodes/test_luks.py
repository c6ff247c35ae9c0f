"""The luks driver and encrypted qcow2 on the node API, against images made
and read by the real qemu-img and qemu-io (both directions), with the
conformance suite on top.  PBKDF2 runs with iter-time=10 to stay fast."""

from __future__ import annotations

import contextlib
import shutil

import pytest

from qsd_trio.crypto import secrets
from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.luks import create_luks_on
from qsd_trio.nodes.qcow2.create import create_qcow2
from qsd_trio.qapi import schema
from qsd_trio.qapi.errors import GenericError

from .conformance import check_block_node, pattern
from .qcow2_helpers import qemu_img, run

PW = "s3cret pass"
SECRET = ("--object", f"secret,id=sec0,data={PW}")
SIZE = 4 << 20


def img_opts(path, fmt: str) -> str:
    if fmt == "luks":
        return f"driver=luks,key-secret=sec0,file.filename={path}"
    if fmt == "aes":
        return f"driver=qcow2,encrypt.format=aes,encrypt.key-secret=sec0,file.filename={path}"
    return f"driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename={path}"


_TEMPLATES: dict = {}


def qemu_create(path, fmt: str, size: int = SIZE, *opts: str) -> None:
    """qemu-img create; each LUKS creation benchmarks PBKDF2 for a second
    whatever iter-time says, so equal requests copy the first image."""
    key = (fmt, size, opts)
    if key in _TEMPLATES:
        shutil.copyfile(_TEMPLATES[key], path)
        return
    _qemu_create(path, fmt, size, *opts)
    keep = path.with_name(path.name + ".template")
    shutil.copyfile(path, keep)
    _TEMPLATES[key] = keep


def _qemu_create(path, fmt: str, size: int, *opts: str) -> None:
    if fmt == "luks":
        o = ["key-secret=sec0", "iter-time=10", *opts]
        qemu_img("create", "-q", *SECRET, "-f", "luks", "-o", ",".join(o), str(path), str(size))
    elif fmt == "aes":
        qemu_img("create", "-q", *SECRET, "-f", "qcow2", "-o",
                 "encrypt.format=aes,encrypt.key-secret=sec0", str(path), str(size))
    else:
        o = ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10", *opts]
        qemu_img("create", "-q", *SECRET, "-f", "qcow2", "-o", ",".join(o), str(path), str(size))


def qemu_io(path, fmt: str, *cmds: str) -> str:
    args = ["qemu-io", *SECRET, "--image-opts"]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, img_opts(path, fmt))
    out = p.stdout + p.stderr
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    return out


def check_clean(path, fmt: str = "qcow2") -> None:
    """``qemu-img check`` (which needs the key to open the image) is clean."""
    p = qemu_img("check", *SECRET, "--image-opts", img_opts(path, fmt), check=False)
    assert p.returncode == 0 and "No errors were found" in p.stdout, p.stdout + p.stderr


def compare(path, fmt: str, model: bytes, tmp_path) -> None:
    ref = tmp_path / "model.raw"
    ref.write_bytes(bytes(model))
    qemu_img("compare", *SECRET, "--image-opts", img_opts(path, fmt),
             f"driver=raw,file.filename={ref}")


def node_opts(path, fmt: str, **extra) -> dict:
    f = {"driver": "file", "filename": str(path)}
    if fmt == "luks":
        return {"driver": "luks", "node-name": "top", "file": f, "key-secret": "sec0", **extra}
    enc = {"format": "aes" if fmt == "aes" else "luks", "key-secret": "sec0"}
    return {"driver": "qcow2", "node-name": "top", "file": f, "encrypt": enc, **extra}


@contextlib.asynccontextmanager
async def opened(path, fmt: str, **extra):
    graph = BlockGraph()
    secrets.register(graph, "sec0", PW.encode())
    node = await graph.add(node_opts(path, fmt, **extra))
    try:
        yield node
    finally:
        await graph.close_all()


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
async def test_conformance(tmp_path, fmt):
    template = tmp_path / "template"
    img = tmp_path / "img"
    qemu_create(template, fmt)
    if fmt == "luks":
        # a LUKS payload never written reads as noise: start from zeroes
        qemu_io(template, fmt, f"write -P 0 0 {SIZE}")

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        shutil.copyfile(template, img)
        async with opened(img, fmt, **{"read-only": read_only, "discard": "unmap"}) as node:
            yield node

    async def after_close(model):
        if fmt == "qcow2":
            check_clean(img)
        compare(img, fmt, model, tmp_path)

    # a grown LUKS payload is noise too (as in QEMU): resize is checked below
    await check_block_node(factory, after_close=after_close, can_resize=fmt == "qcow2")


@pytest.mark.parametrize("fmt", ["luks", "qcow2", "aes"])
async def test_qemu_writes_we_read_we_write_qemu_reads(tmp_path, fmt):
    img = tmp_path / "img"
    qemu_create(img, fmt, 1 << 20)
    qemu_io(img, fmt, "write -P 0x5a 0 65536", "write -P 0x33 70000 1000",
            "write -z 131072 65536")
    async with opened(img, fmt) as node:
        assert node.encrypted
        got = bytes(await node.read(0, 200000))
        assert got[:65536] == b"\x5a" * 65536
        assert got[70000:71000] == b"\x33" * 1000
        assert got[131072:196608] == bytes(65536)
        # unaligned writes: read-modify-write of the edge sectors
        await node.write(100, pattern(1, 1000))
        await node.write(65535, b"xy")
        await node.write(300000, pattern(2, 140000))
        await node.flush()
    qemu_io(img, fmt, "read -P 0x5a 0 100", "read -P 0x5a 1100 64435",
            "read -P 0x33 70000 1000")
    if fmt != "luks":
        check_clean(img, fmt)
    async with opened(img, fmt, **{"read-only": True}) as node:
        assert bytes(await node.read(100, 1000)) == pattern(1, 1000)
        assert bytes(await node.read(65535, 2)) == b"xy"
        assert bytes(await node.read(300000, 140000)) == pattern(2, 140000)
    # and qemu-io sees the same bytes
    out = run("qemu-io", *SECRET, "--image-opts", "-c", "read -v 65534 3",
              img_opts(img, fmt)).stdout
    assert "5a 78 79" in out


# (QEMU 7.2 cannot create aes-192 volumes: 24-byte keys times 4000 stripes
# are not a whole number of sectors, and qemu-img aborts)
LUKS_VARIANTS = [
    ("aes-128", "xts", "plain", None, "sha1"),
    ("aes-256", "cbc", "essiv", "sha256", "sha256"),
    ("aes-256", "cbc", "plain64", None, "sha512"),
]


@pytest.mark.parametrize("alg,mode,ivgen,ivhash,hash_", LUKS_VARIANTS)
async def test_luks_cipher_variants_both_ways(tmp_path, alg, mode, ivgen, ivhash, hash_):
    opts = [f"cipher-alg={alg}", f"cipher-mode={mode}", f"ivgen-alg={ivgen}",
            f"hash-alg={hash_}"] + ([f"ivgen-hash-alg={ivhash}"] if ivhash else [])
    theirs = tmp_path / "theirs.luks"
    qemu_create(theirs, "luks", 1 << 20, *opts)
    qemu_io(theirs, "luks", "write -P 0x61 4096 8192")
    async with opened(theirs, "luks") as node:
        assert bytes(await node.read(4096, 8192)) == b"\x61" * 8192
        info = node.info_extra()["format-specific"]["data"]
        assert (info["cipher-alg"], info["cipher-mode"], info["ivgen-alg"],
                info["hash-alg"]) == (alg, mode, ivgen, hash_)

    # blockdev-create's path: a header qemu-io can unlock, payload it can read
    ours = tmp_path / "ours.luks"
    ours.write_bytes(b"")
    graph = BlockGraph()
    secrets.register(graph, "sec0", PW.encode())
    try:
        file = await graph.add({"driver": "file", "node-name": "f", "filename": str(ours)})
        create = {"key-secret": "sec0", "cipher-alg": alg, "cipher-mode": mode,
                  "ivgen-alg": ivgen, "hash-alg": hash_, "iter-time": 10}
        if ivhash:
            create["ivgen-hash-alg"] = ivhash
        await create_luks_on(graph, file, schema.parse_json(
            "BlockdevCreateOptionsLUKS", {**create, "file": "f", "size": 1 << 20}))
        node = await graph.add({"driver": "luks", "node-name": "l", "file": "f",
                                "key-secret": "sec0"})
        assert node.length == 1 << 20
        await node.write(512, b"\x62" * 1024)
        await node.flush()
    finally:
        await graph.close_all()
    qemu_io(ours, "luks", "read -P 0x62 512 1024")
    info = run("qemu-img", "info", *SECRET, "--image-opts", img_opts(ours, "luks")).stdout
    assert f"cipher alg: {alg}" in info and f"ivgen alg: {ivgen}" in info


def create_encrypt(d: dict):
    """blockdev-create's encrypt member as the schema hands it over."""
    return schema.parse_json("QCryptoBlockCreateOptions", d)


async def test_encrypted_qcow2_create_reads_in_qemu(tmp_path):
    img = tmp_path / "enc.qcow2"
    img.write_bytes(b"")
    graph = BlockGraph()
    secrets.register(graph, "sec0", PW.encode())
    try:
        file = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
        encrypt = create_encrypt({"format": "luks", "key-secret": "sec0", "iter-time": 10})
        await create_qcow2(file, 8 << 20, encrypt=encrypt)
        node = await graph.add({"driver": "qcow2", "node-name": "q", "file": "f",
                                "encrypt": {"format": "luks", "key-secret": "sec0"}})
        await node.write(0, b"\x71" * 65536)
        await node.write(5 << 20, pattern(3, 300000))
        await node.flush()
        assert node.info_extra()["format-specific"]["data"]["encrypt"]["format"] == "luks"
    finally:
        await graph.close_all()
    check_clean(img)
    qemu_io(img, "qcow2", "read -P 0x71 0 65536", "read -P 0 65536 65536")
    model = bytearray(8 << 20)
    model[:65536] = b"\x71" * 65536
    model[5 << 20:(5 << 20) + 300000] = pattern(3, 300000)
    compare(img, "qcow2", model, tmp_path)
    # qemu-img lays it out the same way: L1, then the LUKS header clusters
    theirs = tmp_path / "theirs.qcow2"
    qemu_create(theirs, "qcow2", 8 << 20)
    mine = run("qemu-img", "info", "--output=json", str(img)).stdout
    want = run("qemu-img", "info", "--output=json", str(theirs)).stdout
    import json
    enc_mine = json.loads(mine)["format-specific"]["data"]["encrypt"]
    enc_want = json.loads(want)["format-specific"]["data"]["encrypt"]
    for e in (enc_mine, enc_want):
        e.pop("uuid")
        e.pop("master-key-iters")
        e["slots"][0].pop("iters")
    assert enc_mine == enc_want


async def test_open_errors(tmp_path):
    img = tmp_path / "img"
    qemu_create(img, "qcow2", 1 << 20)
    graph = BlockGraph()
    secrets.register(graph, "bad", b"wrong")
    try:
        with pytest.raises(GenericError, match="Invalid password, cannot unlock any keyslot"):
            await graph.add({"driver": "qcow2", "node-name": "q",
                             "file": {"driver": "file", "filename": str(img)},
                             "encrypt": {"format": "luks", "key-secret": "bad"}})
        with pytest.raises(GenericError, match="No secret with id 'nope'"):
            await graph.add({"driver": "qcow2", "node-name": "q",
                             "file": {"driver": "file", "filename": str(img)},
                             "encrypt": {"format": "luks", "key-secret": "nope"}})
        with pytest.raises(GenericError,
                           match="Parameter 'encrypt.key-secret' is required for cipher"):
            await graph.add({"driver": "qcow2", "node-name": "q",
                             "file": {"driver": "file", "filename": str(img)}})
    finally:
        await graph.close_all()


async def test_aes_qcow2_create(tmp_path):
    """encrypt.format=qcow (legacy AES) images, as qemu-img makes them."""
    img = tmp_path / "aes.qcow2"
    img.write_bytes(b"")
    graph = BlockGraph()
    secrets.register(graph, "sec0", PW.encode())
    try:
        file = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})
        await create_qcow2(file, 1 << 20,
                           encrypt=create_encrypt({"format": "qcow", "key-secret": "sec0"}))
        node = await graph.add({"driver": "qcow2", "node-name": "q", "file": "f",
                                "encrypt": {"format": "aes", "key-secret": "sec0"}})
        await node.write(4096, b"\x72" * 5000)
        await node.flush()
    finally:
        await graph.close_all()
    check_clean(img, "aes")
    qemu_io(img, "aes", "read -P 0x72 4096 5000", "read -P 0 0 4096")
