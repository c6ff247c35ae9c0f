"""blockdev-mirror of a chunk that starts with a hole and ends with data.

The source's block status at the chunk's start says "hole" for less than
the mirror's granularity (64 KiB for a raw target): QEMU's mirror_iteration
then copies the whole chunk, since zeroing it would lose the data after the
hole.  Raw files on the test's file system report 4 KiB holes
(SEEK_DATA/SEEK_HOLE); the data at the end of a disk, whose last chunk is
the shortest, is checked too.  Both daemons, the same command lines; the
copy must equal the source.
"""

from __future__ import annotations

import pytest

from tests.helpers import qemu_img, qemu_io
from tests.integration.test_job_images import wait_event

KiB = 1 << 10
SIZE = 1024 * KiB + 8 * KiB  # the last chunk is 8 KiB long
# (offset, length): data after a hole in the same 64 KiB chunk
DATA = [(124 * KiB, 4 * KiB), (300 * KiB, 8 * KiB), (SIZE - 4 * KiB, 4 * KiB)]


def mirror(qmp, device: str, target: str, finish: str, timeout: float = 120) -> None:
    """blockdev-mirror sync=full to READY, then ``finish`` (job-complete, or
    block-job-cancel for a copy without pivot) and BLOCK_JOB_COMPLETED."""
    r = qmp.cmd_raw("blockdev-mirror", {"job-id": "j", "device": device, "target": target,
                                        "sync": "full"})
    assert "error" not in r, r
    wait_event(qmp, "BLOCK_JOB_READY", timeout, device="j")
    qmp.cmd_raw(finish, {"id": "j"} if finish == "job-complete" else {"device": "j"})
    wait_event(qmp, "BLOCK_JOB_COMPLETED", timeout, device="j")


@pytest.mark.parametrize("kind", ["trio", "qemu"])
def test_data_after_a_short_hole_is_copied(daemon_factory, tmp_path, kind):
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    for p in (src, dst):
        qemu_img("create", "-q", "-f", "raw", str(p), str(SIZE))
    qemu_io("-f", "raw", *[a for i, (off, n) in enumerate(DATA)
                           for a in ("-c", f"write -P {0x41 + i} {off} {n}")], str(src))
    # the file system keeps the holes (so the source reports them)
    holes = [e for e in qemu_img("map", "--output=json", "-f", "raw", str(src)).stdout.split("\n")
             if '"data": false' in e]
    assert len(holes) >= len(DATA)
    d = daemon_factory(kind, [
        "--blockdev", f"driver=file,node-name=s,filename={src}",
        "--blockdev", f"driver=file,node-name=t,filename={dst}",
    ])
    mirror(d.qmp(), "s", "t", "job-complete")
    d.stop()
    expected = bytearray(SIZE)
    for i, (off, n) in enumerate(DATA):
        expected[off:off + n] = bytes([0x41 + i]) * n
    assert dst.read_bytes() == expected
