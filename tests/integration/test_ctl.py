"""qsd-trio-ctl against real daemons: qsd-trio and, for the commands QEMU
has, qemu-storage-daemon. The tool runs as a subprocess (``python -m
qsd_trio.ctl``) with ``NO_COLOR`` and a fixed ``COLUMNS`` so that what a
user would read is stable; images are checked with qemu-img afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import HAVE_QEMU, qemu_img, qemu_io

MiB = 1024 * 1024

KINDS = ["trio", pytest.param("qemu", marks=pytest.mark.skipif(
    not HAVE_QEMU, reason="qemu-storage-daemon not installed"))]


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="160", TERM="dumb")
    return subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-m", "qsd_trio.ctl",
                           str(daemon.qmp_path), *args],
                          capture_output=True, text=True, timeout=90, env=env,
                          stdin=subprocess.DEVNULL)


def once(daemon, cmd: str, args: dict | None = None) -> dict:
    """One command on a connection of its own, closed at once: a monitor
    serves one client at a time, and the tool needs it next."""
    q = daemon.qmp()
    try:
        return q.cmd_raw(cmd, args or {})
    finally:
        q.close()


def source(tmp_path, pattern: int = 7) -> list[str]:
    img = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(8 * MiB))
    qemu_io("-f", "raw", "-c", f"write -P {pattern} 0 {8 * MiB}", str(img))
    return ["--blockdev", f"driver=file,node-name=srcf,filename={img}",
            "--blockdev", "driver=raw,node-name=src,file=srcf"]


def nulls(name: str) -> list[str]:
    return ["--blockdev", f"driver=null-co,node-name={name},size={8 * MiB}"]


@pytest.mark.parametrize("kind", KINDS)
def test_mirror_pivots_the_export(daemon_factory, tmp_path, kind):
    dst = tmp_path / "dst.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(dst), str(8 * MiB))
    d = daemon_factory(kind, source(tmp_path) + [
        "--blockdev", f"driver=qcow2,node-name=dst,file.driver=file,file.filename={dst}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
        "--export", "type=nbd,id=exp0,node-name=src,writable=on"])

    before = ctl(d, "exports")
    assert before.returncode == 0, before.stderr
    row = next(ln for ln in before.stdout.splitlines() if "exp0" in ln)
    assert "nbd" in row and "src" in row

    p = ctl(d, "mirror", "--from", "src", "--to", "dst", "--sync", "full", "--pivot")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mirror0: blockdev-mirror started" in p.stdout
    assert "mirror0: ready, completing (pivot)" in p.stdout
    assert "mirror0: completed" in p.stdout
    assert "100%" in p.stdout and "8.0/8.0 MiB" in p.stdout
    # the tool dismissed its job
    assert once(d, "query-jobs") == {"return": []}

    after = ctl(d, "exports")
    row = next(ln for ln in after.stdout.splitlines() if "exp0" in ln)
    assert "dst" in row and "src" not in row
    d.stop()
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "src.raw"), str(dst))
    qemu_img("check", str(dst))


@pytest.mark.parametrize("kind", KINDS)
def test_jobs_watch_success(daemon_factory, tmp_path, kind):
    d = daemon_factory(kind, source(tmp_path) + nulls("dst"),
                       allow_stderr=r"The target block device doesn't provide information")
    # rate-limited so the watch sees it run; kept after it concludes, so the
    # watch sees it however early it ends
    assert once(d, "blockdev-backup", {"job-id": "bk0", "device": "src", "target": "dst",
                                       "sync": "full", "speed": 4 * MiB,
                                       "auto-dismiss": False}) == {"return": {}}
    p = ctl(d, "jobs", "--watch")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "bk0: completed" in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("bk0 (backup)"))
    assert "100%" in line and "8.0/8.0 MiB" in line
    listing = ctl(d, "jobs")
    assert listing.returncode == 0
    row = next(ln for ln in listing.stdout.splitlines() if "bk0" in ln)
    assert "concluded" in row and "(100%)" in row


@pytest.mark.parametrize("kind", KINDS)
def test_jobs_watch_fails_with_the_job(daemon_factory, tmp_path, kind):
    img = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(8 * MiB))
    # data, so that the mirror reads the sector with the error (it skips holes)
    qemu_io("-f", "raw", "-c", f"write -P 5 0 {8 * MiB}", str(img))
    d = daemon_factory(kind, [
        "--blockdev", f"driver=raw,node-name=src,file.driver=blkdebug,"
                      f"file.image.driver=file,file.image.filename={img},"
                      f"file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,"
                      f"file.inject-error.0.iotype=read,file.inject-error.0.sector=8192"]
        + nulls("dst"))
    assert once(d, "blockdev-mirror", {"job-id": "m0", "device": "src", "target": "dst",
                                       "sync": "full", "auto-dismiss": False}) == {"return": {}}
    p = ctl(d, "jobs", "--watch")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "m0: failed: Input/output error" in p.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_mirror_failure_exits_non_zero(daemon_factory, tmp_path, kind):
    img = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(8 * MiB))
    # data, so that the mirror reads the sector with the error (it skips holes)
    qemu_io("-f", "raw", "-c", f"write -P 5 0 {8 * MiB}", str(img))
    d = daemon_factory(kind, [
        "--blockdev", f"driver=raw,node-name=src,file.driver=blkdebug,"
                      f"file.image.driver=file,file.image.filename={img},"
                      f"file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,"
                      f"file.inject-error.0.iotype=read,file.inject-error.0.sector=8192"]
        + nulls("dst"))
    p = ctl(d, "mirror", "--from", "src", "--to", "dst", "--pivot", "--job-id", "mx")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "mx: failed: Input/output error" in p.stdout
    assert once(d, "query-jobs") == {"return": []}


@pytest.mark.parametrize("kind", KINDS)
def test_stream_and_commit(daemon_factory, tmp_path, kind):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * MiB))
    qemu_io("-f", "qcow2", "-c", f"write -P 1 0 {4 * MiB}", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io("-f", "qcow2", "-c", f"write -P 2 {4 * MiB} {4 * MiB}", str(top))
    d = daemon_factory(kind, [
        "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={base}",
        "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top},"
                      f"backing=base"])
    p = ctl(d, "commit", "--node", "top", "--pivot")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "commit0: completed" in p.stdout and "100%" in p.stdout
    d.stop()
    qemu_img("check", str(base))
    qemu_io("-f", "qcow2", "-c", f"read -P 1 0 {4 * MiB}", "-c",
            f"read -P 2 {4 * MiB} {4 * MiB}", str(base))


@pytest.mark.parametrize("kind", KINDS)
def test_commit_into_read_only_base_fails(daemon_factory, tmp_path, kind):
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    d = daemon_factory(kind, [
        "--blockdev", f"driver=qcow2,node-name=base,read-only=on,auto-read-only=off,"
                      f"file.driver=file,file.filename={base},file.read-only=on",
        "--blockdev", f"driver=qcow2,node-name=mid,file.driver=file,file.filename={mid},"
                      f"backing=base",
        "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top},"
                      f"backing=mid"])
    want = once(d, "block-commit", {"job-id": "c0", "device": "top", "top-node": "mid",
                                            "base-node": "base"})
    assert "error" in want
    p = ctl(d, "commit", "--node", "top", "--top", "mid", "--base", "base")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"qsd-trio-ctl: block-commit: {want['error']['desc']}" in p.stdout


def test_stream(daemon_factory, tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * MiB))
    qemu_io("-f", "qcow2", "-c", f"write -P 1 0 {8 * MiB}", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    d = daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={base}",
        "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top},"
                      f"backing=base"])
    p = ctl(d, "stream", "--node", "top", "--job-id", "s0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "s0: completed" in p.stdout
    d.stop()
    qemu_img("check", str(top))
    info = qemu_img("info", "--output=json", str(top)).stdout
    assert "backing-filename" not in info
    qemu_io("-f", "qcow2", "-c", f"read -P 1 0 {8 * MiB}", str(top))


def test_tree_and_exports_with_clients(daemon_factory, tmp_path):
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", nulls("n0") + [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=n0"])
    # an NBD client that stays connected while the tool looks
    client = subprocess.Popen(["nbdsh", "-u", f"nbd+unix:///n0?socket={sock}", "-c",
                               "import sys; h.pread(512, 0); print('ok', flush=True); "
                               "sys.stdin.readline()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              # nbdsh runs "python3 -m nbd" from the system Python
                              env=dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"]))
    try:
        assert client.stdout.readline().strip() == "ok"
        tree = ctl(d, "tree")
        assert tree.returncode == 0, tree.stderr
        assert "export nbd export exp0 export-id=exp0 node-names=n0 running" in tree.stdout
        assert "client-connection nbd client of exp0" in tree.stdout
        assert "monitor-session QMP on qmp0" in tree.stdout
        exports = ctl(d, "exports")
        row = next(ln for ln in exports.stdout.splitlines() if "exp0" in ln)
        assert "n0" in row and "none" not in row and "unix" in row
    finally:
        client.communicate("\n", timeout=30)
    exports = ctl(d, "exports")
    row = next(ln for ln in exports.stdout.splitlines() if "exp0" in ln)
    assert "none" in row


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")
def test_tree_unsupported_by_qemu(daemon_factory, tmp_path):
    d = daemon_factory("qemu", nulls("n0"))
    p = ctl(d, "tree")
    assert p.returncode == 1
    assert p.stdout.startswith("qsd-trio-ctl: the daemon does not support x-query-tasks")
    exports = ctl(d, "exports")
    assert exports.returncode == 0


@pytest.mark.parametrize("kind", KINDS)
def test_stats_lists_the_nodes(daemon_factory, tmp_path, kind):
    sock = tmp_path / "nbd.sock"
    d = daemon_factory(kind, source(tmp_path) + [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on"])
    qemu_io("-f", "raw", "-c", "write -P 3 0 64k", "-c", "write -P 4 1M 64k",
            f"nbd+unix:///src?socket={sock}")
    p = ctl(d, "stats")
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[1]: ln.split("│")[1:-1] for ln in p.stdout.splitlines()
            if ln.startswith("│")}
    cells = {n: [c.strip() for c in row] for n, row in rows.items()}
    assert cells["srcf"][1] == "file" and cells["src"][1] == "raw"
    assert cells["src"][2] == str(8 * MiB)
    # wr ops, wr bytes: counted by qsd-trio; zeros from qemu-storage-daemon
    if kind == "trio":
        assert cells["src"][5:7] == ["2", str(2 * 65536)]
        assert cells["srcf"][5:7] == ["2", str(2 * 65536)]
        assert "keeps no per-node counters" not in p.stdout
    else:
        assert cells["src"][5:7] == ["0", "0"]
        assert "this daemon keeps no per-node counters" in p.stdout


def test_unreachable_socket(tmp_path):
    class Gone:
        qmp_path = tmp_path / "none.sock"
    p = ctl(Gone, "jobs")
    assert p.returncode == 2
    assert "cannot connect" in p.stdout
