"""driver=nbd: qsd-trio against qemu-storage-daemon 7.2 on the same server.

Both daemons open the same qemu-nbd export (qemu-nbd -e: several clients),
and must answer blockdev-add with the same errors for bad options and
unreachable servers, and describe the node alike in
query-named-block-nodes.  Nothing is normalised: both connect to the same
socket, so even the file names agree.
"""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, qemu_img
from tests.nbd_servers import start_qemu_nbd

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def nbd_server(tmp_path):
    img = tmp_path / "d.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(4 * MiB))
    sock = tmp_path / "nbd.sock"
    proc = start_qemu_nbd(img, sock, export="disk")
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
        # the TLS URLs came after 7.2 (and blockdev-add takes no filename)
        {"filename": "nbds://localhost/disk"},
        {"filename": f"nbds+unix:///disk?socket={sock}"},
        {"server": unix, "filename": "nbds://localhost/disk"},
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


@pytest.mark.parametrize("url", ["nbds://localhost/disk", "nbds+unix:///disk?socket=/s",
                                 "nbd://localhost:1/disk"])
def test_legacy_filename_on_the_command_line(tmp_path, url):
    """--blockdev with a filename: both daemons refuse it before the driver
    parses it, nbds:// (which QEMU 7.2 does not know) as nbd://."""
    from tests.helpers import normalise_prog, run_cli

    out = [run_cli(kind, ["--blockdev", f"driver=nbd,node-name=n,filename={url}"])
           for kind in ("qemu", "trio")]
    assert out[0].returncode == out[1].returncode == 1
    assert normalise_prog(out[1].stderr) == normalise_prog(out[0].stderr)
    assert "Parameter 'server' is missing" in out[0].stderr


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


def qemu_io_lines(uri: str, *cmds: str) -> list[list[str]]:
    """Each command's failure lines (timings differ, failures must not)."""
    from tests.helpers import qemu_io

    out = []
    for c in cmds:
        p = qemu_io("-f", "raw", "-c", c, uri, check=False)
        out.append([ln for ln in (p.stdout + p.stderr).splitlines() if "failed" in ln])
    return out


def test_x_dirty_bitmap_block_status_matches(daemon_factory, tmp_path):
    """A qsd-trio server exports a node with a dirty bitmap; a client of each
    kind opens it with x-dirty-bitmap and re-exports it: qemu-img map of the
    re-export shows the dirty ranges (QEMU reads "dirty" as "hole") alike."""
    img = tmp_path / "src.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(4 * MiB))
    srv_sock = tmp_path / "srv.sock"
    srv = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=f,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={srv_sock}",
    ])
    q = srv.qmp()
    q.cmd_raw("block-dirty-bitmap-add", {"node": "f", "name": "b", "granularity": 65536})
    from tests.helpers import qemu_io
    q.cmd_raw("block-export-add", {"type": "nbd", "id": "w", "node-name": "f", "name": "w",
                                   "writable": True})
    qemu_io("-f", "raw", "-c", "write -P 1 64k 64k", "-c", "write -P 2 1M 192k",
            f"nbd+unix:///w?socket={srv_sock}")
    q.cmd_raw("block-dirty-bitmap-disable", {"node": "f", "name": "b"})
    r = q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                       "name": "disk", "bitmaps": ["b"]})
    assert r == {"return": {}}
    maps = []
    for kind in ("qemu", "trio"):
        sock = tmp_path / f"client-{kind}.sock"
        d = daemon_factory(kind, [
            "--blockdev", f"driver=nbd,node-name=n,server.type=unix,server.path={srv_sock},"
                          "export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=re,node-name=n,name=re",
        ])
        maps.append(qemu_img("map", "--output=json", "-f", "raw",
                             f"nbd+unix:///re?socket={sock}").stdout)
        d.stop()
    assert '"data": false' in maps[0]  # the dirty ranges are visible
    assert maps[1] == maps[0]


@pytest.mark.parametrize("delay", [0, 1])
def test_server_gone_errors_match(daemon_factory, tmp_path, delay):
    """The server is killed and does not come back: qemu-io through a
    re-export of the nbd node fails as it does through qemu-storage-daemon."""
    img = tmp_path / "d.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(4 * MiB))
    outs = []
    for kind in ("qemu", "trio"):
        srv_sock = tmp_path / f"srv-{kind}.sock"
        srv = start_qemu_nbd(img, srv_sock, export="disk")
        try:
            sock = tmp_path / f"client-{kind}.sock"
            d = daemon_factory(kind, [
                "--blockdev", f"driver=nbd,node-name=n,server.type=unix,"
                              f"server.path={srv_sock},export=disk,reconnect-delay={delay}",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=re,node-name=n,name=re,writable=on",
            ])
            uri = f"nbd+unix:///re?socket={sock}"
            before = qemu_io_lines(uri, "write -P 1 0 64k")
        finally:
            srv.kill()
            srv.wait()
        after = qemu_io_lines(uri, "read -P 1 0 4k", "write -P 2 0 4k", "flush",
                              "read 0 4k")
        outs.append((before, after))
        d.stop()
    assert outs[0][0] == [[]]
    assert any(outs[0][1])
    assert outs[1] == outs[0]
