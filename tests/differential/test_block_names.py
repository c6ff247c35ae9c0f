"""File names and backing names in query-named-block-nodes, both daemons.

QEMU spells a node out as ``json:{...}`` when its backing node is not the one
its image header names (given explicitly, null, or renamed by
change-backing-file), resolves relative backing names against the image's
directory (full-backing-filename), and passes force-share down to the
nested file child, so a second read-only view of an image in use opens.

Normalised: the temporary directory, and the order of the node list.
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import HAVE_QEMU, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")


def scenario(d, tmp) -> list:
    q = d.qmp()

    def nodes(tag):
        out = []
        for n in q.cmd("query-named-block-nodes"):
            if n["node-name"].startswith("#"):
                continue  # automatic names: QEMU's carry random digits
            img = n["image"]
            out.append((tag, n["node-name"], n["file"], img.get("backing-filename"),
                        img.get("full-backing-filename"), n.get("backing_file")))
        return sorted(out)

    seen = nodes("open")
    seen.append(q.cmd_raw("change-backing-file", {
        "device": "top", "image-node-name": "top", "backing-file": "other.qcow2"}))
    seen += nodes("renamed")
    return [str(x).replace(str(tmp), "T") for x in seen]


def test_backing_names_and_force_share(daemon_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(src / "base.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(src / "top.qcow2"))
    out = {}
    for kind in ("qemu", "trio"):
        work = tmp_path / kind
        shutil.copytree(src, work)
        f = f"file.driver=file,file.filename={work}"
        d = daemon_factory(kind, allow_stderr=r'warning: Use of "backing": "" is deprecated',
                           args=[
            "--blockdev", f"driver=qcow2,node-name=b,{f}/base.qcow2",
            "--blockdev", f"driver=qcow2,node-name=top,backing=b,{f}/top.qcow2",
            # the header's backing opened implicitly: a plain file name
            "--blockdev", f"driver=qcow2,node-name=top2,{f}/top.qcow2,read-only=on,"
                          "force-share=on",
            # an empty reference still means null (with a deprecation warning)
            "--blockdev", f"driver=qcow2,node-name=top3,backing=,{f}/top.qcow2,"
                          "read-only=on,force-share=on"])
        out[kind] = scenario(d, work)
        d.stop()
        assert 'deprecated; use "backing": null instead' in d.stderr()
    assert any("json:" in line for line in out["trio"])
    assert any("T/other.qcow2" in line for line in out["trio"])
    assert out["trio"] == out["qemu"]
