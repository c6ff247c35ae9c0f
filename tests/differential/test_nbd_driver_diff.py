"""driver=nbd: qsd-trio against qemu-storage-daemon 7.2 on the same server.

Both daemons open the same qemu-nbd export (qemu-nbd -e: several clients),
and must answer blockdev-add with the same errors for bad options and
unreachable servers, and describe the node alike in
query-named-block-nodes.  Nothing is normalised: both connect to the same
socket, so even the file names agree.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import HAVE_QEMU, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def nbd_server(tmp_path):
    img = tmp_path / "d.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(4 * MiB))
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-x", "disk",
                             "-k", str(sock), str(img)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    yield sock
    proc.kill()
    proc.wait()


def cases(sock, tmp_path):
    unix = {"type": "unix", "path": str(sock)}
    return [
        {"server": {"type": "unix", "path": str(tmp_path / "none.sock")}},
        {"server": {"type": "inet", "host": "127.0.0.1", "port": "1"}},
        {"server": unix, "export": "nope"},
        {"server": {"type": "fd", "str": "x"}},
        {"server": unix, "export": "disk", "tls-creds": "nope"},
        {"server": unix, "export": "disk", "x-dirty-bitmap": "b"},
        {"server": unix, "export": "disk", "bogus": 1},
        {"server": unix, "export": "disk", "reconnect-delay": -1},
        {"filename": f"nbd+unix:///disk?socket={sock}"},
        {},
    ]


def test_blockdev_add_errors_match(daemon_factory, tmp_path, nbd_server):
    theirs = daemon_factory("qemu").qmp()
    ours = daemon_factory("trio").qmp()
    for i, extra in enumerate(cases(nbd_server, tmp_path)):
        args = {"driver": "nbd", "node-name": f"n{i}", **extra}
        a = theirs.cmd_raw("blockdev-add", args)
        b = ours.cmd_raw("blockdev-add", args)
        assert "error" in a, (args, a)
        assert b == a, args


@pytest.mark.parametrize("extra", [{}, {"reconnect-delay": 5, "open-timeout": 3},
                                   {"read-only": True}])
def test_query_named_block_nodes_match(daemon_factory, nbd_server, extra):
    args = {"driver": "nbd", "node-name": "n", "export": "disk",
            "server": {"type": "unix", "path": str(nbd_server)}, **extra}
    got = []
    for kind in ("qemu", "trio"):
        qmp = daemon_factory(kind).qmp()
        assert qmp.cmd_raw("blockdev-add", args) == {"return": {}}
        got.append(qmp.cmd_raw("query-named-block-nodes")["return"])
    assert got[1] == got[0]
