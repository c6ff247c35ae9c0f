"""Block QMP commands, differential: the same --blockdev lines and QMP
transcript against qemu-storage-daemon 7.2 and qsd-trio.

Normalised only: each daemon's own image directory (both get identical
copies, so paths differ) and the number in auto-generated "#blockNNN"
names (QEMU's counter also counts other internal ids)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.helpers import HAVE_QEMU, Daemon

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def transcript(d: str) -> list[tuple[str, dict]]:
    return [
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1",
                          "file": {"driver": "file", "filename": f"{d}/b.raw"}}),
        ("blockdev-add", {"driver": "file", "node-name": "x", "filename": f"{d}/nope"}),
        ("blockdev-add", {"driver": "file", "node-name": "x", "filename": d}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": "nope"}),
        ("blockdev-add", {"driver": "raw", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "9x", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "a" * 32, "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": "f0", "offset": 4 * MiB}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": "f0", "offset": 512,
                          "size": 2 * MiB}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": "f0",
                          "force-share": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "x", "file": "f0",
                          "detect-zeroes": "unmap"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
        ("blockdev-add", {"driver": "file", "node-name": "ro", "filename": f"{d}/b.raw",
                          "read-only": True, "force-share": True, "cache": {"no-flush": True}}),
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "c0", "file": "ro"}),
        ("query-named-block-nodes", {"flat": True}),
        ("x-debug-query-block-graph", {}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "b0"}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "b1", "granularity": 512,
                                    "disabled": True}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "b0"}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "b2", "granularity": 1000}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": "b2", "persistent": True}),
        ("block-dirty-bitmap-add", {"node": "r0", "name": ""}),
        ("block-dirty-bitmap-add", {"node": "nope", "name": "b"}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "r0", "name": "b1"}),
        ("block-dirty-bitmap-enable", {"node": "r0", "name": "b1"}),
        ("block-dirty-bitmap-merge", {"node": "r0", "target": "b1", "bitmaps": ["b0"]}),
        ("block-dirty-bitmap-disable", {"node": "r0", "name": "b0"}),
        ("block-dirty-bitmap-clear", {"node": "r0", "name": "b0"}),
        ("block-dirty-bitmap-remove", {"node": "r0", "name": "b9"}),
        ("query-named-block-nodes", {}),
        ("block-dirty-bitmap-remove", {"node": "r0", "name": "b1"}),
        ("block-set-write-threshold", {"node-name": "nope", "write-threshold": 1}),
        ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 4096}),
        ("block_resize", {"node-name": "nope", "size": 4096}),
        ("block_resize", {"device": "nope", "size": 4096}),
        ("block_resize", {"node-name": "f0", "size": -1}),
        ("block_resize", {"node-name": "ro", "size": 4096}),
        ("blockdev-add", {"driver": "raw", "node-name": "w0", "file": "f0", "size": MiB}),
        ("block_resize", {"node-name": "f0", "size": 2 * MiB}),
        ("x-debug-query-block-graph", {}),
        ("blockdev-del", {"node-name": "w0"}),
        ("block_resize", {"node-name": "r0", "size": 3 * MiB}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "nope"}),
        ("query-named-block-nodes", {"flat": True}),
        ("query-blockstats", {}),
        ("query-blockstats", {"query-nodes": True}),
        ("query-block", {}),
        ("blockdev-del", {"node-name": "c0"}),
        ("blockdev-del", {"node-name": "r1"}),
        ("blockdev-del", {"node-name": "r0"}),
        ("blockdev-del", {"node-name": "f0"}),
        ("query-named-block-nodes", {}),
    ]


def run(kind: str, tmp_path) -> list:
    d = tmp_path / kind
    d.mkdir()
    (d / "a.raw").write_bytes(b"\1" * MiB)
    (d / "b.raw").write_bytes(bytes(MiB))
    args = ["--blockdev", f"driver=file,node-name=f0,filename={d}/a.raw"]
    out = []
    with Daemon(kind, tmp_path, args) as daemon:
        qmp = daemon.qmp()
        for name, a in transcript(str(d)):
            r = qmp.cmd_raw(name, a) if hasattr(qmp, "cmd_raw") else qmp.cmd(name, a)
            r.pop("id", None)
            out.append((name, r))
    text = json.dumps(out, sort_keys=True).replace(str(d), "<dir>")
    return json.loads(re.sub(r"#block\d+", "#block", text))


def _diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return "".join(_diff(a.get(k), b.get(k), f"{path}.{k}") for k in sorted({*a, *b}))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return "".join(_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    return "" if a == b else f"  {path}: ours {a!r} theirs {b!r}\n"


def test_block_commands_match_qemu(tmp_path):
    ours, theirs = run("trio", tmp_path), run("qemu", tmp_path)
    diffs = [f"{name} {a}:\n{_diff(o, t)}"
             for (name, a), o, t in zip(transcript("<dir>"), ours, theirs, strict=True)
             if o != t]
    assert not diffs, "\n".join(diffs)
    shutil.rmtree(tmp_path / "trio")
