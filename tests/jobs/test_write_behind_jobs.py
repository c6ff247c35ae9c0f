"""Backup and stream write their target back while they copy (a round
every write_behind.STEP bytes, here 1 MiB), and what they copy is still
exactly the source, checked with qemu-img.  Stream's header change, which
drops the backing file, is the last metadata write."""

from __future__ import annotations

from qsd_trio.jobs import write_behind
from qsd_trio.nodes.file import FileNode
from tests.helpers import qemu_img, qemu_io

SIZE = 8 << 20


def _count_rounds(monkeypatch) -> list[str]:
    paths: list[str] = []
    real = FileNode.write_back

    async def counting(self):
        if not self.read_only:  # a read-only file returns at once
            paths.append(self.path)
        await real(self)

    monkeypatch.setattr(FileNode, "write_back", counting)
    monkeypatch.setattr(write_behind, "STEP", 1 << 20)
    return paths


async def _add(env, name, path, **opts):
    await env.graph.add({"driver": "qcow2", "node-name": name, **opts,
                         "file": {"driver": "file", "filename": str(path)}})


async def test_backup_writes_back_its_target(env, tmp_path, monkeypatch):
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    for p in (src, dst):
        qemu_img("create", "-q", "-f", "qcow2", str(p), str(SIZE))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5a 0 {SIZE - (1 << 20)}", str(src))
    paths = _count_rounds(monkeypatch)
    await _add(env, "src", src)
    await _add(env, "dst", dst)
    await env.qmp("blockdev-backup", job_id="b", device="src", target="dst", sync="full")
    ev = await env.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in ev
    # only the target's file: the source is not written
    assert paths and set(paths) == {str(dst)}
    await env.graph.close_all()
    qemu_img("check", "-q", str(dst))
    qemu_img("compare", "-q", str(src), str(dst))


async def test_stream_writes_back_the_top(env, tmp_path, monkeypatch):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {SIZE}", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 1M 64k", str(top))
    paths = _count_rounds(monkeypatch)
    await _add(env, "base", base)  # writable, but not written: not written back
    await _add(env, "top", top, backing="base")
    await env.qmp("block-stream", job_id="s", device="top")
    ev = await env.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in ev
    assert paths and set(paths) == {str(top)}
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    info = qemu_img("info", "--output=json", str(top)).stdout
    assert "backing-filename" not in info
    out = qemu_io("-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 64k",
                  "-c", f"read -P 0x11 {(1 << 20) + 65536} {SIZE - (1 << 20) - 65536}",
                  str(top)).stdout
    assert "verification failed" not in out


async def test_metadata_is_on_disk_before_the_header_drops_the_backing_file(
        env, tmp_path, monkeypatch):
    """block-stream's header change comes after the copied data's L2 tables
    and refcounts are written: the header is the last metadata write."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {SIZE}", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    await _add(env, "base", base)
    await _add(env, "top", top, backing="base")
    node = env.graph.nodes["top"]
    seen = []
    real = node.rewrite_header

    async def rewrite_header():
        seen.append((set(node.l2cache.dirty), bool(node.refs.dirty)))
        await real()

    monkeypatch.setattr(node, "rewrite_header", rewrite_header)
    await env.qmp("block-stream", job_id="s", device="top")
    ev = await env.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in ev
    assert seen == [(set(), False)]
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
