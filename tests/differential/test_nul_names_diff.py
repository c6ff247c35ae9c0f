"""A NUL in a QMP string, where it becomes bytes in a qcow2 image.

QEMU keeps ``\\u0000`` as modified UTF-8's bytes C0 80 and writes those
bytes wherever the string goes: a backing file name, a persistent dirty
bitmap's name, an internal snapshot's name.  Both daemons run the same QMP
commands on copies of the same image; what they left is compared as
qemu-img reports it and, where nothing in the image depends on the clock,
byte for byte.  Normalised: the image's own path, and a snapshot's date and
time (the clock).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.differential.create_job import run_create
from tests.helpers import HAVE_QEMU, Daemon, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

KINDS = ("qemu", "trio")
MiB = 1 << 20


CLOCK = ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")


def _norm(value: object, img: Path) -> object:
    """``value`` with the image's path as IMG and without a snapshot's times."""
    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in CLOCK}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return strip(json.loads(json.dumps(value).replace(str(img), "IMG")))


def _info(img: Path) -> object:
    return _norm(json.loads(qemu_img("info", "--output=json", "-U", str(img)).stdout), img)


def test_qcow2_create_with_nul_in_backing_names(tmp_path):
    seen = {}
    for kind in KINDS:
        img = tmp_path / f"{kind}.qcow2"
        img.write_bytes(b"")
        with Daemon(kind, tmp_path, ["--blockdev",
                                     f"driver=file,node-name=f,filename={img}"]) as d:
            q = d.qmp()
            out = run_create(q, "c", {"driver": "qcow2", "file": "f", "size": 4 * MiB,
                                      "backing-file": "b\u0000.raw", "backing-fmt": "raw"})
        seen[kind] = (out, img.read_bytes())
    assert seen["trio"] == seen["qemu"]
    assert seen["qemu"][0] == ("job", None) and b"b\xc0\x80.raw" in seen["qemu"][1]


def test_qcow2_bitmap_snapshot_and_backing_names_with_nul(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    seen = {}
    for kind in KINDS:
        img = tmp_path / f"{kind}.qcow2"
        shutil.copy(base, img)
        args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
                "--blockdev", "driver=qcow2,node-name=q,file=f"]
        with Daemon(kind, tmp_path, args) as d:
            q = d.qmp()
            replies = [
                q.cmd_raw("block-dirty-bitmap-add",
                          {"node": "q", "name": "b\u0000", "persistent": True}),
                q.cmd_raw("blockdev-snapshot-internal-sync", {"device": "q", "name": "s\u0000"}),
                q.cmd_raw("query-named-block-nodes", {"flat": True}),
            ]
        info = _info(img)
        # reopened: the names read back from the image as they were written
        with Daemon(kind, tmp_path, args) as d:
            q = d.qmp()
            replies.append(q.cmd_raw("query-named-block-nodes", {"flat": True}))
            replies.append(q.cmd_raw("change-backing-file",
                                     {"device": "q", "image-node-name": "q",
                                      "backing-file": "n\u0000ew"}))
        seen[kind] = (_norm(replies, img), info, _info(img))
    assert seen["trio"] == seen["qemu"]
    assert seen["qemu"][1]["format-specific"]["data"]["bitmaps"][0]["name"] == "b\u0000"
    assert seen["qemu"][1]["snapshots"][0]["name"] == "s\u0000"
