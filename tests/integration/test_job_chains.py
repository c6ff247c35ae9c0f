"""block-stream and block-commit on real qcow2 chains (qsd-trio subprocess).

Chain: base <- mid <- top, each layer with its own data.  After the job the
guest-visible content must be unchanged (byte model), the chain must be the
one QEMU leaves (qemu-img info's backing file), and every image clean.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import qemu_img
from tests.integration.test_job_images import MiB, Model, qemu_io_write, raw_bytes, wait_event

SIZE = 16 * MiB


@pytest.fixture
def chain3(tmp_path):
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    model = Model(SIZE)
    qemu_io_write(str(base), "qcow2", [(0, 4 * MiB, 0x01), (12 * MiB, MiB, 0x02)], model)
    qemu_io_write(str(mid), "qcow2", [(MiB, MiB, 0x11), (8 * MiB, 2 * MiB, 0x12)], model)
    qemu_io_write(str(top), "qcow2", [(MiB + 4096, 8192, 0x21), (9 * MiB, 64 * 1024, 0x22)],
                  model)
    return base, mid, top, model


def blockdevs(base, mid, top):
    return [
        "--blockdev", f"driver=qcow2,node-name=base,read-only=off,"
                      f"file.driver=file,file.filename={base}",
        "--blockdev", f"driver=qcow2,node-name=mid,backing=base,read-only=off,"
                      f"file.driver=file,file.filename={mid}",
        "--blockdev", f"driver=qcow2,node-name=top,backing=mid,"
                      f"file.driver=file,file.filename={top}",
    ]


def backing_of(img) -> str | None:
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    return info.get("backing-filename")


def test_stream_to_base(daemon_factory, tmp_path, chain3):
    base, mid, top, model = chain3
    d = daemon_factory("trio", blockdevs(base, mid, top))
    qmp = d.qmp()
    r = qmp.cmd_raw("block-stream", {"job-id": "s", "device": "top", "base-node": "base"})
    assert r == {"return": {}}, r
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"] and ev["data"]["type"] == "stream"
    d.stop()
    assert backing_of(top) == str(base)
    for img in (base, mid, top):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(top, "qcow2", tmp_path) == bytes(model.data)
    # what mid held now lives in top itself
    m = qemu_img("map", "--output=json", str(top)).stdout
    assert any(e["depth"] == 0 and e["start"] <= 8 * MiB < e["start"] + e["length"]
               and e["data"] for e in json.loads(m))


def test_commit_intermediate(daemon_factory, tmp_path, chain3):
    base, mid, top, model = chain3
    d = daemon_factory("trio", blockdevs(base, mid, top))
    qmp = d.qmp()
    r = qmp.cmd_raw("block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                     "base-node": "base"})
    assert r == {"return": {}}, r
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"] and ev["data"]["type"] == "commit"
    d.stop()
    assert backing_of(top) == str(base)
    for img in (base, top):
        qemu_img("check", "-q", str(img))
    assert raw_bytes(top, "qcow2", tmp_path) == bytes(model.data)


def test_commit_active_ready_complete(daemon_factory, tmp_path, chain3):
    base, mid, top, model = chain3
    d = daemon_factory("trio", blockdevs(base, mid, top))
    qmp = d.qmp()
    r = qmp.cmd_raw("block-commit", {"job-id": "c", "device": "top", "base-node": "base"})
    assert r == {"return": {}}, r
    ev = wait_event(qmp, "BLOCK_JOB_READY")
    assert ev["data"]["type"] == "commit"
    assert qmp.cmd_raw("job-complete", {"id": "c"}) == {"return": {}}
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"]
    d.stop()
    for img in (base, mid, top):
        qemu_img("check", "-q", str(img))
    # base alone now holds the whole disk
    assert raw_bytes(base, "qcow2", tmp_path) == bytes(model.data)


def test_stream_and_commit_errors(daemon_factory, tmp_path, chain3):
    base, mid, top, model = chain3
    d = daemon_factory("trio", blockdevs(base, mid, top))
    qmp = d.qmp()

    def err(cmd, args):
        r = qmp.cmd_raw(cmd, args)
        return r["error"]["desc"]

    assert err("block-stream", {"device": "top"}) == "Invalid job ID ''"
    assert err("block-stream", {"job-id": "s", "device": "top", "base": "x",
                                "base-node": "base"}) == \
        "'base' and 'base-node' cannot be specified at the same time"
    assert err("block-stream", {"job-id": "s", "device": "top", "base-node": "top"}) == \
        "Node 'top' is not a backing image of 'top'"
    assert err("block-stream", {"job-id": "s", "device": "top", "backing-file": "x"}) == \
        "backing file specified, but streaming the entire chain"
    assert err("block-commit", {"job-id": "c", "device": "top", "top-node": "base",
                                "base-node": "base"}) == "cannot commit an image into itself"
    assert err("block-commit", {"job-id": "c", "device": "nope"}) == "Device 'nope' not found"
