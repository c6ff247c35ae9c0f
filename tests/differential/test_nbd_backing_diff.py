"""Backing files named by an NBD URL or a ``json:`` file name, against
qemu-storage-daemon 7.2.

An image header may name its backing file ``nbd+unix:///e?socket=...``,
``nbd://host:port/e``, ``nbd:unix:PATH:exportname=e`` or
``json:{"driver": "nbd", ...}``; QEMU then opens the backing through
driver=nbd (bdrv_find_protocol), under a node of the header's format, or
probed when it records none (qcow v1).  Both daemons open the same images
against one qemu-nbd server and must answer blockdev-add alike, list the
same nodes in query-named-block-nodes, read the same data through the
backing, and fail alike once the server is gone.

Normalised: the ``#blockNNN`` names of implicit nodes (QEMU appends a
random two-digit number to its counter, id_generate).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import HAVE_QEMU, qemu_img, qemu_io
from tests.nbd_servers import start_qemu_nbd

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


@pytest.fixture
def server(tmp_path):
    """qemu-nbd serving export "e" of a 4 MiB raw image whose first MiB is
    pattern 7; yields (socket, image, process)."""
    img = tmp_path / "base.img"
    qemu_img("create", "-q", "-f", "raw", str(img), str(4 * MiB))
    qemu_io("-f", "raw", "-c", "write -P 7 0 1M", str(img))
    sock = tmp_path / "s.sock"
    proc = start_qemu_nbd(img, sock, export="e", shared=32)
    yield sock, img, proc
    proc.kill()
    proc.wait()


def overlay(tmp_path, name: str, backing: str, fmt: str | None, kind: str = "qcow2"):
    """An image of format ``kind`` whose header names ``backing`` (written
    without opening it: -u)."""
    path = tmp_path / name
    args = ["create", "-q", "-f", kind, "-u", "-b", backing]
    if fmt:
        args += ["-F", fmt]
    qemu_img(*args, str(path), str(4 * MiB))
    return path


def normalised(reply) -> str:
    return re.sub(r"#block\d+", "#block", json.dumps(reply, sort_keys=True))


def test_backing_names_open_alike(daemon_factory, tmp_path, server):
    sock = server[0]
    unix = {"type": "unix", "path": str(sock)}
    url = f"nbd+unix:///e?socket={sock}"
    images = [
        ("qcow2", overlay(tmp_path, "url.qcow2", url, "raw")),
        ("qcow2", overlay(tmp_path, "url-nbd.qcow2", url, "nbd")),
        ("qcow2", overlay(tmp_path, "legacy.qcow2", f"nbd:unix:{sock}:exportname=e", "raw")),
        ("qcow2", overlay(tmp_path, "json-raw.qcow2",
                          "json:" + json.dumps({"driver": "raw", "file": {
                              "driver": "nbd", "server": unix, "export": "e"}}), "raw")),
        ("qcow2", overlay(tmp_path, "json-dotted.qcow2",
                          "json:" + json.dumps({"file.driver": "nbd", "file.server.type": "unix",
                                                "file.server.path": str(sock),
                                                "file.export": "e"}), "raw")),
        ("qcow2", overlay(tmp_path, "json-nbd.qcow2",
                          "json:" + json.dumps({"driver": "nbd", "server": unix,
                                                "export": "e"}), "nbd")),
        # probed: qcow v1 has no field for the format qemu-img is given
        ("qcow", overlay(tmp_path, "url.qcow", url, "raw", "qcow")),
        ("qed", overlay(tmp_path, "url.qed", url, "raw", "qed")),
        # a json: name without a driver: its file probed (no format in qcow)
        ("qcow", overlay(tmp_path, "json-file.qcow",
                         "json:" + json.dumps({"file": {"driver": "nbd", "server": unix,
                                                        "export": "e"}}), "raw", "qcow")),
        ("qcow", overlay(tmp_path, "json-neither.qcow",
                         "json:" + json.dumps({"server": unix, "export": "e"}), "raw", "qcow")),
        # errors
        ("qcow2", overlay(tmp_path, "nbds.qcow2", "nbds://127.0.0.1/e", "raw")),
        ("qcow2", overlay(tmp_path, "nbds-unix.qcow2", f"nbds+unix:///e?socket={sock}", "nbd")),
        ("qcow2", overlay(tmp_path, "tcp.qcow2", "nbd://127.0.0.1:1/e", "raw")),
        ("qcow2", overlay(tmp_path, "gone.qcow2",
                          f"nbd+unix:///e?socket={tmp_path / 'none.sock'}", "raw")),
        ("qcow2", overlay(tmp_path, "noexport.qcow2", f"nbd+unix:///x?socket={sock}", "raw")),
        ("qcow2", overlay(tmp_path, "badurl.qcow2", f"nbd+unix:///e?socket={sock}&x=1", "raw")),
        ("qcow2", overlay(tmp_path, "json-nbd-raw.qcow2",
                          "json:" + json.dumps({"driver": "nbd", "server": unix,
                                                "export": "e"}), "raw")),
        ("qcow2", overlay(tmp_path, "json-bogus.qcow2",
                          "json:" + json.dumps({"driver": "nbd", "server": unix, "export": "e",
                                                "bogus": 1}), "nbd")),
        ("qcow2", overlay(tmp_path, "json-short.qcow2", 'json:{"driver":', "raw")),
        ("qcow2", overlay(tmp_path, "json-list.qcow2", "json:[1]", "raw")),
        ("qcow2", overlay(tmp_path, "unknown.qcow2", "NBD://127.0.0.1/e", "raw")),
        ("qcow2", overlay(tmp_path, "null.qcow2", "null-co://x", "raw")),
    ]
    got = []
    for kind in ("qemu", "trio"):
        daemon = daemon_factory(kind)
        qmp = daemon.qmp()
        replies = []
        for i, (fmt, path) in enumerate(images):
            qmp.cmd_raw("blockdev-add", {"driver": "file", "node-name": f"f{i}",
                                         "filename": str(path)})
            replies.append(qmp.cmd_raw("blockdev-add", {"driver": fmt, "node-name": f"n{i}",
                                                        "file": f"f{i}"}))
        got.append((replies, normalised(qmp.cmd_raw("query-named-block-nodes"))))
        daemon.stop()  # the next daemon takes the images' write locks
    assert sum("error" in r for r in got[0][0]) == 13
    assert got[1][0] == got[0][0]
    assert got[1][1] == got[0][1]
    assert '"drv": "nbd"' in got[0][1]


def test_data_through_an_nbd_backing(daemon_factory, tmp_path, server):
    """Each daemon opens its own overlay of the served image, exports it,
    and a client writes into it: what both read back equals the model (the
    backing's pattern under the overlay's writes), qemu-img map agrees, the
    overlays check clean; with the server gone, reads of what the backing
    holds fail alike."""
    sock, _, proc = server
    url = f"nbd+unix:///e?socket={sock}"
    model = bytearray(4 * MiB)
    model[:MiB] = b"\7" * MiB
    model[512 * 1024:576 * 1024] = b"\x09" * 65536
    exports = {}
    for kind in ("qemu", "trio"):
        top = overlay(tmp_path, f"top-{kind}.qcow2", url, "raw")
        exp = tmp_path / f"exp-{kind}.sock"
        daemon_factory(kind, [
            "--blockdev", f"driver=file,node-name=f,filename={top}",
            "--blockdev", "driver=qcow2,node-name=q,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={exp}",
            "--export", "type=nbd,id=x,node-name=q,name=x,writable=on",
        ])
        exports[kind] = (top, f"nbd+unix:///x?socket={exp}")
        qemu_io("-f", "raw", "-c", "write -P 9 512k 64k", exports[kind][1])
    model_path = tmp_path / "model.img"
    model_path.write_bytes(bytes(model))
    maps = []
    for kind in ("qemu", "trio"):
        qemu_img("compare", "-f", "raw", "-F", "raw", str(model_path), exports[kind][1])
        maps.append(qemu_img("map", "--output=json", "-f", "raw", exports[kind][1]).stdout)
    assert maps[1] == maps[0]
    for kind in ("qemu", "trio"):
        # the overlay is open in the daemon: -U to look without its lock
        qemu_img("check", "-U", str(exports[kind][0]))
    proc.kill()
    proc.wait()
    fails = []
    for kind in ("qemu", "trio"):
        p = qemu_io("-f", "raw", "-c", "read -P 7 0 4k", "-c", "read -P 9 512k 4k",
                    exports[kind][1], check=False)
        fails.append([ln for ln in (p.stdout + p.stderr).splitlines() if "failed" in ln])
    assert fails[0] == ["read failed: Input/output error"]
    assert fails[1] == fails[0]


def test_vmdk_parent_over_nbd(daemon_factory, tmp_path):
    """A vmdk whose parentFileNameHint is an NBD URL of a served vmdk parent:
    both daemons open the parent as vmdk over driver=nbd, list the same
    nodes, and read the parent's data through the child."""
    parent, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(parent), str(4 * MiB))
    qemu_io("-f", "vmdk", "-c", "write -P 3 0 1M", str(parent))
    # a descriptor file (twoGbMaxExtentSparse), so the hint can be edited
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
             "-b", str(parent), "-F", "vmdk", str(child))
    sock = tmp_path / "v.sock"
    proc = start_qemu_nbd(parent, sock, export="v")
    try:
        text = child.read_text()
        child.write_text(text.replace(f'parentFileNameHint="{parent}"',
                                      f'parentFileNameHint="nbd+unix:///v?socket={sock}"'))
        got = []
        for kind in ("qemu", "trio"):
            exp = tmp_path / f"exp-{kind}.sock"
            daemon = daemon_factory(kind, [
                "--blockdev", f"driver=file,node-name=f,filename={child}",
                "--blockdev", "driver=vmdk,node-name=c,file=f,read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={exp}",
                "--export", "type=nbd,id=x,node-name=c,name=x"])
            nodes = normalised(daemon.qmp().cmd_raw("query-named-block-nodes"))
            p = qemu_io("-r", "-f", "raw", "-c", "read -P 3 0 1M", "-c", "read -P 0 1M 3M",
                        f"nbd+unix:///x?socket={exp}")
            got.append((nodes, [ln for ln in p.stdout.splitlines() if "failed" in ln]))
            daemon.stop()
        assert '"drv": "nbd"' in got[0][0]
        assert got[1] == got[0]
    finally:
        proc.kill()
        proc.wait()
