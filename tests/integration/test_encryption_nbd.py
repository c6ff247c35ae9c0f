"""Encrypted images made and written by qemu-img/qemu-io, served by the
qsd-trio daemon over NBD: they read identically to a plain copy that
qemu-img converted, and what NBD clients write through the daemon reads
back identically in qemu-img (compare, check) afterwards."""

from __future__ import annotations

import pytest

from tests.helpers import qemu_img, qemu_io

PW = "pass phrase"
OBJ = ["--object", f"secret,id=sec0,data={PW}"]


def _image_opts(fmt: str, path) -> str:
    if fmt == "luks":
        return f"driver=luks,key-secret=sec0,file.filename={path}"
    return f"driver=qcow2,encrypt.key-secret=sec0,file.filename={path}"


WRITES = ["write -P 0x11 0 65536", "write -P 0x22 100000 3333", "write -z 1048576 131072",
          "write -P 0x33 2097151 70000"]
NBD_WRITES = ["write -P 0x44 511 1026", "write -P 0x55 1100000 200000",
              "write -z 3000000 65536", "write -P 0x66 4194303 1"]


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_encrypted_image_over_nbd(daemon_factory, tmp_path, fmt):
    img, plain = tmp_path / f"img.{fmt}", tmp_path / "plain.raw"
    opts = ("key-secret=sec0,iter-time=10" if fmt == "luks" else
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
    qemu_img("create", "-q", *OBJ, "-f", fmt, "-o", opts, str(img), "4M")
    args = [*OBJ, "--image-opts"]
    for w in WRITES:
        args += ["-c", w]
    qemu_io(*args, _image_opts(fmt, img))
    qemu_img("convert", *OBJ, "--image-opts", _image_opts(fmt, img), "-O", "raw", str(plain))

    sock = tmp_path / "nbd.sock"
    node = ("driver=luks,node-name=d,file=f,key-secret=sec0" if fmt == "luks" else
            "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0")
    d = daemon_factory("trio", [*OBJ, "--blockdev", f"driver=file,node-name=f,filename={img}",
                            "--blockdev", node,
                            "--nbd-server", f"addr.type=unix,addr.path={sock}",
                            "--export", "type=nbd,id=e,node-name=d,writable=on"])
    uri = f"nbd+unix:///d?socket={sock}"
    qemu_img("compare", "-f", "raw", "-F", "raw", uri, str(plain))
    for w in NBD_WRITES:
        qemu_io("-f", "raw", "-c", w, uri)
        qemu_io("-f", "raw", "-c", w, str(plain))
    qemu_img("compare", "-f", "raw", "-F", "raw", uri, str(plain))
    d.stop()  # quits: the node is flushed and the image released
    qemu_img("compare", *OBJ, "--image-opts", _image_opts(fmt, img),
             f"driver=raw,file.filename={plain}")
    if fmt == "qcow2":
        out = qemu_img("check", *OBJ, "--image-opts", _image_opts(fmt, img)).stdout
        assert "No errors were found" in out
