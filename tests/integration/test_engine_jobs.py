"""The copy jobs over each I/O engine (issue 11): mirror (with a client
writing to the source while it runs), backup, stream and commit, every
image on a file node opened with the engine's ``aio=`` and
``cache.direct``; after a clean shutdown each image passes ``qemu-img
check`` and holds what a model says it must (holes in the source included).
"""

from __future__ import annotations

import json

import pytest

from tests.differential.test_jobs import Transcript
from tests.engines import ENGINES, drop_page_cache, stop_clean
from tests.helpers import qemu_img, qemu_io

from .test_engine_clients import source

MiB = 1 << 20
SIZE = 16 * MiB


def raw_file(path, data: bytes):
    path.write_bytes(data)
    return path


def qcow2_from(path, data: bytes, tmp_path, backing=None):
    """A qcow2 image holding ``data`` (every cluster written, so none of it
    comes from a backing file), or, with ``backing``, an empty overlay."""
    if backing is not None:
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2",
                 str(path), str(SIZE))
        return path
    src = raw_file(tmp_path / f"{path.name}.src", data)
    qemu_img("convert", "-O", "qcow2", "-S", "0", str(src), str(path))
    src.unlink()
    return path


def same(path, model: bytes, tmp_path, fmt: str) -> None:
    ref = raw_file(tmp_path / "ref.raw", model)
    r = qemu_img("compare", "-f", fmt, "-F", "raw", str(path), str(ref), check=False)
    assert r.returncode == 0, f"{path.name}: {r.stdout}{r.stderr}"


def overwrite(model: bytearray, pattern: int, offset: int, length: int) -> str:
    model[offset:offset + length] = bytes([pattern]) * length
    return f"write -P {pattern} {offset} {length}"


@pytest.mark.parametrize("engine", ENGINES)
def test_jobs(daemon_factory, tmp_path, engine):
    src_data = source(11, SIZE)
    src = raw_file(tmp_path / "src.raw", src_data)
    mirror_dst = tmp_path / "mirror.raw"
    qemu_img("create", "-q", "-f", "raw", str(mirror_dst), str(SIZE))
    backup_dst = tmp_path / "backup.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(backup_dst), str(SIZE))
    # stream: base <- top, the top's own writes over the base's data
    base_data = source(12, SIZE)
    base = qcow2_from(tmp_path / "base.qcow2", base_data, tmp_path)
    top = qcow2_from(tmp_path / "top.qcow2", b"", tmp_path, backing=base)
    stream_model = bytearray(base_data)
    qemu_io("-f", "qcow2", "-c", overwrite(stream_model, 0x5C, MiB + 512, 3 * MiB),
            "-c", overwrite(stream_model, 0, 9 * MiB, MiB), str(top))
    # commit: cbase <- cmid <- ctop, cmid committed into cbase
    cbase = qcow2_from(tmp_path / "cbase.qcow2", source(13, SIZE), tmp_path)
    cmid = qcow2_from(tmp_path / "cmid.qcow2", b"", tmp_path, backing=cbase)
    ctop = qcow2_from(tmp_path / "ctop.qcow2", b"", tmp_path, backing=cmid)
    commit_base = bytearray(source(13, SIZE))  # cbase after the commit
    qemu_io("-f", "qcow2", "-c", overwrite(commit_base, 0x6D, 2 * MiB, 5 * MiB + 7),
            str(cmid))
    commit_model = bytearray(commit_base)  # what ctop shows
    qemu_io("-f", "qcow2", "-c", overwrite(commit_model, 0x7E, 4 * MiB, MiB), str(ctop))

    def file(path):
        return f"file.driver=file,file.filename={path}" + engine.keyval("file.")

    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=raw,node-name=src,{file(src)}",
        "--blockdev", f"driver=raw,node-name=mdst,{file(mirror_dst)}",
        "--blockdev", f"driver=qcow2,node-name=bdst,{file(backup_dst)}",
        "--blockdev", f"driver=qcow2,node-name=base,{file(base)}",
        "--blockdev", f"driver=qcow2,node-name=top,backing=base,{file(top)}",
        "--blockdev", f"driver=qcow2,node-name=cbase,{file(cbase)}",
        "--blockdev", f"driver=qcow2,node-name=cmid,backing=cbase,{file(cmid)}",
        "--blockdev", f"driver=qcow2,node-name=ctop,backing=cmid,{file(ctop)}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=src,name=src,writable=on"])
    t = Transcript(d.qmp())
    for path in (src, base, cbase):
        drop_page_cache(path)  # the jobs read through the engine

    # backup first: a point-in-time copy of the source as it is now
    assert "return" in t.cmd("blockdev-backup", {"job-id": "b", "device": "src",
                                                 "target": "bdst", "sync": "full"})
    t.until("JOB_STATUS_CHANGE", id="b", status="null")
    # mirror, with the source written through NBD once the job is ready
    mirror_model = bytearray(src_data)
    assert "return" in t.cmd("blockdev-mirror", {"job-id": "m", "device": "src",
                                                 "target": "mdst", "sync": "full"})
    t.until("BLOCK_JOB_READY", device="m")
    qemu_io("-f", "raw", "-c", overwrite(mirror_model, 0x11, 100, 70_000),
            "-c", overwrite(mirror_model, 0x22, 7 * MiB + 4096, 2 * MiB),
            "-c", "write -z 12M 1M", f"nbd+unix:///src?socket={sock}")
    mirror_model[12 * MiB:13 * MiB] = bytes(MiB)
    assert "return" in t.cmd("job-complete", {"id": "m"})
    t.until("JOB_STATUS_CHANGE", id="m", status="null")
    assert "return" in t.cmd("block-stream", {"job-id": "s", "device": "top"})
    t.until("JOB_STATUS_CHANGE", id="s", status="null")
    assert "return" in t.cmd("block-commit", {"job-id": "c", "device": "ctop",
                                              "top-node": "cmid", "base-node": "cbase"})
    t.until("JOB_STATUS_CHANGE", id="c", status="null")
    completed = [line for line in t.lines if line[:2] == ("event", "BLOCK_JOB_COMPLETED")]
    assert len(completed) == 4 and not any("error" in line[2] for line in completed), completed
    stop_clean(d)

    for img in (backup_dst, base, top, cbase, cmid, ctop):
        qemu_img("check", "-q", str(img))
    same(backup_dst, src_data, tmp_path, "qcow2")
    same(src, mirror_model, tmp_path, "raw")
    same(mirror_dst, mirror_model, tmp_path, "raw")
    same(top, stream_model, tmp_path, "qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert "backing-filename" not in info  # the stream dropped the backing file
    same(ctop, commit_model, tmp_path, "qcow2")
    same(cbase, commit_base, tmp_path, "qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(ctop)).stdout)
    assert info["backing-filename"] == str(cbase)  # cmid left the chain
