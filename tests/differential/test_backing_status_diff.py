"""What formats report of clusters their backing file holds, over NBD, on
both daemons (nodes/backing.py): a qcow2, qed or qcow image of 2 MiB over a
raw backing file of 1 MiB with data in its first 4 KiB, some of the image's
own clusters written.  ``qemu:allocation-depth`` and ``base:allocation``
read by nbdinfo are the same, and past the backing file's end both say
depth 2 (QEMU counts the zeroes a short backing file synthesizes as
allocated in it)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, qemu_io, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def _maps(kind, tmp_path, img, fmt) -> dict:
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver={fmt},node-name=t,read-only=on,"
                          f"file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e,node-name=t,allocation-depth=on"]
    out = {}
    with Daemon(kind, tmp_path, args):
        for ctx in ("qemu:allocation-depth", "base:allocation"):
            r = run("nbdinfo", "--json", f"--map={ctx}", f"nbd+unix:///t?socket={sock}")
            out[ctx] = [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]
    return out


@pytest.mark.parametrize("fmt", ["qcow2", "qed", "qcow"])
def test_short_backing_as_qemu(tmp_path, fmt):
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", str(base), str(MiB))
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 4096", str(base))
    img = tmp_path / f"top.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-b", base.name, "-F", "raw", str(img), str(2 * MiB))
    qemu_io("-f", fmt, "-c", "write -P 0x22 65536 4096", str(img))
    seen = {kind: _maps(kind, tmp_path, img, fmt) for kind in ("qemu", "trio")}
    assert seen["trio"] == seen["qemu"]
    depth = seen["trio"]["qemu:allocation-depth"]
    # past the backing file's end: depth 2 like the backing file's own
    # clusters before it (one extent with them), not absent
    start, length, d = depth[-1]
    assert d == 2 and start < MiB and start + length == 2 * MiB
