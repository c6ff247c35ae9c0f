"""FUSE exports of qsd-trio used with ordinary tools (dd, cmp, qemu-img, fallocate).

Each test starts the daemon as a subprocess, works on the mounted file, and
checks the result against an independent model (a plain file holding the
expected guest-visible bytes) and with ``qemu-img check``.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from tests.helpers import qemu_img, qemu_io
from tests.integration.fuse_helpers import (
    fuse_daemon,
    fuse_tmp,  # noqa: F401 - fixture
    is_mounted,
    make_mountpoint,
    wait_for,
)

MiB = 1 << 20


def dd(*args: str) -> None:
    subprocess.run(["dd", "status=none", *args], check=True, capture_output=True, timeout=120)


def cmp(a, b) -> bool:
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True, timeout=120).returncode == 0


def write_model(model, offset: int, data: bytes) -> None:
    with open(model, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_qcow2_guest_view_with_dd_and_cmp(daemon_factory, fuse_tmp):  # noqa: F811
    image = str(fuse_tmp / "disk.qcow2")
    model = fuse_tmp / "model.raw"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", image)
    with open(model, "wb") as f:
        f.write(b"\x11" * MiB)
        f.truncate(8 * MiB)
    mp = make_mountpoint(fuse_tmp)
    d = fuse_daemon(daemon_factory, "trio", image, mp, fmt="qcow2")
    assert os.path.getsize(mp) == 8 * MiB
    assert cmp(mp, model)
    rnd = random.Random(6)
    for offset, length in [(0, 4096), (3 * MiB + 512, 70000), (8 * MiB - 4096, 4096),
                           (MiB - 100, 200)]:
        data = rnd.randbytes(length)
        src = fuse_tmp / "chunk"
        src.write_bytes(data)
        dd(f"if={src}", f"of={mp}", "bs=1", f"seek={offset}", "conv=notrunc,fsync") \
            if length < 4096 else \
            dd(f"if={src}", f"of={mp}", "oflag=seek_bytes", f"seek={offset}",
               f"bs={length}", "conv=notrunc,fsync")
        write_model(model, offset, data)
    assert cmp(mp, model)
    qmp = d.qmp()
    assert qmp.cmd_raw("quit") == {"return": {}}
    assert d.wait() == 0
    assert not is_mounted(mp)
    assert os.path.getsize(mp) == 0  # the mountpoint file itself is untouched
    qemu_img("check", "-q", image)
    assert qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image, str(model),
                    check=False).returncode == 0


def test_qcow2_protocol_level_opened_by_qemu_img(daemon_factory, fuse_tmp):  # noqa: F811
    """The file node of a qcow2 exported; qemu-img/qemu-io use the qcow2 through the mount."""
    image = str(fuse_tmp / "disk.qcow2")
    model = fuse_tmp / "model.raw"
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 64k 128k", image)
    with open(model, "wb") as f:
        f.truncate(4 * MiB)
    write_model(model, 65536, b"\x22" * 131072)
    mp = make_mountpoint(fuse_tmp)
    d = fuse_daemon(daemon_factory, "trio", image, mp)
    info = qemu_img("info", "-U", "--output=json", mp).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": 4194304' in info
    qemu_img("check", "-q", mp)
    # the image grows through the mount: the export must be able to resize... but
    # it is not growable, so qcow2 writes must stay within the file; preallocate
    # by writing into already-allocated clusters only
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 64k 4k", mp)
    write_model(model, 65536, b"\x33" * 4096)
    assert qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", mp, str(model),
                    check=False).returncode == 0
    qmp = d.qmp()
    assert qmp.cmd_raw("block-export-del", {"id": "e"}) == {"return": {}}
    ev = qmp.pull_event(wait=10)
    assert (ev["event"], ev["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
    assert not is_mounted(mp)
    d.stop()
    qemu_img("check", "-q", image)
    assert qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image, str(model),
                    check=False).returncode == 0


def test_growable_export_grows_the_image(daemon_factory, fuse_tmp):  # noqa: F811
    image = str(fuse_tmp / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    mp = make_mountpoint(fuse_tmp)
    d = fuse_daemon(daemon_factory, "trio", image, mp, export_opts="writable=on,growable=on")
    # qemu-io opens the qcow2 through the mount and allocates clusters past
    # the file's end; each such write grows the file node
    qemu_io("-f", "qcow2", "-c", "write -P 0x44 0 512k", mp)
    grown = os.path.getsize(mp)
    assert grown > 512 * 1024
    qemu_img("check", "-q", mp)
    d.stop()
    assert os.path.getsize(image) == grown
    qemu_img("check", "-q", image)
    out = qemu_io("-f", "qcow2", "-c", "read -P 0x44 0 512k", image).stdout
    assert "read 524288/524288" in out


def test_non_growable_write_past_end_fails(daemon_factory, fuse_tmp):  # noqa: F811
    image = fuse_tmp / "disk.raw"
    image.write_bytes(b"\x01" * 65536)
    mp = make_mountpoint(fuse_tmp)
    fuse_daemon(daemon_factory, "trio", str(image), mp)
    fd = os.open(mp, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"\x02" * 10, 65536 - 4) == 4  # short write at the end
        with pytest.raises(OSError):
            os.pwrite(fd, b"\x03" * 512, 65536 + 512)
    finally:
        os.close(fd)
    assert os.path.getsize(mp) == 65536
    assert image.read_bytes() == b"\x01" * (65536 - 4) + b"\x02" * 4


def test_fallocate_truncate_and_seek(daemon_factory, fuse_tmp):  # noqa: F811
    image = fuse_tmp / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x07" * MiB)
    model = fuse_tmp / "model"
    model.write_bytes(image.read_bytes())
    mp = make_mountpoint(fuse_tmp)
    # discard=unmap: with QEMU's default (ignore) a punched hole keeps its data
    fuse_daemon(daemon_factory, "trio", str(image), mp, file_opts=",discard=unmap")
    subprocess.run(["fallocate", "-p", "-o", "65536", "-l", "131072", mp], check=True)
    write_model(model, 65536, bytes(131072))
    subprocess.run(["fallocate", "-z", "-o", "524288", "-l", "4096", mp], check=True)
    write_model(model, 524288, bytes(4096))
    assert cmp(mp, model)
    # SEEK_DATA/SEEK_HOLE agree with the image file underneath
    fd, ifd = os.open(mp, os.O_RDONLY), os.open(image, os.O_RDONLY)
    try:
        for off in (0, 65536, 200000, 2 * MiB, 4 * MiB - 1):
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    expect = os.lseek(ifd, off, whence)
                except OSError as e:
                    expect = e.errno
                try:
                    got = os.lseek(fd, off, whence)
                except OSError as e:
                    got = e.errno
                assert got == expect, (off, whence)
        assert os.lseek(fd, 65536, os.SEEK_HOLE) == 65536  # the punched hole
    finally:
        os.close(fd)
        os.close(ifd)
    # truncate resizes a writable export even when it is not growable (as QEMU)
    subprocess.run(["truncate", "-s", "5M", mp], check=True)
    assert os.path.getsize(mp) == os.path.getsize(image) == 5 * MiB
    with open(model, "r+b") as f:
        f.truncate(5 * MiB)
    os.truncate(mp, 3 * MiB)
    with open(model, "r+b") as f:
        f.truncate(3 * MiB)
    assert cmp(mp, model)
    assert cmp(image, model)


def test_several_exports_in_one_daemon(daemon_factory, fuse_tmp):  # noqa: F811
    images, mps = [], []
    args = []
    for i in range(4):
        img = fuse_tmp / f"img{i}"
        img.write_bytes(bytes([i + 1]) * (65536 * (i + 1)))
        images.append(img)
        mps.append(make_mountpoint(fuse_tmp, f"mp{i}"))
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={img}"]
    for i in range(2):
        args += ["--export", f"type=fuse,id=e{i},node-name=f{i},mountpoint={mps[i]},writable=on"]
    d = daemon_factory("trio", args)
    qmp = d.qmp()
    for i in range(2, 4):
        assert qmp.cmd_raw("block-export-add", {
            "type": "fuse", "id": f"e{i}", "node-name": f"f{i}", "mountpoint": mps[i],
            "writable": True}) == {"return": {}}
    assert sorted(e["id"] for e in qmp.cmd_raw("query-block-exports")["return"]) == \
        ["e0", "e1", "e2", "e3"]
    for i in range(4):
        assert cmp(mps[i], images[i])
        assert os.path.getsize(mps[i]) == 65536 * (i + 1)
    # all four served at once: readers in parallel processes
    procs = [subprocess.Popen(["dd", f"if={mp}", "of=/dev/null", "bs=4k", "status=none"])
             for mp in mps * 3]
    assert all(p.wait(60) == 0 for p in procs)
    write_model(mps[2], 100, b"three")
    assert images[2].read_bytes()[100:105] == b"three"
    assert images[1].read_bytes() == b"\x02" * 131072
    assert qmp.cmd_raw("block-export-del", {"id": "e1"}) == {"return": {}}
    assert qmp.pull_event(wait=10)["data"] == {"id": "e1"}
    assert not is_mounted(mps[1])
    assert all(is_mounted(mps[i]) for i in (0, 2, 3))
    assert cmp(mps[3], images[3])
    d.stop()
    assert not any(is_mounted(mp) for mp in mps)


def test_external_unmount_ends_the_export(daemon_factory, fuse_tmp):  # noqa: F811
    image = fuse_tmp / "disk.raw"
    image.write_bytes(b"\x05" * 65536)
    mp = make_mountpoint(fuse_tmp)
    d = fuse_daemon(daemon_factory, "trio", str(image), mp)
    qmp = d.qmp()
    subprocess.run(["fusermount3", "-u", mp], check=True)
    ev = qmp.pull_event(wait=10)
    assert (ev["event"], ev["data"]) == ("BLOCK_EXPORT_DELETED", {"id": "e"})
    assert qmp.cmd_raw("query-block-exports") == {"return": []}
    # the node is free again and the same mountpoint can be exported anew
    assert qmp.cmd_raw("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                                            "mountpoint": mp}) == {"return": {}}
    wait_for(lambda: is_mounted(mp), what="remount")
    assert cmp(mp, image)
    assert qmp.cmd_raw("blockdev-del", {"node-name": "f"})["error"]["class"] == "GenericError"
    d.proc.terminate()
    assert d.wait() == 0
    assert not is_mounted(mp)


def test_bad_options_are_refused(daemon_factory, fuse_tmp):  # noqa: F811
    image = fuse_tmp / "disk.raw"
    image.write_bytes(bytes(65536))
    mp = make_mountpoint(fuse_tmp)
    d = daemon_factory("trio", ["--blockdev", f"driver=file,node-name=f,filename={image},"
                                              "read-only=on"])
    qmp = d.qmp()
    r = qmp.cmd_raw("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                                         "mountpoint": mp, "writable": True})
    assert r["error"] == {"class": "GenericError",
                          "desc": "Cannot export read-only node as writable"}
    assert not is_mounted(mp)
    r = qmp.cmd_raw("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                                         "mountpoint": mp, "allow-other": "maybe"})
    assert r["error"]["class"] == "GenericError"
    assert qmp.cmd_raw("query-block-exports") == {"return": []}


@pytest.mark.parametrize("kind", ["trio", "qemu"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_workload_against_model(daemon_factory, fuse_tmp, seed, kind):  # noqa: F811
    """Random unaligned writes, zero-range, punch-hole and reads on a qcow2 guest view.

    Run against both daemons: the model is the ground truth for each.
    """
    size = 4 * MiB
    image = str(fuse_tmp / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, str(size))
    model = bytearray(size)
    mp = make_mountpoint(fuse_tmp)
    d = daemon_factory(kind, [
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", "driver=qcow2,node-name=q,file=f,discard=unmap",
        "--export", f"type=fuse,id=e,node-name=q,mountpoint={mp},writable=on"])
    rnd = random.Random(seed)
    fd = os.open(mp, os.O_RDWR)
    try:
        for _ in range(300):
            op = rnd.choice(["write", "write", "read", "zero", "punch", "fsync"])
            off = rnd.randrange(size)
            length = min(rnd.choice([1, 511, 4096, 65536, 300000]), size - off)
            if op == "write":
                data = rnd.randbytes(length)
                assert os.pwrite(fd, data, off) == length
                model[off:off + length] = data
            elif op == "read":
                assert os.pread(fd, length, off) == bytes(model[off:off + length])
            elif op == "zero":
                subprocess.run(["fallocate", "-z", "-o", str(off), "-l", str(length), mp],
                               check=True)
                model[off:off + length] = bytes(length)
            elif op == "punch":
                subprocess.run(["fallocate", "-p", "-o", str(off), "-l", str(length), mp],
                               check=True)
                # discard is advisory (qcow2 drops only whole clusters): each byte
                # is now either what it was or zero
                with open(mp, "rb") as f:
                    f.seek(off)
                    got = f.read(length)
                old = model[off:off + length]
                assert all(g == o or g == 0 for g, o in zip(got, old, strict=True))
                model[off:off + length] = got
            else:
                os.fsync(fd)
        # a fresh open drops the kernel's page cache: read what the node holds
        with open(mp, "rb") as f:
            assert f.read() == bytes(model)
    finally:
        os.close(fd)
    d.stop()
    assert not is_mounted(mp)
    qemu_img("check", "-q", image)
    (fuse_tmp / "model").write_bytes(model)
    assert qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image,
                    str(fuse_tmp / "model"), check=False).returncode == 0
