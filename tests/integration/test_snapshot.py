"""Snapshots through a running qsd-trio, checked with the real tools.

A client writes over NBD (qemu-io) while the test takes external snapshots
(blockdev-snapshot-sync, blockdev-snapshot) and internal ones; afterwards
``qemu-img check`` must be clean, ``qemu-img info --backing-chain`` must show
the chain, ``qemu-img snapshot -l`` our snapshots, and every image (and every
internal snapshot) must read back as an independent bytearray model says.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20
SIZE = 2 * MiB


def write(uri: str, model: bytearray | None, pattern: int, offset: int, length: int) -> None:
    qemu_io("-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri)
    if model is not None:
        model[offset:offset + length] = bytes([pattern]) * length


def compare(image, model: bytes, tmp_path, *extra: str) -> None:
    ref = tmp_path / "model.raw"
    ref.write_bytes(bytes(model))
    r = qemu_img("compare", *extra, "-F", "raw", str(image), str(ref), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def check(image) -> None:
    r = qemu_img("check", str(image), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


def _start(daemon_factory, tmp_path, base):
    sock = tmp_path / "nbd.sock"
    d = daemon_factory("trio", [
        "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={base}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=base,name=disk,writable=on",
    ])
    return d, d.qmp(), f"nbd+unix:///disk?socket={sock}"


def test_external_snapshot_chain(daemon_factory, tmp_path):
    base, s1, ov = (tmp_path / n for n in ("base.qcow2", "s1.qcow2", "ov.qcow2"))
    qemu_img("create", "-f", "qcow2", str(base), str(SIZE))
    qemu_io("-c", "write -P 0x11 0 256k", str(base))
    model = bytearray(SIZE)
    model[:256 * 1024] = b"\x11" * (256 * 1024)
    d, qmp, uri = _start(daemon_factory, tmp_path, base)

    write(uri, model, 0x22, 192 * 1024, 192 * 1024)
    base_model = bytes(model)  # what base holds when it is frozen
    r = qmp.cmd_raw("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": str(s1),
                                               "snapshot-node-name": "s1"})
    assert r == {"return": {}}
    # partial-cluster writes into the overlay copy the rest from base
    write(uri, model, 0x33, 100 * 1024, 8 * 1024)
    write(uri, model, 0x34, SIZE - 4096, 4096)
    s1_model = bytes(model)

    qemu_img("create", "-f", "qcow2", "-b", str(s1), "-F", "qcow2", str(ov))
    assert qmp.cmd_raw("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None,
                                        "file": {"driver": "file", "filename": str(ov)}}) \
        == {"return": {}}
    assert qmp.cmd_raw("blockdev-snapshot", {"node": "s1", "overlay": "ov"}) == {"return": {}}
    write(uri, model, 0x44, 60 * 1024, 200 * 1024)

    exports = qmp.cmd_raw("query-block-exports")["return"]
    assert [e["node-name"] for e in exports] == ["ov"]
    nodes = {n["node-name"]: n for n in qmp.cmd_raw("query-named-block-nodes",
                                                    {"flat": True})["return"]}
    assert nodes["base"]["ro"] and nodes["s1"]["ro"] and not nodes["ov"]["ro"]
    assert nodes["s1"]["backing_file"] == str(base)
    assert nodes["ov"]["backing_file"] == str(s1)
    # what the client reads now is the whole chain
    out = tmp_path / "read.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert out.read_bytes() == bytes(model)
    qmp.cmd_raw("quit")
    d.wait()

    for img in (base, s1, ov):
        check(img)
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(ov)).stdout)
    assert [i["filename"] for i in info] == [str(ov), str(s1), str(base)]
    assert info[1]["backing-filename"] == str(base)
    assert info[1]["backing-filename-format"] == "qcow2"
    compare(ov, model, tmp_path)
    compare(s1, s1_model, tmp_path)
    compare(base, base_model, tmp_path)


def test_change_backing_file(daemon_factory, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), str(SIZE))
    qemu_io("-c", "write -P 0x5a 0 64k", str(base))
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    d = daemon_factory("trio", ["--blockdev",
                                f"driver=qcow2,node-name=top,file.driver=file,"
                                f"file.filename={top}"])
    qmp = d.qmp()
    # a relative name for the writable top, then for its read-only backing
    assert qmp.cmd_raw("change-backing-file", {"device": "top", "image-node-name": "top",
                                               "backing-file": "base.qcow2"}) == {"return": {}}
    nodes = qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
    top_info = next(n for n in nodes if n["node-name"] == "top")
    assert top_info["image"]["backing-filename"] == "base.qcow2"
    qmp.cmd_raw("quit")
    d.wait()
    check(top)
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    model = bytearray(SIZE)
    model[:64 * 1024] = b"\x5a" * (64 * 1024)
    compare(top, model, tmp_path)

    # the header of a read-only backing node, written while it is open
    qemu_img("rebase", "-u", "-b", str(mid), "-F", "qcow2", str(top))
    d = daemon_factory("trio", ["--blockdev",
                                f"driver=qcow2,node-name=top,file.driver=file,"
                                f"file.filename={top}"])
    qmp = d.qmp()
    nodes = qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
    mid_name = next(n["node-name"] for n in nodes if n["file"] == str(mid))
    assert qmp.cmd_raw("change-backing-file", {"device": "top", "image-node-name": mid_name,
                                               "backing-file": "base.qcow2"}) == {"return": {}}
    qmp.cmd_raw("quit")
    d.wait()
    check(mid)
    assert json.loads(qemu_img("info", "--output=json", str(mid)).stdout)[
        "backing-filename"] == "base.qcow2"
    compare(top, model, tmp_path)


@pytest.mark.parametrize("cluster_size", [65536, 4096])
def test_internal_snapshots(daemon_factory, tmp_path, cluster_size):
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(img),
             str(SIZE))
    qemu_io("-c", "write -P 0x01 0 1M", str(img))
    model = bytearray(SIZE)
    model[:MiB] = b"\x01" * MiB
    d, qmp, uri = _start(daemon_factory, tmp_path, img)
    assert qmp.cmd_raw("blockdev-snapshot-internal-sync",
                       {"device": "base", "name": "a"}) == {"return": {}}
    snap_a = bytes(model)
    write(uri, model, 0x02, 4096, 300 * 1024)
    assert qmp.cmd_raw("blockdev-snapshot-internal-sync",
                       {"device": "base", "name": "b"}) == {"return": {}}
    snap_b = bytes(model)
    write(uri, model, 0x03, 0, 8192)
    write(uri, model, 0x04, MiB + 512, 70000)
    nodes = qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
    snaps = next(n for n in nodes if n["node-name"] == "base")["image"]["snapshots"]
    assert [(s["id"], s["name"]) for s in snaps] == [("1", "a"), ("2", "b")]
    qmp.cmd_raw("quit")
    d.wait()
    check(img)
    listing = qemu_img("snapshot", "-l", str(img)).stdout
    assert " a " in listing and " b " in listing
    compare(img, model, tmp_path)
    for name, want in (("a", snap_a), ("b", snap_b)):
        out = tmp_path / f"snap-{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        assert out.read_bytes() == want

    # delete one of them while a client keeps writing to the active layer
    d, qmp, uri = _start(daemon_factory, tmp_path, img)
    r = qmp.cmd_raw("blockdev-snapshot-delete-internal-sync", {"device": "base", "name": "a"})
    info = r["return"]
    assert (info["id"], info["name"], info["vm-state-size"]) == ("1", "a", 0)
    write(uri, model, 0x05, 0, 128 * 1024)
    qmp.cmd_raw("quit")
    d.wait()
    check(img)
    listing = qemu_img("snapshot", "-l", str(img)).stdout
    assert " a " not in listing and " b " in listing
    compare(img, model, tmp_path)
    out = tmp_path / "snap-b2.raw"
    qemu_img("convert", "-l", "snapshot.name=b", "-O", "raw", str(img), str(out))
    assert out.read_bytes() == snap_b
