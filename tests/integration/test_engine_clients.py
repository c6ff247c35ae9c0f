"""Real clients against each I/O engine (issue 11), the daemon started as a
user starts it.

One daemon per engine exports a raw file and a qcow2 image, both opened with
the engine's ``aio=`` and ``cache.direct``.  On each export: nbdcopy writes
a whole image in, qemu-img convert overwrites the start, qemu-io writes
unaligned data and zeroes, fio writes at depth 32 and verifies every block;
qemu-img compare and nbdcopy read it back.  After a clean shutdown the
images on disk pass ``qemu-img check`` and equal the model.  The daemon
must hold the kernel object of the engine asked for (an io_uring instance,
a Linux AIO context).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from tests.engines import ENGINES, drop_page_cache, stop_clean
from tests.helpers import first_difference, qemu_img, qemu_io

from .nbd_helpers import fio_verify

pytestmark = pytest.mark.skipif(not (shutil.which("fio") and shutil.which("nbdcopy")),
                                reason="needs fio and nbdcopy")

MiB = 1 << 20
SIZE = 24 * MiB
FIO_AT, FIO_SIZE = 16 * MiB, 8 * MiB  # fio's region; its data is checked by fio


def source(seed: int, size: int) -> bytes:
    """Random data with runs of zeroes (which convert and nbdcopy skip or zero)."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for _ in range(size // MiB):
        off = rnd.randrange(0, size - 300_000)
        n = rnd.randrange(1, 300_000)
        data[off:off + n] = bytes(n)
    return bytes(data)


def clients_scenario(uri: str, tmp_path, name: str, image) -> bytearray:
    """Every client in turn on one export; returns the model of the image."""
    src = tmp_path / f"{name}-in.raw"
    src.write_bytes(source(1, SIZE))
    subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=120)
    model = bytearray(src.read_bytes())

    head = tmp_path / f"{name}-head.raw"
    head.write_bytes(source(2, 8 * MiB))
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(head), uri)
    model[:8 * MiB] = head.read_bytes()

    cmds = []
    for i, (off, n) in enumerate([(8 * MiB + 1, 5000), (9 * MiB - 300, 70_001),
                                  (10 * MiB + 4095, 4097), (12 * MiB + 511, 1)]):
        cmds += ["-c", f"write -P {0x20 + i} {off} {n}"]
        model[off:off + n] = bytes([0x20 + i]) * n
    for off, n in [(11 * MiB + 100, 200_000), (13 * MiB, 65536)]:
        cmds += ["-c", f"write -z {off} {n}"]
        model[off:off + n] = bytes(n)
    # concurrent, not overlapping, some sharing a 4 KiB block
    for i in range(16):
        off = 14 * MiB + i * 1300
        cmds += ["-c", f"aio_write -P {0x40 + i} {off} 1300"]
        model[off:off + 1300] = bytes([0x40 + i]) * 1300
    cmds += ["-c", "aio_flush"]
    qemu_io("-f", "raw", *cmds, uri)

    fio_verify(uri, tmp_path, offset=FIO_AT, size=FIO_SIZE)

    drop_page_cache(image)  # read back through the engine, cached or not
    out = tmp_path / f"{name}-out.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
    got = out.read_bytes()
    assert len(got) == SIZE
    assert got[:FIO_AT] == model[:FIO_AT], first_difference(got, model)
    assert got[FIO_AT + FIO_SIZE:] == model[FIO_AT + FIO_SIZE:]
    model[FIO_AT:FIO_AT + FIO_SIZE] = got[FIO_AT:FIO_AT + FIO_SIZE]
    ref = tmp_path / f"{name}-model.raw"
    ref.write_bytes(model)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", uri, str(ref),
                    check=False).returncode == 0
    return model


def kernel_engines(pid: int) -> set[str]:
    """What the kernel shows a process holding: an io_uring instance (a file
    descriptor on anon_inode:[io_uring]) and a Linux AIO context (a mapping
    named [aio])."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                found.add("io_uring")
        except OSError:
            pass
    with open(f"/proc/{pid}/maps") as f:
        if any(line.split()[5:6] == ["/[aio]"] for line in f):
            found.add("native")
    return found


@pytest.mark.parametrize("engine", ENGINES)
def test_real_clients(daemon_factory, tmp_path, engine):
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw), str(SIZE))
    q2 = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q2), str(SIZE))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=rawf,filename={raw}" + engine.keyval(),
        "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={q2}"
        + engine.keyval("file."),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=er,node-name=rawf,name=raw,writable=on",
        "--export", "type=nbd,id=eq,node-name=q,name=qcow2,writable=on"])
    models = {}
    for name, image in (("raw", raw), ("qcow2", q2)):
        models[name] = clients_scenario(f"nbd+unix:///{name}?socket={sock}", tmp_path, name,
                                        image)
    kernel = kernel_engines(d.proc.pid)
    if engine.aio != "threads":
        assert engine.aio in kernel, f"aio={engine.aio} asked for, the daemon holds {kernel}"
    stop_clean(d)
    qemu_img("check", str(q2))
    for name, path in (("raw", raw), ("qcow2", q2)):
        ref = tmp_path / f"{name}-model.raw"
        assert ref.read_bytes() == models[name]
        r = qemu_img("compare", "-F", "raw", str(path), str(ref), check=False)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_qd1_clients(daemon_factory, tmp_path, engine):
    """Four clients at queue depth 1 at once, each on its own region of one
    export, writing and verifying every block: a connection that waits for
    its socket and its completions without the scheduler (inline_wait.py)
    must hand over to the others whenever they have a request."""
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw), str(16 * MiB))
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=f,filename={raw}" + engine.keyval(),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=f,writable=on"])
    uri = f"nbd+unix:///f?socket={sock}"
    procs = [subprocess.Popen(
        ["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", f"--randseed={i + 1}",
         "--rw=randwrite", "--bs=4k", "--iodepth=1", f"--offset={i * 4 * MiB}",
         f"--size={4 * MiB}", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(4)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:]
        assert "err= 0" in out, out[-2000:]
    stop_clean(d)
