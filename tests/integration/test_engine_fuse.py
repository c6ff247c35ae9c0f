"""FUSE exports over each I/O engine (issue 11).

A raw file and a qcow2 image, each on a file node opened with the engine's
``aio=`` and ``cache.direct``, read and written through the mounts with
plain file I/O from several threads at once (reads the page cache cannot
serve reach the engine), every read compared with a model; after a clean
shutdown the images pass ``qemu-img check`` and equal the model.  And an
export deleted (mode=hard) while threads read the mount, in a loop.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.engines import ENGINES, drop_page_cache, stop_clean
from tests.helpers import first_difference, qemu_img
from tests.integration.fuse_helpers import (  # noqa: F401 - fuse_tmp is a fixture
    fuse_tmp,
    make_mountpoint,
    no_stale_mounts,
)

MiB = 1 << 20
SIZE = 16 * MiB


def drop_cache(fd: int) -> None:
    """Make the next reads of the mount ask the daemon again."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def exercise(mp: str, image, model: bytearray, seed: int) -> None:
    rnd = random.Random(seed)
    fd = os.open(mp, os.O_RDWR)
    try:
        drop_cache(fd)
        drop_page_cache(image)
        reads = [(rnd.randrange(0, SIZE - 200_000), rnd.choice([512, 4096, 65536, 131_071]))
                 for _ in range(200)]

        def read(off_len):
            off, n = off_len
            got = os.pread(fd, n, off)
            assert got == model[off:off + n], f"read {off}+{n}: {first_difference(got, model[off:off + n])}"

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read, reads))

        # pieces that cover 2 MiB exactly, cut anywhere, written concurrently
        at = rnd.randrange(0, SIZE - 2 * MiB)
        cuts = sorted(rnd.sample(range(1, 2 * MiB), 63))
        bounds = [0, *cuts, 2 * MiB]
        pieces = [(at + a, rnd.randbytes(b - a)) for a, b in zip(bounds, bounds[1:],
                                                                 strict=False)]
        rnd.shuffle(pieces)
        for off, data in pieces:
            model[off:off + len(data)] = data

        def write(piece):
            off, data = piece
            assert os.pwrite(fd, data, off) == len(data)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, pieces))
        drop_cache(fd)
        drop_page_cache(image)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read, [(off, MiB) for off in range(0, SIZE, MiB)]))
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ENGINES)
def test_fuse_exports(daemon_factory, fuse_tmp, engine):  # noqa: F811
    content = random.Random(5).randbytes(SIZE)
    raw = fuse_tmp / "disk.raw"
    raw.write_bytes(content)
    q2 = fuse_tmp / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", str(raw), str(q2))
    mp_raw = make_mountpoint(fuse_tmp, "mp-raw")
    mp_q2 = make_mountpoint(fuse_tmp, "mp-qcow2")
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=r,filename={raw}" + engine.keyval(),
        "--blockdev", f"driver=file,node-name=f,filename={q2}" + engine.keyval(),
        "--blockdev", "driver=qcow2,node-name=q,file=f",
        "--export", f"type=fuse,id=er,node-name=r,mountpoint={mp_raw},writable=on",
        "--export", f"type=fuse,id=eq,node-name=q,mountpoint={mp_q2},writable=on"])
    models = {"raw": bytearray(content), "qcow2": bytearray(content)}
    exercise(mp_raw, raw, models["raw"], 1)
    exercise(mp_q2, q2, models["qcow2"], 2)
    stop_clean(d)
    qemu_img("check", str(q2))
    for name, path, fmt in (("raw", raw, "raw"), ("qcow2", q2, "qcow2")):
        ref = fuse_tmp / f"{name}-model.raw"
        ref.write_bytes(models[name])
        r = qemu_img("compare", "-f", fmt, "-F", "raw", str(path), str(ref), check=False)
        assert r.returncode == 0, r.stdout + r.stderr


READER = r"""
import os, sys, threading
mp, model = sys.argv[1], open(sys.argv[2], "rb").read()
size = len(model)
fd = os.open(mp, os.O_RDONLY)
reads, bad, started = [0], [], threading.Event()

def loop(seed):
    import random
    rnd = random.Random(seed)
    while True:
        off = rnd.randrange(0, size - 65536)
        try:
            os.posix_fadvise(fd, off, 65536, os.POSIX_FADV_DONTNEED)
            got = os.pread(fd, 65536, off)
        except OSError:
            return  # the export went away under us
        if not got:
            return  # or shows as empty while it goes
        if got != model[off:off + len(got)]:
            bad.append(off)
            return
        reads[0] += 1
        started.set()

threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
started.wait(20)
print("started", flush=True)
for t in threads:
    t.join()
print(reads[0], bad, flush=True)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_fuse_export_deleted_with_reads_in_flight(daemon_factory, tmp_path, engine):
    """FUSE: block-export-del mode=hard while four threads read the mount
    (the page cache dropped before each read, so every read reaches the
    daemon), then the export added again, in a loop; what was read before
    the export went away is the image's."""
    data = random.Random(4).randbytes(8 * MiB)
    img = tmp_path / "disk.raw"
    img.write_bytes(data)
    model = tmp_path / "model.raw"
    model.write_bytes(data)
    with no_stale_mounts(tmp_path):
        mp = make_mountpoint(tmp_path)
        d = daemon_factory("trio", [
            "--blockdev", f"driver=file,node-name=f,filename={img}" + engine.keyval()])
        qmp = d.qmp()
        for r in range(5):
            assert qmp.cmd_raw("block-export-add", {
                "type": "fuse", "id": f"e{r}", "node-name": "f", "mountpoint": mp}) == \
                {"return": {}}
            reader = subprocess.Popen([sys.executable, "-c", READER, mp, str(model)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert reader.stdout.readline().strip() == "started"
                assert qmp.cmd_raw("block-export-del", {"id": f"e{r}", "mode": "hard"}) == \
                    {"return": {}}
                ev = qmp.pull_event(wait=30)
                assert ev["event"] == "BLOCK_EXPORT_DELETED", ev
                out, _ = reader.communicate(timeout=30)
            finally:
                if reader.poll() is None:
                    reader.kill()
                    reader.wait()
            assert reader.returncode == 0, f"reads differ from the image: {out}"
        stop_clean(d)
    assert img.read_bytes() == data
