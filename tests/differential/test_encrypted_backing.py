"""Encrypted qcow2 (encrypt.format=luks) over a backing file, as qemu-img
makes it: over a plain qcow2 base, and over an encrypted base with its own
secret (backing.encrypt.key-secret).  What each daemon exports over NBD
equals qemu-io's view of the chain; writes through each daemon (partial
clusters, so the rest of the cluster is copied up from the backing file and
encrypted with the overlay's key) read back with qemu-io, the images check
clean and both daemons leave the same guest data."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

SECRETS = ["--object", "secret,id=sec0,data=pw0", "--object", "secret,id=sec1,data=pw1"]
LUKS = "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret="
WRITES = ["write -P 0x33 66000 1000", "write -P 0x44 1M 64k", "write -z 200k 8k"]
GUEST = ["write -P 0x55 130000 5000", "write -P 0x66 3M 70000", "write -z 1500k 4k"]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("encback")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    run("qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -z 2M 64k", str(d / "base.qcow2"))
    qemu_img("create", "-q", *SECRETS, "-f", "qcow2", "-o", LUKS + "sec1",
             str(d / "ebase.qcow2"), "4M")
    run("qemu-io", *SECRETS, "--image-opts", "-c", "write -P 0x22 0 3M",
        f"driver=qcow2,encrypt.key-secret=sec1,file.filename={d / 'ebase.qcow2'}")
    qemu_img("create", "-q", *SECRETS, "-f", "qcow2", "-o", LUKS + "sec0",
             "-b", "base.qcow2", "-F", "qcow2", str(d / "plain.qcow2"))
    # qemu-img cannot open the encrypted base without its secret: -u
    qemu_img("create", "-q", "-u", *SECRETS, "-f", "qcow2", "-o", LUKS + "sec0",
             "-b", "ebase.qcow2", "-F", "qcow2", str(d / "enc.qcow2"), "4M")
    for top in ("plain", "enc"):
        run("qemu-io", *SECRETS, "--image-opts", *[a for w in WRITES for a in ("-c", w)],
            _image_opts(d, top))
    return d


def _image_opts(d, top: str) -> str:
    opts = f"driver=qcow2,encrypt.key-secret=sec0,file.filename={d / (top + '.qcow2')}"
    if top == "enc":
        opts += ",backing.encrypt.key-secret=sec1"
    return opts


def _blockdev(d, top: str) -> dict:
    node = {"driver": "qcow2", "node-name": "d",
            "encrypt": {"format": "luks", "key-secret": "sec0"},
            "file": {"driver": "file", "filename": str(d / f"{top}.qcow2")}}
    if top == "enc":
        node["backing"] = {"driver": "qcow2",
                           "encrypt": {"format": "luks", "key-secret": "sec1"},
                           "file": {"driver": "file", "filename": str(d / "ebase.qcow2")}}
    return node


def _view(d, top: str, out) -> bytes:
    qemu_img("convert", *SECRETS, "--image-opts", _image_opts(d, top), "-O", "raw", str(out))
    return out.read_bytes()


@pytest.mark.parametrize("top", ["plain", "enc"], ids=["plain-base", "encrypted-base"])
def test_encrypted_overlay_over_backing(chains, tmp_path, top):
    views = {}
    for kind in ("qemu", "trio"):
        d = tmp_path / kind
        d.mkdir()
        for name in ("base", "ebase", top):
            shutil.copyfile(chains / f"{name}.qcow2", d / f"{name}.qcow2")
        before = _view(d, top, d / "before.raw")
        sock = d / "nbd.sock"
        with Daemon(kind, d, SECRETS) as dm:
            q = dm.qmp()
            assert q.cmd_raw("blockdev-add", _blockdev(d, top)) == {"return": {}}
            q.cmd_raw("nbd-server-start", {"addr": {"type": "unix",
                                                    "data": {"path": str(sock)}}})
            assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "d",
                                                  "writable": True}) == {"return": {}}
            uri = f"nbd+unix:///d?socket={sock}"
            qemu_img("convert", "-f", "raw", uri, "-O", "raw", str(d / "nbd.raw"))
            assert (d / "nbd.raw").read_bytes() == before, kind
            run("qemu-io", "-f", "raw", *[a for w in GUEST for a in ("-c", w)], uri)
        p = qemu_img("check", *SECRETS, "--image-opts", _image_opts(d, top))
        assert "No errors were found" in p.stdout, p.stdout
        p = run("qemu-io", *SECRETS, "--image-opts", "-c", "read -P 0x55 130000 5000",
                "-c", "read -P 0x66 3M 70000", "-c", "read -P 0 1500k 4k",
                "-c", "read -P 0x44 1M 64k", _image_opts(d, top))
        assert "Pattern verification failed" not in p.stdout, p.stdout
        views[kind] = _view(d, top, d / "after.raw")
    assert views["trio"] == views["qemu"]


def test_backing_open_errors_as_qemu(chains, tmp_path):
    """A backing file that cannot be opened, from the header or given
    (nested or by name): QEMU's bdrv_open_backing_file prefixes the error."""
    enc = _blockdev(chains, "enc")
    nested = {"driver": "qcow2", "file": {"driver": "file", "filename": str(chains / "ebase.qcow2")}}
    cases = [
        {k: v for k, v in enc.items() if k != "backing"},  # from the header, no secret
        {**enc, "backing": nested},
        {**enc, "backing": {**nested, "file": {"driver": "file", "filename": "/nonexistent"}}},
        {**enc, "backing": {**enc["backing"], "l2-cache-entry-size": 1000}},
        {**enc, "backing": "nonode"},
        {**enc, "backing": None, "read-only": True},
    ]
    out = {}
    for kind in ("qemu", "trio"):
        with Daemon(kind, tmp_path, SECRETS) as dm:
            q = dm.qmp()
            out[kind] = [q.cmd_raw("blockdev-add", {**c, "node-name": f"n{i}",
                                                    "read-only": True,
                                                    "file": {**c["file"], "read-only": True}})
                         for i, c in enumerate(cases)]
    assert out["trio"] == out["qemu"]
    assert out["trio"][-1] == {"return": {}}
