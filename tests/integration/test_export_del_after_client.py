"""block-export-del mode=safe right after the last client hung up: the
export is not in use any more, on both daemons, every time."""

import subprocess

import pytest


@pytest.mark.parametrize("kind", ["qemu", "trio"])
def test_safe_delete_right_after_disconnect(daemon_factory, tmp_path, kind):
    sock = tmp_path / "nbd.sock"
    d = daemon_factory(kind, ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                              "--blockdev", "null-co,node-name=n,size=4194304"])
    qmp = d.qmp()
    for _ in range(15):
        assert qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                                "writable": True}) == {"return": {}}
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 1M 64k",
                        f"nbd+unix:///n?socket={sock}"], check=True, capture_output=True)
        # the client has sent NBD_CMD_DISC and closed its socket
        assert qmp.cmd_raw("block-export-del", {"id": "e"}) == {"return": {}}
        ev = qmp.pull_event(wait=True)
        assert ev["event"] == "BLOCK_EXPORT_DELETED"
