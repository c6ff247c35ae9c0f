"""blockdev-reopen: a read-only file node made writable really writes
(the same scenario on both daemons)."""

import pytest

from tests.helpers import qemu_img, qemu_io


@pytest.mark.parametrize("kind", ["qemu", "trio"])
def test_reopen_read_write_then_write_through_nbd(daemon_factory, tmp_path, kind):
    img = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "4M")
    sock = tmp_path / "nbd.sock"
    d = daemon_factory(kind, ["--nbd-server", f"addr.type=unix,addr.path={sock}"])
    qmp = d.qmp()
    assert qmp.cmd_raw("blockdev-add", {"driver": "file", "node-name": "f",
                                        "filename": str(img), "read-only": True}) == {"return": {}}
    # while read-only, qemu-io may write the image: we hold no write lock
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 64k", str(img))
    assert qmp.cmd_raw("blockdev-reopen", {"options": [
        {"driver": "file", "node-name": "f", "filename": str(img),
         "read-only": False}]}) == {"return": {}}
    assert qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                            "writable": True}) == {"return": {}}
    qemu_io("-f", "raw", "-c", "write -P 0x22 1M 64k", f"nbd+unix:///f?socket={sock}")
    assert qmp.cmd_raw("block-export-del", {"id": "e"}) == {"return": {}}
    qmp.pull_event(wait=True)
    assert qmp.cmd_raw("blockdev-del", {"node-name": "f"}) == {"return": {}}
    data = img.read_bytes()
    assert data[:64 << 10] == b"\x11" * (64 << 10)
    assert data[1 << 20:(1 << 20) + (64 << 10)] == b"\x22" * (64 << 10)
    assert data[64 << 10:1 << 20] == bytes((1 << 20) - (64 << 10))
