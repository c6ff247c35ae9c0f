"""block_resize of a node whose driver cannot resize: both daemons refuse
it with bdrv_co_truncate's words, whatever the driver (formats without a
truncate, and a protocol driver such as null-co), and the image is left as
it was."""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def test_resize_refused(daemon_factory, tmp_path):
    qemu_img("create", "-q", "-f", "vpc", str(tmp_path / "r.vpc"), "1M")
    qemu_img("create", "-q", "-f", "vdi", str(tmp_path / "r.vdi"), "1M")
    before = {n: (tmp_path / n).read_bytes() for n in ("r.vpc", "r.vdi")}
    args = ["--blockdev", f"vpc,node-name=v,file.driver=file,file.filename={tmp_path}/r.vpc",
            "--blockdev", f"vdi,node-name=d,file.driver=file,file.filename={tmp_path}/r.vdi",
            "--blockdev", "null-co,node-name=n"]
    seen = {}
    for kind in ("qemu", "trio"):
        d = daemon_factory(kind, args)
        q = d.qmp()
        seen[kind] = [q.cmd_raw("block_resize", {"node-name": n, "size": 2 * MiB})
                      for n in ("v", "d", "n")]
        d.stop()
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"] == [{"error": {"class": "GenericError",
                                       "desc": "Image format driver does not support resize"}}] * 3
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
