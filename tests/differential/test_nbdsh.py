"""libnbd's view (nbdsh) of qemu-storage-daemon 7.2 and qsd-trio.

``nbdsh_probe.py`` runs under nbdsh (Debian's python3-libnbd) against each
daemon and records option-level results (NBD_OPT_LIST, NBD_OPT_INFO with
block sizes and transmission flags, NBD_OPT_LIST_META_CONTEXT queries),
structured and simple replies, block status of every meta context, and the
error replies to reads past EOF, writes to a read-only export, bad flags and
FAST_ZERO.  Both daemons must give the same record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Daemon, qemu_img, qemu_io

PROBE = Path(__file__).with_name("nbdsh_probe.py")


def nbdsh_env(sock: str) -> dict:
    env = dict(os.environ, NBD_SOCK=sock)
    # nbdsh runs "python3 -m nbd": the system Python holds the binding, so it
    # must come first even where a virtualenv or pyenv shadows python3
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")
    return env


def probe(sock: str) -> dict:
    p = subprocess.run(["nbdsh", "-n", "-c", f"exec(open({str(PROBE)!r}).read())"],
                       capture_output=True, text=True, timeout=60, env=nbdsh_env(sock))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def start(kind: str, tmp_path: Path) -> tuple[Daemon, str]:
    d = tmp_path / kind
    d.mkdir()
    qemu_img("create", "-f", "qcow2", f"{d}/x.qcow2", "64M")
    qemu_io("-f", "qcow2", "-c", "write -P 0xab 1M 2M", "-c", "write -z 8M 1M",
            "-c", "write -P 7 20M 64k", f"{d}/x.qcow2")
    qemu_img("bitmap", "--add", "--disable", f"{d}/x.qcow2", "b0")
    qemu_img("create", "-f", "qcow2", f"{d}/w.qcow2", "16M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", f"{d}/w.qcow2")
    sock = str(d / "nbd.sock")
    daemon = Daemon(kind, tmp_path, [
        "--blockdev", f"driver=qcow2,node-name=x,file.driver=file,file.filename={d}/x.qcow2",
        "--blockdev", f"driver=qcow2,node-name=w,file.driver=file,file.filename={d}/w.qcow2",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=x,node-name=x,description=read-only,allocation-depth=on,"
                    "bitmaps.0=b0",
        "--export", "type=nbd,id=w,node-name=w,writable=on",
    ])
    return daemon.start(), sock


@pytest.fixture
def daemons(tmp_path):
    started = []
    try:
        for kind in ("qemu", "trio"):
            started.append(start(kind, tmp_path))
        yield {kind: sock for kind, (_d, sock) in zip(("qemu", "trio"), started, strict=True)}
    finally:
        for d, _ in started:
            d.stop()


def test_nbdsh_sees_the_same(daemons):
    assert shutil.which("nbdsh"), "nbdsh (python3-libnbd) is installed by make test"
    seen = {kind: probe(sock) for kind, sock in daemons.items()}
    for part in seen["qemu"]:
        assert seen["trio"][part] == seen["qemu"][part], part
    t = seen["trio"]
    # and it is what the spec and QEMU's documentation promise
    opts = t["options"]
    assert opts["list"] == [["w", ""], ["x", "read-only"]]
    assert opts["info"]["nope"]["opt_info"][1] == "ENOENT"
    assert opts["info"]["x"]["ro"] and not opts["info"]["x"]["fast_zero"]
    assert opts["info"]["w"]["fast_zero"] and opts["info"]["w"]["block"] == [1, 4096, 32 << 20]
    assert opts["list_meta_context"]["(all)"][1] == [
        "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    assert opts["list_meta_context"]["base:allocation nope:x qemu:dirty-bitmap:b0"][1] == [
        "base:allocation", "qemu:dirty-bitmap:b0"]
    x, simple = t["x"], t["x-simple"]
    assert x["structured"] and not simple["structured"]
    M = 1 << 20
    assert x["extents"] == {
        "base:allocation": [[0, [M, 3, 2 * M, 0, 17 * M, 3, 64 << 10, 0, 4 * M - (64 << 10), 3]]],
        "qemu:allocation-depth": [[0, [M, 0, 2 * M, 1, 5 * M, 0, M, 1, 11 * M, 0, 64 << 10, 1,
                                       4 * M - (64 << 10), 0]]],
        "qemu:dirty-bitmap:b0": [[0, [24 * M, 0]]]}
    assert simple["block_status"][1] == "EINVAL" and simple["extents"] == {}
    for key in ("read_past_eof", "read_offset_past_eof", "write_ro", "zero_ro", "trim_ro",
                "read_bad_flags"):
        assert x[key][1] == "EINVAL", key
    assert simple["read_df"][1] == "EINVAL" and x["read_df"] == ["ok", 65536]
    w = t["w"]
    assert w["fast_zero_in_data"][1] == "ENOTSUP" and w["zero_in_data"][0] == "ok"
    assert w["read_back"] == ["ok", ["61", "00", "61"]]
